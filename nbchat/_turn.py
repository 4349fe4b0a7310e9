"""One turn of the loop, as named steps: start → prepare_request → send_request →
take_reply / request_failed → run_tools → … → finish.

``TurnLoop`` holds the steps and is mixed into ``Session``, whose state they use
(declared below); ``_Turn`` is what a running turn has done so far, ``_TurnSettings``
what it runs with (the session's settings with the turn's ``TurnOptions`` applied).
Every step emits typed events; the session hands each to the store first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._client import ModelClient, ReplyAssembler, truncation_notice
from ._compaction import Compactor
from ._exceptions import GuardrailRejected, ModelAPIError
from ._history import TokenEstimator, is_context_overflow
from ._limits import Budgets, Guardrail, Projection, apply_guardrails
from ._output import FINAL_ANSWER_TOOL, OutputMode, OutputSpec, Parsed
from ._runner import TurnRunner
from ._text import redact, valid_text
from ._tools import INVALID_TOOL_NAME, ToolSet, error_payload, valid_tool_name
from ._types import (
    ErrorEvent,
    Event,
    ImagePart,
    LimitReached,
    Message,
    MessagesMarked,
    MessageStatus,
    Notice,
    RequestUsage,
    TextDelta,
    ToolCall,
    ToolCallRecord,
    ToolResult,
    TurnFinished,
    TurnResult,
    TurnStarted,
    TurnStatus,
    Usage,
    UsageEvent,
    new_id,
)

__all__ = ["MAX_ROUNDS_NOTE", "REASONING_FIELDS", "TurnLoop", "TurnOptions"]

# The field reasoning is sent back in, per wire: chat completions (DeepSeek's and vLLM's
# name), and the Responses API's reasoning items (which _responses puts before the calls).
REASONING_FIELDS = {"chat": "reasoning_content", "responses": "reasoning_items"}
MAX_ROUNDS_NOTE = (
    "You have reached the limit on tool calls for this turn. Do not call tools; "
    "answer now as well as you can with the information you already have."
)


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


class TurnLoop:
    """The steps of one turn (mixed into ``Session``, which sets the state below)."""

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
    _wire: dict[str, tuple[Any, Any, dict[str | None, dict[str, Any]]]]
    _notices_given: set[str]
    _runner: TurnRunner[Event]

    if TYPE_CHECKING:  # what Session provides

        @property
        def pending_tool_calls(self) -> list[ToolCall]: ...
        def _emit(self, event: Event) -> Event: ...
        async def _barrier(self) -> None: ...
        def _record(self, message: Message, turn: _Turn | None = None) -> Event: ...
        def _add(self, message: Message, turn: _Turn | None = None) -> Event: ...
        def _turn_settings(self, options: TurnOptions | None) -> _TurnSettings: ...

    async def _turn(
        self,
        text: str | None,
        cell_id: str | None,
        *,
        resume: bool = False,
        options: TurnOptions | None = None,
        turn_id: str | None = None,
        images: list[ImagePart] | None = None,
    ) -> AsyncIterator[Event]:
        settings = self._turn_settings(options)
        if resume:
            last = next(m for m in reversed(self._messages) if m.role == "assistant")
            turn = _Turn(last.turn_id or new_id(), last.cell_id, settings)
        else:
            turn = _Turn(turn_id or new_id(), cell_id, settings)
        if settings.output is not None:
            endpoint = settings.client.settings.base_url
            refused = endpoint in _NO_RESPONSE_FORMAT
            auto: OutputMode = "tool" if refused else "json_schema"
            turn.output_mode = auto if self.output_mode == "auto" else self.output_mode
        yield self._emit(
            TurnStarted(
                session_id=self.id,
                turn_id=turn.turn_id,
                text=text or "",
                cell_id=cell_id,
                attachments=images or None,
            )
        )
        fault: Exception | None = None
        try:
            if resume:
                async for event in self._run_tools(turn, self.pending_tool_calls):
                    yield event
            else:
                assert text is not None
                for event in self._start(turn, text, images):
                    yield event
            while turn.status == "running":
                async for event in self._request_model(turn):
                    yield event
                if turn.ask_again:  # a typed answer did not validate: one more try
                    turn.ask_again = False
                    turn.round += 1
                    continue
                if turn.status != "running" or not turn.unanswered:
                    break
                async for event in self._run_tools(turn, turn.unanswered):
                    yield event
                turn.round += 1
        except asyncio.CancelledError:
            for event in self._interrupted(turn):
                yield event
        except Exception as exc:  # a bug (nbchat's, or a hook's or guardrail's): raised below
            fault = exc
            turn.status, turn.error = "error", _fault(turn, exc)
            yield self._turn_error(turn, "internal")
        yield self._finish(turn)  # stored as failed, never left "running"
        # A stop that comes after the turn ended (■ or Ctrl-C as it finishes) has nothing
        # left to stop; the writer keeps going in the background.
        with contextlib.suppress(asyncio.CancelledError):
            await self._barrier()  # a turn is stored by the time send() returns
        if fault is not None:
            raise fault  # with its traceback: a bug should be seen, not summed up

    def _start(self, turn: _Turn, text: str, images: list[ImagePart] | None) -> Iterable[Event]:
        """Guard the user's text, fork the conversation on a cell re-run, add the message."""
        if turn.cell_id is not None:
            yield from self._supersede_cell(turn.cell_id)
        text = valid_text(text)
        try:
            text = apply_guardrails(text, self.input_guardrails)
        except GuardrailRejected as exc:
            turn.status, turn.error = "rejected", f"Input rejected by a guardrail: {exc}"
            yield self._record(
                Message(
                    role="user",
                    content=text,
                    attachments=images or None,
                    turn_id=turn.turn_id,
                    cell_id=turn.cell_id,
                    status="rejected",
                    state="superseded",
                ),
                turn,
            )
            yield self._turn_error(turn, "guardrail")
            return
        message = Message(
            role="user",
            content=text,
            attachments=images or None,
            turn_id=turn.turn_id,
            cell_id=turn.cell_id,
        )
        yield self._add(message, turn)

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

    def _supersede_cell(self, cell_id: str) -> Iterable[Event]:
        """Re-running a cell replaces its earlier turn and everything after it."""
        start = next(
            (i for i, m in enumerate(self._messages) if m.role == "user" and m.cell_id == cell_id),
            None,
        )
        if start is None:
            return
        dropped, self._messages = self._messages[start:], self._messages[:start]
        for m in dropped:
            m.state = "superseded"
        yield self._emit(
            MessagesMarked(
                session_id=self.id, message_ids=[m.id for m in dropped], state="superseded"
            )
        )

    async def _request_model(self, turn: _Turn) -> AsyncIterator[Event]:
        """One round's request: check limits → send it → take the reply into the history."""
        final = turn.round >= turn.settings.max_rounds
        tools = None if final else turn.settings.tools.specs() or None
        output = turn.settings.output
        if output is not None and turn.output_mode == "tool":
            tools = [*(tools or []), output.tool_spec()]  # even in the last round
        async for event in self._prepare_request(turn, tools):
            yield event
        if turn.status != "running":
            return
        async for event in self._send_request(turn, tools, final):
            yield event
        assembler = turn.reply
        if turn.status != "running" or assembler is None:
            return
        if turn.failure is not None:
            for event in self._request_failed(turn, assembler, turn.failure):
                yield event
            return
        for event in self._take_reply(turn, assembler, final):
            yield event

    async def _prepare_request(
        self, turn: _Turn, tools: list[dict[str, Any]] | None
    ) -> AsyncIterator[Event]:
        """Budgets from what was spent, compaction, then the budget the request would need."""
        for event in self._check_budgets(turn):
            yield event
        if turn.status == "running":
            async for event in self._maybe_compact(turn, tools):
                yield event
        if turn.status != "running":
            return
        turn.projection = self._projection(turn, tools)
        for event in self._check_budgets(turn, next_request=turn.projection):
            yield event

    async def _send_request(
        self, turn: _Turn, tools: list[dict[str, Any]] | None, final: bool
    ) -> AsyncIterator[Event]:
        """Stream the request's reply; a prompt refused as too long is compacted, retried once.

        The reply is left in ``turn.reply``, and the error that ended it (if one did) in
        ``turn.failure``.
        """
        # Output guardrails judge the whole reply, so its text is shown once they passed it.
        hold_text = bool(self.output_guardrails)
        retried = False
        while True:
            payload = self._wire_messages(turn)
            if final:
                payload.append({"role": "system", "content": MAX_ROUNDS_NOTE})
            params = turn.settings.request_params
            output = turn.settings.output
            if output is not None:
                payload.append({"role": "system", "content": output.instruction(turn.output_mode)})
                if turn.output_mode == "json_schema":
                    params = {**params, "response_format": output.response_format()}
            assembler = ReplyAssembler(self.id, turn.turn_id, turn.round)
            turn.assembler = turn.reply = assembler
            turn.failure = None
            reserved = turn.projection.cost_usd if turn.projection else None
            self._reserved_usd += reserved or 0.0
            try:
                settings = turn.settings
                async for event in settings.client.astream(
                    payload, assembler, tools=tools, stream=settings.streaming, **params
                ):
                    if not (hold_text and event.kind == "text_delta"):
                        yield self._emit(event)
            except ModelAPIError as exc:
                turn.failure = exc
            except Exception as exc:  # not the server's: the request is recorded as failed too
                turn.failure = ModelAPIError(_fault(turn, exc))
                raise
            finally:
                # Runs on cancellation too: a request that was cut short is still recorded.
                self._reserved_usd -= reserved or 0.0
                usage_event = self._record_usage(turn, assembler, turn.failure, turn.projection)
            yield usage_event
            for event in self._check_budgets(turn, stop=False):
                yield event
            turn.assembler = None
            error = turn.failure
            cut = (
                self._truncation_notice(turn, assembler)
                if usage_event.suspected_truncation
                else None
            )
            if cut is not None:  # the server probably dropped the start of the prompt
                yield self._emit(Notice(session_id=self.id, turn_id=turn.turn_id, message=cut))
            elif error is None and assembler.usage is not None and not turn.settings.isolated:
                self.estimator.observe(self._messages, _chars(tools), assembler.usage.prompt_tokens)
            if error is not None and _refuses_response_format(error, turn):
                # This endpoint takes no json_schema: ask through a final_answer tool.
                _NO_RESPONSE_FORMAT.add(turn.settings.client.settings.base_url)
                turn.output_mode = "tool"
                assert output is not None
                tools = [*(tools or []), output.tool_spec()]
                turn.extra_requests += 1  # the refused request is not a round of the turn
                continue
            if (
                error is None
                or retried
                or self.compactor is None
                or assembler.chunks
                or not is_context_overflow(error)
            ):
                return
            # The server refused the prompt as too long: compact once, and retry once.
            retried = True
            compactions = turn.compactions
            async for event in self._maybe_compact(turn, tools, overflow=error):
                yield event
            if turn.status != "running" or turn.compactions == compactions:
                return
            turn.extra_requests += 1  # the refused request is not a round of the turn

    def _request_failed(
        self, turn: _Turn, assembler: ReplyAssembler, error: ModelAPIError
    ) -> Iterable[Event]:
        """End the turn on a failed request, keeping the text that arrived before it."""
        turn.status, turn.error = "error", str(error)
        if assembler.text:
            message = self._assistant(turn, assembler, status="error", with_calls=False)
            yield from self._judge_reply(turn, message, rejection_ends_turn=False)
            if message.state == "active":
                turn.text = message.content or ""
                yield self._add(message, turn)
        yield self._emit(
            ErrorEvent(
                session_id=self.id,
                turn_id=turn.turn_id,
                message=str(error),
                error_kind="model_api",
                status_code=error.status_code,
            )
        )
        refused = error.status_code in _REFUSED_AS_SENT
        if refused and not any(m.role == "assistant" for m in turn.messages):
            yield from self._withdraw(turn)

    def _withdraw(self, turn: _Turn) -> Iterable[Event]:
        """A turn the server refused as sent, before any answer, leaves the conversation
        (stored, marked superseded), as a rejected input does: what it refused (an image a
        text-only model cannot read) would fail every later turn that sent it again."""
        ids = {m.id for m in turn.messages if m.state == "active"}
        if not ids:
            return
        self._messages = [m for m in self._messages if m.id not in ids]
        for m in turn.messages:
            if m.id in ids:
                m.state = "superseded"
        yield self._emit(
            MessagesMarked(session_id=self.id, message_ids=sorted(ids), state="superseded")
        )

    def _take_reply(self, turn: _Turn, assembler: ReplyAssembler, final: bool) -> Iterable[Event]:
        """Judge the reply, add it to the history; its tool calls are what runs next."""
        if assembler.finish_reason == "length":  # the server stopped at max_tokens
            turn.truncated = True
            yield self._emit(
                Notice(
                    session_id=self.id,
                    turn_id=turn.turn_id,
                    message="The reply was cut off at the reply length limit (max_tokens); "
                    "ask the model to continue, or allow a longer reply.",
                )
            )
        message = self._assistant(turn, assembler, status="ok", with_calls=not final)
        if message.content or not message.tool_calls:
            yield from self._judge_reply(turn, message)
            if turn.status != "running":
                return
        if turn.settings.output is not None:
            yield from self._take_output(turn, message)
            return
        if not message.tool_calls:
            turn.text = message.content or ""
            if final and turn.round > 0:  # tool rounds were cut short, not merely absent
                turn.status = "max_rounds"
                yield self._emit(
                    LimitReached(
                        session_id=self.id,
                        turn_id=turn.turn_id,
                        limit="max_rounds",
                        message=f"Stopped after {turn.settings.max_rounds} rounds of tool calls "
                        "(max_rounds); the last answer was asked for without tools.",
                    )
                )
        yield self._add(message, turn)
        turn.unanswered = list(message.tool_calls or [])
        turn.tools_started = None  # asked for, not running yet

    def _take_output(self, turn: _Turn, message: Message) -> Iterable[Event]:
        """Validate a typed answer (the reply's JSON, or the final_answer tool's arguments).

        A valid answer ends the turn; an invalid one is explained to the model, which gets
        ``output_retries`` more tries; then the turn ends ``error`` with the reason.
        """
        spec = turn.settings.output
        assert spec is not None
        answer = next((c for c in message.tool_calls or [] if c.name == FINAL_ANSWER_TOOL), None)
        others = [c for c in message.tool_calls or [] if c.name != FINAL_ANSWER_TOOL]
        if answer is None and others:  # other tools first: run them, as any round
            yield self._add(message, turn)
            turn.unanswered, turn.tools_started = others, None
            return
        if answer is not None:
            parsed = spec.parse(answer.arguments)
        elif turn.output_mode == "tool":
            parsed = Parsed(error=f"no {FINAL_ANSWER_TOOL} call (answer through the tool)")
        else:
            parsed = spec.parse(message.content or "")
        turn.text = message.content or (answer.arguments if answer is not None else "")
        yield self._add(message, turn)
        if message.tool_calls:  # every call gets its answer, so the history stays valid
            for call in message.tool_calls:
                if call is answer:
                    content = (
                        "ok"
                        if parsed.error is None
                        else error_payload("invalid_answer", spec.correction(parsed.error))
                    )
                else:
                    content = error_payload("not_run", "Not run: the final answer was given.")
                yield self._add(_tool_message(turn, call.id, call.name, content, "ok"), turn)
        if parsed.error is None:
            turn.output = parsed.value
            return
        turn.output_tries += 1
        if turn.output_tries > self.output_retries:
            turn.status = "error"
            turn.error = (
                f"The model's answer did not fit {spec.name} after {turn.output_tries} "
                f"tries: {parsed.error}."
            )
            yield self._turn_error(turn, "invalid_output")
            return
        if answer is None:  # the correction goes to the model as the user's next words
            correction = Message(
                role="user",
                content=spec.correction(parsed.error),
                turn_id=turn.turn_id,
                round=turn.round,
                cell_id=turn.cell_id,
            )
            yield self._add(correction, turn)
        turn.ask_again = True

    def _judge_reply(
        self, turn: _Turn, message: Message, *, rejection_ends_turn: bool = True
    ) -> Iterable[Event]:
        """Run the output guardrails over a reply's text, then show text that was held.

        A rejected reply is stored as rejected and superseded (out of the conversation);
        with ``rejection_ends_turn`` the turn ends as ``rejected``.
        """
        if not self.output_guardrails:
            return
        try:
            message.content = apply_guardrails(message.content or "", self.output_guardrails)
        except GuardrailRejected as exc:
            message.status, message.state = "rejected", "superseded"
            if rejection_ends_turn:
                turn.status, turn.error = "rejected", f"Reply rejected by a guardrail: {exc}"
            yield self._record(message, turn)
            if rejection_ends_turn:
                yield self._turn_error(turn, "guardrail")
            return
        if message.content:  # held back from display until now
            yield self._emit(
                TextDelta(
                    session_id=self.id, turn_id=turn.turn_id, text=message.content, round=turn.round
                )
            )

    def _projection(self, turn: _Turn, tools: list[dict[str, Any]] | None) -> Projection:
        """The estimated size and cost of the request about to be sent."""
        from ._pricing import request_cost

        prompt = self.estimator.estimate(self._context(turn), _chars(tools))
        params = turn.settings.request_params
        client = turn.settings.client
        cap = params.get("max_completion_tokens") or params.get("max_tokens") or 0
        cap = cap if isinstance(cap, int) and cap > 0 else 0
        usage = RequestUsage(prompt_tokens=prompt, completion_tokens=cap)
        cost, _ = request_cost(client.model, client.settings.base_url, usage)
        return Projection(prompt_tokens=prompt, reply_cap=cap, cost_usd=cost)

    def _check_budgets(
        self, turn: _Turn, *, stop: bool = True, next_request: Projection | None = None
    ) -> Iterable[Event]:
        """Say once when a budget cannot be checked; with ``stop``, end the turn at a limit.

        ``next_request`` (the estimate of the request about to go) also stops a request
        that would cross a USD limit.
        """
        spent = self.usage
        if self._reserved_usd and spent.cost_usd is not None:
            # Requests of other turns in flight (isolated turns run at once) count too.
            spent = spent.model_copy(update={"cost_usd": spent.cost_usd + self._reserved_usd})
        check = turn.settings.budgets.check(spent, turn.usage, next_request)
        for notice in check.notices:
            if notice not in self._notices_given:
                self._notices_given.add(notice)
                yield self._emit(Notice(session_id=self.id, turn_id=turn.turn_id, message=notice))
        if stop and check.limit is not None:
            turn.status, turn.error = "budget_exceeded", check.message
            yield self._emit(
                LimitReached(
                    session_id=self.id,
                    turn_id=turn.turn_id,
                    limit=check.limit,
                    message=check.message or "",
                )
            )

    def _truncation_notice(self, turn: _Turn, assembler: ReplyAssembler) -> str | None:
        """One line if the server reported far fewer prompt tokens than were sent."""
        if turn.projection is None or assembler.usage is None:
            return None
        client = turn.settings.client
        return truncation_notice(
            turn.projection.prompt_tokens,
            assembler.usage.prompt_tokens,
            client.cached_context_window(),
        )

    def _replayed(self, turn: _Turn, message: Message) -> str | None:
        """The field a message's reasoning is sent back in, or ``None`` to leave it out.

        ``reasoning_replay="auto"``: within the turn's own tool rounds (models such as
        DeepSeek's refuse a tool round without it), never from earlier turns (it is
        kept in the store); ``"always"`` / ``"never"``.
        """
        if (message.reasoning is None and message.reasoning_items is None) or (
            self.reasoning_replay == "never"
        ):
            return None
        if self.reasoning_replay == "auto" and message.turn_id != turn.turn_id:
            return None
        return REASONING_FIELDS[turn.settings.client.api]

    def _wire_messages(self, turn: _Turn) -> list[dict[str, Any]]:
        """The context as the chat dicts a request sends; a message's dict is made once
        and handed again while it is unchanged, so the client encodes it only once."""
        made, kept = self._wire, {}
        out = []
        for m in self._context(turn):
            field = self._replayed(turn, m)
            hit = made.get(m.id)
            if hit is None or hit[0] is not m.content or hit[1] is not m.tool_calls:
                hit = (m.content, m.tool_calls, {})
            wire = hit[2].get(field)
            if wire is None:
                wire = hit[2][field] = m.to_openai(field)
            kept[m.id] = hit
            out.append(wire)
        if not turn.settings.isolated:
            self._wire = kept  # what left the conversation is let go
        return out

    def _context(self, turn: _Turn) -> list[Message]:
        """The messages a request of ``turn`` sends: the conversation, or for an isolated
        turn the system prompt and the turn's own messages."""
        if not turn.settings.isolated:
            return self._messages
        system = [m for m in self._messages if m.role == "system" and m.turn_id is None]
        return system + [m for m in turn.messages if m.state == "active"]

    async def _maybe_compact(
        self,
        turn: _Turn,
        tools: list[dict[str, Any]] | None,
        overflow: ModelAPIError | None = None,
    ) -> AsyncIterator[Event]:
        """Fold the middle of the history when the prompt nears the context window."""
        if self.compactor is None or turn.settings.isolated:
            return
        outcome = await self.compactor.maybe_compact(
            self._messages,
            client=turn.settings.client,
            extra_chars=_chars(tools),
            session_id=self.id,
            turn_id=turn.turn_id,
            round=turn.round,
            overflow=overflow,
        )
        if outcome is None:
            return
        for request in outcome.requests:
            turn.extra_requests += 1
            turn.usage = turn.usage.add(request.usage, request.cost_usd)
            self.usage = self.usage.add(request.usage, request.cost_usd)
            yield self._emit(request)
        if outcome.messages is not None:
            turn.compactions += 1
            self._messages = outcome.messages
            for m in outcome.folded:
                m.state = "compacted"
            yield self._emit(
                MessagesMarked(
                    session_id=self.id,
                    turn_id=turn.turn_id,
                    message_ids=[m.id for m in outcome.folded],
                    state="compacted",
                )
            )
            if outcome.summary is not None:
                yield self._record(outcome.summary)
        yield self._emit(outcome.event)
        if outcome.requests:  # the summariser spent: the next request must still fit
            for event in self._check_budgets(turn):
                yield event

    def _record_usage(
        self,
        turn: _Turn,
        assembler: ReplyAssembler,
        error: ModelAPIError | None,
        projection: Projection | None = None,
    ) -> UsageEvent:
        event = turn.settings.client.usage_event(
            assembler, error, interrupted=self._runner.cancel_requested
        )
        if projection is not None:  # kept beside the actual figures
            event.estimated_prompt_tokens = projection.prompt_tokens
            event.estimated_cost_usd = projection.cost_usd
            if error is None:
                event.suspected_truncation = self._truncation_notice(turn, assembler) is not None
        turn.usage = turn.usage.add(event.usage, event.cost_usd)
        self.usage = self.usage.add(event.usage, event.cost_usd)
        return self._emit(event)  # type: ignore[return-value]

    def _assistant(
        self, turn: _Turn, assembler: ReplyAssembler, *, status: MessageStatus, with_calls: bool
    ) -> Message:
        calls = self._valid_calls(turn, assembler.tool_calls()) if with_calls else []
        return Message(
            role="assistant",
            content=assembler.text or None,
            reasoning=assembler.reasoning or None,
            reasoning_items=assembler.reasoning_items or None,
            tool_calls=calls or None,
            turn_id=turn.turn_id,
            round=turn.round,
            cell_id=turn.cell_id,
            status=status,
        )

    def _valid_calls(self, turn: _Turn, calls: list[ToolCall]) -> list[ToolCall]:
        """The model's tool calls made acceptable to send back, before they are stored.

        OpenAI refuses every later request of a conversation that holds a tool call with
        an empty or malformed name, or two calls with one id. A nameless call keeps its
        place under a placeholder name and is answered with an error the model can read;
        an id used before in this conversation gets a fresh one.
        """
        seen = {c.id for m in self._messages if m.tool_calls for c in m.tool_calls}
        fixed = []
        for call in calls:
            if call.id in seen or not call.id:
                call = call.model_copy(update={"id": f"call_{new_id()[:24]}"})
            call.arguments = valid_text(call.arguments)
            if not valid_tool_name(call.name):
                turn.bad_names[call.id] = call.name
                call = call.model_copy(update={"name": INVALID_TOOL_NAME})
            seen.add(call.id)
            fixed.append(call)
        return fixed

    async def _run_tools(self, turn: _Turn, calls: list[ToolCall]) -> AsyncIterator[Event]:
        """Run the round's tool calls together; append their results in call order."""
        turn.unanswered = list(calls)
        await self._barrier()  # the message asking for these tools is stored before they run
        turn.tools_started = time.perf_counter()
        records = await turn.settings.tools.run(
            calls, turn_id=turn.turn_id, round=turn.round, bad_names=turn.bad_names
        )
        for record in records:
            turn.tool_calls.append(record)
            yield self._emit(ToolResult(session_id=self.id, turn_id=turn.turn_id, call=record))
            turn.unanswered = [c for c in turn.unanswered if c.id != record.call_id]
            status: MessageStatus = "error" if record.is_error else "ok"
            message = _tool_message(turn, record.call_id, record.name, record.result, status)
            yield self._add(message, turn)
            if record.error_kind == "interrupted":  # Ctrl-C inside a tool stops the turn
                turn.status = "interrupted"
        # Chat tool messages carry text only: the images tools returned follow as one
        # user message, after every result of the round (the peers' way, see README).
        returned = [(r, image) for r in records for image in r.images or []]
        if returned:
            names = ", ".join(dict.fromkeys(f"`{r.name}`" for r, _ in returned))
            plural = "s" if len(returned) > 1 else ""
            message = Message(
                role="user",
                content=f"Image{plural} returned by {names}:",
                attachments=[image for _, image in returned],
                turn_id=turn.turn_id,
                round=turn.round,
                cell_id=turn.cell_id,
            )
            yield self._add(message, turn)

    def _interrupted(self, turn: _Turn) -> Iterable[Event]:
        """Keep what arrived, and answer every dangling tool call so the history stays valid."""
        turn.status = "interrupted"
        assembler = turn.assembler
        if assembler is not None and assembler.text:
            message = self._assistant(turn, assembler, status="interrupted", with_calls=False)
            # Partial text held back from display is judged before it is shown.
            yield from self._judge_reply(turn, message, rejection_ends_turn=False)
            if message.state == "active":
                turn.text = message.content or ""
                yield self._add(message, turn)
        stopped = error_payload(
            "cancelled", "The user stopped this turn before the tool call finished."
        )
        started = turn.tools_started
        for call in turn.unanswered:
            if started is not None:  # it was running: recorded as a cancelled tool call
                record = ToolCallRecord(
                    call_id=call.id,
                    name=call.name,
                    arguments=call.arguments,
                    result=stopped,
                    is_error=True,
                    error_kind="cancelled",
                    duration_ms=(time.perf_counter() - started) * 1000,
                    turn_id=turn.turn_id,
                    round=turn.round,
                )
                turn.tool_calls.append(record)
                yield self._emit(ToolResult(session_id=self.id, turn_id=turn.turn_id, call=record))
            yield self._add(_tool_message(turn, call.id, call.name, stopped, "cancelled"), turn)
        turn.unanswered = []

    def _finish(self, turn: _Turn) -> Event:
        if turn.status == "running":  # nothing stopped it: it ran to its end
            turn.status = "completed"
        result = TurnResult(
            session_id=self.id,
            turn_id=turn.turn_id,
            status=turn.status,
            text=turn.text,
            usage=turn.usage,
            tool_calls=turn.tool_calls,
            messages=turn.messages,
            rounds=turn.usage.requests - turn.extra_requests,
            error=turn.error,
            duration_ms=(time.perf_counter() - turn.started) * 1000,
            output=turn.output,
            truncated=turn.truncated,
            reasoning="".join(m.reasoning or "" for m in turn.messages if m.role == "assistant"),
        )
        return self._emit(TurnFinished(session_id=self.id, turn_id=turn.turn_id, result=result))


