"""How a process borrows a DuckDB file that other processes also use (the DuckDB lease).

DuckDB lets one process hold a database file at a time, readers included. A *lease*
holds it only while it is being used:

* Each lease owns a private in-memory DuckDB instance, created once, and ATTACHes
  the file to it on demand (~1 ms) and DETACHes it to let go (~2 ms plus a
  checkpoint). Opening the file with ``duckdb.connect`` instead costs 20-60 ms each
  time, because every new instance builds the engine's catalog.
* While operations keep coming the file stays attached; a background thread
  detaches it after ``linger`` seconds without use.
* A process that finds the file locked signals that it is waiting (a shared
  ``flock`` on the side file ``<db>.nbchat-wait``) and retries with jittered
  exponential backoff, checking DuckDB's lock with a cheap ``fcntl`` probe between
  attempts. It gives up after ``lock_timeout`` seconds with a ``StoreError``.
* The holder checks that signal after each operation (two system calls) and, once
  it has held the file for ``min_hold`` seconds (or sits idle), hands it over by
  detaching. Before attaching again it waits briefly until a waiter has taken the
  file, so busy processes take turns instead of one starving the others.
* User SQL (``nbchat.sql()``) runs in a second instance of the same kind, attached
  read-only and sandboxed: no file access beyond the store, no extension
  downloads, configuration locked. DuckDB cannot turn file access back on in a
  running instance, nor attach one file to two instances, so the file moves between
  them (detach, attach: ~2-3 ms) when a user query follows a write; ``allow_files``
  queries get a third instance with file access on.
* Commits reach the operating system at once (``fsync_mode=NONE`` while attached, so
  a killed process loses nothing) and are flushed to disk by the checkpoint that
  detaching runs with ``fsync`` back on. ``sync_every_write`` flushes every commit.

Without ``fcntl`` (Windows) the waiting signal and the probe are skipped: waiters
simply retry with backoff, and the holder lets go after ``linger``. The signal, the
probe and the reading of DuckDB's lock errors are ``_file_lock.py``'s; here is what a
lease does with them.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from .._exceptions import StoreError, StoreLocked
from . import Lease, release_lease, shared_lease
from ._file_lock import PROBES, WaitSignal, file_is_free, is_lock_conflict, lock_holder

__all__ = ["Access", "FileLease", "LeaseOptions", "MemoryLease", "acquire_lease"]

# What a connection is for: nbchat's own statements ("write"), a user's query in the
# sandbox ("sandbox"), or a user's query allowed to read files ("files").
Access = Literal["write", "sandbox", "files"]
# No instance ever downloads or loads an extension on its own: opening a SQLite file
# as the store made DuckDB fetch sqlite_scanner from the network.
_NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


_FIRST_DELAY = 0.001
# Probing is ~10 µs, so a waiter can look often; a real DuckDB open that fails
# still costs ~10 ms of CPU, hence the longer cap when no probe is available.
_MAX_DELAY = 0.005 if PROBES else 0.05
_POLL = 0.01  # how often an attached but idle holder looks for waiters
# A holder idle this long has finished its burst of writes (the rest of a turn is
# waiting for the model or a tool): it hands over to a waiter, whatever min_hold says.
_IDLE_YIELD = 0.01
_POLITE_MAX = 0.25  # how long a process that just handed over waits for the taker
_ALIAS = "nbchat"  # the catalog name the store file is attached under


@dataclass(frozen=True)
class LeaseOptions:
    """How long to keep an idle connection, and how to flush writes."""

    linger: float = 0.5
    min_hold: float = 0.1
    sync_every_write: bool = False


def _duckdb() -> Any:
    import duckdb

    return duckdb


def _open_error(path: str, exc: BaseException) -> StoreError:
    text = str(exc)
    if "not a valid DuckDB database" in text or "Extension" in text:
        return StoreError(
            f"The file {path} is not a DuckDB database (or is damaged); "
            "move it away or choose another db= path."
        )
    if "Unique file handle conflict" in text or "different configuration" in text:
        return StoreError(
            f"The store {path} is already open in this process through another DuckDB "
            "connection; close that connection first."
        )
    detail = text.removeprefix("IO Error: ")
    return StoreError(f"Cannot open the store {path}: {detail}")


class MemoryLease(Lease):
    """A private ``:memory:`` database: one connection for the lease's whole life."""

    shared = False

    def __init__(self) -> None:
        from ._migrations import migrate

        self.key = self.path = ":memory:"
        self._lock = threading.RLock()
        self._con: Any = _duckdb().connect(":memory:", config=_NO_EXTENSIONS)
        self._con.execute("SET TimeZone = 'UTC'")
        migrate(self._con)
        # A private database has no second instance to move to: it is sandboxed for
        # good, nbchat's own statements need no files.
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")

    @contextmanager
    def connection(self, timeout: float, access: Access = "write") -> Iterator[Any]:
        """The one connection; ``access`` other than "write" is refused only for files."""
        duckdb = _duckdb()
        with self._lock:
            if self._con is None:
                raise StoreError("This in-memory store is closed.")
            if access == "files":
                raise StoreError(
                    "allow_files=True needs a store file: queries on an in-memory store "
                    "cannot read files."
                )
            try:
                yield self._con
            except duckdb.Error as exc:
                raise StoreError(f"Store {self.path}: {exc}") from exc

    def release(self) -> None:
        pass  # a private database is never shared: nothing to hand over

    def after_fork(self) -> None:
        pass  # a child may keep using its copy of a private database

    def shutdown(self) -> None:
        with self._lock:
            con, self._con = self._con, None
            if con is not None:
                con.close()


