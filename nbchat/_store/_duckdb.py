"""The DuckDB backend: sessions, the rows of the event stream, and the reads, in one file
shared by many kernels.

``write()`` writes the rows of each event that completes something (a message, a
request, a tool call, a compaction, a turn), committed before it returns; stream deltas
are ignored. It tells the two ways a write fails apart: ``StoreLocked`` (another process
holds the file: retry) and ``UnstorableRow`` (DuckDB refuses the values: a retry can
never succeed). Which event becomes which row, and the queue that feeds ``write()`` from
a background thread, live in ``_sink.py``; how the file is shared, in ``_lease.py``; the
analysis queries, in ``_queries.py``.

Events a process could not write before it exited are kept in a recovery file beside
the store (``<db>.nbchat-recovery-<pid>.jsonl``), which the next ``Store.open`` writes.
"""

from __future__ import annotations

import glob
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import StoreError, UnstorableRow
from .._types import Event, EventAdapter, Message, utcnow
from . import Lease, QueryName, key_of
from ._frames import QueryResult, arrow_readable, to_frame
from ._journal import journal_folder
from ._kept import KeptRows, Recorder
from ._lease import Access, LeaseOptions, acquire_lease
from ._migrations import fill_counters
from ._queries import QUERIES, SESSION_TIMES, SESSION_USAGE
from ._records import StoredSession
from ._sink import (
    MESSAGE_COLUMNS,
    STORED_KINDS,
    Insert,
    RowWrite,
    Update,
    message_from_row,
    rows_of,
    settled,
    with_image_bytes,
)
from ._sql import END_TURNS, SqlStore, load_queries
from ._tally import COUNTER_TABLES, Bump, apply_rows, bumps

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DuckDBStore", "warm_up"]

