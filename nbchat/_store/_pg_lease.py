"""How a process talks to a team store on PostgreSQL (psycopg 3), and what it does while
the server is away.

* **The URL.** ``postgresql://user@host:5432/db`` (libpq's URL, any of its parameters).
  A password in it is refused: libpq reads it from ``~/.pgpass`` or ``PGPASSWORD``, so
  it is never stored in a notebook, a config file or a repr. ``shown_url`` is what
  messages print (any password replaced by ``[redacted]``).
* **Connections.** One for writes (autocommit: one statement per row write, as the
  DuckDB backend), one for the small reads of the loop (``load_session``...), and the
  analysis reads go through ``_mirror.py``. Each is opened on first use; a broken one
  (a restarted server: psycopg connections stay dead) is replaced on the next use.
* **Writes never wait for an absent server.** A write that finds the server gone (it
  cannot connect, or the connection broke) goes to the spool (``_spool.py``), and so does
  every write after it until the spool is written, so order is kept. A thread
  reconnects with backoff (0.1 s doubling to 5 s) and replays the spool; the user is
  told once when the outage starts and once when it is over (``take_notices``).
* **Replays are harmless**: inserts are ``ON CONFLICT (id) DO UPDATE`` (or ``DO
  NOTHING`` for rows that are kept), updates set the same values again, and a unique
  violation (SQLSTATE 23505, from an index a DBA added) counts as already written.
* **Migrations** are ``_migrations.py``'s, run through ``PgMigrationConnection`` (its
  types and placeholders), under ``pg_advisory_lock`` so two kernels opening a fresh
  database at once both succeed. A store already up to date is only read: roles that
  may not create tables can use a database their DBA migrated.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._config import default_spool_dir
from .._exceptions import StoreError, StoreLocked, UnstorableRow
from .._text import REDACTED, redact
from . import Lease, key_of
from ._migrations import MIGRATIONS, _refuse_newer, migrate
from ._sink import Insert, RowWrite
from ._spool import Spool, Unit, spool_folder

__all__ = [
    "DuplicateRow",
    "PgLease",
    "PgMigrationConnection",
    "PgOptions",
    "check_url",
    "psycopg_module",
    "shown_url",
]

_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 5.0
_MIGRATION_LOCK = 0x6E626368_6174  # "nbchat": the advisory lock of schema changes
# SQLSTATE classes of values PostgreSQL can never take (data exceptions, constraints).
_UNSTORABLE_CLASSES = ("22", "23")
_RETRY_STATES = {"40001", "40P01", "55P03", "57014"}  # serialization, deadlock, lock, timeout


def psycopg_module() -> Any:
    """psycopg, or a ``StoreError`` saying how to install it."""
    try:
        import psycopg
    except ImportError as exc:
        raise StoreError(
            "A PostgreSQL store needs psycopg: pip install 'nbchat[postgres]'."
        ) from exc
    return psycopg


# ------------------------------------------------------------------ the URL


def shown_url(raw: str) -> str:
    """``raw`` as it may be shown: a password (in the URL or a parameter) redacted."""
    try:
        parts = urlsplit(raw)
        netloc = parts.netloc
        if "@" in netloc:
            credentials, host = netloc.rsplit("@", 1)
            if ":" in credentials:
                credentials = credentials.split(":", 1)[0] + ":" + REDACTED
            netloc = f"{credentials}@{host}"
        query = [(k, REDACTED if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)]
        return urlunsplit(
            (parts.scheme, netloc, parts.path, urlencode(query, safe="[]/"), parts.fragment)
        )
    except ValueError:
        return re.sub(r"(?<=:)[^:@/]*(?=@)", REDACTED, raw)


def check_url(raw: str) -> str:
    """The URL to connect with; ``StoreError`` if it is malformed or holds a password."""
    psycopg = psycopg_module()
    shown = shown_url(raw)
    try:
        urlsplit(raw).port  # noqa: B018  # a port that is not a number
    except ValueError as exc:
        raise StoreError(f"Not a valid PostgreSQL URL: {shown} ({exc}).") from None
    try:
        params = psycopg.conninfo.conninfo_to_dict(raw)
    except psycopg.ProgrammingError as exc:
        detail = redact(str(exc).strip().splitlines()[0], *_password_in(raw))
        raise StoreError(f"Not a valid PostgreSQL URL: {shown} ({detail}).") from None
    if params.get("password"):
        raise StoreError(
            f"The store URL {shown} has a password in it; nbchat does not keep passwords. "
            "Put it in ~/.pgpass (or PGPASSWORD) and use the URL without it."
        )
    return raw


def _password_in(raw: str) -> list[str]:
    found = re.findall(r"://[^:/@]*:([^@/]*)@", raw) + re.findall(r"password=([^&\s]*)", raw)
    return [p for p in found if p]


def _secrets() -> tuple[str, ...]:
    value = os.environ.get("PGPASSWORD")
    return (value,) if value else ()


def describe(exc: BaseException) -> str:
    """A driver error in one or two lines, with any known password redacted."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = "; ".join(lines[:2]) or type(exc).__name__
    return redact(text, *_secrets())


