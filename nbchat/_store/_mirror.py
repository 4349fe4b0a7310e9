"""Analysis on a team store: the tables a query reads, fetched from PostgreSQL as Arrow
into a private DuckDB, and the query run there.

So ``_queries.py``'s DuckDB SQL (and a user's ``sql()``) runs unchanged on both
backends, with the same types: the private DuckDB has the schema of a file store (the
same migrations made it), and the fetched rows are inserted into it for the one query,
in a transaction rolled back afterwards. What is fetched:

* only the tables whose names the query mentions;
* for nbchat's named queries, only the columns whose names it mentions (all of them
  when it has a ``*`` other than ``count(*)``); a user's query gets whole tables;
* for a named query given a ``session_id``, only that session's rows of the tables
  that have a ``session_id`` column. A named query with that parameter is about one
  session, and the tests run every query on both backends to hold it to that.

All tables of one query are read in one ``REPEATABLE READ READ ONLY`` transaction
(ADBC's PostgreSQL driver, which reads with ``COPY`` in binary), so they are one
snapshot and nothing can be written through this path. The user's SQL never reaches
PostgreSQL: it runs in the private DuckDB, sandboxed like a file store's (no file
access unless ``allow_files``, no extensions, configuration locked), on rows the
database role was allowed to read (row-level security applies to the fetch).

A fetch waits at most the store's lock timeout (``lock_timeout``,
``NBCHAT_DB_LOCK_TIMEOUT``, 15 s) for a table another connection has locked: the
server's ``lock_timeout`` ends it. The whole fetch is bounded by the read timeout
(``read_timeout``, ``NBCHAT_DB_READ_TIMEOUT``, 120 s), longer because reading a big
store's tables whole takes time: the server's ``statement_timeout`` ends a statement
that runs longer, and the fetch runs on a thread of its own while the caller waits at
most that long, so a server that stopped answering (frozen, or gone without closing
the connection) and a Ctrl-C both end the wait. A fetch given up on is
cancelled and its connection left to that thread, which closes it when the driver
returns; the next fetch connects again.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from .._exceptions import StoreError
from . import TABLES
from ._duckdb import _result, sandbox_refused, user_query_failed
from ._duckdb_rows import duckdb_module
from ._frames import QueryResult
from ._lease import _NO_EXTENSIONS
from ._recount import fill_counters, fill_tool_counts
from ._tally import COUNTER_TABLES

__all__ = ["Mirror", "needed_columns"]

# The tables the counters are computed from (``fill_counters`` reads them whole).
_COUNTED = ("sessions", "messages", "requests", "turns")
_TOOL_COUNTED = ("tool_calls",)
_WORD = re.compile(r"[a-z_][a-z0-9_]*")
_COUNT_STAR = re.compile(r"count\s*\(\s*\*\s*\)", re.I)
# The server's "statement timeout" and "lock not available" (a fetch that waited too long).
_STATEMENT_TIMEOUT, _LOCK_NOT_AVAILABLE = "57014", "55P03"
# The caller waits this much beyond the server's own timeout, so a locked table is told
# by the server (its error, the connection kept) and only a silent server by the clock.
_CLIENT_GRACE = 1.0
_CONNECT_TIMEOUT = 10  # s, libpq's: a fetch thread connecting to a silent server ends


def needed_columns(sql: str, schema: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The tables ``sql`` reads and, of each, the columns it names (all on a ``*``)."""
    words = set(_WORD.findall(sql.lower()))
    star = "*" in _COUNT_STAR.sub("", sql)
    return {
        table: [c for c in columns if star or c in words]
        for table, columns in schema.items()
        if table in words
    }


