"""The store as a consumer of the event stream: which events become which rows, a queue,
and the writer thread that empties it.

``rows_of(event)`` is the one mapping of events to rows (``_WRITERS``: kind -> table and
writer), as ``Insert`` and ``Update`` values a backend applies in its own SQL;
``STORED_KINDS`` derives from it. Values a backend can never take become ``UnstorableRow``.

``StoreSink.handle(event)`` is on the per-token path, so it never touches the store:
an event the store keeps goes on a queue and into this process's journal (one append),
everything else (deltas, notices) costs one set lookup. One writer thread per sink
writes the queue to the store in order, what has queued up (up to ``BATCH_MAX`` events)
in one transaction: each DuckDB statement costs ~0.3 ms, and a commit per event kept a
writer behind the chats of a shared file. A batch the store refuses is written again
one event at a time, so only the row that cannot be stored is skipped.

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
* **Reading your own writes.** A store read in this process (``settled``, which the
  backends' connections enter) first waits, bounded, for this process's sinks on the
  same store to write what they hold, so a turn ``send()`` returned is in what
  ``transcript()`` reads, even while the file was busy.
* **Exit.** An ``atexit`` hook gives every sink up to ``EXIT_WAIT_S`` in all to drain;
  what is left stays in the journal (or, without one, goes to a recovery file beside
  the store), which the next ``Store.open`` of that file writes; one line on stderr says
  so.

What a SIGKILL can lose: nothing ``handle()`` returned from, while the journal works
(``handle`` journals the event before it returns), and so nothing past a barrier, even
while the file is held by another process; without a journal, the events handed and not
yet written.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from typing import TYPE_CHECKING, Any

from .._config import whoami
from .._exceptions import StoreError, StoreLocked, UnstorableRow
from .._types import (
    CompactionEvent,
    Event,
    ImagePart,
    Message,
    MessageAdded,
    MessagesMarked,
    RequestUsage,
    ToolCallsAdapter,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
    utcnow,
)
from ._migrations import ATTRIBUTED_TABLES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from . import Store
    from ._journal import Journal

__all__ = [
    "ATTEMPT_S",
    "ATTRIBUTION_COLUMNS",
    "EXIT_WAIT_S",
    "STORED_KINDS",
    "Insert",
    "RowWrite",
    "StoreSink",
    "Update",
    "attachment_rows",
    "attributed",
    "message_row",
    "rows_of",
    "session_row",
    "session_title",
    "settle",
    "settled",
    "with_image_bytes",
]

ATTEMPT_S = 0.5  # one attempt's wait for the file: short, so stopping is quick
EXIT_WAIT_S = 5.0  # at interpreter exit, the longest wait for all sinks to drain
_BACKOFF_FIRST = 0.05  # after an attempt that failed fast (not a lock wait)
_BACKOFF_MAX = 1.0
BATCH_MAX = 32  # the most queued events the writer writes in one transaction
_IDLE_EXIT = 2.0  # an idle writer thread ends; the next stored event starts another

_live: weakref.WeakSet[StoreSink] = weakref.WeakSet()
_here = threading.local()  # .writer: this is a sink's writer; .depth: inside settled()


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
        _live.add(self)

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
        _live.discard(self)
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
        _here.writer = True  # its own writes never wait in settled()
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


def _after_fork_in_child() -> None:
    # The writer threads did not follow us into the child; its own start on demand.
    for sink in list(_live):
        sink._cond = threading.Condition()
        sink._journal_lock = threading.Lock()
        sink._thread = None
        if sink._journal is not None:
            sink._journal.after_fork()  # the parent's file: the child makes its own


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def settled(store: Store) -> Iterator[None]:
    """Around a use of ``store``: first let this process's sinks write what they hold for
    the same store (bounded by its lock timeout), so a read sees this process's turns.

    Not on a writer thread, and only at the outermost use (a nested one would wait for a
    writer that waits for the connection this thread holds).
    """
    depth = getattr(_here, "depth", 0)
    if depth == 0:
        settle(store)
    _here.depth = depth + 1
    try:
        yield
    finally:
        _here.depth = depth


def settle(store: Store) -> None:
    """Wait (bounded) for this process's sinks to write what they hold for ``store``;
    nothing on a writer thread. ``settled`` for a backend whose uses do not nest."""
    if getattr(_here, "writer", False):
        return
    for sink in list(_live):
        same = sink.store is store or sink.store.path == store.path != ":memory:"
        if same and sink._handed > sink._done:
            sink.flush(store.lock_timeout)


@atexit.register
def _drain_at_exit() -> None:
    """Give every sink a last chance to write; keep what is left in a recovery file."""
    deadline = time.monotonic() + EXIT_WAIT_S
    for sink in list(_live):
        left = sink.close(max(0.0, deadline - time.monotonic()))
        if not left or sink.store.path == ":memory:":
            continue
        if sink.kept_in is not None:
            print(
                f"nbchat: the store {sink.store.path} was still locked at exit; "
                f"{len(left)} events were kept in {sink.kept_in} and will be stored when "
                "it is next opened.",
                file=sys.stderr,
            )
            continue
        try:
            where = sink.store.save_recovery(left)
        except OSError as exc:
            print(
                f"nbchat: the store {sink.store.path} was still locked at exit and the "
                f"recovery file could not be written ({exc}); {len(left)} events are lost.",
                file=sys.stderr,
            )
            continue
        print(
            f"nbchat: the store {sink.store.path} was still locked at exit; {len(left)} "
            f"events were kept in {where} and will be stored when it is next opened.",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- event -> rows
# What each stored event writes, as rows any backend can apply: the backend owns the
# SQL (its upsert, its list syntax) and tells unstorable values from other failures.


@dataclass(frozen=True)
class Insert:
    """One row of ``table``; a row with the same id is replaced (a replayed event), or
    kept as it is when ``keep``."""

    table: str
    columns: tuple[str, ...]
    values: list[Any]
    keep: bool = False


@dataclass(frozen=True)
class Update:
    """Set ``values`` on the rows of ``table`` whose ``key`` column is one of ``keys``.

    ``only_if_null`` limits it to rows where that column is NULL; ``otherwise`` is
    inserted when no row matched.
    """

    table: str
    values: dict[str, Any]
    key: str
    keys: list[Any]
    only_if_null: str | None = None
    otherwise: Insert | None = None


RowWrite = Insert | Update


def rows_of(event: Event) -> tuple[str, list[RowWrite]] | None:
    """The table ``event`` is stored in and the rows it writes; ``None`` if it is not stored.

    Every inserted row carries who wrote it (``attributed``).
    """
    entry = _WRITERS.get(event.kind)
    if entry is None:
        return None
    table, writer = entry
    return table, [_attribute(write) for write in writer(event)]


def _attribute(write: RowWrite) -> RowWrite:
    if isinstance(write, Insert):
        return attributed(write) if write.table in ATTRIBUTED_TABLES else write
    if write.otherwise is not None:
        return replace(write, otherwise=attributed(write.otherwise))
    return write


ATTRIBUTION_COLUMNS = ("username", "hostname")


def attributed(row: Insert) -> Insert:
    """``row`` with the user and host of this process (``_config.whoami``) added."""
    return Insert(
        row.table,
        (*row.columns, *ATTRIBUTION_COLUMNS),
        [*row.values, *_who(os.environ.get("JUPYTERHUB_USER"))],
        row.keep,
    )


@lru_cache(maxsize=4)
def _who(hub_user: str | None) -> tuple[str | None, str]:
    # Keyed by JUPYTERHUB_USER so a changed environment is seen; the rest never changes.
    return whoami()


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# The columns of the rows ``_row`` builds from an event's (or record's) attributes.

_TOOL_CALL_COLUMNS = (
    "id", "session_id", "turn_id", "round", "call_id", "name", "arguments", "result",
    "is_error", "error_kind", "duration_ms", "created_at",
)  # fmt: skip
_COMPACTION_COLUMNS = (
    "id", "session_id", "turn_id", "strategy", "from_seq", "to_seq", "summary",
    "tokens_before", "tokens_after", "model", "cost_usd", "error", "created_at",
)  # fmt: skip
_TURN_OUTCOME = (
    "status", "rounds", "requests", "prompt_tokens", "completion_tokens", "cost_usd",
    "error", "duration_ms", "finished_at",
)  # fmt: skip


# The one mapping between a Message and its ``messages`` row (writes and loads use it).
MESSAGE_COLUMNS = (
    "id", "session_id", "seq", "role", "content", "reasoning", "name", "tool_calls",
    "tool_call_id", "turn_id", "round", "cell_id", "status", "state", "created_at",
    "attachments",
)  # fmt: skip
_ATTACHMENT_COLUMNS = (
    "sha256", "mime", "size", "width", "height", "data", "url", "created_at",
)  # fmt: skip


def message_row(session_id: str, message: Message) -> Insert:
    """The ``messages`` row of one message (a replayed one replaces it)."""
    tool_calls = (
        ToolCallsAdapter.dump_json(message.tool_calls).decode() if message.tool_calls else None
    )
    images = message.attachments
    row = {
        **message.model_dump(
            include=set(MESSAGE_COLUMNS) - {"tool_calls", "created_at", "attachments"}
        ),
        "session_id": session_id,
        "tool_calls": tool_calls,
        "created_at": utc(message.created_at),
        "attachments": json.dumps([image.ref() for image in images]) if images else None,
    }
    return Insert("messages", MESSAGE_COLUMNS, [row[c] for c in MESSAGE_COLUMNS])


def attachment_rows(message: Message) -> list[Insert]:
    """The ``attachments`` rows of a message's images; an image stored before is kept."""
    rows: list[Insert] = []
    for image in message.attachments or []:
        values = [
            image.sha256, image.mime, image.size, image.width, image.height, image.data,
            image.url, utc(message.created_at),
        ]  # fmt: skip
        rows.append(Insert("attachments", _ATTACHMENT_COLUMNS, values, keep=True))
    return rows


