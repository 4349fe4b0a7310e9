"""Which process runs a session's turns: a lock file per session, beside the journals.

Two kernels may open the same stored session (``%chat use ID``). Had both run turns,
each would number its messages from the ``seq`` it loaded, and the conversation would
interleave. So a process *holds* a session while one of its turns runs: it takes an
exclusive ``flock`` on ``<journal folder>/<hash of the id>.session`` (a lock the
operating system lets go when the process dies, however it dies), and records there the
last ``seq`` it gave a message when it lets go. Another process then learns, at no cost
to the store, two things:

- the session is busy (the lock is taken): its turn is refused, and its reopening does
  not close the running turn as one a dead process left;
- the session moved on (the recorded ``seq`` is past the one it knows): it loads the
  newer messages before its own turn.

Within one process, two ``Session`` objects of one id are told apart the same way (two
descriptors of one file conflict). The files are a few bytes each and are kept: one
deleted while another process opens it would split the lock in two. A team store's
folder is on this machine, so the lock reaches the processes here, not another machine's.
Without ``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .._exceptions import SessionInUseError

__all__ = ["SessionHold", "hold_session"]


class SessionHold:
    """This process's hold on one session; ``last_seq`` is what the previous holder
    recorded (None: no one recorded anything yet)."""

    def __init__(self, fd: int | None, last_seq: int | None) -> None:
        self._fd = fd
        self.last_seq = last_seq

    def release(self, last_seq: int) -> None:
        """Record ``last_seq`` (the last message number given) and let the session go."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.last_seq is not None:  # a holder whose rows are not loaded yet keeps its mark
            last_seq = max(last_seq, self.last_seq)
        try:
            _write(fd, last_seq, 0)
        finally:
            os.close(fd)  # closing the descriptor lets go of the lock


def hold_session(folder: Path | None, session_id: str) -> SessionHold:
    """Hold ``session_id`` (the folder None: a store no other process shares).

    Raises ``SessionInUseError`` if a turn of the session runs elsewhere now.
    """
    if folder is None or fcntl is None:
        return SessionHold(None, None)
    name = hashlib.sha256(session_id.encode()).hexdigest()[:32]
    path = folder / f"{name}.session"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # the first hold of any session of this store
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SessionInUseError(_busy(session_id, _read(fd)[1])) from None
        seq, _ = _read(fd)
        _write(fd, seq, os.getpid())
    except BaseException:
        os.close(fd)
        raise
    return SessionHold(fd, seq)


def _busy(session_id: str, pid: int | None) -> str:
    if pid == os.getpid():
        where = "in another of this process's Session objects"
    else:
        where = f"in another process (pid {pid})" if pid else "in another process"
    return (
        f"Session {session_id} is running a turn {where}: wait for it to finish, "
        "or start a new session (%chat new)."
    )


# The file: the last seq given (-1: none yet) and the pid of the holder (0: none), in
# fixed widths, so each write replaces the last in place.
_RECORD = "%20d %10d\n"


def _read(fd: int) -> tuple[int | None, int | None]:
    with suppress(OSError, ValueError):
        seq, pid = (int(word) for word in os.pread(fd, 64, 0).split())
        return (seq if seq >= 0 else None), (pid or None)
    return None, None


def _write(fd: int, seq: int | None, pid: int) -> None:
    os.pwrite(fd, (_RECORD % (-1 if seq is None else seq, pid)).encode(), 0)