# ------------------------------------------------------------------ migrations


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
    return f'"{name}"'  # table and column names are fixed strings of _sink, never user text


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


def _write_unit(con: Any, unit: Unit) -> str | None:
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


def _clean(value: Any) -> Any:
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
        params = [_clean(v) for v in write.values]
    else:
        names = tuple(write.values)
        many = len(write.keys) != 1
        sql = _update_sql(write.table, names, write.key, many, write.only_if_null or "")
        params = [_clean(write.values[n]) for n in names]
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


# ------------------------------------------------------------------ the lease


class DuplicateRow(StoreError):
    """A new session's id is taken (its transaction was rolled back)."""


@dataclass(frozen=True)
class PgOptions:
    """Where to spool, and how long to wait for a connection."""

    spool_dir: str | None = None
    connect_timeout: float = 5.0


class PgLease(Lease):
    """A process's connections to one team store, its spool and its reconnecting thread."""

    def __init__(self, url: str, options: PgOptions, lock_timeout: float) -> None:
        self.url = url
        self.key = self.shown = shown_url(url)
        self.options = options
        self.lock_timeout = lock_timeout
        self._lock = threading.RLock()  # the write connection, the spool, the state
        self._changed = threading.Condition(self._lock)
        self._read_lock = threading.RLock()
        self._write_con: Any = None
        self._read_con: Any = None
        self._online = True
        self._closed = False
        self._reconnecting = False
        self._outage_told = False
        self._notices: list[str] = []
        self._inherited: list[Any] = []  # a forked child's copies: never closed there
        root = options.spool_dir or default_spool_dir()
        self.spool = Spool(spool_folder(root, self.key))
        self._counters = {"connects": 0, "write_connects": 0, "spooled": 0, "replayed": 0,
                          "outages": 0}  # fmt: skip
        self.mirror: Any = None  # _mirror.Mirror, made by the store on first analysis

    # -------------------------------------------------------------- connecting

    def connect(self, *, migrate_schema: bool = True) -> Any:
        """A new psycopg connection (autocommit, UTC, JSON as text); ``StoreError`` if none."""
        psycopg = psycopg_module()
        from psycopg.types.string import TextLoader

        settings: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, math.ceil(self.options.connect_timeout)),
        }
        given = psycopg.conninfo.conninfo_to_dict(self.url)
        # Without keepalives a vanished server (not a refused port) would hang a read.
        for name, value in (("application_name", "nbchat"), ("keepalives_idle", 10),
                            ("keepalives_interval", 5), ("keepalives_count", 3)):  # fmt: skip
            if name not in given:
                settings[name] = value
        try:
            con = psycopg.connect(self.url, **settings)
        except psycopg.OperationalError as exc:
            raise StoreError(f"Cannot reach the store {self.shown}: {describe(exc)}") from None
        try:
            con.adapters.register_loader("json", TextLoader)
            con.execute("SET TIME ZONE 'UTC'")
            con.execute(f"SET statement_timeout = {int(self.lock_timeout * 1000)}")
            if migrate_schema:
                ensure_schema(con, self.lock_timeout, self.shown)
        except psycopg.Error as exc:
            con.close()
            raise StoreError(f"Cannot open the store {self.shown}: {describe(exc)}") from None
        except BaseException:
            con.close()
            raise
        self._counters["connects"] += 1
        return con

    def _writer(self) -> Any:
        if self._write_con is None or self._write_con.closed or self._write_con.broken:
            self._write_con = self.connect()
            self._counters["write_connects"] += 1
        return self._write_con

    def check(self) -> None:
        """Connect (migrating the database if needed) now: ``Store.open`` fails clearly."""
        with self._lock:
            self._writer()

    # -------------------------------------------------------------- writing

    def apply(self, unit: Unit, *, table: str, new_session: bool = False) -> None:
        """Write ``unit`` now, or spool it when the server is away (never waits for it).

        ``new_session``: the unit is a new session's row and messages, written in one
        transaction, ``DuplicateRow`` if the session exists (spooled, it is kept as is).
        Raises ``UnstorableRow`` for values the database never takes, ``StoreLocked``
        for a lock or timeout worth retrying, ``StoreError`` for other failures.
        """
        psycopg = psycopg_module()
        with self._lock:
            if self._closed:
                raise StoreError(f"The store {self.shown} is closed.")
            if not self._online:
                self._spool_unit(unit)
                return
            try:
                con = self._writer()
            except StoreError as exc:
                self._go_offline(str(exc))
                self._spool_unit(unit)
                return
            try:
                if new_session:
                    with con.transaction():
                        if apply_write(con, unit[0]) == 0:
                            raise DuplicateRow(unit[0].table)
                        for write in unit[1:]:
                            apply_write(con, write)
                else:
                    for write in unit:
                        apply_write(con, write)
            except psycopg.Error as exc:
                if con.broken or con.closed:  # the server went away under us
                    self._go_offline(f"Lost the store {self.shown}: {describe(exc)}")
                    self._spool_unit(unit)
                    return
                raise self._classify(exc, table) from exc
            except (UnicodeError, OverflowError, TypeError, ValueError) as exc:
                raise self._classify(exc, table) from exc

    def _classify(self, exc: BaseException, table: str) -> StoreError:
        found = unstorable(exc, table)
        if found is not None:
            return found
        if getattr(exc, "sqlstate", None) in _RETRY_STATES:
            return StoreLocked(f"The store {self.shown} was busy: {describe(exc)}")
        return StoreError(f"Store {self.shown}: {describe(exc)}")

    def run_online(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(connection)`` on the write connection, in order after every spooled write.

        For the few writes that need an answer (``end_unfinished_turns``): a
        ``StoreError`` while the server is away or the spool is not written yet.
        """
        psycopg = psycopg_module()
        with self._lock:
            if not self._online:
                raise StoreError(self._away_message())
            try:
                return fn(self._writer())
            except psycopg.Error as exc:
                raise StoreError(f"Store {self.shown}: {describe(exc)}") from exc

    def _spool_unit(self, unit: Unit) -> None:
        try:
            self.spool.append(unit)
        except OSError as exc:
            raise StoreError(
                f"The store {self.shown} is unreachable and its spool file cannot be "
                f"written ({exc}); the write is kept in memory and retried."
            ) from exc
        self._counters["spooled"] += 1

    def _go_offline(self, why: str) -> None:
        """Called with the lock held: drop the connection, start reconnecting, tell once."""
        if self._write_con is not None:
            with contextlib.suppress(Exception):
                self._write_con.close()
            self._write_con = None
        if self._online:
            self._online = False
            self._counters["outages"] += 1
            if not self._outage_told:
                self._outage_told = True
                self._notices.append(
                    f"Not saved yet: {why.rstrip('.')}. The conversation goes on; nbchat "
                    f"keeps its writes in {self.spool.folder} and stores them when the "
                    "server is back."
                )
        self._start_reconnecting()

    def _away_message(self) -> str:
        return (
            f"The store {self.shown} is unreachable (nbchat is reconnecting; "
            f"{self._counters['spooled'] - self._counters['replayed']} writes wait in "
            f"{self.spool.folder})."
        )

    def take_notices(self) -> list[str]:
        """What the user should be told since last asked (an outage began or ended)."""
        if not self._notices:
            return []
        with self._lock:
            notices, self._notices = self._notices, []
            return notices

    @property
    def online(self) -> bool:
        """Whether writes go to the server now (not to the spool)."""
        return self._online

    # -------------------------------------------------------------- reconnecting

    def _start_reconnecting(self) -> None:
        if not self._reconnecting and not self._closed:
            self._reconnecting = True
            threading.Thread(
                target=self._reconnect, name="nbchat-store-reconnect", daemon=True
            ).start()

    def _reconnect(self) -> None:
        delay = _BACKOFF_FIRST
        try:
            while True:
                with self._changed:
                    if self._closed or self._online:
                        return
                    self._changed.wait(delay)
                    if self._closed:
                        return
                try:
                    con = self.connect()
                except StoreError:
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                if self._replay(con):
                    return
                delay = min(delay * 2, _BACKOFF_MAX)
        finally:
            with self._lock:
                self._reconnecting = False
                if not self._online and not self._closed:
                    self._start_reconnecting()  # woken while finishing: go on

    def _replay(self, con: Any) -> bool:
        """Write our spool on ``con``, then go online; False if the server went away again."""
        psycopg = psycopg_module()
        offset = written = 0
        while True:
            units, offset = self.spool.read_from(offset)
            for unit in units:
                try:
                    refused = _write_unit(con, unit)
                except psycopg.Error:
                    return False  # the connection broke
                if refused:
                    self._notices.append(f"Not saved: one spooled write was skipped ({refused}).")
                written += 1
            with self._lock:
                if offset < self.spool.size:
                    continue  # written to meanwhile: take those too
                self.spool.clear()
                self._counters["replayed"] += written
                self._write_con, self._online = con, True
                self._outage_told = False
                self._notices.append(
                    f"Saved now: the store {self.shown} is back; {written} spooled writes "
                    "are stored."
                )
                self._changed.notify_all()
                return True

    def wait_online(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the spool to be written (True), nudging the thread."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._online:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._changed.notify_all()  # a reconnecting thread tries again now
                self._changed.wait(min(left, 0.05))
            return True

    def replay_orphans(self) -> tuple[int, int, list[str]]:
        """Write spool files left by processes that are gone; (units, unreadable, files)."""
        written = broken = 0
        names: list[str] = []
        psycopg = psycopg_module()
        with self._lock:
            con = self._writer()
            for path, units, unreadable in self.spool.claim_orphans():
                for unit in units:
                    try:
                        refused = _write_unit(con, unit)
                    except psycopg.Error as exc:  # the connection broke
                        raise StoreError(f"Lost the store {self.shown}: {describe(exc)}") from None
                    broken, written = (broken + 1, written) if refused else (broken, written + 1)
                broken += unreadable
                names.append(path.name)
        return written, broken, names

    # -------------------------------------------------------------- reading

    def read(self, fn: Callable[[Any], Any], timeout: float) -> Any:
        """``fn(connection)`` for one of the loop's small reads, after the spool is written.

        A connection the server dropped (a restart) is replaced and ``fn`` run again once.
        """
        psycopg = psycopg_module()
        if not self.wait_online(min(timeout, 2.0)):
            raise StoreError(self._away_message())
        with self._read_lock:
            for attempt in (1, 2):
                if self._closed:
                    raise StoreError(f"The store {self.shown} is closed.")
                if self._read_con is None or self._read_con.closed or self._read_con.broken:
                    self._read_con = self.connect(migrate_schema=False)
                con = self._read_con
                try:
                    return fn(con)
                except psycopg.Error as exc:
                    if (con.broken or con.closed) and attempt == 1:
                        continue
                    raise StoreError(f"Store {self.shown}: {describe(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @contextlib.contextmanager
    def connection(self, timeout: float, access: Any = "read") -> Iterator[Any]:
        """The read connection for one block (``read`` retries a dropped one; this does not)."""
        if not self.wait_online(min(timeout, 2.0)):
            raise StoreError(self._away_message())
        with self._read_lock:
            if self._read_con is None or self._read_con.closed or self._read_con.broken:
                self._read_con = self.connect(migrate_schema=False)
            yield self._read_con

    # -------------------------------------------------------------- lifecycle

    def release(self) -> None:
        """Nobody in this process uses the store: close the read connections, keep the writer."""
        with self._read_lock:
            self._close_quietly(self._read_con)
            self._read_con = None
        if self.mirror is not None:
            self.mirror.release()

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            self._close_quietly(self._write_con)
            self._write_con = None
            self.spool.close()
        self.release()
        if self.mirror is not None:
            self.mirror.shutdown()

    @staticmethod
    def _close_quietly(con: Any) -> None:
        if con is not None:
            with contextlib.suppress(Exception):
                con.close()

    def after_fork(self) -> None:
        """In a forked child: keep the parent's connections alive but unused (closing them
        here would end the parent's sessions on the server), and spool to a file of our own."""
        self._inherited.extend(c for c in (self._write_con, self._read_con) if c is not None)
        self._write_con = self._read_con = None
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._read_lock = threading.RLock()
        self._online, self._reconnecting, self._outage_told = True, False, False
        self._notices = []
        self.spool.after_fork()
        if self.mirror is not None:
            self.mirror.after_fork()

    def stats(self) -> dict[str, Any]:
        return {**self._counters, "online": self._online}