class FileLease(Lease):
    """A database file shared with other processes; see the module docstring."""

    def __init__(self, path: str, options: LeaseOptions) -> None:
        self.key = self.path = path
        self.options = options
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # One private in-memory DuckDB instance per kind of access, made on first use.
        self._instances: dict[Access, Any] = {}
        self._attached = False
        self._attached_to: Access = "write"  # the instance the file is attached to
        self._migrated = False
        self._opened_at = 0.0
        self._last_used = 0.0
        self._handed_over_at: float | None = None
        self._signal = WaitSignal(path)
        self._closer_running = False
        self._inherited: list[Any] = []
        self._counters = {"opens": 0, "closes": 0, "handovers": 0, "waits": 0, "wait_s": 0.0}

    # -------------------------------------------------------------- using

    @contextmanager
    def connection(self, timeout: float, access: Access = "write") -> Iterator[Any]:
        duckdb = _duckdb()
        with self._lock:
            if self._attached and self._attached_to != access:
                self._detach(handover=False)  # one file, one instance at a time
            if not self._attached:
                if access != "write" and not self._migrated:
                    self._attach(timeout, "write")
                    self._detach(handover=False)
                self._attach(timeout, access)
            try:
                yield self._instances[access]
            except duckdb.Error as exc:
                if isinstance(exc, duckdb.FatalException) or "invalidated" in str(exc):
                    self._discard_instance()  # unusable now; a new one is made next time
                if access == "write" and isinstance(
                    exc, duckdb.BinderException | duckdb.CatalogException
                ):  # nbchat's own statements: the schema differs, not a typo
                    raise StoreError(
                        f"The store {self.path} does not have the tables and columns this "
                        f"nbchat expects (changed by another program?): {exc}"
                    ) from exc
                raise StoreError(f"Store {self.path}: {exc}") from exc
            finally:
                now = time.monotonic()
                self._last_used = now
                if (
                    self._attached
                    and now - self._opened_at >= self.options.min_hold
                    and self._signal.others_waiting()
                ):
                    self._detach(handover=True)

    def check(self, timeout: float) -> None:
        """Open the file once (migrating it) unless it is attached already, to any instance."""
        with self._lock:
            if self._attached and self._migrated:
                return  # the file works; an open needs no extra attach (or move)
        with self.connection(timeout):
            pass

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counters, "open": self._attached}

    def release(self) -> None:
        """Let go of the file now; keep the instance for a quick re-attach."""
        with self._lock:
            self._detach(handover=False)

    def shutdown(self) -> None:
        with self._lock:
            self._detach(handover=False)
            self._signal.close()
            instances, self._instances = self._instances, {}
            for instance in instances.values():
                instance.close()

    # -------------------------------------------------------------- attaching

    def _new_instance(self, access: Access) -> Any:
        duckdb = _duckdb()
        config: dict[str, Any] = dict(_NO_EXTENSIONS)
        if access == "write" and not self.options.sync_every_write:
            config["fsync_mode"] = "NONE"
        instance = duckdb.connect(":memory:", config=config)
        instance.execute("SET TimeZone = 'UTC'")
        return instance

    def _attach(self, timeout: float, access: Access = "write") -> None:
        duckdb = _duckdb()
        fresh = access not in self._instances
        if fresh:
            self._instances[access] = self._new_instance(access)
        instance = self._instances[access]
        # TYPE duckdb: a file of another kind (SQLite...) is refused, not handed to an extension.
        options = "TYPE duckdb" if access == "write" else "TYPE duckdb, READ_ONLY"
        started = time.monotonic()
        deadline = started + timeout
        self._let_taker_in(deadline)
        delay = _FIRST_DELAY
        waiting = False
        holder = ""
        try:
            while True:
                if not waiting or file_is_free(self.path):
                    try:
                        instance.execute(f"ATTACH ? AS {_ALIAS} ({options})", [self.path])
                        break
                    except duckdb.Error as exc:
                        if not is_lock_conflict(exc):
                            raise _open_error(self.path, exc) from exc
                        holder = lock_holder(str(exc))
                        if not waiting:
                            waiting = True
                            self._counters["waits"] += 1
                            self._signal.begin_waiting()
                now = time.monotonic()
                if now >= deadline:
                    raise StoreLocked(
                        f"The store {self.path} stayed locked by another process{holder} "
                        f"for {timeout:g} s; close that kernel's sessions or raise lock_timeout.",
                        holder,
                    )
                time.sleep(min(delay * random.uniform(0.5, 1.5), deadline - now))
                delay = min(delay * 2, _MAX_DELAY)
        finally:
            if waiting:
                self._signal.end_waiting()
                self._counters["wait_s"] += time.monotonic() - started
        self._attached = True
        self._attached_to = access
        try:
            instance.execute(f"USE {_ALIAS}")
            if access == "write":
                from ._migrations import check_not_newer, migrate

                if not self._migrated:
                    migrate(instance)
                    self._migrated = True
                else:  # while we did not hold the file, a newer nbchat may have migrated it
                    check_not_newer(instance)
            if fresh and access != "write":
                _sandbox(instance, self.path, files=access == "files")
        except (duckdb.Error, StoreError) as exc:
            self._detach(handover=False)
            if access != "write":
                self._forget(access)  # never reuse a half-sandboxed instance
            raise StoreError(f"Cannot open the store {self.path}: {exc}") from exc
        self._opened_at = self._last_used = time.monotonic()
        self._counters["opens"] += 1
        self._start_closer()

    def _let_taker_in(self, deadline: float) -> None:
        """After handing the file over, give a waiting process the moment to take it."""
        if self._handed_over_at is None:
            return
        self._handed_over_at = None
        stop = min(deadline, time.monotonic() + _POLITE_MAX)
        # Our process holds no lock on the file now, so probing it is safe.
        while time.monotonic() < stop and self._signal.others_waiting() and file_is_free(self.path):
            time.sleep(0.002)

    # -------------------------------------------------------------- detaching

    def _detach(self, *, handover: bool) -> None:
        if not self._attached:
            return
        self._attached = False
        instance = self._instances[self._attached_to]
        writer = self._attached_to == "write"
        try:
            instance.execute("USE memory")
            if writer and not self.options.sync_every_write:
                # Detaching checkpoints; with fsync on, that flushes the file and its WAL.
                instance.execute("SET fsync_mode = 'STANDARD'")
            instance.execute(f"DETACH {_ALIAS}")
            if writer and not self.options.sync_every_write:
                instance.execute("SET fsync_mode = 'NONE'")
        except _duckdb().Error:
            # The file may still be attached: drop the whole instance to be sure the
            # lock goes. An unfinished checkpoint leaves the WAL for the next attach.
            self._discard_instance()
        self._counters["closes"] += 1
        if handover:
            self._counters["handovers"] += 1
            self._handed_over_at = time.monotonic()
        self._cond.notify_all()

    def _discard_instance(self) -> None:
        self._attached = False
        self._forget(self._attached_to)

    def _forget(self, access: Access) -> None:
        instance = self._instances.pop(access, None)
        if instance is not None:
            try:
                instance.close()
            except _duckdb().Error:
                pass  # closing a broken instance still frees it

    def _start_closer(self) -> None:
        # Called with the lock held; the flag (not Thread.is_alive) says whether a
        # closer is still watching the file, so none is ever missed.
        if not self._closer_running:
            self._closer_running = True
            threading.Thread(
                target=self._close_when_idle, name="nbchat-store-closer", daemon=True
            ).start()

    def _close_when_idle(self) -> None:
        with self._cond:
            try:
                self._watch_until_detached()
            finally:
                self._closer_running = False

    def _watch_until_detached(self) -> None:
        while self._attached:
            now = time.monotonic()
            idle = now - self._last_used
            if idle >= self.options.linger:
                self._detach(handover=False)
            elif (
                now - self._opened_at >= self.options.min_hold or idle >= _IDLE_YIELD
            ) and self._signal.others_waiting():
                self._detach(handover=True)
            else:
                self._cond.wait(min(self.options.linger - idle, _POLL))

    def after_fork(self) -> None:
        """In a forked child: forget the parent's instance without touching the file."""
        # Dropping them would run their destructors, which checkpoint into the parent's file.
        self._inherited.extend(self._instances.values())
        self._instances = {}
        self._attached = False
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closer_running = False
        self._signal = WaitSignal(self.path)


