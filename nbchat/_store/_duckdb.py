"""The DuckDB backend: sessions, the rows of the event stream, and the reads, in one file
shared by many kernels.

``write()`` writes the rows of each event that completes something (a message, a
request, a tool call, a compaction, a turn), committed before it returns; stream deltas
are ignored. It tells the two ways a write fails apart: ``StoreLocked`` (another process
holds the file: retry) and ``UnstorableRow`` (DuckDB refuses the values: a retry can
never succeed). Which event becomes which row is ``_rows.py``; the queue that feeds
``write()`` from a background thread, ``_sink.py``; how those rows are written, in
``_duckdb_rows.py``; how the file is shared, in ``_lease.py``; the
analysis queries, in ``_queries.py``.

Events a process could not write before it exited are kept in a recovery file beside
the store (``<db>.nbchat-recovery-<pid>.jsonl``), which the next ``Store.open`` writes.
"""

from __future__ import annotations

import glob
import os
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._events import Event, EventAdapter
from .._exceptions import StoreError, UnknownSession, UnstorableRow
from .._types import Message, utcnow
from . import TABLES, Lease, QueryName
from ._duckdb_rows import (
    _RowOps,
    duckdb_module,
    first_line,
    from_epoch_us,
    parsed,
    write_event,
    write_events,
)
from ._frames import QueryResult, arrow_readable, to_frame
from ._journal import journal_folder
from ._kept import KeptRows
from ._lease import Access, LeaseOptions, acquire_lease
from ._live_sinks import settled
from ._queries import QUERIES, SESSION_TIMES, SESSION_USAGE
from ._records import StoredSession
from ._recount import fill_counters
from ._rows import (
    MESSAGE_COLUMNS,
    STORED_KINDS,
    Insert,
    RowWrite,
    Update,
    message_from_row,
    with_image_bytes,
)
from ._sql import END_TURNS, SqlStore, load_queries
from ._tally import apply_rows, bumps

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DuckDBStore", "warm_up"]

_RECOVERY = ".nbchat-recovery-"