class Mirror:
    """One process's reading side of a team store: an ADBC connection, private DuckDBs."""

    def __init__(self, url: str, shown: str) -> None:
        self.url = url
        self.shown = shown
        self._lock = threading.RLock()
        self._adbc: Any = None
        self._instances: dict[str, Any] = {}  # "sandbox" or "files" -> DuckDB connection
        self._schema: dict[str, list[str]] = {}
        self._inherited: list[Any] = []
        self.counters = {"fetches": 0, "rows": 0, "fetch_s": 0.0, "query_s": 0.0}

    # -------------------------------------------------------------- running

    def run(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        session_id: str | None = None,
        user: bool = False,
        allow_files: bool = False,
        timeout: float = 120.0,
        lock_timeout: float | None = None,
    ) -> QueryResult:
        """Run ``sql`` on the fetched tables (see the module docstring for which rows).

        ``StoreError`` if the tables stay locked for ``lock_timeout`` s (default
        ``timeout``), or the server does not answer within ``timeout`` s.
        """
        duckdb = duckdb_module()
        bound = dict(params) if isinstance(params, Mapping) else list(params or [])
        with self._lock:
            con = self._instance("files" if allow_files else "sandbox")
            if user:
                wanted = {t: c for t, c in self._schema.items() if t in _words(sql)}
            else:
                wanted = needed_columns(sql, self._schema)
            counters = COUNTER_TABLES.keys() & _words(sql)
            # The counters are derived here, from every row they count: the tool calls
            # alone for the tool counters (m010), the rest for the others.
            tools_only = counters == {"_tool_counts"}
            counted = _TOOL_COUNTED if tools_only else (*_COUNTED, *_TOOL_COUNTED)
            if counters:
                wanted = {**wanted, **{t: self._schema[t] for t in counted}}
            lock = timeout if lock_timeout is None else min(lock_timeout, timeout)
            waits = _Waits(read=timeout, lock=lock)
            fetched = self._fetch(wanted, None if user else session_id, waits)
            started = time.perf_counter()
            con.execute("BEGIN TRANSACTION")
            try:
                for table, data in fetched.items():
                    names = ", ".join(f'"{c}"' for c in wanted[table])
                    con.register("_nbchat_rows", data)
                    con.execute(f'INSERT INTO "{table}" ({names}) SELECT {names} FROM _nbchat_rows')
                    con.unregister("_nbchat_rows")
                if tools_only:
                    fill_tool_counts(con)
                elif counters:
                    fill_counters(con)
                cursor = con.execute(sql, bound)
                return _result(cursor)
            except duckdb.Error as exc:
                if user:
                    raise user_query_failed(exc, self.shown) from exc
                if isinstance(exc, duckdb.PermissionException):
                    raise sandbox_refused(exc) from exc
                raise StoreError(f"Store {self.shown}: {exc}") from exc
            finally:
                con.execute("ROLLBACK")
                with contextlib.suppress(duckdb.Error):
                    con.unregister("_nbchat_rows")
                self.counters["query_s"] += time.perf_counter() - started

    def _fetch(
        self, wanted: Mapping[str, Sequence[str]], session_id: str | None, waits: _Waits
    ) -> dict[str, Any]:
        """The wanted columns of each table, as Arrow, from one snapshot."""
        if not wanted:
            return {}
        import adbc_driver_manager

        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                out = self._bounded(
                    lambda con, call: self._read(con, wanted, session_id, waits, call), waits.read
                )
                break
            except adbc_driver_manager.Error as exc:
                self._drop_connection()  # a restarted server: the next attempt reconnects
                if exc.sqlstate == _LOCK_NOT_AVAILABLE:
                    raise self._locked(waits.lock) from None
                if exc.sqlstate == _STATEMENT_TIMEOUT:
                    raise self._no_answer(waits.read) from None
                if attempt == 2 or not isinstance(exc, adbc_driver_manager.OperationalError):
                    raise StoreError(
                        f"Cannot read the store {self.shown}: {_describe(exc)}"
                    ) from exc
        self.counters["fetches"] += 1
        self.counters["fetch_s"] += time.perf_counter() - started
        return out

    def _read(
        self,
        con: Any,
        wanted: Mapping[str, Sequence[str]],
        session_id: str | None,
        waits: _Waits,
        call: _Call,
    ) -> dict[str, Any]:
        """The fetch itself, on ``con``, on the fetch's own thread."""
        cursor = call.cursor = con.cursor()
        try:
            cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            # The server ends a statement that waits longer for a lock, or runs longer.
            cursor.execute(f"SET LOCAL lock_timeout = {_ms(waits.lock)}")
            cursor.execute(f"SET LOCAL statement_timeout = {_ms(waits.read)}")
            out = {}
            for table, columns in wanted.items():
                names = ", ".join(f'"{c}"' for c in columns)
                query = f'SELECT {names} FROM "{table}"'
                if session_id is not None and "session_id" in self._schema[table]:
                    cursor.execute(query + ' WHERE "session_id" = $1', (session_id,))
                else:
                    cursor.execute(query)
                out[table] = cursor.fetch_arrow_table()
                self.counters["rows"] += out[table].num_rows
            cursor.execute("ROLLBACK")
            return out
        finally:
            cursor.close()

    def _bounded(
        self, read: Callable[[Any, _Call], dict[str, Any]], timeout: float
    ) -> dict[str, Any]:
        """``read(connection)`` on a thread of its own; waits up to ``timeout`` s for it,
        interruptibly (the driver's call cannot be interrupted where it blocks)."""
        call = _Call(self._adbc)
        self._adbc = None  # the call's until it is done; given back if it ends in time

        def work() -> None:
            try:
                if call.con is None:
                    call.con = self._connect()
                call.value = read(call.con, call)
            except BaseException as exc:  # handed to the waiting thread
                call.error = exc
            finally:
                call.finish()

        worker = threading.Thread(target=work, name="nbchat-store-fetch", daemon=True)
        worker.start()
        try:
            finished = call.done.wait(timeout + _CLIENT_GRACE)
        except BaseException:  # Ctrl-C: the statement is cancelled, the caller told at once
            call.abandon()
            raise
        if not finished:
            call.abandon()
            raise self._no_answer(timeout)
        if call.error is not None:
            _close_quietly(call.con)
            raise call.error
        self._adbc = call.con
        value: dict[str, Any] = call.value
        return value

    def _no_answer(self, timeout: float) -> StoreError:
        return StoreError(
            f"The store {self.shown} did not answer within {timeout:g} s (the server is "
            "busy or not responding, or the tables are too large to read in that time); "
            "nothing was read. The wait is the store's read timeout "
            "(read_timeout=, NBCHAT_DB_READ_TIMEOUT)."
        )

    def _locked(self, timeout: float) -> StoreError:
        return StoreError(
            f"The store {self.shown} did not answer within {timeout:g} s: another "
            "connection holds a lock on the tables this reads; nothing was read. The wait "
            "is the store's lock timeout (lock_timeout=, NBCHAT_DB_LOCK_TIMEOUT)."
        )

    # -------------------------------------------------------------- parts

    def _connect(self) -> Any:
        import adbc_driver_manager
        import adbc_driver_postgresql.dbapi

        try:
            return adbc_driver_postgresql.dbapi.connect(
                _with_connect_timeout(self.url), autocommit=True
            )
        except adbc_driver_manager.Error as exc:
            from ._pg_url import cannot_connect

            raise StoreError(cannot_connect(self.shown, exc)) from exc

    def _drop_connection(self) -> None:
        adbc, self._adbc = self._adbc, None
        _close_quietly(adbc)

    def _instance(self, access: str) -> Any:
        """A private DuckDB with the store's schema, sandboxed (file access only for "files")."""
        instance = self._instances.get(access)
        if instance is not None:
            return instance
        from ._migrations import migrate

        instance = duckdb_module().connect(":memory:", config=dict(_NO_EXTENSIONS))
        instance.execute("SET TimeZone = 'UTC'")
        migrate(instance)
        for table in TABLES:
            # The same columns and types without keys or NOT NULL: a query's unneeded
            # columns stay NULL, and no index is built for rows that live one query.
            instance.execute(f'CREATE TABLE "_{table}" AS FROM "{table}" LIMIT 0')
            instance.execute(f'DROP TABLE "{table}"')
            instance.execute(f'ALTER TABLE "_{table}" RENAME TO "{table}"')
        if not self._schema:
            rows = instance.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
            ).fetchall()
            for table, column in rows:
                if table in TABLES:
                    self._schema.setdefault(table, []).append(column)
        if access != "files":
            instance.execute("SET enable_external_access = false")
        instance.execute("SET lock_configuration = true")
        self._instances[access] = instance
        return instance

    def release(self) -> None:
        """Close the ADBC connection (the next query opens another); keep the DuckDBs."""
        with self._lock:
            self._drop_connection()

    def shutdown(self) -> None:
        """Close everything."""
        with self._lock:
            self._drop_connection()
            instances, self._instances = self._instances, {}
            for instance in instances.values():
                instance.close()

    def after_fork(self) -> None:
        """In a forked child: keep the parent's connection unused (closing it would end
        the parent's session on the server) and make new DuckDBs when needed."""
        self._inherited.extend([self._adbc, *self._instances.values()])
        self._adbc, self._instances = None, {}
        self._lock = threading.RLock()