def _sandbox(instance: Any, path: str, *, files: bool) -> None:
    """Lock a fresh user-SQL instance down, once the store file is attached to it.

    Turning file access off keeps the files attached at that moment allowed (the
    store and its WAL), so the instance can detach and re-attach the store later.
    Spilling goes to a folder beside the store, the one other place it may write.
    """
    if not files:
        spill = (path + ".nbchat-tmp").replace("'", "''")
        instance.execute(f"SET temp_directory = '{spill}'")
        instance.execute(f"SET allowed_directories = ['{spill}{os.sep}']")
        instance.execute("SET enable_external_access = false")
    instance.execute("SET lock_configuration = true")


# ------------------------------------------------------------------ opening


def _resolve(raw: str) -> str:
    path = os.path.realpath(os.path.abspath(os.path.expanduser(raw)))
    if os.path.isdir(path):
        raise StoreError(
            f"The store path {path} is a directory; pass a file path such as "
            f"{os.path.join(path, 'nbchat.duckdb')}."
        )
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"Cannot create the folder {folder} for the store {path}: {exc.strerror or exc}."
        ) from exc
    return path


def acquire_lease(raw: str, options: LeaseOptions, timeout: float) -> Lease:
    """The lease for ``raw`` (shared within the process), opened once to check the path."""
    lease: Lease
    if raw == ":memory:":
        try:
            lease = MemoryLease()
        except Exception as exc:
            raise StoreError(f"Cannot create an in-memory store: {exc}") from exc
        lease.refs = 1
        return lease
    path = _resolve(raw)
    file_lease = shared_lease(path, lambda: FileLease(path, options))
    assert isinstance(file_lease, FileLease)
    try:
        file_lease.check(timeout)
    except BaseException:
        release_lease(file_lease)
        raise
    return file_lease