def session_row(
    *,
    session_id: str,
    model: str | None,
    system_prompt: str | None,
    title: str | None,
    parent_id: str | None,
    notebook: str | None,
    metadata: dict[str, Any] | None,
    created_at: datetime | None,
) -> Insert:
    """The ``sessions`` row of a new session (``metadata`` as JSON text), attributed."""
    row = {
        "id": session_id,
        "title": title,
        "created_at": utc(created_at or utcnow()),
        "model": model,
        "system_prompt": system_prompt,
        "parent_id": parent_id,
        "notebook": notebook,
        "metadata": json.dumps(metadata or {}),
    }
    return attributed(Insert("sessions", tuple(row), list(row.values()), keep=True))


def with_image_bytes(message: Message, found: dict[str, bytes]) -> Message:
    """``message`` with the stored bytes of its images put back (``found``: by sha256)."""
    if message.attachments:
        message.attachments = [
            i.model_copy(update={"data": found.get(i.sha256)}) if i.url is None else i
            for i in message.attachments
        ]
    return message


def message_from_row(row: dict[str, Any]) -> Message:
    """The Message of a ``messages`` row (``created_at`` an aware datetime).

    Its images come without their bytes (``data`` None); ``Store.load_session`` adds them.
    """
    fields = {k: v for k, v in row.items() if k != "session_id"}
    calls = fields.pop("tool_calls")
    refs = fields.pop("attachments", None)
    return Message(
        **fields,
        tool_calls=ToolCallsAdapter.validate_json(calls) if calls else None,
        attachments=[ImagePart(**ref) for ref in json.loads(refs)] if refs else None,
    )


