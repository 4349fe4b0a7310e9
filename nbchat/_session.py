"""The session: a conversation's settings, history and store, and the way to run turns.

A turn's steps are in ``_turn`` (``TurnLoop``, mixed in here). Every step emits typed
events (``nbchat._types``); ``_emit`` hands each to the store first, then to the
session's listeners and the caller (cell renderer, panel, ``send()``), so an assistant
message that asks for tools is durable before the tools run.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from ._client import DEFAULT_STALL_TIMEOUT, ModelClient
from ._compaction import CompactionStrategy, Compactor, resolve_strategy
from ._config import (
    Secret,
    current_notebook,
    get_defaults,
    resolve_client,
    set_defaults,
    whoami,
)
from ._exceptions import SessionPendingError
from ._history import TokenEstimator, live_order
from ._limits import Budgets, Guardrail, stored_usage
from ._output import OutputMode, OutputSpec
from ._runner import TurnRunner
from ._store import pending_tool_calls
from ._store._sink import StoreSink
from ._tools import ToolSet, error_payload
from ._turn import TurnLoop, TurnOptions, _Turn, _TurnSettings
from ._types import (
    Event,
    ImagePart,
    Message,
    MessageAdded,
    Notice,
    ToolCall,
    TurnFinished,
    TurnResult,
    Usage,
    new_id,
)

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["Session", "configure"]

EventHandler = Callable[[Event], None]
DEFAULT_MAX_ROUNDS = 16


def configure(**defaults: Any) -> dict[str, Any]:
    """Set defaults for new sessions in this process (model, base_url, api_key, db, ...).

    Pass ``None`` to remove a default. Returns the defaults now in force (key hidden).
    """
    return set_defaults(**defaults)


class Session(TurnLoop):
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
        self.budgets = Budgets(
            budget_usd=budget_usd,
            turn_budget_usd=turn_budget_usd,
            max_tokens_total=max_tokens_total,
            turn_max_tokens=turn_max_tokens,
        )
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
        # Each message's chat dict, by id (see _wire_messages).
        self._wire: dict[str, tuple[Any, Any, dict[str | None, dict[str, Any]]]] = {}
        # The store's writer thread takes the events; the loop never waits on the file
        # except at the two barriers (before tools run, before a turn returns).
        self._sink = StoreSink(self.store, notify=self._store_notice) if self.store else None
        self._pending_notices: list[Event] = []
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
                # A turn still "running" in the store belonged to a process that stopped.
                self.store.end_unfinished_turns(
                    self.id,
                    status="interrupted",
                    error="The process running this turn stopped before it finished.",
                )
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

    def send(
        self,
        text: str,
        *,
        attachments: Sequence[Any] | None = None,
        cell_id: str | None = None,
        on_event: EventHandler | None = None,
        options: TurnOptions | None = None,
        output_type: Any = None,
    ) -> TurnResult:
        """Run one turn and return its result; ``on_event`` sees each event on this thread.

        Works in scripts and inside a running Jupyter kernel. Ctrl-C or a kernel
        interrupt stops the turn at once: the result then has status "interrupted".
        ``options`` (a ``TurnOptions``) change the model, tools, limits or sampling for
        this turn only; the session is left as it was. ``output_type`` (a pydantic
        model, ``list[Model]``, a dataclass, ``Literal``, ``dict``...) asks for a typed
        answer: ``result.output`` is then a validated instance. ``attachments`` are
        images (matplotlib figures, PIL images, bytes, paths, URLs, ``nbchat.Image``)
        sent with the text, or text files inlined under their names.
        """
        self._raise_if_pending()
        options = _with_output(options, output_type)
        text, images = _attached(text, attachments)
        turn = self._turn(text, cell_id, options=options, images=images)
        return self._run_sync(turn, on_event)

    def _run_sync(self, turn: AsyncIterator[Event], on_event: EventHandler | None) -> TurnResult:
        result: TurnResult | None = None

        def take(event: Event) -> None:
            nonlocal result
            if isinstance(event, TurnFinished):
                result = event.result
            if on_event is not None:
                on_event(event)

        self._runner.run_sync(self._with_notices(turn), take)
        assert result is not None, "a turn always ends with TurnFinished"
        return result

    async def stream(
        self,
        text: str,
        *,
        attachments: Sequence[Any] | None = None,
        cell_id: str | None = None,
        options: TurnOptions | None = None,
        output_type: Any = None,
    ) -> AsyncIterator[Event]:
        """Run one turn, yielding its events as they happen (the last is ``TurnFinished``)."""
        self._raise_if_pending()
        text, images = _attached(text, attachments)
        options = _with_output(options, output_type)
        turn = self._turn(text, cell_id, options=options, images=images)
        async for event in self._runner.stream(self._with_notices(turn)):
            yield event

    def resume(
        self, *, on_event: EventHandler | None = None, options: TurnOptions | None = None
    ) -> TurnResult:
        """Run the tool calls left pending by a crash, then let the model continue."""
        if not self.pending_tool_calls:
            raise SessionPendingError("Nothing to resume: this session has no pending tool calls.")
        return self._run_sync(self._turn(None, None, resume=True, options=options), on_event)

    def send_each(
        self,
        texts: Sequence[str],
        *,
        options: TurnOptions | None = None,
        concurrency: int = 4,
        on_result: Callable[[int, TurnResult], None] | None = None,
    ) -> list[TurnResult | None]:
        """Send each text as its own isolated turn, up to ``concurrency`` at a time.

        Every turn sees the system prompt and its own text only (``isolated``), and is
        stored in this session. Once a turn stops at a budget, no further text is sent:
        those places hold ``None``. ``on_result(index, result)`` is called on this thread
        as each turn ends. Ctrl-C stops every turn in flight (their results say
        "interrupted") and sends no more.
        """
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._raise_if_pending()
        isolated = replace(options or TurnOptions(), isolated=True)
        results: list[TurnResult | None] = [None] * len(texts)
        turn_ids = [new_id() for _ in texts]
        index = {turn_id: i for i, turn_id in enumerate(turn_ids)}

        def take(event: Event) -> None:
            if isinstance(event, TurnFinished):
                i = index[event.turn_id]
                results[i] = event.result
                if on_result is not None:
                    on_result(i, event.result)

        jobs = list(zip(turn_ids, texts, strict=True))
        self._runner.run_sync(self._each(jobs, isolated, concurrency), take)
        return results

    async def _each(
        self, jobs: list[tuple[str, str]], options: TurnOptions, concurrency: int
    ) -> AsyncIterator[Event]:
        """The events of one isolated turn per text, merged as they happen."""
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        gate = asyncio.Semaphore(concurrency)
        stopped = False

        async def run(turn_id: str, text: str) -> None:
            nonlocal stopped
            async with gate:
                if stopped:
                    return
                turn = self._turn(text, None, options=options, turn_id=turn_id)
                async for event in self._with_notices(turn):
                    if isinstance(event, TurnFinished) and event.result.status in (
                        "budget_exceeded",
                        "interrupted",
                    ):
                        stopped = True
                    events.put_nowait(event)

        async def run_all() -> None:
            try:
                await asyncio.gather(*(run(turn_id, text) for turn_id, text in jobs))
            finally:
                events.put_nowait(None)

        task = asyncio.ensure_future(run_all())
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # a turn's own failure is raised here, never dropped
            while not events.empty():  # what the cancelled turns said on their way out
                if (event := events.get_nowait()) is not None:
                    yield event

    def _turn_settings(self, options: TurnOptions | None) -> _TurnSettings:
        """The session's settings, with ``options`` applied for one turn."""
        o = options or TurnOptions()
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

    def abort_pending(self) -> list[Message]:
        """Close pending tool calls with synthetic "aborted" results; returns those messages."""
        calls = self.pending_tool_calls
        turn_id = next((m.turn_id for m in reversed(self._messages) if m.role == "assistant"), None)
        aborted = [
            Message(
                role="tool",
                tool_call_id=c.id,
                name=c.name,
                turn_id=turn_id,
                status="aborted",
                content=error_payload(
                    "aborted", "This tool call was aborted before it produced a result."
                ),
            )
            for c in calls
        ]
        for message in aborted:
            self._add(message)
        if self.store is not None and self._sink is not None:
            self._sink.flush(self.store.lock_timeout)
            self.store.end_unfinished_turns(
                self.id, status="aborted", error="Its pending tool calls were aborted."
            )
        return aborted

    def cancel(self) -> None:
        """Stop the running turn at once (safe to call from any thread or a signal handler)."""
        self._runner.cancel()

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
        """Send the following requests to another model on the same endpoint."""
        self.client = self.client.for_model(model)

    # ------------------------------------------------------------------ sync bridge

    def _raise_if_pending(self) -> None:
        pending = self.pending_tool_calls
        if pending:
            names = ", ".join(c.name or "?" for c in pending)
            raise SessionPendingError(
                f"Session {self.id} has {len(pending)} tool call(s) without results ({names}), "
                "left by a process that stopped. Call session.resume() to run them and "
                "continue, or session.abort_pending() to close them as aborted."
            )

    # ------------------------------------------------------------------ the loop

    async def _with_notices(self, turn: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """``turn``'s events, with the store's notices raised on the way (store locked)."""
        async for event in turn:
            yield event
            while self._pending_notices:
                yield self._pending_notices.pop(0)
        while self._pending_notices:  # e.g. raised while the last barrier waited
            yield self._pending_notices.pop(0)

    def _store_notice(self, message: str) -> None:
        """The store's writer has something to say (it runs on the writer's thread)."""
        notice = Notice(session_id=self.id, message=message)
        self._pending_notices.append(notice)
        if self.on_event is not None:
            self.on_event(notice)

    def listen(self, handler: EventHandler) -> Callable[[], None]:
        """Call ``handler`` with every event of every turn, whoever runs it (a panel
        following cells); returns the function that stops it."""
        self._listeners.append(handler)
        return lambda: self._listeners.remove(handler) if handler in self._listeners else None

    def _emit(self, event: Event) -> Event:
        if self._sink is not None:
            self._sink.handle(event)
        if self.on_event is not None:
            self.on_event(event)
        for listener in self._listeners:
            listener(event)
        return event

    async def _barrier(self) -> None:
        """Make everything handed to the store so far durable: in its journal at once, or
        without one, written (waited for on a thread, bounded)."""
        if self._sink is not None and self.store is not None and not self._sink.journal():
            await asyncio.to_thread(self._sink.flush, self.store.lock_timeout)

    def _record(self, message: Message, turn: _Turn | None = None) -> Event:
        """Number a message, hand it to the store, and remember it as part of the turn."""
        message.seq = self._seq
        self._seq += 1
        if turn is not None:
            turn.messages.append(message)
        return self._emit(
            MessageAdded(session_id=self.id, turn_id=message.turn_id or "", message=message)
        )

    def _add(self, message: Message, turn: _Turn | None = None) -> Event:
        """Append a message to the live context (and record it)."""
        self._messages.append(message)
        return self._record(message, turn)


def _attached(text: str, attachments: Sequence[Any] | None) -> tuple[str, list[ImagePart]]:
    """The text with text files inlined, and the images: checked before the turn starts."""
    if not attachments:
        return text, []
    if isinstance(attachments, (str, bytes)) or not isinstance(attachments, Sequence):
        attachments = [attachments]
    from ._images import attach

    attached = attach(attachments)
    return "\n\n".join([text, *attached.texts]), attached.images


def _open_store(db: Any) -> Store | None:
    if db is False:
        return None
    from ._store import Store

    if isinstance(db, Store):
        return db
    return Store.open(db)


def _with_output(options: TurnOptions | None, output_type: Any) -> TurnOptions | None:
    """``options`` with ``output_type`` set, when one is given."""
    if output_type is None:
        return options
    return replace(options or TurnOptions(), output_type=output_type)


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
        warnings.warn(
            f"Session {session_id} ran on {ran_on}; it continues on {now}, this kernel's "
            f"endpoint. Pass base_url={ran_on!r} (or endpoint=...) to continue there.",
            stacklevel=3,
        )


def _attribution(tags: Iterable[str] | str | None) -> dict[str, Any]:
    """Who ran a session, where, and its tags (``costs(by="user"|"tag")`` group by them)."""
    if isinstance(tags, str):
        tags = tags.split(",")
    user, host = whoami()
    names = sorted({t.strip() for t in tags or () if t and t.strip()})
    return {"user": user, "host": host, "tags": names}
