"""How a process talks to a team store on PostgreSQL (psycopg 3), and what it does while
the server is away.

* **The URL** is ``_pg_url.py``'s: checked, shown without a password.
* **Connections.** One for writes (autocommit: one statement per row write, as the
  DuckDB backend), one for the small reads of the loop (``load_session``...), and the
  analysis reads go through ``_mirror.py``. Each is opened on first use; a broken one
  (a restarted server: psycopg connections stay dead) is replaced on the next use.
* **Writes never wait for an absent server.** A write that finds the server gone (it
  cannot connect, or the connection broke) goes to the spool (``_spool.py``), and so does
  every write after it until the spool is written, so order is kept. A thread
  reconnects with backoff (0.1 s doubling to 5 s) and replays the spool; the user is
  told once when the outage starts and once when it is over (``take_notices``).
* **Migrations and row writes** are ``_pg_sql.py``'s: the migrations in PostgreSQL's
  dialect under an advisory lock, and each row write one idempotent statement, so a
  replayed spool does no harm.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .._config import default_spool_dir
from .._exceptions import StoreError, StoreLocked
from . import Lease
from ._pg_sql import apply_write, ensure_schema, unstorable, write_unit
from ._pg_url import cannot_connect, describe, psycopg_module, shown_url
from ._spool import Spool, Unit, spool_folder

__all__ = ["DuplicateRow", "PgLease", "PgOptions"]

_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 5.0
_RETRY_STATES = {"40001", "40P01", "55P03", "57014"}  # serialization, deadlock, lock, timeout


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
        # An open of the store has connected (and written orphaned spools) in this process:
        # later opens do not wait for the server (their writes spool while it is away).
        self.checked = False

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
            raise StoreError(cannot_connect(self.shown, exc)) from None
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
                    refused = write_unit(con, unit)
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
                        refused = write_unit(con, unit)
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
