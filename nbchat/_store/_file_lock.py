"""Who holds a DuckDB file, and how processes waiting for it ask the holder to let go.

DuckDB keeps its lock with ``fcntl``; ``file_is_free`` probes that lock (~10 µs) without
opening the database, and ``is_lock_conflict`` and ``lock_holder`` read DuckDB's refusal to
attach a held file. A waiting process holds a shared ``flock`` on the side file
``<db>.nbchat-wait`` (``WaitSignal.begin_waiting``); the holder tries an exclusive one
after each operation (``others_waiting``: two system calls), which fails while anyone
waits.
How the lease uses them, and when it hands the file over, is ``_lease.py``'s.

Without ``fcntl`` (Windows) there is no signal and no probe (``PROBES`` is False):
nobody is ever seen waiting, and every file looks free, so waiters retry with backoff.
"""

from __future__ import annotations

import os
import time

try:  # POSIX only; see the module docstring for what Windows does instead.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = ["PROBES", "WaitSignal", "file_is_free", "is_lock_conflict", "lock_holder"]

PROBES = fcntl is not None  # whether the signal and the probe work on this system
_LOOK_EVERY = 0.005  # how often a holder looks for the side file before it exists


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether DuckDB refused ``exc``'s open because another process holds the file."""
    text = str(exc)
    return "Could not set lock" in text or "Conflicting lock" in text


def lock_holder(message: str) -> str:
    """Who holds the file, as DuckDB's refusal names it: " (PID 1234)", or ""."""
    # DuckDB names the holder as "... is held in /usr/bin/python3 (PID 1234)".
    marker = "(PID "
    start = message.find(marker)
    if start < 0:
        return ""
    end = message.find(")", start)
    return f" (PID {message[start + len(marker) : end]})" if end > start else ""


class WaitSignal:
    """The side file through which waiting processes ask the holder to let go."""

    def __init__(self, db_path: str) -> None:
        self.path = db_path + ".nbchat-wait"
        self._probe_fd: int | None = None
        self._wait_fd: int | None = None
        self._looked_at = -1.0

    def others_waiting(self) -> bool:
        if fcntl is None:
            return False
        if self._probe_fd is None:
            # Nobody has ever waited (the common case): look for the file at most
            # every few ms, not on every write of a burst.
            now = time.monotonic()
            if now - self._looked_at < _LOOK_EVERY:
                return False
            self._looked_at = now
            if not os.path.exists(self.path):
                return False
            try:
                self._probe_fd = os.open(self.path, os.O_RDWR)
            except OSError:
                return False
        try:
            fcntl.flock(self._probe_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(self._probe_fd, fcntl.LOCK_UN)
        return False

    def begin_waiting(self) -> None:
        if fcntl is None or self._wait_fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return  # a read-only folder: we cannot signal, and simply poll
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only during a holder's µs-long probe
        except OSError:
            os.close(fd)
            return
        self._wait_fd = fd

    def end_waiting(self) -> None:
        fd, self._wait_fd = self._wait_fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def close(self) -> None:
        self.end_waiting()
        fd, self._probe_fd = self._probe_fd, None
        if fd is not None:
            os.close(fd)


def file_is_free(path: str) -> bool:
    """Whether no process holds DuckDB's lock on ``path`` (a probe, not an open).

    Only safe while this process holds no lock on the file itself: closing any
    descriptor of a file drops all of the process's ``fcntl`` locks on it. Callers
    probe only after DuckDB said another process holds it.
    """
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return True  # let DuckDB's open report what is wrong
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