class _Call:
    """One fetch on its own thread: its connection and cursor, and how it ended."""

    def __init__(self, con: Any) -> None:
        self.con = con  # None: the thread connects
        self.cursor: Any = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False

    def finish(self) -> None:
        """On the fetch's thread, when the driver returned: a fetch given up on closes
        its connection (nobody else touches it while the driver may use it)."""
        with self._lock:
            self.done.set()
            abandoned = self._abandoned
        if abandoned:
            _close_quietly(self.con)

    def abandon(self) -> None:
        """The caller gives up: cancel the statement; the connection goes with the thread."""
        with self._lock:
            if self.done.is_set():
                _close_quietly(self.con)
                return
            self._abandoned = True
            cursor = self.cursor
        if cursor is not None:
            # A cancel is a new connection to the server: a frozen one would hold it too.
            threading.Thread(target=_cancel, args=(cursor,), daemon=True).start()


class _Waits(NamedTuple):
    """How long one fetch may wait, in seconds: in all, and for locked tables."""

    read: float
    lock: float


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _cancel(cursor: Any) -> None:
    with contextlib.suppress(Exception):  # the statement may have ended meanwhile
        cursor.adbc_cancel()


def _close_quietly(con: Any) -> None:
    if con is not None:
        with contextlib.suppress(Exception):  # a broken connection still lets go
            con.close()


def _with_connect_timeout(url: str) -> str:
    """``url`` with libpq's ``connect_timeout`` (unless given): a fetch's thread given up
    on while connecting to a server that does not answer ends in time too."""
    if "connect_timeout=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}connect_timeout={_CONNECT_TIMEOUT}"


def _words(sql: str) -> set[str]:
    return set(_WORD.findall(sql.lower()))


def _describe(exc: BaseException) -> str:
    from ._pg_url import describe

    return describe(exc)
