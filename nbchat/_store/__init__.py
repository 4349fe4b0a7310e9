"""The store: every event of the loop kept as rows, and the reads the loop and analysis need.

``Store`` is the interface; a backend implements it beside this file:

* ``_duckdb.py``: the embedded DuckDB file (``_lease.py``: how processes share it).
* ``_sink.py``: the event stream → rows (``STORED_KINDS``, ``rows_of``), and the writer
  thread that feeds ``Store.write`` without making the loop wait.
* ``_queries.py``: the named analysis queries, and their results as DataFrames.
* ``_migrations.py``: the schema, as named migrations.
* ``_records.py``: what reads hand back (``StoredSession``).

``Store.open(db)`` picks the backend from ``db``: a path or ``":memory:"`` is DuckDB, a
``postgresql://`` URL is the team store (``_postgres.py``: ``_pg_lease.py`` its
connections and migrations, ``_spool.py`` where writes wait while its server is away,
``_mirror.py`` its analysis, in DuckDB over rows fetched as Arrow). Each backend keeps
the connections of a process in the one cache below (``shared_lease``), so the handles
of a session, its writer and the analysis functions on one store share one connection.

A new backend implements the abstract methods of ``Store`` (``_connect`` opens it) and
of ``Lease``, applies ``_sink.rows_of(event)`` in its own SQL, and runs the queries of
``_queries.py`` in DuckDB (the PostgreSQL backend fetches the rows they read).

Outside this package nobody writes SQL, imports a driver or reads its errors: they
call the methods of ``Store`` and get models, ``Usage`` or DataFrames back.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from .._config import default_db_path
from .._exceptions import StoreError, StoreLocked, UnstorableRow

if TYPE_CHECKING:
    import pandas as pd

    from .._types import Event, Message, ToolCall, Usage
    from ._frames import QueryResult
    from ._records import StoredSession
    from ._sink import RowWrite, Update

__all__ = [
    "TABLES",
    "Db",
    "Lease",
    "Store",
    "StoreLocked",
    "UnstorableRow",
    "check_table",
    "copy_store",
    "evict_lease",
    "key_of",
    "open_store",
    "pending_tool_calls",
    "release_lease",
    "shared_lease",
    "warm_up",
]

# The tables a user's SQL can read (README, sql(), %%chat_sql help are generated from it).
TABLES: tuple[str, ...] = (
    "sessions", "messages", "requests", "tool_calls", "compactions", "turns", "attachments",
)  # fmt: skip


# Columns of ``sessions`` a caller may change after creation (``update_session``).
SESSION_FIELDS = frozenset({"title", "model", "system_prompt", "parent_id", "notebook", "metadata"})


def check_table(table: str) -> str:
    """``table`` if it is one of the store's own tables (names go into SQL text)."""
    if table not in TABLES:
        raise StoreError(f"The store has no table {table!r}; its tables are {', '.join(TABLES)}.")
    return table


def key_of(table: str) -> str:
    """The column that identifies a row of ``table`` (``copy_store`` pages and dedups by it)."""
    return "sha256" if table == "attachments" else "id"


# The named analysis queries (``Store.frame``); ``_queries.QUERIES`` has one of each.
QueryName = Literal[
    "sessions",
    "transcript",
    "usage",
    "tool_calls",
    "compactions",
    "turns",
    "costs_by_model",
    "costs_by_day",
    "costs_by_session",
    "costs_by_notebook",
    "costs_by_user",
    "costs_by_tag",
    "search",
    "attachments",
    "spend_by_day_model",
    "spend_by_session",
    "spend_by_session_all",
    "latency_by_model",
    "latency_by_model_sampled",
    "tool_stats",
]


def pending_tool_calls(messages: Sequence[Message]) -> list[ToolCall]:
    """Tool calls of the last assistant message in ``messages`` that have no result yet.

    Non-empty means the process died between storing the assistant's tool calls and
    storing their results: the session is *pending* (resume() or abort_pending()).
    """
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role == "assistant" and message.tool_calls:
            answered = {
                later.tool_call_id for later in messages[index + 1 :] if later.role == "tool"
            }
            return [call for call in message.tool_calls if call.id not in answered]
        if message.role in ("assistant", "user"):
            return []
    return []