# ------------------------------------------------------------------ writers
# Each gives one event's rows.


def _write_message(event: MessageAdded) -> list[RowWrite]:
    return [message_row(event.session_id, event.message), *attachment_rows(event.message)]


def _write_marked(event: MessagesMarked) -> list[RowWrite]:
    if not event.message_ids:
        return []
    return [Update("messages", {"state": event.state}, "id", list(event.message_ids))]


def _write_usage(event: UsageEvent) -> list[RowWrite]:
    usage = event.usage or RequestUsage()
    row = {
        "id": event.request_id,
        "session_id": event.session_id,
        "turn_id": event.turn_id or None,
        "round": event.round,
        "model": event.model,
        "provider": event.provider,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cost_usd": event.cost_usd,
        "cost_source": event.cost_source,
        "ttft_ms": event.ttft_ms,
        "first_text_ms": event.first_text_ms,
        "duration_ms": event.duration_ms,
        "finish_reason": event.finish_reason,
        "error": event.error,
        "purpose": event.purpose,
        "estimated_prompt_tokens": event.estimated_prompt_tokens,
        "estimated_cost_usd": event.estimated_cost_usd,
        "suspected_truncation": event.suspected_truncation,
        "created_at": utc(event.at),
    }
    return [Insert("requests", tuple(row), list(row.values()))]


