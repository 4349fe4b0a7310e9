"""The PostgreSQL backend: a team store that many users' kernels on many hosts share.

``Store.open("postgresql://user@host:5432/nbchat")`` (or ``NBCHAT_DB``). Writes go
through ``_pg_lease.py`` (psycopg 3 connections, the spool while the server is away),
in ``_pg_sql.py``'s idempotent statements (and its migrations, under an advisory lock;
``_pg_url.py`` checks the URL); the loop's small reads are plain
PostgreSQL queries here; analysis (``frame``, ``sql``) runs ``_queries.py``'s DuckDB SQL
on rows fetched as Arrow (``_mirror.py``). Every row says who wrote it (``username``,
``hostname``); what a user may see is the database role's business (grants, row-level
security), not nbchat's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._events import Event
from .._exceptions import StoreError, UnknownSession
from .._types import utcnow
from .._warn import warn_user
from . import Lease, QueryName, evict_lease, key_of, shared_lease
from ._frames import QueryResult, to_frame
from ._live_sinks import settle
from ._mirror import Mirror
from ._pg_lease import DuplicateRow, PgLease, PgOptions
from ._pg_sql import nul_free
from ._pg_url import check_url, shown_url
from ._queries import QUERIES, SESSION_USAGE
from ._records import StoredSession
from ._rows import (
    MESSAGE_COLUMNS,
    STORED_KINDS,
    RowWrite,
    Update,
    message_from_row,
    rows_of,
    with_image_bytes,
)
from ._sql import END_TURNS, SqlStore, load_queries

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["PostgresStore"]

_MESSAGE_SELECT = ", ".join(f'"{c}"' for c in MESSAGE_COLUMNS)
_LOAD = tuple(q.replace("?", "%s") for q in load_queries("created_at", _MESSAGE_SELECT))
_LOAD_ALL = tuple(
    q.replace("?", "%s")
    for q in load_queries("created_at", _MESSAGE_SELECT, include_compacted=True)
)
_mirror_lock = threading.Lock()


def default_read_timeout() -> float:
    """Seconds one analysis read of a team store may take: ``NBCHAT_DB_READ_TIMEOUT`` or 120."""
    raw = os.environ.get("NBCHAT_DB_READ_TIMEOUT")
    try:
        value = float(raw) if raw else 120.0
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise StoreError(
            f"NBCHAT_DB_READ_TIMEOUT must be a positive number of seconds, not {raw!r}."
        )
    return value


class PostgresStore(SqlStore[PgLease]):
    """A PostgreSQL database holding the sessions of a team (see the module docstring)."""

    _read_timeout: float = 120.0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def _connect(
        cls,
        raw: str,
        *,
        lock_timeout: float,
        spool_dir: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float | None = None,
        **options: Any,
    ) -> PostgresStore:
        """Connect to the database at the URL ``raw`` (migrating it if needed).

        ``spool_dir`` is where writes wait while the server is away (default
        ``NBCHAT_SPOOL_DIR`` or ``~/.nbchat/spool``); ``connect_timeout`` bounds one
        connection attempt. Both are fixed by the first ``open`` of a URL in a process
        that succeeds (a failed one leaves nothing behind). ``read_timeout`` bounds one
        analysis read (default ``NBCHAT_DB_READ_TIMEOUT`` or 120 s; a locked table is
        waited for ``lock_timeout`` s only).
        """
        if options:
            raise TypeError(f"unexpected store options: {', '.join(sorted(options))}")
        read = default_read_timeout() if read_timeout is None else float(read_timeout)
        if not read > 0:
            raise ValueError(f"read_timeout must be a positive number of seconds, not {read!r}.")
        url = check_url(raw)
        pg_options = PgOptions(spool_dir=spool_dir, connect_timeout=connect_timeout)

        def make() -> Lease:
            return PgLease(url, pg_options, lock_timeout)

        lease = shared_lease(shown_url(url), make)
        assert isinstance(lease, PgLease)
        store = cls(lease, lock_timeout=lock_timeout, path=lease.shown)
        store._read_timeout = read
        try:
            if not lease.checked:  # until an open succeeds in this process: connect, fail clearly
                lease.check()
                store._replay_orphans()
                lease.checked = True
            store._replay_journals()
        except BaseException:
            store.close()
            if not lease.checked:
                # Forgotten unless another handle uses it: the next open (the server back,
                # other options) starts afresh, where a lease shut down but kept in the
                # cache said "closed" to every later call.
                evict_lease(lease.key)
            raise
        return store

    def _live(self) -> PgLease:
        """The lease; this process's sinks write what they hold for this store first."""
        if self._lease is None:
            raise StoreError(f"The store {self.path} is closed.")
        settle(self)
        return self._lease

    def journal_folder(self) -> Path | None:
        return None if self._lease is None else self._lease.spool.folder / "journal"

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one PostgreSQL query (``?`` placeholders, as the DuckDB backend's)."""

        def run(con: Any) -> list[tuple[Any, ...]]:
            rows: list[tuple[Any, ...]] = con.execute(
                sql.replace("?", "%s"), list(params)
            ).fetchall()
            return rows

        return self._live().read(run, self._lock_timeout)  # type: ignore[no-any-return]

    def _write(self, unit: list[RowWrite], table: str) -> None:
        # For the direct calls (a session's settings); events come through ``write``.
        lease = self._live()
        lease.apply(unit, table=table)
        self._warn_notices(lease)

    def _warn_notices(self, lease: PgLease) -> None:
        # Direct calls (not through a sink) tell the user with a warning, once per outage.
        for notice in lease.take_notices():
            warn_user(notice)

    def take_notices(self) -> list[str]:
        """What the user should be told since last asked (the server went away, came back)."""
        return [] if self._lease is None else self._lease.take_notices()

    # ------------------------------------------------------------------ sessions

    def _insert_session(self, session_id: str, unit: list[RowWrite]) -> None:
        """While the server is away the new session is spooled like any write."""
        lease = self._live()
        try:
            lease.apply(unit, table="sessions", new_session=True)
        except DuplicateRow:
            raise StoreError(
                f"A session or message with this id already exists in {self.path}"
                f" (session {session_id})."
            ) from None
        self._warn_notices(lease)

    def _apply(self, write: Update) -> None:
        self._write([write], write.table)

    def load_session(self, session_id: str, *, include_compacted: bool = False) -> StoredSession:
        """The session's settings and active messages in order; ``StoreError`` if unknown."""

        self._replay_journals()  # a process that died in this session may have left one

        def load(con: Any) -> tuple[Any, Any, Any, dict[str, bytes]]:
            head_sql, rows_sql, max_seq_sql = _LOAD_ALL if include_compacted else _LOAD
            head = con.execute(head_sql, [session_id]).fetchall()
            rows = con.execute(rows_sql, [session_id]).fetchall()
            (max_seq,) = con.execute(max_seq_sql, [session_id]).fetchone()
            images = con.execute(  # the bytes of the images these messages carry
                "SELECT a.sha256, a.data FROM attachments a WHERE a.sha256 IN ("
                " SELECT DISTINCT r->>'sha256' FROM messages m,"
                " json_array_elements(m.attachments) r"
                " WHERE m.session_id = %s AND m.state IN ('active', 'compacted')"
                " AND m.attachments IS NOT NULL)",
                [session_id],
            ).fetchall()
            return head, rows, max_seq, {sha: bytes(data) for sha, data in images if data}

        head, rows, max_seq, images = self._live().read(load, self._lock_timeout)
        if not head:
            raise UnknownSession(f"No session {session_id} in {self.path}.")
        messages = [
            with_image_bytes(message_from_row(dict(zip(MESSAGE_COLUMNS, r, strict=True))), images)
            for r in rows
        ]
        return StoredSession.of_row(head[0], messages=messages, max_seq=max_seq)

    # ------------------------------------------------------------------ events

    def write(self, event: Event, *, timeout: float | None = None) -> None:
        """Write one event's rows now, or spool them while the server is away."""
        if event.kind not in STORED_KINDS:
            return
        entry = rows_of(event)
        if entry is None:
            return
        table, unit = entry
        if unit:
            self._live().apply(unit, table=table)

    def end_unfinished_turns(
        self, session_id: str, *, status: str, error: str, keep: str | None = None
    ) -> int:
        """Close the session's turns still running (or never given a status); returns how many."""

        def end(con: Any) -> int:
            params = [status, error, utcnow(), session_id, keep, keep]
            cursor = con.execute(END_TURNS.replace("?", "%s"), params)
            return int(cursor.rowcount)

        lease = self._live()
        lease.wait_online(min(self._lock_timeout, 2.0))
        return int(lease.run_online(end))

    # ------------------------------------------------------------------ recovery

    def save_recovery(self, events: Iterable[Event]) -> str:
        """Keep events this process could not write in its spool (written when the server
        is back, by this process or the next one to open the store). Returns the folder."""
        lease = self._live()
        for event in events:
            entry = rows_of(event)
            if entry is not None and entry[1]:
                lease.spool.append(entry[1])
        return str(lease.spool.path or lease.spool.folder)

    def _replay_orphans(self) -> None:
        lease = self._live()
        written, broken, names = lease.replay_orphans()
        what = (
            f"{written} writes that processes which stopped while {self.path} was "
            "unreachable had spooled in"
        )
        # Spool files that held nothing left to write are not worth a warning.
        self._tell_recovered(what, names if written or broken else [], broken, warn=True)

    # ------------------------------------------------------------------ copying

    def _dump_rows(
        self, table: str, key: str, after: str | None, limit: int
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        columns = [
            str(name)
            for (name,) in self._fetchall(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ?"
                " ORDER BY ordinal_position",
                [table],
            )
        ]
        names = ", ".join(f'"{c}"' for c in columns)
        rows = self._fetchall(
            f'SELECT {names} FROM "{table}" WHERE ?::text IS NULL OR "{key}" > ?'
            f' ORDER BY "{key}" LIMIT ?',
            [after, after, limit],
        )
        return columns, rows

    def _load_rows(self, table: str, names: str, width: int, rows: Sequence[Sequence[Any]]) -> int:
        marks = ", ".join(["%s"] * width)
        key = key_of(table)
        sql = f'INSERT INTO "{table}" ({names}) VALUES ({marks}) ON CONFLICT ("{key}") DO NOTHING'

        def load(con: Any) -> int:
            cursor = con.cursor()
            with con.transaction():
                cursor.executemany(sql, [[nul_free(v) for v in row] for row in rows])
            return int(cursor.rowcount)

        return int(self._live().run_online(load))

    # ------------------------------------------------------------------ reading

    def _mirror(self) -> Mirror:
        lease = self._live()
        with _mirror_lock:
            if lease.mirror is None:
                lease.mirror = Mirror(lease.url, lease.shown)
            mirror: Mirror = lease.mirror
        if not lease.wait_online(min(self._lock_timeout, 2.0)):
            raise StoreError(lease._away_message())
        return mirror

    def _usage_row(self, session_id: str) -> Sequence[Any]:
        result = self._mirror().run(
            SESSION_USAGE,
            [session_id],
            session_id=session_id,
            timeout=self._read_timeout,
            lock_timeout=self._lock_timeout,
        )
        return [_first(result.data[c]) for c in result.columns]

    def frame(self, name: QueryName, **params: Any) -> pd.DataFrame:
        """The named analysis query (``_queries.QUERIES``) as a DataFrame."""
        query = QUERIES[name]
        bound = query.bind(params)
        result = self._mirror().run(
            query.sql,
            bound,
            session_id=params.get("session_id"),
            timeout=self._read_timeout,
            lock_timeout=self._lock_timeout,
        )
        return to_frame(result, query.json_columns, query.order_by)

    def _select(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] | None, *, allow_files: bool
    ) -> QueryResult:
        """In a private DuckDB over the tables it names: the query never reaches
        PostgreSQL, it reads a copy of the rows the database role may see."""
        return self._mirror().run(
            query,
            params,
            user=True,
            allow_files=allow_files,
            timeout=self._read_timeout,
            lock_timeout=self._lock_timeout,
        )

    def stats(self) -> dict[str, Any]:
        """Counters of this process's connections, spool and analysis fetches."""
        if self._lease is None:
            return {}
        mirror = self._lease.mirror
        counters = self._lease.stats()
        counters["opens"] = counters["write_connects"]  # as the DuckDB backend's attaches
        return {**counters, **(mirror.counters if mirror is not None else {})}


def _first(values: Any) -> Any:
    import numpy as np

    if np.ma.getmaskarray(values)[0]:
        return None
    return np.ma.getdata(values)[0].item()