class DuckDBStore(SqlStore[Lease]):
    """A DuckDB file (or ``:memory:``) holding sessions, messages, requests and more.

    Open with ``Store.open(db)``. Several processes may share one file: each holds it
    only while it is writing or reading, and waits (bounded by ``lock_timeout``
    seconds) for the others.
    """

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def _connect(
        cls,
        raw: str,
        *,
        lock_timeout: float,
        linger: float = 0.5,
        min_hold: float = 0.1,
        sync_every_write: bool = False,
        **options: Any,
    ) -> DuckDBStore:
        """Open the file (or ``:memory:``) at ``raw``.

        ``linger`` is how long the file stays attached after the last use, ``min_hold``
        how long a busy process keeps it before handing it to a waiting one. By default
        a write reaches the operating system before ``write()`` returns (safe if the
        process dies) and is flushed to disk when the file is let go;
        ``sync_every_write=True`` flushes every write (safe against power loss,
        slower). The three are fixed by the first ``open`` of a path in a process.
        """
        if options:
            raise TypeError(f"unexpected store options: {', '.join(sorted(options))}")
        lease_options = LeaseOptions(
            linger=linger, min_hold=min_hold, sync_every_write=sync_every_write
        )
        lease = acquire_lease(raw, lease_options, lock_timeout)
        store = cls(lease, lock_timeout=lock_timeout, path=lease.key)
        try:
            # Recovery files are looked for once per process (a directory listing each
            # time would cost every analysis call); journals at every open (their own
            # small folder) and before a session is loaded.
            if not lease.leftovers_checked and lease.key != ":memory:":
                if glob.glob(glob.escape(lease.key) + _RECOVERY + "*"):
                    store._import_recovery()
                lease.leftovers_checked = True
            store._replay_journals()
        except BaseException:
            store.close()
            raise
        return store

    def journal_folder(self) -> Path | None:
        return journal_folder(self.path)

    @contextmanager
    def _connection(self, timeout: float | None = None, access: Access = "write") -> Iterator[Any]:
        """The file's connection; this process's sinks write what they hold first."""
        if self._lease is None:
            raise StoreError(f"The store {self.path} is closed.")
        wait = self._lock_timeout if timeout is None else timeout
        with settled(self), self._lease.connection(wait, access) as con:
            yield con

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._connection() as con:
            con.execute(parsed(sql), list(params))

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as con:
            rows: list[tuple[Any, ...]] = con.execute(sql, list(params)).fetchall()
            return rows

    # ------------------------------------------------------------------ sessions

    def _insert_session(self, session_id: str, unit: list[RowWrite]) -> None:
        row, messages = unit[0], unit[1:]
        assert isinstance(row, Insert)
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                names = ", ".join(row.columns)
                con.execute(
                    f"INSERT INTO sessions ({names}) VALUES ({', '.join('?' * len(row.columns))})",
                    row.values,
                )
                # Counted as any stored row (the row's copy in its counters, m009); the
                # messages through the counters too (ids already stored: replaced).
                ops = _RowOps(con)
                for bump in bumps(
                    "sessions", [], [dict(zip(row.columns, row.values, strict=True))]
                ):
                    ops.bump(bump)
                apply_rows(messages, ops)
                con.execute("COMMIT")
            except duckdb_module().ConstraintException as exc:
                con.execute("ROLLBACK")
                raise StoreError(
                    f"A session or message with this id already exists in {self.path}"
                    f" (session {session_id})."
                ) from exc
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def _apply(self, write: Update) -> None:
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                apply_rows([write], _RowOps(con))  # a session's row is copied in its counters
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def load_session(self, session_id: str, *, include_compacted: bool = False) -> StoredSession:
        """The session's settings and active messages in order; ``StoreError`` if unknown."""
        self._replay_journals()  # a process that died in this session may have left one
        head_sql, rows_sql, max_seq_sql = _LOAD_ALL if include_compacted else _LOAD
        with self._connection() as con:
            head = con.execute(head_sql, [session_id]).fetchall()
            if not head:
                raise UnknownSession(f"No session {session_id} in {self.path}.")
            rows = con.execute(rows_sql, [session_id]).fetchall()
            # fetchall: a result fetched with fetchone() stays open on the connection
            # (DuckDB 2), and the next query read as a relation (frame()) is refused.
            [(max_seq,)] = con.execute(max_seq_sql, [session_id]).fetchall()
            messages = [_message(row) for row in rows]
            _load_image_bytes(con, messages)
        *settings, created_us, metadata = head[0]
        return StoredSession.of_row(
            [*settings, from_epoch_us(created_us), metadata], messages=messages, max_seq=max_seq
        )

    # ------------------------------------------------------------------ events

    def write(self, event: Event, *, timeout: float | None = None) -> None:
        """Write one event's rows now, waiting up to ``timeout`` s (default ``lock_timeout``)."""
        if event.kind not in STORED_KINDS:
            return
        assert self._lease is not None
        kept = _kept_rows(self._lease)
        with self._connection(timeout) as con:
            write_events(con, [event], kept)

    def write_many(self, events: Sequence[Event], *, timeout: float | None = None) -> None:
        """Write several events' rows in one transaction (all or none), in one hold of
        the file: a commit per event was most of what a backlog cost the writer."""
        assert self._lease is not None
        kept = _kept_rows(self._lease)
        with self._connection(timeout) as con:
            write_events(con, events, kept)

    def end_unfinished_turns(
        self, session_id: str, *, status: str, error: str, keep: str | None = None
    ) -> int:
        """Close the session's turns still running (or never given a status); returns how many.

        For turns whose process is gone (a reopened session) or that ``abort_pending()``
        resolves; ``keep`` is a turn id to leave alone (the one running now).
        """
        with self._connection() as con:
            params = [status, error, utcnow(), session_id, keep, keep]
            row = con.execute(END_TURNS, params).fetchone()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ recovery

    def save_recovery(self, events: Iterable[Event]) -> str:
        """Keep events this process could not write in a file the next ``open`` writes.

        Returns the file's path; raises ``OSError`` if it cannot be written.
        """
        path = f"{self.path}{_RECOVERY}{os.getpid()}.jsonl"
        partial = path + ".partial"  # renamed when complete: never imported half-written
        with open(partial, "wb") as out:
            for event in events:
                out.write(EventAdapter.dump_json(event) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
        return path

    def _import_recovery(self) -> None:
        """Write the events of recovery files left beside this store, then delete them.

        The file stays held for the whole import, so two processes opening the store
        together do not both import a file; a replay (killed mid-import) is harmless,
        every row is written by id.
        """
        stored = skipped = 0
        names: list[str] = []
        with self._connection() as con:
            for name in sorted(glob.glob(glob.escape(self.path) + _RECOVERY + "*.jsonl")):
                try:
                    with open(name, "rb") as source:
                        lines = source.read().splitlines()
                except FileNotFoundError:
                    continue  # another process imported it a moment ago
                for line in lines:
                    try:
                        event = EventAdapter.validate_json(line)
                        write_event(con, event)
                        stored += 1
                    except (ValueError, UnstorableRow):
                        skipped += 1
                with suppress(OSError):  # a read-only folder: imported again next time, harmless
                    os.remove(name)
                names.append(os.path.basename(name))
        what = f"{stored} events that a process exiting while {self.path} was locked had kept in"
        self._tell_recovered(what, names, skipped, warn=True)

    # ------------------------------------------------------------------ copying

    def _dump_rows(
        self, table: str, key: str, after: str | None, limit: int
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        with self._connection() as con:
            described = con.execute(f'DESCRIBE "{table}"').fetchall()
            columns = [str(row[0]) for row in described]
            stamps = [str(row[1]).startswith("TIMESTAMP") for row in described]
            select = ", ".join(
                f'epoch_us("{c}")' if stamp else f'"{c}"'
                for c, stamp in zip(columns, stamps, strict=True)
            )
            rows = con.execute(
                f'SELECT {select} FROM "{table}" WHERE ?::VARCHAR IS NULL OR {key} > ?'
                f" ORDER BY {key} LIMIT ?",
                [after, after, limit],
            ).fetchall()
        return columns, [
            tuple(from_epoch_us(v) if stamp else v for v, stamp in zip(row, stamps, strict=True))
            for row in rows
        ]

    def loaded(self) -> None:
        """The counters computed again from every row (``load_rows`` bypasses them)."""
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                fill_counters(con)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def _load_rows(self, table: str, names: str, width: int, rows: Sequence[Sequence[Any]]) -> int:
        marks = ", ".join("?" * width)
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                (before,) = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                con.executemany(
                    f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({marks})',
                    [list(row) for row in rows],
                )
                (after,) = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return int(after) - int(before)

    # ------------------------------------------------------------------ reading

    def _usage_row(self, session_id: str) -> Sequence[Any]:
        [row] = self._fetchall(SESSION_USAGE, [session_id])
        return row

    def frame(self, name: QueryName, **params: Any) -> pd.DataFrame:
        """The named analysis query (``_queries.QUERIES``) as a DataFrame."""
        query = QUERIES[name]
        assert self._lease is not None
        kept = _kept_rows(self._lease)
        with self._connection() as con:
            if not query.session_times:
                # Parsed once (``parsed``): parsing was ~0.6 ms of a transcript's read.
                result = _frame_rows(con, parsed(query.sql), query.bind(params))
                return to_frame(result, query.json_columns, query.order_by)
            # From the counters, in the same hold of the file (no other writer between).
            times = con.execute(parsed(SESSION_TIMES), [params["session_id"]]).fetchall()
            first_us, last_us, version = times[0] if times else (None, None, None)
            key = (name, *sorted(params.items()))
            rows = kept.get(key, version)
            if rows is None:
                bounds = {"first_us": first_us, "last_us": last_us}
                rows = _frame_rows(con, parsed(query.sql), query.bind({**params, **bounds}))
                kept.put(key, version, rows)
        return kept.frame(key, rows, query.json_columns)

    def _select(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] | None, *, allow_files: bool
    ) -> QueryResult:
        return self.query_read_only(query, params, allow_files=allow_files, for_frame=True)

    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        """Run one query built by nbchat (parameterised) and return its columns."""
        with self._connection() as con:
            cursor = con.execute(sql, list(params or []))
            return _result(cursor)

    def query_read_only(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        allow_files: bool = False,
        for_frame: bool = False,
    ) -> QueryResult:
        """Run one user query, sandboxed, on the store opened read-only.

        The query cannot change the store, read or write other files (``read_csv``,
        ``glob``...) or load extensions; ``allow_files=True`` lets it read files.
        ``params`` is a sequence for ``?`` placeholders or a mapping for ``$name`` ones.
        The columns are numpy arrays; ``for_frame`` fetches what ``to_frame`` reads
        fastest (``_frame_rows``).
        """
        if self._lease is None:
            raise StoreError(f"The store {self.path} is closed.")
        bound = dict(params) if isinstance(params, Mapping) else list(params or [])
        access: Access = "files" if allow_files else "sandbox"
        duckdb = duckdb_module()
        with self._connection(access=access) as con:
            con.execute("BEGIN TRANSACTION READ ONLY")
            try:
                return (
                    _frame_rows(con, sql, bound) if for_frame else _result(con.execute(sql, bound))
                )
            except (duckdb.PermissionException, duckdb.CatalogException) as exc:
                raise user_query_failed(exc, str(self.path)) from exc  # others: the lease's
            finally:
                con.execute("ROLLBACK")

    def stats(self) -> dict[str, Any]:
        """Counters of this process's connection handling (opens, waits), for benchmarks."""
        if self._lease is None:
            return {}
        return self._lease.stats()


_kept: weakref.WeakKeyDictionary[Lease, KeptRows] = weakref.WeakKeyDictionary()
_kept_lock = threading.Lock()


def _kept_rows(lease: Lease) -> KeptRows:
    with _kept_lock:
        kept = _kept.get(lease)
        if kept is None:
            kept = _kept[lease] = KeptRows()
        return kept


def _result(cursor: Any) -> QueryResult:
    description = cursor.description or []
    columns = [str(item[0]) for item in description]
    types = [str(item[1]) for item in description]
    data = cursor.fetchnumpy() if columns else {}
    return QueryResult(columns=columns, types=types, data=dict(data))


def _frame_rows(con: Any, sql: Any, params: Sequence[Any] | Mapping[str, Any]) -> QueryResult:
    """The rows of one SELECT for a DataFrame: as Arrow when its column types allow
    (``_frames.arrow_readable``), else as numpy. Through a relation: its types are known
    before it runs, and DuckDB fetches Arrow from it without copying the rows again."""
    relation = con.sql(sql, params=params)
    if relation is None:  # not a query: no rows
        return QueryResult(columns=[], types=[])
    columns = [str(name) for name in relation.columns]
    types = [str(kind) for kind in relation.types]
    if arrow_readable(types):
        return QueryResult(columns=columns, types=types, table=relation.to_arrow_table())
    return QueryResult(columns=columns, types=types, data=dict(relation.fetchnumpy()))


def warm_up() -> None:
    """Import DuckDB and open (and close) a throwaway in-memory database."""
    duckdb_module().connect(":memory:").close()


# Timestamps are read as epoch microseconds (see from_epoch_us).
_MESSAGE_SELECT = ", ".join(
    "epoch_us(created_at)" if c == "created_at" else c for c in MESSAGE_COLUMNS
)
_LOAD = load_queries("epoch_us(created_at)", _MESSAGE_SELECT)
_LOAD_ALL = load_queries("epoch_us(created_at)", _MESSAGE_SELECT, include_compacted=True)


def _load_image_bytes(con: Any, messages: list[Message]) -> None:
    """Put the stored bytes back into the messages' images (a resumed session resends them)."""
    wanted = {i.sha256 for m in messages for i in m.attachments or [] if i.url is None}
    if not wanted:
        return
    found = dict(
        con.execute(
            "SELECT sha256, data FROM attachments WHERE list_contains(?, sha256)", [sorted(wanted)]
        ).fetchall()
    )
    for m in messages:
        with_image_bytes(m, found)


def _message(row: tuple[Any, ...]) -> Message:
    values = dict(zip(MESSAGE_COLUMNS, row, strict=True))
    values["created_at"] = from_epoch_us(values["created_at"])
    return message_from_row(values)


def user_query_failed(exc: BaseException, shown: str) -> StoreError:
    """The error for a user query (``sql()``) that DuckDB refused, on either backend.

    A missing table is named with the store's tables rather than DuckDB's guess, which
    may be one of its own catalog's (``pg_constraint``) that the query cannot mean.
    """
    duckdb = duckdb_module()
    if isinstance(exc, duckdb.PermissionException):
        return sandbox_refused(exc)
    missing = _MISSING_TABLE.search(str(exc))
    if isinstance(exc, duckdb.CatalogException) and missing and missing[2] not in TABLES:
        return StoreError(
            f"sql(): the store has no table {missing[1]}; its tables are {', '.join(TABLES)}."
        )
    return StoreError(f"Store {shown}: {exc}")


_MISSING_TABLE = re.compile(r'Table with name (\S+) does not exist!(?:\s*Did you mean "([^"]*)")?')


def sandbox_refused(exc: BaseException) -> StoreError:
    """The error for a user query that tried to read files without ``allow_files``."""
    return StoreError(
        f"The query may not read files: {first_line(exc)}. Queries on the store run "
        "sandboxed; pass allow_files=True to let one read files."
    )