_RECOVERY = ".nbchat-recovery-"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _from_epoch_us(value: int | None) -> datetime | None:
    # Timestamps are read as epoch microseconds: DuckDB's own TIMESTAMPTZ -> datetime
    # conversion needs pytz, which nbchat does not depend on.
    return None if value is None else _EPOCH + timedelta(microseconds=value)


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
            except _duckdb().ConstraintException as exc:
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

    def load_session(self, session_id: str) -> StoredSession:
        """The session's settings and active messages in order; ``StoreError`` if unknown."""
        self._replay_journals()  # a process that died in this session may have left one
        head_sql, rows_sql, max_seq_sql = _LOAD
        with self._connection() as con:
            head = con.execute(head_sql, [session_id]).fetchall()
            if not head:
                raise StoreError(f"No session {session_id} in {self.path}.")
            rows = con.execute(rows_sql, [session_id]).fetchall()
            (max_seq,) = con.execute(max_seq_sql, [session_id]).fetchone()
            messages = [_message(row) for row in rows]
            _load_image_bytes(con, messages)
        *settings, created_us, metadata = head[0]
        return StoredSession.of_row(
            [*settings, _from_epoch_us(created_us), metadata], messages=messages, max_seq=max_seq
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
            tuple(_from_epoch_us(v) if stamp else v for v, stamp in zip(row, stamps, strict=True))
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
        duckdb = _duckdb()
        with self._connection(access=access) as con:
            con.execute("BEGIN TRANSACTION READ ONLY")
            try:
                return (
                    _frame_rows(con, sql, bound) if for_frame else _result(con.execute(sql, bound))
                )
            except duckdb.PermissionException as exc:
                raise sandbox_refused(exc) from exc
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
    _duckdb().connect(":memory:").close()


def _duckdb() -> Any:
    import duckdb

    return duckdb


# Timestamps are read as epoch microseconds (see _from_epoch_us).
_MESSAGE_SELECT = ", ".join(
    "epoch_us(created_at)" if c == "created_at" else c for c in MESSAGE_COLUMNS
)
_LOAD = load_queries("epoch_us(created_at)", _MESSAGE_SELECT)


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
    values["created_at"] = _from_epoch_us(values["created_at"])
    return message_from_row(values)


# ------------------------------------------------------------------ rows -> DuckDB


def write_event(con: Any, event: Event) -> None:
    """Write ``event``'s rows (``_sink.rows_of``) and their counters in one transaction.

    Raises ``UnstorableRow`` if DuckDB refuses the values; other DuckDB errors pass.
    """
    write_events(con, [event])


def write_events(con: Any, events: Sequence[Event], kept: KeptRows | None = None) -> None:
    """``write_event`` for several events, in one transaction: all are written or none
    (``UnstorableRow`` names the table of the one refused). The rows ``kept`` holds of
    the sessions whose messages it writes are brought up to date (``_kept.py``)."""
    entries = [entry for event in events if (entry := rows_of(event)) is not None]
    if not entries:
        return
    writes = [write for _, writes in entries for write in writes]
    sessions = kept.sessions() if kept is not None else []
    recorder = Recorder() if sessions and any(w.table == "messages" for w in writes) else None
    ops = _BatchOps(con, writes, recorder)

    def work() -> None:
        if recorder is not None:  # the versions the kept rows must have been read at
            found = con.execute(parsed(_VERSIONS), [sessions]).fetchall()
            recorder.before.update({str(sid): version for sid, version in found})
        ops.look_up()
        for _, writes in entries:
            apply_rows(writes, ops)
        ops.finish()

    _in_transaction(con, lambda: ops.writing, work)
    if recorder is not None and kept is not None:
        kept.write_through(recorder)


_VERSIONS = (
    "SELECT session_id, messages_version FROM _session_counts WHERE list_contains(?, session_id)"
)


def _in_transaction(con: Any, table_of: Callable[[], str], work: Callable[[], None]) -> None:
    # ``table_of``: the table being written when it failed (for ``UnstorableRow``).
    duckdb = _duckdb()
    con.execute(parsed("BEGIN TRANSACTION"))
    try:
        work()
        con.execute(parsed("COMMIT"))
    except BaseException as exc:
        con.execute("ROLLBACK")
        table = table_of()
        if isinstance(exc, duckdb.DataError | duckdb.IntegrityError):
            # Conversion (2**64 into BIGINT, NaN, bad JSON), out of range, a NOT NULL.
            raise UnstorableRow(table, first_line(exc)) from exc
        if isinstance(exc, duckdb.BinderException | duckdb.CatalogException):
            raise UnstorableRow(
                table, f"the store's schema is not the one this nbchat expects ({first_line(exc)})"
            ) from exc
        if isinstance(exc, duckdb.InvalidInputException):
            # The Python value itself cannot be converted (an int past 128 bits, a surrogate).
            raise UnstorableRow(table, first_line(exc)) from exc
        if isinstance(exc, TypeError | ValueError | OverflowError):
            raise UnstorableRow(table, f"{type(exc).__name__}: {exc}") from exc
        raise


class _RowOps:
    """``_tally.RowOps`` on a DuckDB connection inside a transaction."""

    def __init__(self, con: Any) -> None:
        self.con = con

    def fetch(
        self, table: str, key: str, keys: Sequence[Any], columns: Sequence[str]
    ) -> list[Mapping[str, Any]]:
        # Timestamps as epoch microseconds (see _from_epoch_us); names are _tally's own.
        shown = ", ".join(f"epoch_us({c})" if c.endswith("_at") else c for c in columns)
        where = f"{key} = ?" if len(keys) == 1 else f"list_contains(?, {key})"
        sql = parsed(f"SELECT {shown} FROM {table} WHERE {where}")
        rows = self.con.execute(sql, [keys[0] if len(keys) == 1 else list(keys)]).fetchall()
        out: list[Mapping[str, Any]] = []
        for row in rows:
            values = dict(zip(columns, row, strict=True))
            for c in columns:
                if c.endswith("_at"):
                    values[c] = _from_epoch_us(values[c])
            out.append(values)
        return out

    def apply(self, write: RowWrite, *, exists: bool | None) -> None:
        if isinstance(write, Insert):
            # Inside a transaction a failed INSERT would end it: find out first.
            if exists is None:
                key = key_of(write.table)
                found = self.con.execute(
                    parsed(f"SELECT count(*) FROM {write.table} WHERE {key} = ?"),
                    [write.values[write.columns.index(key)]],
                ).fetchone()
                exists = bool(found and found[0])
            _insert(self.con, write, upsert=exists)
        else:
            _update(self.con, write, self)

    def bump(self, bump: Bump) -> None:
        # UPDATE, and INSERT when no row matched: DuckDB's ON CONFLICT DO UPDATE costs
        # about three times as much, and the row exists for all but a session's first.
        changes = [f"{c} = {c} + ?" for c in bump.add]
        changes += [f"{c} = greatest({c}, ?::TIMESTAMPTZ)" for c in bump.latest]
        changes += [f"{c} = least({c}, ?::TIMESTAMPTZ)" for c in bump.earliest]
        changes += [f"{c} = ?" for c in bump.copy]
        where = " AND ".join(f"{c} = ?" for c in COUNTER_TABLES[bump.table])
        times = [*bump.latest.values(), *bump.earliest.values()]
        values = [*bump.add.values(), *times, *bump.copy.values(), *bump.key.values()]
        updated = self.con.execute(
            parsed(f"UPDATE {bump.table} SET {', '.join(changes)} WHERE {where}"), values
        ).fetchone()
        if updated and updated[0]:
            return
        names = [*bump.key, *bump.add, *bump.latest, *bump.earliest, *bump.copy]
        marks = ", ".join("?" * len(names))
        self.con.execute(
            parsed(f"INSERT INTO {bump.table} ({', '.join(names)}) VALUES ({marks})"),
            [*bump.key.values(), *bump.add.values(), *times, *bump.copy.values()],
        )


class _BatchOps(_RowOps):
    """``_RowOps`` for the rows of one or more events in one transaction, in fewer
    statements (each costs DuckDB ~0.3 ms, whatever it does): which ids are stored
    already is asked once per table, not once per row; the inserts of new rows are held
    and sent together, one statement per table; the counters' bumps are summed per
    counter row and applied once (sums, latest and earliest times do not depend on the
    order). A read or an update of a table first sends the inserts held for it, so every
    statement sees the rows before it. ``finish()`` sends what is still held.
    """

    def __init__(
        self, con: Any, writes: Sequence[RowWrite], recorder: Recorder | None = None
    ) -> None:
        super().__init__(con)
        self.recorder = recorder  # what it writes of messages (``_kept.Recorder``)
        self.writing = ""  # the table of the statement sent last (what a failure names)
        self._absent: dict[str, set[Any]] = {}  # per table: keys known not to be stored
        self._held: dict[str, list[Insert]] = {}
        self._bumps: dict[tuple[str, tuple[tuple[str, Any], ...]], Bump] = {}
        self._wanted: dict[str, set[Any]] = {}
        for write in writes:
            row = write if isinstance(write, Insert) else write.otherwise
            if row is not None:
                self._wanted.setdefault(row.table, set()).add(_key_value(row))

    def look_up(self) -> None:
        """Ask, once per table, which of the rows to insert are stored already."""
        for table, keys in self._wanted.items():
            self.writing = table
            key, listed = key_of(table), list(keys)
            sql = f"SELECT {key} FROM {table} WHERE {key} IN ({', '.join('?' * len(listed))})"
            stored = {found for (found,) in self.con.execute(parsed(sql), listed).fetchall()}
            self._absent[table] = keys - stored

    def fetch(
        self, table: str, key: str, keys: Sequence[Any], columns: Sequence[str]
    ) -> list[Mapping[str, Any]]:
        absent = self._absent.get(table, ())
        if key == key_of(table) and all(k in absent for k in keys):
            return []  # not stored, not held: nothing to read
        self._send(table)
        self._send_bumps(table)  # a counter read (a turn's state) sees the bumps before it
        rows = super().fetch(table, key, keys, columns)
        if self.recorder is not None and table == "messages":
            self.recorder.fetched(rows)
        return rows

    def apply(self, write: RowWrite, *, exists: bool | None) -> None:
        if self.recorder is not None and write.table == "messages":
            self.recorder.writes.append((write, exists))
        if isinstance(write, Insert) and not exists:
            absent = self._absent.get(write.table, set())
            value = _key_value(write)
            if value in absent:
                absent.discard(value)  # held now: a later read sends it first
                self._held.setdefault(write.table, []).append(write)
                return
        self._send(write.table)
        self.writing = write.table
        super().apply(write, exists=exists)

    def bump(self, bump: Bump) -> None:
        slot = (bump.table, tuple(bump.key.items()))
        held = self._bumps.get(slot)
        if held is None:
            self._bumps[slot] = Bump(
                bump.table,
                dict(bump.key),
                add=dict(bump.add),
                latest=dict(bump.latest),
                earliest=dict(bump.earliest),
                copy=dict(bump.copy),
            )
            return
        for name, amount in bump.add.items():
            held.add[name] = held.add.get(name, 0) + amount
        for name, stamp in bump.latest.items():
            held.latest[name] = max(held.latest.get(name, stamp), stamp)
        for name, stamp in bump.earliest.items():
            held.earliest[name] = min(held.earliest.get(name, stamp), stamp)
        held.copy.update(bump.copy)  # copied values: the last one is what stays

    def finish(self) -> None:
        """Send the held inserts and the summed bumps."""
        for table in list(self._held):
            self._send(table)
        self._send_bumps(None)

    def _send_bumps(self, table: str | None) -> None:
        """Apply the held bumps of ``table`` (of every table: ``None``)."""
        for slot in [slot for slot in self._bumps if table is None or slot[0] == table]:
            bump = self._bumps.pop(slot)
            if bump.latest or bump.earliest or bump.copy or any(bump.add.values()):
                self.writing = bump.table
                super().bump(bump)
                version = bump.copy.get("messages_version")
                if self.recorder is not None and version is not None:
                    self.recorder.stamped[str(bump.key["session_id"])] = version

    def _send(self, table: str) -> None:
        rows = self._held.pop(table, None)
        if rows:
            self.writing = table
        while rows:
            # One statement per run of rows with the same columns (a table's rows have one
            # shape but for a turn's ``otherwise`` row).
            columns = rows[0].columns
            run = [row for row in rows if row.columns == columns]
            rows = [row for row in rows if row.columns != columns]
            marks = "(" + ", ".join("?" * len(columns)) + ")"
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join(
                [marks] * len(run)
            )
            self.con.execute(parsed(sql), [value for row in run for value in row.values])


def _key_value(row: Insert) -> Any:
    return row.values[row.columns.index(key_of(row.table))]


def _update(con: Any, write: Update, ops: _RowOps) -> None:
    # Table and column names are fixed strings of _sink, never user text.
    names = list(write.values)
    assignments = ", ".join(f"{name} = ?" for name in names)
    if len(write.keys) == 1:
        where, keys = f"{write.key} = ?", write.keys[0]
    else:
        where, keys = f"list_contains(?, {write.key})", write.keys
    if write.only_if_null:
        where += f" AND {write.only_if_null} IS NULL"
    params = [*(write.values[name] for name in names), keys]
    updated = con.execute(
        parsed(f"UPDATE {write.table} SET {assignments} WHERE {where}"), params
    ).fetchone()
    if write.otherwise is not None and (not updated or not updated[0]):
        ops.apply(write.otherwise, exists=False)


def _insert(con: Any, row: Insert, *, upsert: bool = False) -> None:
    """Insert one row; with ``upsert``, a row with the same id is replaced (a replayed
    event), or kept (``row.keep``). A plain INSERT is about three times cheaper in
    DuckDB than an upsert, so the upsert runs only when the id is known to exist."""
    names = ", ".join(row.columns)
    marks = ", ".join("?" * len(row.columns))
    verb = ("INSERT OR IGNORE" if row.keep else "INSERT OR REPLACE") if upsert else "INSERT"
    con.execute(parsed(f"{verb} INTO {row.table} ({names}) VALUES ({marks})"), row.values)


@lru_cache(maxsize=256)  # batches add a statement per number of rows inserted together
def parsed(sql: str) -> Any:
    """``sql`` parsed once: DuckDB's parser is a large part of a one-row INSERT's cost
    (~30%), and a parsed statement can be executed again and again."""
    return _duckdb().extract_statements(sql)[0]


def sandbox_refused(exc: BaseException) -> StoreError:
    """The error for a user query that tried to read files without ``allow_files``."""
    return StoreError(
        f"The query may not read files: {first_line(exc)}. Queries on the store run "
        "sandboxed; pass allow_files=True to let one read files."
    )


def first_line(exc: BaseException) -> str:
    """The first line of a DuckDB error (its kind and message, without the query excerpt)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