# Statuses that say the request itself cannot be served, however often it is sent: a
# bad request, too large, an unsupported media type, unprocessable. (429, 5xx, 401, 404
# and timeouts are not: the same message may well go through later, so it stays.)
_REFUSED_AS_SENT = frozenset({400, 413, 415, 422})


def _fault(turn: _Turn, exc: Exception) -> str:
    """What the store says of a turn or request an exception ended (the key redacted)."""
    key = turn.settings.client.settings.api_key.get_secret_value()
    return redact(f"{type(exc).__name__}: {exc}", key)


def _chars(tools: list[dict[str, Any]] | None) -> int:
    """Characters the tool definitions add to a request (part of its prompt tokens)."""
    return len(json.dumps(tools, separators=(",", ":"))) if tools else 0


def _tool_message(
    turn: _Turn, call_id: str, name: str, content: str, status: MessageStatus
) -> Message:
    """The tool-result message answering ``call_id`` in this turn's current round."""
    return Message(
        role="tool",
        content=content,
        tool_call_id=call_id,
        name=name,
        turn_id=turn.turn_id,
        round=turn.round,
        cell_id=turn.cell_id,
        status=status,
    )


# Endpoints that answered a json_schema response_format with an error: typed answers go
# through the final_answer tool there for the rest of the process.
_NO_RESPONSE_FORMAT: set[str] = set()


def _refuses_response_format(error: ModelAPIError, turn: _Turn) -> bool:
    """Whether a request failed because the server does not take ``response_format``."""
    if turn.settings.output is None or turn.output_mode != "json_schema":
        return False
    text = str(error).lower()
    return error.status_code in (400, 422) and any(
        word in text for word in ("response_format", "json_schema", "structured output")
    )