def default_lock_timeout() -> float:
    """Seconds to wait for another process: ``NBCHAT_DB_LOCK_TIMEOUT`` or 15."""
    raw = os.environ.get("NBCHAT_DB_LOCK_TIMEOUT")
    try:
        return float(raw) if raw else 15.0
    except ValueError:
        raise StoreError(
            f"NBCHAT_DB_LOCK_TIMEOUT must be a number of seconds, not {raw!r}."
        ) from None


class Store(ABC):
    """Where sessions and the rows of their event streams are kept (a DuckDB file today).

    Open with ``Store.open(db)``. The session loop feeds it every event through
    ``handle()`` (or its background writer, through ``write()``); the analysis
    functions read it with ``frame()`` and ``sql()``. Several processes may share one
    store: each waits (bounded by ``lock_timeout`` seconds) for the others.
    """

    path: str
    # What the last open wrote from recovery files (also a UserWarning), or None.
    recovered: str | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        db: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float | None = None,
        **options: Any,
    ) -> Store:
        """Open (creating and migrating if needed) the store at ``db``.

        ``None`` means ``NBCHAT_DB`` or ``~/.nbchat/nbchat.duckdb``; ``":memory:"`` is
        a private in-memory store that lives as long as this object. ``lock_timeout``
        bounds how long any operation waits for another process (default 15 s, or
        ``NBCHAT_DB_LOCK_TIMEOUT``). Other options belong to the backend (DuckDB:
        ``linger``, ``min_hold``, ``sync_every_write``).
        """
        raw = default_db_path() if db is None else os.fspath(db)
        if not raw:
            raise StoreError("The store path is empty; pass db= a file path or ':memory:'.")
        timeout = default_lock_timeout() if lock_timeout is None else float(lock_timeout)
        backend = _backend(raw) if cls is Store else cls
        return backend._connect(raw, lock_timeout=timeout, **options)

    @classmethod
    @abstractmethod
    def _connect(cls, raw: str, *, lock_timeout: float, **options: Any) -> Store:
        """Open this backend's store at ``raw`` (``open`` resolved the defaults)."""

    @abstractmethod
    def close(self, *, linger: bool = False) -> None:
        """Release this handle; the store is let go when no other handle in the process uses it.

        ``linger=True`` keeps the connection a moment (the backend's linger) for a
        next handle, as the analysis functions do between notebook cells.
        """

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Whether ``close()`` was called."""

    @property
    @abstractmethod
    def lock_timeout(self) -> float:
        """Seconds an operation waits for another process holding the store."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r}{', closed' if self.closed else ''})"

    # ------------------------------------------------------------------ sessions

    def create_session(
        self,
        *,
        session_id: str,
        model: str | None,
        system_prompt: str | None,
        title: str | None = None,
        parent_id: str | None = None,
        notebook: str | None = None,
        metadata: dict[str, Any] | None = None,
        created_at: datetime | None = None,
        messages: Sequence[Message] = (),
    ) -> None:
        """Record a new session (with ``messages``, all at once); ids are unique."""
        from ._sink import attachment_rows, attributed, message_row, session_row

        row = session_row(
            session_id=session_id,
            model=model,
            system_prompt=system_prompt,
            title=title,
            parent_id=parent_id,
            notebook=notebook,
            metadata=metadata,
            created_at=created_at,
        )
        unit: list[RowWrite] = [row]
        for message in messages:
            unit += [attributed(message_row(session_id, message)), *attachment_rows(message)]
        self._insert_session(session_id, unit)

    @abstractmethod
    def _insert_session(self, session_id: str, unit: list[RowWrite]) -> None:
        """Write a new session's row (``unit[0]``) and its messages' rows in one go;
        ``StoreError`` if the session (or a message) is stored already."""

    def update_session(self, session_id: str, **fields: Any) -> None:
        """Change some of a session's settings (title, model, system_prompt, metadata...)."""
        from ._sink import Update

        unknown = set(fields) - SESSION_FIELDS
        if unknown:
            raise StoreError(f"Sessions have no field {', '.join(sorted(unknown))}.")
        if fields:
            values = {n: json.dumps(v) if n == "metadata" else v for n, v in sorted(fields.items())}
            self._apply(Update("sessions", values, "id", [session_id]))

    @abstractmethod
    def _apply(self, write: Update) -> None:
        """Apply one row write made here (not an event's: those come through ``write``)."""

    @abstractmethod
    def has_session(self, session_id: str) -> bool:
        """Whether a session with this id is stored."""

    @abstractmethod
    def latest_session_id(self, notebook: str | None = None) -> str | None:
        """The most recently created session (in ``notebook``, if given), or ``None``."""

    @abstractmethod
    def session_for_cell(self, cell_id: str, notebook: str | None = None) -> str | None:
        """The latest session whose live messages include a user message from ``cell_id``.

        In ``notebook`` if given; ``None`` if no session has one. After a kernel
        restart, a re-run cell continues the conversation it belonged to.
        """

    @abstractmethod
    def load_session(self, session_id: str) -> StoredSession:
        """The session's settings and active messages in order; ``StoreError`` if unknown."""

    def pending_tool_calls(self, session_id: str) -> list[ToolCall]:
        """The stored session's tool calls that have no result yet (it is *pending*)."""
        return pending_tool_calls(self.load_session(session_id).messages)

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> None:
        """Persist one event of the session loop now; deltas and notices are ignored."""
        self.write(event)

    @abstractmethod
    def write(self, event: Event, *, timeout: float | None = None) -> None:
        """Write one event's rows now, waiting up to ``timeout`` s (default ``lock_timeout``).

        Raises ``StoreLocked`` if another process held the store all along (retry
        later), ``UnstorableRow`` if the values can never be stored (never retry),
        ``StoreError`` otherwise (the disk, a closed store: possibly worth a retry).
        """

    def write_many(self, events: Sequence[Event], *, timeout: float | None = None) -> None:
        """Write several events' rows, in order; raises as ``write`` does.

        A backend may write them all in one transaction (all or none); this one writes
        them one by one, so a failure may leave the first ones written (harmless: a
        retry rewrites them by id).
        """
        for event in events:
            self.write(event, timeout=timeout)

    @abstractmethod
    def end_unfinished_turns(
        self, session_id: str, *, status: str, error: str, keep: str | None = None
    ) -> int:
        """Close the session's turns still running (or never given a status); returns how many.

        For turns whose process is gone (a reopened session) or that ``abort_pending()``
        resolves; ``keep`` is a turn id to leave alone (the one running now).
        """

    @abstractmethod
    def save_recovery(self, events: Iterable[Event]) -> str:
        """Keep events this process could not write where the next ``open`` writes them.

        Returns where they were kept; raises ``OSError`` if they cannot be kept.
        """

    def journal_folder(self) -> Path | None:
        """Where this process's sink journals the events it keeps before the store has
        written them (``_journal.py``); None: barriers wait for the store itself."""
        return None

    # ------------------------------------------------------------------ reading

    def session_usage(self, session_id: str) -> Usage:
        """What a stored session already spent (every request, summaries included).

        A total is ``None`` when any request's figure is unknown, as in ``Usage``.
        """
        from .._types import Usage

        requests, prompt, completion, cached, reasoning, cost = self._usage_row(session_id)
        return Usage(
            requests=int(requests),
            prompt_tokens=None if prompt is None else int(prompt),
            completion_tokens=None if completion is None else int(completion),
            cached_tokens=int(cached),
            reasoning_tokens=int(reasoning),
            cost_usd=None if cost is None else float(cost),
        )

    @abstractmethod
    def _usage_row(self, session_id: str) -> Sequence[Any]:
        """The one row of ``_queries.SESSION_USAGE`` for the session."""

    @abstractmethod
    def frame(self, name: QueryName, **params: Any) -> pd.DataFrame:
        """The named analysis query (``_queries.QUERIES``) as a DataFrame."""

    def sql(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        allow_files: bool = False,
    ) -> pd.DataFrame:
        """Run one user SELECT, read-only and sandboxed; ``StoreError`` for anything else.

        ``params`` is a sequence for ``?`` placeholders or a mapping for ``$name`` ones;
        ``allow_files=True`` lets the query read files (``read_csv``...).
        """
        from ._frames import to_frame
        from ._queries import check_select

        check_select(query)
        return to_frame(self._select(query, params, allow_files=allow_files))

    @abstractmethod
    def _select(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] | None, *, allow_files: bool
    ) -> QueryResult:
        """``sql``'s checked SELECT, run read-only and sandboxed, as columns."""

    def stats(self) -> dict[str, Any]:
        """Counters of this process's connection handling (opens, waits), for benchmarks."""
        return {}

    # ------------------------------------------------------------------ copying

    def dump_rows(
        self, table: str, *, after: str | None, limit: int
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Up to ``limit`` rows of ``table`` with ids above ``after``, in id order, with
        their column names (timestamps as aware datetimes, JSON as text): ``copy_store``."""
        return self._dump_rows(check_table(table), key_of(table), after, limit)

    @abstractmethod
    def _dump_rows(
        self, table: str, key: str, after: str | None, limit: int
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """``dump_rows`` of a table checked to be the store's own, ``key`` its key."""

    def load_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> int:
        """Insert ``rows`` as they are, in one transaction, leaving alone those whose id is
        stored already; returns how many were added (``copy_store``)."""
        names = ", ".join(f'"{c}"' for c in columns)
        return self._load_rows(check_table(table), names, len(columns), rows)

    @abstractmethod
    def _load_rows(self, table: str, names: str, width: int, rows: Sequence[Sequence[Any]]) -> int:
        """``load_rows`` of a table checked to be the store's own; ``names`` the quoted
        list of its ``width`` columns."""

    def loaded(self) -> None:  # noqa: B027 -- a hook: most backends need nothing here
        """``load_rows`` is done: bring what is kept beside the rows (counters) up to date."""

    def take_notices(self) -> list[str]:
        """What the backend has to tell the user since last asked (a team store's server
        went away, or came back); the sink's writer relays it. Most backends have nothing."""
        return []


# What every analysis function's ``db=`` takes.
Db: TypeAlias = str | os.PathLike[str] | Store | None


def warm_up() -> None:
    """Import the default backend's driver and start it once, then open the default store
    (creating and migrating a new file), so a first turn need not: ~150 ms on its main
    thread, before its placeholder shows. A team store (a URL) is not connected to here."""
    from ._duckdb import _RECOVERY
    from ._duckdb import warm_up as warm_duckdb

    warm_duckdb()
    raw = default_db_path()
    if not raw or raw == ":memory:" or "://" in raw:
        return
    path = os.path.realpath(os.path.expanduser(raw))
    if glob.glob(glob.escape(path) + _RECOVERY + "*"):
        return  # importing them warns: left to the first turn, where the user sees it
    with open_store(raw):
        pass  # closed with linger: the next open finds the file migrated


def _backend(raw: str) -> type[Store]:
    """The backend class for a path or URL."""
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme in ("postgres", "postgresql"):
        from ._postgres import PostgresStore

        return PostgresStore
    from ._duckdb import DuckDBStore

    return DuckDBStore


def copy_store(src: Db, dst: Db, *, batch: int = 5_000) -> dict[str, int]:
    """Copy every session and row of the store ``src`` into ``dst``, keeping their ids.

    For moving a local DuckDB file into a team store (or the other way, for a backup):
    ``copy_store("~/.nbchat/nbchat.duckdb", "postgresql://me@db/nbchat")``. Rows that
    ``dst`` has already (same id) are left as they are, so running it again adds nothing.
    Returns the rows added per table.
    """
    added: dict[str, int] = {}
    with open_store(src) as source, open_store(dst) as target:
        if source.path == target.path:
            raise StoreError(f"copy_store() needs two stores; both are {source.path}.")
        for table in TABLES:  # sessions first: a reader never sees rows without their session
            added[table] = 0
            after: str | None = None
            while True:
                columns, rows = source.dump_rows(table, after=after, limit=batch)
                if not rows:
                    break
                added[table] += target.load_rows(table, columns, rows)
                after = rows[-1][columns.index(key_of(table))]
        target.loaded()
    return added


@contextmanager
def open_store(db: Db) -> Iterator[Store]:
    """The store ``db`` names (a path, ``":memory:"``, an open ``Store``, or ``None``).

    A store opened here is closed on exit with ``linger=True``: a query right after
    another (the usual notebook cell) finds the connection still open.
    """
    if isinstance(db, Store):
        yield db
        return
    store = Store.open(db)
    try:
        yield store
    finally:
        store.close(linger=True)


# ------------------------------------------------------------------ the one cache


class Lease(ABC):
    """A process's access to one store, shared by all ``Store`` handles on it.

    ``key`` is what the cache finds it by (a resolved path, a URL); ``refs`` counts
    the handles using it. A private lease (``":memory:"``) is not cached.
    """

    key: str
    refs: int = 0
    shared: bool = True
    # Files other processes left were looked for (at the first open, or the first after
    # the store was closed without linger; the analysis functions' linger keeps it).
    leftovers_checked = False

    @abstractmethod
    def connection(self, timeout: float, access: Any = "write") -> AbstractContextManager[Any]:
        """The open connection, for one operation; waits up to ``timeout`` s for the store."""

    @abstractmethod
    def release(self) -> None:
        """Let go of the store now; keep what makes reconnecting quick."""

    @abstractmethod
    def shutdown(self) -> None:
        """Close everything now."""

    @abstractmethod
    def after_fork(self) -> None:
        """In a forked child: forget the parent's connections without touching them."""

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and tests."""
        return {}


_IDLE_LEASES = 4  # unused leases kept for quick reuse (analysis calls open and close)
_leases: OrderedDict[str, Lease] = OrderedDict()
_leases_lock = threading.Lock()


def shared_lease(key: str, make: Callable[[], Lease]) -> Lease:
    """The process's lease for ``key`` (made by ``make`` the first time), one reference more."""
    with _leases_lock:
        lease = _leases.pop(key, None) or make()
        _leases[key] = lease  # most recently used last
        lease.refs += 1
        return lease


def cached_lease(key: str) -> Lease | None:
    """The cached lease for ``key``, if any (for tests and benchmarks)."""
    with _leases_lock:
        return _leases.get(key)


def evict_lease(key: str) -> None:
    """Shut down and forget the cached lease for ``key`` if no handle uses it (tests and
    benchmarks, before they drop a database)."""
    with _leases_lock:
        lease = _leases.get(key)
        if lease is None or lease.refs > 0:
            return
        del _leases[key]
    lease.shutdown()


def release_lease(lease: Lease, *, linger: bool = False) -> None:
    """Drop one reference; the last one lets go of the store (after its linger, if asked).

    A shared lease stays cached for the next ``Store.open`` of the same store; only
    the few most recently used idle ones are kept.
    """
    evicted: list[Lease] = []
    with _leases_lock:
        lease.refs -= 1
        last = lease.refs <= 0
        if last and lease.shared:
            idle = [item for item in _leases.values() if item.refs <= 0]
            for item in idle[: max(0, len(idle) - _IDLE_LEASES)]:
                del _leases[item.key]
                evicted.append(item)
    if not last:
        return
    if not lease.shared or lease in evicted:
        lease.shutdown()
    elif not linger:
        lease.release()
        lease.leftovers_checked = False  # closed for good: the next open looks again
    for item in evicted:
        if item is not lease:
            item.shutdown()


@atexit.register
def _close_all() -> None:
    # Closing lets each backend finish cleanly (DuckDB checkpoints, so the next open is fast).
    with _leases_lock:
        leases = list(_leases.values())
    for lease in leases:
        lease.shutdown()


def _after_fork_in_child() -> None:
    global _leases_lock
    _leases_lock = threading.Lock()
    for lease in _leases.values():
        lease.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
