"""PostgreSQL's SQL for the team store: the schema's migrations and the row writes.

* **Migrations** are ``_migrations.py``'s, run through ``PgMigrationConnection`` (its
  types and placeholders), under ``pg_advisory_lock`` so two kernels opening a fresh
  database at once both succeed. A store already up to date is only read: roles that
  may not create tables can use a database their DBA migrated.
* **Row writes are idempotent**, so a replayed spool does no harm: inserts are ``ON
  CONFLICT (id) DO UPDATE`` (``DO NOTHING`` for rows that are kept), updates set the
  same values again, and a unique violation (SQLSTATE 23505, from an index a DBA added)
  counts as already written.
* **What can never be stored** (``unstorable``): the SQLSTATEs for which retrying the
  row cannot help, so the writer skips it and says why.
"""

from __future__ import annotations

import re
import time
from functools import lru_cache
from typing import Any

from .._exceptions import StoreLocked, UnstorableRow
from . import key_of
from ._migrations import MIGRATIONS, _refuse_newer, migrate
from ._pg_url import describe, psycopg_module
from ._rows import Insert, RowWrite
from ._spool import Unit

__all__ = [
    "PgMigrationConnection",
    "apply_write",
    "ensure_schema",
    "nul_free",
    "pg_dialect",
    "unstorable",
    "write_unit",
]

_MIGRATION_LOCK = 0x6E626368_6174  # "nbchat": the advisory lock of schema changes
# SQLSTATE classes of values PostgreSQL can never take (data exceptions, constraints).
_UNSTORABLE_CLASSES = ("22", "23")


def pg_dialect(sql: str) -> str:
    """DuckDB's DDL and placeholders as PostgreSQL's (the migrations keep to both)."""
    sql = re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", sql)
    sql = re.sub(r"\bBLOB\b", "BYTEA", sql)
    return sql.replace("?", "%s")


class PgMigrationConnection:
    """A psycopg connection that takes the migrations' DuckDB SQL (``pg_dialect``)."""

    keeps_counters = False  # m007's counters are derived by the analysis side (_mirror)

    def __init__(self, con: Any) -> None:
        self._con = con
        self._cursor: Any = None

    def execute(self, sql: str, params: Any = None) -> PgMigrationConnection:
        """Run one statement; fetch its rows with ``fetchall``/``fetchone``."""
        self._cursor = self._con.execute(pg_dialect(sql), params or None)
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        """The rows of the last statement."""
        rows: list[tuple[Any, ...]] = self._cursor.fetchall()
        return rows

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement."""
        row: tuple[Any, ...] | None = self._cursor.fetchone()
        return row


def ensure_schema(con: Any, timeout: float, shown: str) -> None:
    """Migrate the database if it needs it, under the advisory lock; refuse a newer one."""
    known = [name for name, _ in MIGRATIONS]
    recorded = _recorded(con)
    if recorded is not None:
        _refuse_newer(recorded)
        if set(known) <= set(recorded):
            return
    deadline = time.monotonic() + timeout
    while not con.execute("SELECT pg_try_advisory_lock(%s)", [_MIGRATION_LOCK]).fetchone()[0]:
        if time.monotonic() >= deadline:
            raise StoreLocked(
                f"Another process has been migrating the store {shown} for {timeout:g} s."
            )
        time.sleep(0.05)
    try:
        migrate(PgMigrationConnection(con))
        # PostgreSQL only: one session's rows (a transcript, a reopened session) are
        # found by index, not a scan of every team member's rows. DuckDB needs none.
        for table in ("messages", "requests", "tool_calls", "compactions", "turns"):
            con.execute(
                f'CREATE INDEX IF NOT EXISTS "{table}_session_id" ON "{table}" (session_id)'
            )
    finally:
        con.execute("SELECT pg_advisory_unlock(%s)", [_MIGRATION_LOCK])


def _recorded(con: Any) -> list[str] | None:
    (exists,) = con.execute("SELECT to_regclass('_migrations') IS NOT NULL").fetchone()
    if not exists:
        return None
    rows = con.execute("SELECT name FROM _migrations ORDER BY applied_at, name").fetchall()
    return [str(name) for (name,) in rows]


# ------------------------------------------------------------------ row writes in SQL


def _quoted(name: str) -> str:
    return f'"{name}"'  # table and column names are fixed strings of _rows, never user text


@lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], keep: bool) -> str:
    names = ", ".join(map(_quoted, columns))
    marks = ", ".join(["%s"] * len(columns))
    key = key_of(table)
    if keep:
        action = "DO NOTHING"
    else:
        action = "DO UPDATE SET " + ", ".join(
            f"{_quoted(c)} = EXCLUDED.{_quoted(c)}" for c in columns if c != key
        )
    conflict = f"ON CONFLICT ({_quoted(key)}) {action}"
    return f"INSERT INTO {_quoted(table)} ({names}) VALUES ({marks}) {conflict}"


def write_unit(con: Any, unit: Unit) -> str | None:
    """Apply one spooled unit on ``con``: None, or why the server refused it (skipped).

    Raises ``psycopg.Error`` when the connection itself broke.
    """
    psycopg = psycopg_module()
    try:
        for write in unit:
            apply_write(con, write)
    except psycopg.Error as exc:
        if con.broken or con.closed:
            raise
        return describe(exc)
    return None


@lru_cache(maxsize=64)
def _update_sql(table: str, names: tuple[str, ...], key: str, many: bool, if_null: str) -> str:
    assignments = ", ".join(f"{_quoted(n)} = %s" for n in names)
    where = f"{_quoted(key)} = ANY(%s)" if many else f"{_quoted(key)} = %s"
    if if_null:
        where += f" AND {_quoted(if_null)} IS NULL"
    return f"UPDATE {_quoted(table)} SET {assignments} WHERE {where}"


def nul_free(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL; DuckDB's can. A stray NUL in a model's reply must
    # not cost the row, so it is stored as U+FFFD.
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def apply_write(con: Any, write: RowWrite) -> int:
    """Run one row write on ``con``; returns the rows it changed (SQLSTATE 23505: 0)."""
    psycopg = psycopg_module()
    if isinstance(write, Insert):
        sql = _insert_sql(write.table, write.columns, write.keep)
        params = [nul_free(v) for v in write.values]
    else:
        names = tuple(write.values)
        many = len(write.keys) != 1
        sql = _update_sql(write.table, names, write.key, many, write.only_if_null or "")
        params = [nul_free(write.values[n]) for n in names]
        params.append(list(write.keys) if many else write.keys[0])
    try:
        changed = int(con.execute(sql, params).rowcount)
    except psycopg.errors.UniqueViolation:
        return 0  # written before (a replay), under a unique index of the DBA's
    if isinstance(write, Insert) or changed or write.otherwise is None:
        return changed
    return apply_write(con, write.otherwise)


def unstorable(exc: BaseException, table: str) -> UnstorableRow | None:
    """``exc`` as ``UnstorableRow`` if retrying the row can never help, else ``None``."""
    state = getattr(exc, "sqlstate", None) or ""
    if state[:2] in _UNSTORABLE_CLASSES:
        return UnstorableRow(table, describe(exc))
    if state in ("42703", "42P01"):
        return UnstorableRow(
            table, f"the store's schema is not the one this nbchat expects ({describe(exc)})"
        )
    if state == "42501":  # insufficient privilege; a row-level security policy too
        return UnstorableRow(table, f"the database role may not write it ({describe(exc)})")
    if isinstance(exc, UnicodeError | OverflowError | TypeError | ValueError) and not state:
        return UnstorableRow(table, f"{type(exc).__name__}: {exc}")
    return None
