"""What one turn runs with and has done so far, and what every step of it shares.

``TurnOptions`` are one turn's own settings (given to ``send()``/``stream()``);
``_TurnSettings`` the session's settings with them applied; ``_Turn`` what a running
turn has done so far. ``LoopState`` declares the session state the steps read and write
(``Session`` sets it) and the session methods they call; the steps themselves are
``_turn_request.RequestSteps``, ``_turn_reply.ReplySteps`` and ``_turn.TurnLoop``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._assembler import ReplyAssembler
from ._client import ModelClient
from ._compaction import Compactor
from ._events import ErrorEvent, Event
from ._exceptions import ModelAPIError
from ._history import TokenEstimator
from ._limits import Budgets, Guardrail, Projection
from ._output import OutputMode, OutputSpec
from ._runner import TurnRunner
from ._text import redact
from ._tools import ToolSet
from ._types import Message, ToolCall, ToolCallRecord, TurnStatus, Usage
from ._wire import PrefixCache

__all__ = ["LoopState", "TurnOptions", "fault_text"]


@dataclass(frozen=True)
class TurnOptions:
    """Settings for one turn only, given to ``send()``/``stream()``; ``None`` keeps the session's.

    ``tools`` replaces the session's tools for the turn (``()`` for none);
    ``budget_usd`` limits what this turn may spend (on top of the session's limits);
    ``request_params`` are merged over the session's; ``isolated`` sends the turn with
    the system prompt and its own messages only, not the conversation before it (for
    batch jobs such as ``nbchat.extract``; several isolated turns may run at once).
    """

    model: str | None = None
    tools: Iterable[Any] | None = None
    temperature: float | None = None
    max_rounds: int | None = None
    budget_usd: float | None = None
    stream: bool | None = None
    request_params: dict[str, Any] | None = None
    output_type: Any = None
    isolated: bool = False


@dataclass(frozen=True)
class _TurnSettings:
    """What one turn runs with: the session's settings with the turn's options applied."""

    client: ModelClient
    tools: ToolSet
    max_rounds: int
    streaming: bool
    request_params: dict[str, Any]
    budgets: Budgets
    output: OutputSpec | None = None
    isolated: bool = False


class _Turn:
    """What one turn has done so far."""

    def __init__(self, turn_id: str, cell_id: str | None, settings: _TurnSettings) -> None:
        self.turn_id = turn_id
        self.cell_id = cell_id
        self.settings = settings
        self.started = time.perf_counter()
        self.round = 0
        self.usage = Usage()
        self.tool_calls: list[ToolCallRecord] = []
        self.messages: list[Message] = []
        self.text = ""
        self.status: TurnStatus = "running"  # until the turn ends; then how it ended
        self.error: str | None = None
        self.assembler: ReplyAssembler | None = None  # the request streaming now
        self.reply: ReplyAssembler | None = None  # the last request's reply
        self.failure: ModelAPIError | None = None  # why the last request failed
        self.projection: Projection | None = None  # the last request's estimate
        self.unanswered: list[ToolCall] = []
        self.extra_requests = 0  # summaries, and requests refused as too long and retried
        self.bad_names: dict[str, str] = {}  # call id -> the unusable name the model gave
        self.tools_started: float | None = None  # when this round's tools began to run
        self.output: Any = None  # the validated typed answer
        self.truncated = False  # a reply was cut at max_tokens (finish_reason "length")
        self.output_mode: OutputMode = "json_schema"  # how the answer's type is asked for
        self.output_tries = 0
        self.ask_again = False  # the answer did not validate: another request follows
        self.compactions = 0


class LoopState:
    """What the steps of a turn share: the state ``Session`` sets, the methods it provides."""

    id: str
    usage: Usage
    reasoning_replay: Literal["auto", "always", "never"]
    output_mode: OutputMode
    output_retries: int
    compactor: Compactor | None
    estimator: TokenEstimator
    input_guardrails: list[Guardrail]
    output_guardrails: list[Guardrail]
    _messages: list[Message]
    _reserved_usd: float
    _wire: PrefixCache[Message, dict[str, Any]]
    _wire_replay: tuple[str, str, str] | None
    _notices_given: set[str]
    _runner: TurnRunner[Event]

    if TYPE_CHECKING:  # what Session provides

        @property
        def pending_tool_calls(self) -> list[ToolCall]: ...
        def _emit(self, event: Event) -> Event: ...
        async def _barrier(self) -> None: ...
        def _record(
            self, message: Message, turn: _Turn | None = None, *, seq: int | None = None
        ) -> Event: ...
        def _add(self, message: Message, turn: _Turn | None = None) -> Event: ...
        def _turn_settings(self, options: TurnOptions | None) -> _TurnSettings: ...

    def _turn_error(self, turn: _Turn, kind: str) -> Event:
        """The error event of a turn that ends failed; ``turn.error`` says why."""
        return self._emit(
            ErrorEvent(
                session_id=self.id,
                turn_id=turn.turn_id,
                message=turn.error or kind,
                error_kind=kind,
            )
        )


def fault_text(turn: _Turn, exc: Exception) -> str:
    """What the store says of a turn or request an exception ended (the key redacted)."""
    key = turn.settings.client.settings.api_key.get_secret_value()
    return redact(f"{type(exc).__name__}: {exc}", key)
