"""The session: a conversation's settings, its history (new, or reopened from the
store), and the settings a turn runs with.

``Session`` is put together from three layers: the calls that run turns
(``_session_turns.py``: ``send``, ``stream``, ``resume``, ``send_each``), where their
events go (``_session_events.py``: to the store first, then the listeners and the
caller), and a turn's steps (``_turn.py``: ``TurnLoop``). Here is what they share: the
state a new session starts with, or a reopened one finds in the store; ``new()`` for
another conversation set up the same way; and each turn's settings
(``_turn_settings``: the session's, with that turn's ``TurnOptions`` applied).
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal

from ._client import DEFAULT_STALL_TIMEOUT, ModelClient
from ._compaction import CompactionStrategy, Compactor, resolve_strategy
from ._config import (
    Secret,
    check_limits,
    current_notebook,
    get_defaults,
    resolve_client,
    set_defaults,
    whoami,
)
from ._events import Event, Notice
from ._exceptions import SessionInUseError, StoreError
from ._history import TokenEstimator, live_order
from ._limits import Budgets, Guardrail, stored_usage
from ._output import OutputMode, OutputSpec
from ._runner import TurnRunner
from ._session_events import EventHandler
from ._session_turns import SessionTurns
from ._store import pending_tool_calls
from ._store._sink import StoreSink
from ._tools import ToolSet
from ._turn_state import TurnOptions, _TurnSettings
from ._types import Message, ToolCall, Usage, new_id
from ._warn import warn_user
from ._wire import PrefixCache

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["Session", "configure"]

DEFAULT_MAX_ROUNDS = 16


def configure(**defaults: Any) -> dict[str, Any]:
    """Set defaults for new sessions in this process (model, base_url, api_key, db, ...).

    Pass ``None`` to remove a default. Returns the defaults now in force (key hidden).
    """
    return set_defaults(**defaults)


class Session(SessionTurns):
    """A conversation with a model that may call Python tools; every step is stored.

    ``Session(session_id=...)`` reopens a stored session and continues it. ``db=False``
    keeps the session in memory only.

    Long sessions: before each request, when the prompt passes ``trigger_ratio`` of the
    model's context window (``context_window=``, or genai-prices' data), the middle of
    the history is folded (``compaction="summary"``: into one summary written by
    ``summary_model``, default the session's model; ``"window"``: dropped; ``None``:
    never; or your own ``CompactionStrategy``). The system prompt and the last
    ``keep_last_n`` exchanges stay verbatim.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | Secret | None = None,
        db: Any = None,
        system: str | None = None,
        tools: Iterable[Any] = (),
        max_rounds: int | None = None,
        budget_usd: float | None = None,
        turn_budget_usd: float | None = None,
        max_tokens_total: int | None = None,
        turn_max_tokens: int | None = None,
        temperature: float | None = None,
        session_id: str | None = None,
        title: str | None = None,
        on_event: EventHandler | None = None,
        input_guardrails: Sequence[Guardrail] = (),
        output_guardrails: Sequence[Guardrail] = (),
        max_retries: int = 2,
        timeout: float = 600.0,
        stall_timeout: float | None = DEFAULT_STALL_TIMEOUT,
        max_result_chars: int = 8000,
        stream: bool = True,
        request_params: dict[str, Any] | None = None,
        notebook: str | None = None,
        tags: Iterable[str] | None = None,
        compaction: str | CompactionStrategy | None = "summary",
        context_window: int | None = None,
        trigger_ratio: float = 0.8,
        keep_last_n: int = 4,
        summary_model: str | None = None,
        output_mode: OutputMode = "auto",
        output_retries: int = 1,
        reasoning_replay: Literal["auto", "always", "never"] = "auto",
        api: Literal["chat", "responses"] | None = None,
        endpoint: str | None = None,
    ) -> None:
        # Kept so new() can start another conversation set up the same way.
        self._settings: dict[str, Any] = {
            "db": db,
            "system": system,
            "budget_usd": budget_usd,
            "turn_budget_usd": turn_budget_usd,
            "max_tokens_total": max_tokens_total,
            "turn_max_tokens": turn_max_tokens,
            "on_event": on_event,
            "input_guardrails": input_guardrails,
            "output_guardrails": output_guardrails,
            "max_retries": max_retries,
            "timeout": timeout,
            "stall_timeout": stall_timeout,
            "max_result_chars": max_result_chars,
            "notebook": notebook,
            "tags": tags,
            "compaction": compaction,
            "context_window": context_window,
            "trigger_ratio": trigger_ratio,
            "keep_last_n": keep_last_n,
            "summary_model": summary_model,
            "output_mode": output_mode,
            "output_retries": output_retries,
            "reasoning_replay": reasoning_replay,
            "api": api,
        }
        self.reasoning_replay = reasoning_replay
        # Typed answers (send(output_type=...)): how the schema is sent, and how many
        # more tries a model gets after an answer that does not validate.
        self.output_mode: OutputMode = output_mode
        self.output_retries = output_retries
        strategy = resolve_strategy(compaction)
        self.compactor = (
            None
            if strategy is None
            else Compactor(
                strategy,
                context_window=context_window,
                trigger_ratio=trigger_ratio,
                keep_last_n=keep_last_n,
                summary_model=summary_model,
            )
        )
        # Estimates prompt sizes for compaction and for budgets checked before a request.
        self.estimator = self.compactor.estimator if self.compactor else TokenEstimator()
        self.store: Store | None = _open_store(db)
        stored = self.store.load_session(session_id) if self.store and session_id else None
        settings = resolve_client(
            model or (stored.model if stored else None), base_url, api_key, endpoint=endpoint
        )
        if stored is not None and base_url is None and endpoint is None:
            _warn_if_moved(stored.id, stored.metadata.get("endpoint"), settings.base_url)
        if stored is not None and model and model != stored.model and self.store is not None:
            # It continues with another model: listings and exports name that one now.
            self.store.update_session(stored.id, model=model)
        self.client = ModelClient(
            settings,
            max_retries=max_retries,
            timeout=timeout,
            stall_timeout=stall_timeout,
            api=api,
        )
        self.id = session_id or new_id()
        self.tools = ToolSet(tools, max_result_chars=max_result_chars)
        # What %chat config / nbchat.configure() set for this kernel fills what is not given.
        defaults = get_defaults()
        system = system if system is not None else defaults.get("system")
        temperature = temperature if temperature is not None else defaults.get("temperature")
        budget_usd = budget_usd if budget_usd is not None else defaults.get("budget_usd")
        self.max_rounds: int = (
            max_rounds if max_rounds is not None else defaults.get("max_rounds", DEFAULT_MAX_ROUNDS)
        )
        limits = {
            "budget_usd": budget_usd,
            "turn_budget_usd": turn_budget_usd,
            "max_tokens_total": max_tokens_total,
            "turn_max_tokens": turn_max_tokens,
        }
        check_limits("Session()", temperature=temperature, max_rounds=self.max_rounds, **limits)
        self.budgets = Budgets(**limits)
        self.on_event = on_event
        self._listeners: list[EventHandler] = []
        self.input_guardrails = list(input_guardrails)
        self.output_guardrails = list(output_guardrails)
        self.streaming = stream
        self.request_params = dict(request_params or {})
        if temperature is not None:
            self.request_params["temperature"] = temperature
        self.usage = Usage()
        self._runner: TurnRunner[Event] = TurnRunner()
        self._reserved_usd = 0.0  # estimated cost of requests in flight
        # The conversation's chat dicts, made once a message (see _wire_messages), and the
        # (turn, reasoning_replay, wire) they were made for.
        self._wire: PrefixCache[Message, dict[str, Any]] = PrefixCache(
            Message.to_openai, stamp=attrgetter("content", "tool_calls")
        )
        self._wire_replay: tuple[str, str, str] | None = None
        # The store's writer thread takes the events; the loop never waits on the file
        # except at the two barriers (before tools run, before a turn returns).
        self._sink = StoreSink(self.store, notify=self._store_notice) if self.store else None
        self._pending_notices: list[Event] = []
        self._holding = False  # a turn of this object holds the session (_hold)
        # The last turn went through send() with nothing to see its events (a script):
        # the store's notices are logged then, or no one would hear of an outage.
        self._unheard = False
        self._notices_given: set[str] = set()
        # Who ran it, where, and its tags: stored with the session (costs by user / tag).
        self.metadata: dict[str, Any] = (
            dict(stored.metadata)
            if stored is not None
            else {
                **_attribution(tags if tags is not None else defaults.get("tags")),
                "endpoint": _endpoint(settings.base_url),
            }
        )
        if stored is not None:
            # The live summary is newer (higher seq) than the messages kept after it.
            self._messages = live_order(stored.messages)
            assert self.store is not None
            self.usage = stored_usage(self.store, self.id)  # session budgets count from here
            if not self.pending_tool_calls:
                self._end_dead_turns(stored.max_seq)
            self._seq = stored.max_seq + 1
            self.system = stored.system_prompt
            self.title = stored.title
        else:
            self._messages, self._seq = [], 0
            self.system, self.title = system, title
            if self.store is not None:
                self.store.create_session(
                    session_id=self.id,
                    model=settings.model,
                    system_prompt=system,
                    title=title,
                    notebook=notebook if notebook is not None else current_notebook(),
                    metadata=self.metadata,
                )
            if system:
                self._add(Message(role="system", content=system))

    def _end_dead_turns(self, max_seq: int) -> None:
        """A turn still "running" in the store belonged to a process that stopped, unless
        a process holds the session (``_store/_holds.py``): its turn is running now."""
        assert self.store is not None
        try:
            hold = self.store.hold_session(self.id)
        except SessionInUseError:
            return
        try:
            self.store.end_unfinished_turns(
                self.id,
                status="interrupted",
                error="The process running this turn stopped before it finished.",
            )
        finally:
            hold.release(max_seq)

    @contextlib.contextmanager
    def _hold(self) -> Iterator[None]:
        """Run turns as the one process holding this session, after loading the messages
        another process added since this one loaded it (``_store/_holds.py``).

        Raises ``SessionInUseError`` while a turn of it runs elsewhere. Nested or
        concurrent turns of this object (``send_each``) share its one hold.
        """
        if self.store is None or self._holding:
            yield
            return
        hold = self.store.hold_session(self.id)
        self._holding = True
        try:
            if hold.last_seq is not None and hold.last_seq >= self._seq:
                self._catch_up(hold.last_seq)
            yield
        finally:
            self._holding = False
            hold.release(self._seq - 1)

    def _catch_up(self, last_seq: int) -> None:
        """Load the session again: another process has numbered messages up to
        ``last_seq``, which its writer stores a moment after its turn (waited for up to
        the store's lock timeout)."""
        assert self.store is not None
        deadline = time.monotonic() + self.store.lock_timeout
        stored = self.store.load_session(self.id)
        while stored.max_seq < last_seq and time.monotonic() < deadline:
            time.sleep(0.05)
            stored = self.store.load_session(self.id)
        if stored.max_seq < last_seq:
            raise StoreError(
                f"Session {self.id} was continued in another process, whose messages are "
                f"not all in {self.store.path} yet: try again in a moment."
            )
        self._messages = live_order(stored.messages)
        self._seq = stored.max_seq + 1
        self.usage = stored_usage(self.store, self.id)
        self._pending_notices.append(
            Notice(
                session_id=self.id,
                message=f"Session {self.id} was continued in another process since this "
                "one loaded it: its newer messages were loaded before this turn.",
            )
        )

    def __repr__(self) -> str:
        return (
            f"Session(id={self.id!r}, model={self.model!r}, messages={len(self._messages)}, "
            f"store={self.store.path if self.store else None!r})"
        )

    # ------------------------------------------------------------------ public surface

    @property
    def model(self) -> str:
        """The model this session sends requests to."""
        return self.client.model

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The live context, as the OpenAI-format dicts the next request will send."""
        return [m.to_openai() for m in self._messages]

    @property
    def history(self) -> list[Message]:
        """The live context as ``Message`` objects (with seq, turn, status, ...)."""
        return list(self._messages)

    @property
    def pending_tool_calls(self) -> list[ToolCall]:
        """Tool calls of the last assistant message that have no result yet."""
        return pending_tool_calls(self._messages)

    def turn_outcomes(self) -> dict[str, tuple[str, str | None]]:
        """How each stored turn ended: turn id → (status, error). Empty without a store,
        or when it cannot be read (history views then show only what messages say)."""
        if self.store is None:
            return {}
        try:
            frame = self.store.frame("turns", session_id=self.id)
        except StoreError:
            return {}
        errors = frame["error"].astype(object).where(frame["error"].notna(), None)
        return dict(zip(frame["id"], zip(frame["status"], errors, strict=True), strict=True))

    def _turn_settings(self, options: TurnOptions | None) -> _TurnSettings:
        """The session's settings, with ``options`` applied for one turn."""
        o = options or TurnOptions()
        check_limits(
            "the turn's options",
            temperature=o.temperature,
            max_rounds=o.max_rounds,
            budget_usd=o.budget_usd,
        )
        client = self.client
        if o.model and o.model != client.model:
            client = client.for_model(o.model)
        tools = self.tools
        if o.tools is not None:
            tools = ToolSet(o.tools, max_result_chars=self.tools.max_result_chars)
        params = {**self.request_params, **(o.request_params or {})}
        if o.temperature is not None:
            params["temperature"] = o.temperature
        budgets = self.budgets
        if o.budget_usd is not None:
            budgets = budgets.model_copy(update={"turn_budget_usd": o.budget_usd})
        return _TurnSettings(
            client=client,
            tools=tools,
            max_rounds=self.max_rounds if o.max_rounds is None else o.max_rounds,
            streaming=self.streaming if o.stream is None else o.stream,
            request_params=params,
            budgets=budgets,
            output=None if o.output_type is None else OutputSpec(o.output_type),
            isolated=o.isolated,
        )

    @property
    def tags(self) -> list[str]:
        """The session's tags (``costs(by="tag")`` groups its spend by them)."""
        return list(self.metadata.get("tags") or [])

    def tag(self, *names: str) -> list[str]:
        """Add tags to this session (stored at once); returns all its tags."""
        merged = sorted({*self.tags, *(n.strip() for n in names if n.strip())})
        self.metadata["tags"] = merged
        if self.store is not None:
            self.store.update_session(self.id, metadata=self.metadata)
        return merged

    def new(self, **changes: Any) -> Session:
        """A new, empty session set up like this one (endpoint, tools, limits, guardrails...).

        Keyword arguments are ``Session``'s and override what is copied; the new session
        starts with this session's current model and system prompt.
        """
        s = self.client.settings
        settings: dict[str, Any] = {
            **self._settings,
            "model": s.model,
            "base_url": s.base_url,
            "api_key": s.api_key,
            "endpoint": s.endpoint,
            "system": self.system,
            "tools": list(self.tools),
            "max_rounds": self.max_rounds,
            "stream": self.streaming,
            "request_params": dict(self.request_params),
            "db": self.store if self.store is not None else False,
            "tags": self.tags,
            **self.budgets.model_dump(),
        }
        settings.update(changes)
        return Session(**settings)

    def set_model(self, model: str) -> None:
        """Send the following requests to another model on the same endpoint.

        The stored session takes it as its model too (``sessions()``' ``model``, and
        the one it continues with when reopened): it named the first model only.
        """
        self.client = self.client.for_model(model)
        if self.store is not None:
            self.store.update_session(self.id, model=model)


