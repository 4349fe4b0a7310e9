"""Where a session's events go: to the store first, then to the session's listeners and
the caller, and the store's own notices back into the stream.

``_emit`` hands each event to the store's sink (``_store/_sink.py``, which never waits
for the file) before anyone else sees it, so an assistant message that asks for tools
is durable before the tools run: ``_barrier`` (before tools run, before a turn returns)
makes everything handed so far durable. ``_record`` and ``_add`` number a message and
emit it. What the store has to say (it is locked, it is free again) arrives on the
writer's thread (``_store_notice``) and is raised between the turn's events
(``_with_notices``), or logged when nobody listens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from ._events import Event, MessageAdded, Notice
from ._turn_state import LoopState, _Turn
from ._types import Message

if TYPE_CHECKING:
    from ._store import Store
    from ._store._sink import StoreSink

__all__ = ["EventHandler", "SessionEvents"]

EventHandler = Callable[[Event], None]


class SessionEvents(LoopState):
    """A session's events on their way out (mixed into ``Session``, which sets the state)."""

    store: Store | None
    on_event: EventHandler | None
    _sink: StoreSink | None
    _listeners: list[EventHandler]
    _pending_notices: list[Event]
    _unheard: bool
    _holding: bool
    _seq: int

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
        if self._unheard and self.on_event is None and not self._listeners:
            logging.getLogger("nbchat").warning("%s", message)
            return
        # Said while no turn ran, it is shown with the next one: not about that turn.
        said = message if self._holding else f"About earlier turns: {message}"
        notice = Notice(session_id=self.id, message=said)
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

    def _record(
        self, message: Message, turn: _Turn | None = None, *, seq: int | None = None
    ) -> Event:
        """Number a message, hand it to the store, and remember it as part of the turn.

        ``seq``: the place the message takes among those stored, when it is not after
        them all (a summary follows the last message it folds).
        """
        if seq is None:
            seq = self._seq
            self._seq += 1
        message.seq = seq
        if turn is not None:
            turn.messages.append(message)
        return self._emit(
            MessageAdded(session_id=self.id, turn_id=message.turn_id or "", message=message)
        )

    def _add(self, message: Message, turn: _Turn | None = None) -> Event:
        """Append a message to the live context (and record it)."""
        self._messages.append(message)
        return self._record(message, turn)