def _row(table: str, columns: tuple[str, ...], source: Any, **given: Any) -> Insert:
    """A row of ``columns``: each the attribute of ``source`` by that name, unless given."""
    values = [given[c] if c in given else getattr(source, c) for c in columns]
    return Insert(table, columns, values)


def _write_tool_result(event: ToolResult) -> list[RowWrite]:
    call = event.call
    # The row is keyed by the record's own id: the model's call id is not unique
    # (fakes and some servers reuse "call_0", even within one turn).
    row = _row(
        "tool_calls",
        _TOOL_CALL_COLUMNS,
        call,
        session_id=event.session_id,
        turn_id=call.turn_id or event.turn_id or None,
        created_at=utc(event.at),
    )
    return [row]


def _write_compaction(event: CompactionEvent) -> list[RowWrite]:
    row = _row(
        "compactions",
        _COMPACTION_COLUMNS,
        event,
        id=event.compaction_id,
        turn_id=event.turn_id or None,
        created_at=utc(event.at),
    )
    return [row]


def _write_turn_started(event: TurnStarted) -> list[RowWrite]:
    writes: list[RowWrite] = [
        Insert(
            "turns",
            ("id", "session_id", "cell_id", "user_text", "status", "started_at"),
            [event.turn_id, event.session_id, event.cell_id, event.text, "running", utc(event.at)],
            keep=True,  # resume() continues a stored turn under the same id
        )
    ]
    title = session_title(event.text)
    if title:  # a session without a title is named after its first message
        writes.append(
            Update("sessions", {"title": title}, "id", [event.session_id], only_if_null="title")
        )
    return writes


TITLE_CHARS = 60


def session_title(text: str | None) -> str | None:
    """A session's title from its first user message: one line, at most ``TITLE_CHARS``."""
    words = " ".join((text or "").split())
    if len(words) <= TITLE_CHARS:
        return words or None
    return words[: TITLE_CHARS - 1].rstrip() + "…"


def _write_turn_finished(event: TurnFinished) -> list[RowWrite]:
    result = event.result
    now = utc(event.at)
    turn_id = result.turn_id or event.turn_id
    outcome = [
        result.status,
        result.rounds,
        result.usage.requests,
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
        result.usage.cost_usd,
        result.error,
        result.duration_ms,
        now,
    ]
    # The start of this turn may never have been stored (an older loop, a replay).
    whole = Insert(
        "turns",
        ("id", "session_id", *_TURN_OUTCOME, "started_at"),
        [
            turn_id,
            result.session_id or event.session_id,
            *outcome,
            now - timedelta(milliseconds=result.duration_ms),
        ],
    )
    values = dict(zip(_TURN_OUTCOME, outcome, strict=True))
    return [Update("turns", values, "id", [turn_id], otherwise=whole)]


# The one list of what is stored: event kind -> (table, writer). The sink derives the
# kinds it queues from it; every other kind (deltas, notices) writes nothing.
_WRITERS: dict[str, tuple[str, Callable[[Any], list[RowWrite]]]] = {
    "message": ("messages", _write_message),
    "messages_marked": ("messages", _write_marked),
    "usage": ("requests", _write_usage),
    "tool_result": ("tool_calls", _write_tool_result),
    "compaction": ("compactions", _write_compaction),
    "turn_started": ("turns", _write_turn_started),
    "turn_finished": ("turns", _write_turn_finished),
}
STORED_KINDS: frozenset[str] = frozenset(_WRITERS)