def _open_store(db: Any) -> Store | None:
    if db is False:
        return None
    from ._store import Store

    if isinstance(db, Store):
        return db
    return Store.open(db)


def _endpoint(base_url: str) -> str:
    """Where a session's requests go, as it may be stored and shown: scheme, host, port
    and path (no user, password or query, which may carry a credential)."""
    parts = urllib.parse.urlsplit(base_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}".rstrip("/")


def _warn_if_moved(session_id: str, ran_on: Any, base_url: str) -> None:
    """A reopened session goes to this kernel's endpoint, never back to a stored URL on
    its own (a shared store must not be able to send this kernel's key elsewhere): say
    so when that is not where it ran."""
    now = _endpoint(base_url)
    if isinstance(ran_on, str) and ran_on and ran_on != now:
        warn_user(
            f"Session {session_id} ran on {ran_on}; it continues on {now}, this kernel's "
            f"endpoint. Pass base_url={ran_on!r} (or endpoint=...) to continue there."
        )


def _attribution(tags: Iterable[str] | str | None) -> dict[str, Any]:
    """Who ran a session, where, and its tags (``costs(by="user"|"tag")`` group by them)."""
    if isinstance(tags, str):
        tags = tags.split(",")
    user, host = whoami()
    names = sorted({t.strip() for t in tags or () if t and t.strip()})
    return {"user": user, "host": host, "tags": names}
