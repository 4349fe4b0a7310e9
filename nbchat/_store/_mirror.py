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
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .._exceptions import StoreError
from . import TABLES
from ._duckdb import _duckdb, _result, sandbox_refused
from ._frames import QueryResult
from ._lease import _NO_EXTENSIONS
from ._migrations import fill_counters, fill_tool_counts
from ._tally import COUNTER_TABLES

__all__ = ["Mirror", "needed_columns"]

# The tables the counters are computed from (``fill_counters`` reads them whole).
_COUNTED = ("sessions", "messages", "requests", "turns")
_TOOL_COUNTED = ("tool_calls",)
_WORD = re.compile(r"[a-z_][a-z0-9_]*")
_COUNT_STAR = re.compile(r"count\s*\(\s*\*\s*\)", re.I)


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
    ) -> QueryResult:
        """Run ``sql`` on the fetched tables (see the module docstring for which rows)."""
        duckdb = _duckdb()
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
            fetched = self._fetch(wanted, None if user else session_id)
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
            except duckdb.PermissionException as exc:
                raise sandbox_refused(exc) from exc
            except duckdb.Error as exc:
                raise StoreError(f"Store {self.shown}: {exc}") from exc
            finally:
                con.execute("ROLLBACK")
                with contextlib.suppress(duckdb.Error):
                    con.unregister("_nbchat_rows")
                self.counters["query_s"] += time.perf_counter() - started

    def _fetch(self, wanted: Mapping[str, Sequence[str]], session_id: str | None) -> dict[str, Any]:
        """The wanted columns of each table, as Arrow, from one snapshot."""
        if not wanted:
            return {}
        import adbc_driver_manager

        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                cursor = self._connection().cursor()
                try:
                    cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
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
                finally:
                    cursor.close()
                break
            except adbc_driver_manager.Error as exc:
                self._drop_connection()  # a restarted server: the next attempt reconnects
                if attempt == 2 or not isinstance(exc, adbc_driver_manager.OperationalError):
                    raise StoreError(
                        f"Cannot read the store {self.shown}: {_describe(exc)}"
                    ) from exc
        self.counters["fetches"] += 1
        self.counters["fetch_s"] += time.perf_counter() - started
        return out

    # -------------------------------------------------------------- parts

    def _connection(self) -> Any:
        if self._adbc is None:
            import adbc_driver_manager
            import adbc_driver_postgresql.dbapi

            try:
                self._adbc = adbc_driver_postgresql.dbapi.connect(self.url, autocommit=True)
            except adbc_driver_manager.Error as exc:
                raise StoreError(f"Cannot reach the store {self.shown}: {_describe(exc)}") from exc
        return self._adbc

    def _drop_connection(self) -> None:
        adbc, self._adbc = self._adbc, None
        if adbc is not None:
            with contextlib.suppress(Exception):  # a broken connection still lets go
                adbc.close()

    def _instance(self, access: str) -> Any:
        """A private DuckDB with the store's schema, sandboxed (file access only for "files")."""
        instance = self._instances.get(access)
        if instance is not None:
            return instance
        from ._migrations import migrate

        instance = _duckdb().connect(":memory:", config=dict(_NO_EXTENSIONS))
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


def _words(sql: str) -> set[str]:
    return set(_WORD.findall(sql.lower()))


def _describe(exc: BaseException) -> str:
    from ._pg_lease import describe

    return describe(exc)
