"""The store as a consumer of the event stream: a queue, a journal, and the writer thread
that empties the queue into the store.

``StoreSink.handle(event)`` is on the per-token path, so it never touches the store:
an event the store keeps (``_rows.STORED_KINDS``) goes on a queue and into this
process's journal (one append), everything else (deltas, notices) costs one set lookup.
One writer thread per sink writes the queue to the store in order, what has queued up
(up to ``BATCH_MAX`` events) in one transaction: each DuckDB statement costs ~0.3 ms, and
a commit per event kept a writer behind the chats of a shared file. A batch the store
refuses is written again one event at a time, so only the row that cannot be stored is
skipped. Which rows an event becomes is ``_rows.py``'s; what every sink of the process
does at a read, at exit and after a fork is ``_live_sinks.py``'s.

* **Another process holds the file.** The writer retries the head of the queue with
  short attempts (``ATTEMPT_S``) and bounded backoff, forever; later events wait
  behind it, so order is kept. Once the head has waited ``patience`` seconds (the
  store's lock timeout) the user is told once, "Not saved yet: ...", and once more
  when the backlog is written.
* **A row DuckDB can never take** (a value out of range, a broken constraint) is
  skipped and reported, one message per row, so it cannot freeze the rows behind it.
* **Barriers.** ``barrier()`` makes everything handed so far durable: ``handle()`` has
  already appended each event to this process's journal (``_journal.py``), so it only
  appends any that could not be, on the caller's thread, and returns, without waiting
  for the store. The session calls it
  before running tools and before ``send()`` returns. Without a journal (``:memory:``, a
  folder it cannot write) it is ``flush(timeout)``, which waits until everything handed
  so far is written, and returns at once while the store is known to be unavailable
  (the user has been told).
* **Close.** ``close()`` writes what it can in a bounded time and hands back what is
  left, which the journal, when there is one, keeps (``kept_in``) for the next
  ``Store.open`` of that file.

What a SIGKILL can lose: nothing ``handle()`` returned from, while the journal works
(``handle`` journals the event before it returns), and so nothing past a barrier, even
while the file is held by another process; without a journal, the events handed and not
yet written.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from itertools import islice
from typing import TYPE_CHECKING

from .._exceptions import StoreError, StoreLocked, UnstorableRow
from ._live_sinks import EXIT_WAIT_S, live, mark_writer
from ._rows import STORED_KINDS

if TYPE_CHECKING:
    from .._events import Event
    from . import Store
    from ._journal import Journal

__all__ = ["ATTEMPT_S", "BATCH_MAX", "StoreSink"]

ATTEMPT_S = 0.5  # one attempt's wait for the file: short, so stopping is quick
_BACKOFF_FIRST = 0.05  # after an attempt that failed fast (not a lock wait)
_BACKOFF_MAX = 1.0
BATCH_MAX = 32  # the most queued events the writer writes in one transaction
_IDLE_EXIT = 2.0  # an idle writer thread ends; the next stored event starts another


class StoreSink:
    """Writes a session's events to ``store`` on a background thread, in order.

    ``notify(message)`` receives the user-facing messages (store unavailable, saved
    again, a row skipped); it is called on the writer thread, or at exit on the main one.
    ``patience`` is how long the writer tries before telling the user (default: the
    store's lock timeout).
    """

    def __init__(
        self, store: Store, *, notify: Callable[[str], None], patience: float | None = None
    ) -> None:
        self.store = store
        self.patience = store.lock_timeout if patience is None else patience
        self._notify = notify
        self._cond = threading.Condition()
        self._queue: deque[Event] = deque()
        self._handed = 0  # events accepted by handle()
        self._done = 0  # events written or skipped
        self._singly_until = 0  # a batch failed: write one at a time until _done is here
        self._unjournaled: deque[Event] = deque()  # handed, not in the journal yet
        self._journaled = 0  # events in the journal (the first ones handed)
        self._journal_lock = threading.Lock()  # one appender at a time: order is kept
        self._journal: Journal | None = None  # made on the first event
        self._journal_off = store.journal_folder() is None  # no journal: barriers wait
        self._outage = False  # the store is unavailable now: barriers do not wait
        self._told = False  # the user was told so, and not yet that all is saved
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._own: Store | None = None  # a handle of our own, if the caller closed theirs
        self.kept_in: str | None = None  # after close(): the journal keeping what was left
        # The last writes' durations (s), for benchmarks.
        self.write_seconds: deque[float] = deque(maxlen=10_000)
        live.add(self)

    # ------------------------------------------------------------------ the loop's side

    def handle(self, event: Event) -> None:
        """Queue ``event`` if the store keeps it, and journal it; never waits for the file.

        Journaling here (one encode and one append, ~10 µs) rather than on the writer
        thread: a writer waiting for the file journals nothing meanwhile, and a barrier
        would then encode the backlog itself, competing for the GIL.
        """
        if event.kind not in STORED_KINDS:
            return
        with self._cond:
            if self._stopping:
                raise StoreError("This store sink is closed.")
            self._queue.append(event)
            if not self._journal_off:
                self._unjournaled.append(event)
            self._handed += 1
            if self._thread is None:
                self._start_writer()
        self.journal()  # before the writer is woken: it would take the journal's lock first
        with self._cond:
            self._cond.notify_all()

    def _start_writer(self) -> None:
        # With the condition held. A daemon: the exit hook, not the interpreter, waits for it.
        self._thread = threading.Thread(target=self._run, name="nbchat-store-writer", daemon=True)
        self._thread.start()

    def barrier(self, timeout: float) -> bool:
        """Make every event handed so far durable: journaled now, on this thread, or
        without a journal, written (``flush``); True when it is."""
        return self.journal() or self.flush(timeout)

    def journal(self) -> bool:
        """Append the events not journaled yet, on this thread; True when every event
        handed so far is in the journal (False: there is none, wait with ``flush``)."""
        if self._journal_off:
            return False
        failed: Exception | None = None
        with self._journal_lock:
            if self._journal_off:
                return False
            if self._journal is None:
                from ._journal import Journal

                folder = self.store.journal_folder()
                assert folder is not None
                self._journal = Journal(folder)
            while self._unjournaled:
                try:
                    self._journal.append(self._unjournaled[0])
                except (OSError, ValueError) as exc:
                    failed = exc  # from here on barriers wait for the store itself
                    self._journal_off = True
                    self._unjournaled.clear()
                    break
                self._unjournaled.popleft()
                self._journaled += 1
        if failed is None:
            return True
        self._say(  # outside the lock: the callback is the user's
            f"The store's journal {self.store.journal_folder()} cannot be written "
            f"({failed}); each turn now waits for the store file itself."
        )
        return False

    def _clear_journal(self) -> None:
        """Everything journaled is written: empty the journal (the writer, when drained)."""
        with self._journal_lock:
            with self._cond:
                written = self._done >= self._journaled
            if written and self._journal is not None and self._journal.size:
                with suppress(OSError):  # left as it is: replaying it later is harmless
                    self._journal.clear()

    def flush(self, timeout: float) -> bool:
        """Wait until every event handed so far is written (True) or ``timeout`` s pass.

        Returns False at once while the store is unavailable (``unavailable``: the user
        has been told); unwritten events stay queued and keep being retried in the
        background. Once a write succeeds again, barriers wait for the backlog.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._handed
            while self._done < target:
                left = deadline - time.monotonic()
                if self._outage or left <= 0:
                    return False
                self._cond.wait(left)
            return True

    @property
    def pending(self) -> int:
        """Events handed but not yet written."""
        with self._cond:
            return self._handed - self._done

    @property
    def unavailable(self) -> bool:
        """Whether the store is unavailable now (a write has waited ``patience`` s and
        none has succeeded since); barriers do not wait meanwhile."""
        return self._outage

    def close(self, timeout: float = EXIT_WAIT_S) -> list[Event]:
        """Flush up to ``timeout`` s, stop the writer; returns the events left unwritten."""
        self.flush_quietly(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(ATTEMPT_S + 1.0)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        self.kept_in = self._close_journal(keep=bool(left))
        own, self._own = self._own, None
        if own is not None:
            own.close()
        live.discard(self)
        return left

    def _close_journal(self, *, keep: bool) -> str | None:
        """Let go of the journal; returns its path if it keeps unwritten events (the next
        open of the store writes them), else deletes it."""
        if keep and not self.journal():
            return None
        with self._journal_lock:
            journal, self._journal = self._journal, None
            self._journal_off = True  # closed: nothing more is journaled
        if journal is None:
            return None
        path = journal.path
        with suppress(OSError):
            if not keep:
                journal.clear()
            journal.close()
        return str(path) if keep and path is not None else None

    def flush_quietly(self, timeout: float) -> bool:
        """``flush`` that also waits through an outage (the exit path: last chance)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._handed
            while self._done < target and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._done >= target

    # ------------------------------------------------------------------ the writer

    def _run(self) -> None:
        mark_writer()  # its own writes never wait in settled()
        backoff = _BACKOFF_FIRST
        waiting_since: float | None = None  # when the head of the queue first failed
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(_IDLE_EXIT)
                if self._stopping or not self._queue:
                    self._thread = None  # idle (or closed): handle() starts another
                    return
                # The head of the queue, and what follows it: a backlog is written in one
                # transaction. Events stay queued until written: order is kept.
                take = 1 if self._done < self._singly_until else BATCH_MAX
                batch = list(islice(self._queue, take))
                if self.store.closed and self.store.path == ":memory:":
                    self._done += len(self._queue)  # nowhere left to write them
                    self._queue.clear()
                    self._cond.notify_all()
                    continue
            if self._unjournaled:  # handle() journals; this is for what it could not
                self.journal()
            started = time.perf_counter()
            attempt_began = time.monotonic()
            try:
                if len(batch) == 1:
                    self._target().write(batch[0], timeout=min(ATTEMPT_S, self.patience))
                else:
                    self._target().write_many(batch, timeout=min(ATTEMPT_S, self.patience))
            except UnstorableRow as exc:
                if len(batch) > 1:  # nothing of it was written: find the refused one alone
                    self._singly_until = self._done + len(batch)
                    continue
                self._say(
                    f"Not saved: one {exc.table} row was skipped because it cannot be "
                    f"stored ({exc.reason})."
                )
            except StoreError as exc:  # locked, or the disk, a closed store: retry
                now = time.monotonic()
                waiting_since = waiting_since or attempt_began
                if not self._outage and now - waiting_since >= self.patience:
                    self._declare_outage(exc)
                failed_fast = not isinstance(exc, StoreLocked)
                if failed_fast:
                    with self._cond:
                        if not self._stopping:
                            self._cond.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            except Exception as exc:  # a bug, not the file: skip, or the queue freezes
                if len(batch) > 1:
                    self._singly_until = self._done + len(batch)
                    continue
                self._say(
                    f"Not saved: one event ({batch[0].kind}) was skipped because writing it "
                    f"failed ({type(exc).__name__}: {exc})."
                )
            self.write_seconds.append(time.perf_counter() - started)
            for notice in self.store.take_notices():  # a team store's server went or came
                self._say(notice)
            backoff, waiting_since = _BACKOFF_FIRST, None
            with self._cond:
                for _ in range(min(len(batch), len(self._queue))):  # close() may have emptied it
                    self._queue.popleft()
                self._done += len(batch)
                drained = not self._queue
                # The store answers again: barriers wait for the backlog from here on.
                self._outage = False
                recovered = drained and self._told
                if recovered:
                    self._told = False
                self._cond.notify_all()
            if drained:
                self._clear_journal()
            if recovered:
                self._say(f"Saved now: the store {self.store.path} is free again.")

    def _target(self) -> Store:
        """The store to write to; a fresh handle if the caller closed theirs meanwhile."""
        if not self.store.closed:
            return self.store
        if self._own is None:
            self._own = type(self.store).open(self.store.path, lock_timeout=ATTEMPT_S)
        return self._own

    def _declare_outage(self, exc: StoreError) -> None:
        with self._cond:
            self._outage = True
            self._cond.notify_all()  # barriers stop waiting
            told, self._told = self._told, True
        if told:
            return  # once per outage, until everything is saved
        if isinstance(exc, StoreLocked):
            why = (
                f"another process{exc.holder} has held the store {self.store.path} "
                f"for {self.patience:g} s"
            )
        else:
            why = str(exc).rstrip(".")
        kept = "memory" if self._journal_off else "this process's journal"
        self._say(
            f"Not saved yet: {why}. The conversation goes on; it is kept in {kept} and "
            "written once the store is free."
        )

    def _say(self, message: str) -> None:
        try:
            self._notify(message)
        except Exception as exc:  # a broken callback must not stop the writer
            print(f"nbchat: {message} (notify failed: {exc!r})", file=sys.stderr)

    def after_fork(self) -> None:
        """In a forked child: the writer thread did not follow; one starts on demand."""
        self._cond = threading.Condition()
        self._journal_lock = threading.Lock()
        self._thread = None
        if self._journal is not None:
            self._journal.after_fork()  # the parent's file: the child makes its own
