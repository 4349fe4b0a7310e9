"""How a caller runs turns on a session: ``send`` (sync, in scripts and kernels),
``stream`` (async, event by event), ``resume`` (a crash's pending tool calls), and
``send_each`` (isolated turns, several at a time); ``cancel`` and ``abort_pending``.

Each checks first that the session is not *pending* (tool calls left without results by
a process that stopped), then runs ``TurnLoop._turn`` (``_turn.py``: a turn's steps) on
the session's runner, with the store's notices raised among its events
(``_session_events.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._events import Event, TurnFinished
from ._exceptions import SessionPendingError
from ._session_events import EventHandler, SessionEvents
from ._text import counted
from ._tools import error_payload
from ._turn import TurnLoop
from ._turn_state import TurnOptions
from ._types import ImagePart, Message, TurnResult, new_id

__all__ = ["SessionTurns"]


class SessionTurns(TurnLoop, SessionEvents):
    """The calls that run turns (mixed into ``Session``, which sets the state they use)."""

    if TYPE_CHECKING:  # what Session provides

        def _hold(self) -> contextlib.AbstractContextManager[None]: ...

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
        self._unheard = on_event is None and self.on_event is None and not self._listeners

        def take(event: Event) -> None:
            nonlocal result
            if isinstance(event, TurnFinished):
                result = event.result
            if on_event is not None:
                on_event(event)

        with self._hold():
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
        self._unheard = False  # whoever iterates sees the notices
        with self._hold():
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
        with self._hold():
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

    def abort_pending(self) -> list[Message]:
        """Close pending tool calls with synthetic "aborted" results; returns those messages."""
        with self._hold():  # also ends the turn the crash left, while no one else runs one
            return self._abort_pending()

    def _abort_pending(self) -> list[Message]:
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

    def _raise_if_pending(self) -> None:
        pending = self.pending_tool_calls
        if pending:
            names = ", ".join(c.name or "?" for c in pending)
            raise SessionPendingError(
                f"Session {self.id} has {counted(len(pending), 'tool call')} without results "
                f"({names}), left by a process that stopped. Call session.resume() to run them and "
                "continue, or session.abort_pending() to close them as aborted."
            )


def _attached(text: str, attachments: Sequence[Any] | None) -> tuple[str, list[ImagePart]]:
    """The text with text files inlined, and the images: checked before the turn starts."""
    if not attachments:
        return text, []
    if isinstance(attachments, (str, bytes)) or not isinstance(attachments, Sequence):
        attachments = [attachments]
    from ._images import attach

    attached = attach(attachments)
    return "\n\n".join([text, *attached.texts]), attached.images


def _with_output(options: TurnOptions | None, output_type: Any) -> TurnOptions | None:
    """``options`` with ``output_type`` set, when one is given."""
    if output_type is None:
        return options
    return replace(options or TurnOptions(), output_type=output_type)
