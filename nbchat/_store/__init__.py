"""The store: every event of the loop kept as rows, and the reads the loop and analysis need.

``Store`` is the interface; a backend implements it beside this file:

* ``_duckdb.py``: the embedded DuckDB file (``_lease.py``: how processes share it,
  ``_file_lock.py``: who holds it, and asking them to let go).
* ``_rows.py``: the event stream → rows (``STORED_KINDS``, ``rows_of``); ``_sink.py``:
  the writer thread that feeds ``Store.write`` without making the loop wait, and
  ``_live_sinks.py`` what this process's sinks do at a read, at exit and after a fork.
* ``_queries.py``: the named analysis queries, and their results as DataFrames.
* ``_migrations.py``: the schema, as named migrations (``_counter_migrations.py`` those
  that add counters); ``_recount.py`` its counters computed again from the rows.
* ``_records.py``: what reads hand back (``StoredSession``).
* ``_copy.py``: ``copy_store``, every row of one store into another.

``Store.open(db)`` picks the backend from ``db``: a path or ``":memory:"`` is DuckDB, a
``postgresql://`` URL is the team store (``_postgres.py``: ``_pg_lease.py`` its
connections, ``_pg_sql.py`` its migrations and row writes, ``_pg_url.py`` its URL,
``_spool.py`` where writes wait while its server is away, ``_mirror.py`` its analysis,
in DuckDB over rows fetched as Arrow). Each backend keeps the connections of a process
in the one cache (``_leases.py``: ``shared_lease``), so the handles of a session, its writer and
the analysis functions on one store share one connection.

A new backend implements the abstract methods of ``Store`` (``_connect`` opens it) and
of ``Lease``, applies ``_rows.rows_of(event)`` in its own SQL, and runs the queries of
``_queries.py`` in DuckDB (the PostgreSQL backend fetches the rows they read).

Outside this package nobody writes SQL, imports a driver or reads its errors: they
call the methods of ``Store`` and get models, ``Usage`` or DataFrames back.
"""

from __future__ import annotations

import glob
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from .._config import default_db_path
from .._exceptions import StoreError, StoreLocked, UnstorableRow
from ._holds import SessionHold, hold_session
from ._leases import Lease, evict_lease, release_lease, shared_lease

if TYPE_CHECKING:
    import pandas as pd

    from .._events import Event
    from .._types import Message, ToolCall, Usage
    from ._frames import QueryResult
    from ._records import StoredSession
    from ._rows import RowWrite, Update

__all__ = [
    "TABLES",
    "Db",
    "Lease",
    "Store",
    "StoreLocked",
    "UnstorableRow",
    "check_table",
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


# What new_id() makes: a path of this shape that does not exist is a session id passed
# where the store goes (``Store.open``).
_SESSION_ID = re.compile(r"[0-9a-f]{32}")

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
        ``linger``, ``min_hold``, ``sync_every_write``; PostgreSQL: ``spool_dir``,
        ``connect_timeout``, ``read_timeout``).
        """
        raw = default_db_path() if db is None else os.fspath(db)
        if not raw:
            raise StoreError("The store path is empty; pass db= a file path or ':memory:'.")
        if _SESSION_ID.fullmatch(raw) and not os.path.exists(raw):
            # turns(s.id) reads as "this session's turns" but names the store: a file of
            # that name would be made, and read empty.
            raise ValueError(
                f"{raw!r} is a session id, not a store file (db=): to read one session, "
                f"pass session_id={raw!r}."
            )
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
        from ._rows import attachment_rows, attributed, message_row, session_row

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
        from ._rows import Update

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
    def load_session(self, session_id: str, *, include_compacted: bool = False) -> StoredSession:
        """The session's settings and active messages in order; ``StoreError`` if unknown.

        ``include_compacted`` adds the messages folded into a summary, in their place
        (an export of the whole conversation; not a context to continue from)."""

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

    def hold_session(self, session_id: str) -> SessionHold:
        """Hold the session while this process runs a turn of it (``_holds.py``): its
        ``last_seq`` says whether another process has added messages since.

        Raises ``SessionInUseError`` while a turn of it runs elsewhere."""
        return hold_session(self.journal_folder(), session_id)

    # ------------------------------------------------------------------ reading

    def session_usage(self, session_id: str) -> Usage:
        """What a stored session already spent (every request, summaries included).

        A total is ``None`` when any request's figure is unknown, as in ``Usage``.
        """
        from .._types import Usage

        row = self._usage_row(session_id)
        requests, prompt, completion, cached, reasoning, cost = row[:6]
        known_tokens, known_cost, without_tokens, without_cost = row[6:]
        return Usage(
            requests=int(requests),
            prompt_tokens=None if prompt is None else int(prompt),
            completion_tokens=None if completion is None else int(completion),
            cached_tokens=int(cached),
            reasoning_tokens=int(reasoning),
            cost_usd=None if cost is None else float(cost),
            known_tokens=int(known_tokens),
            known_cost_usd=float(known_cost),
            requests_without_tokens=int(without_tokens),
            requests_without_cost=int(without_cost),
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
    from ._duckdb import _RECOVERY, warm_up as warm_duckdb

    warm_duckdb()
    raw = default_db_path()
    if not raw or raw == ":memory:" or "://" in raw:
        return
    path = os.path.realpath(os.path.expanduser(raw))
    if glob.glob(glob.escape(path) + _RECOVERY + "*"):
        return  # importing them warns: left to the first turn, where the user sees it
    with open_store(raw, create=True):
        pass  # closed with linger: the next open finds the file migrated


def _backend(raw: str) -> type[Store]:
    """The backend class for a path or URL."""
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme in ("postgres", "postgresql"):
        from ._postgres import PostgresStore

        return PostgresStore
    from ._duckdb import DuckDBStore

    return DuckDBStore


@contextmanager
def open_store(db: Db, *, create: bool = False) -> Iterator[Store]:
    """The store ``db`` names (a path, ``":memory:"``, an open ``Store``, or ``None``).

    A store file named here that does not exist is refused, and nothing is made, unless
    ``create`` (a copy's or an import's target): a mistyped path for ``sessions()`` or
    ``%%chat_sql --db`` had made a new empty store (and its folders) and shown it empty.
    ``None``, the kernel's default store, is made on first use as a session makes it.
    A store opened here is closed on exit with ``linger=True``: a query right after
    another (the usual notebook cell) finds the connection still open.
    """
    if isinstance(db, Store):
        yield db
        return
    if db is not None and not create:
        _refuse_missing(str(db))
    store = Store.open(db)
    try:
        yield store
    finally:
        store.close(linger=True)


def _refuse_missing(raw: str) -> None:
    """A ``StoreError`` for a store file ``raw`` names that is not there."""
    if raw == ":memory:" or "://" in raw or _SESSION_ID.fullmatch(raw):
        return  # Store.open says what a session id given as the store is
    path = os.path.expanduser(raw)
    if os.path.exists(path):
        return
    default = default_db_path()
    raise StoreError(
        f"No store at {path}: the file does not exist, and nothing was created. The "
        f"default store is {default}; a Session(db=...) starts a new store file."
    )
