"""Where writes to a team store wait while its server is away: one local file per process.

A *unit* is the row writes of one event (or of one new session), as ``_rows`` makes
them, with their values as they were when it happened (timestamps included: a request
replayed an hour later still says when it was made). Units are appended as JSON lines
to ``<spool dir>/<store>/<pid>-<random>.jsonl`` and reach the operating system before
``append`` returns, so a killed process loses nothing it spooled.

The owning process holds an exclusive ``flock`` on its file while it lives. A file
nobody holds belongs to a process that is gone: whoever opens the same store next
replays it (``claim_orphans``) and deletes it. Replaying twice is harmless: every row
is written by id.

``LineFile`` is those file mechanics for any item with a line codec; ``Spool`` is it
for units, and the store sink's journal (``_journal.py``) is it for events.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from ._rows import Insert, RowWrite, Update

try:  # POSIX; without it a file is an orphan when its process id is not running
    import fcntl
except ImportError:  # pragma: no cover - Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = ["LineFile", "Spool", "decode_unit", "encode_unit", "spool_folder"]

Unit = list[RowWrite]
T = TypeVar("T")


def spool_folder(root: str, key: str) -> Path:
    """The folder of one store's spool files: readable, and unique per store URL."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", key.split("://", 1)[-1])[:60].strip("_")
    return Path(root).expanduser() / f"{readable}-{digest}"


# ------------------------------------------------------------------ units as JSON


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$t": value.isoformat()}
    if isinstance(value, bytes):  # an image's bytes (the attachments table)
        return {"$b": base64.b64encode(value).decode()}
    raise TypeError(f"cannot spool a {type(value).__name__}")


def _hook(data: dict[str, Any]) -> Any:
    if len(data) == 1 and "$t" in data:
        return datetime.fromisoformat(data["$t"])
    if len(data) == 1 and "$b" in data:
        return base64.b64decode(data["$b"])
    return data


def _insert_data(row: Insert) -> dict[str, Any]:
    return {"insert": row.table, "columns": row.columns, "values": row.values, "keep": row.keep}


def encode_unit(unit: Unit) -> bytes:
    """One JSON line for the writes of ``unit``."""
    items: list[dict[str, Any]] = []
    for write in unit:
        if isinstance(write, Insert):
            items.append(_insert_data(write))
        else:
            items.append(
                {
                    "update": write.table,
                    "values": write.values,
                    "key": write.key,
                    "keys": write.keys,
                    "only_if_null": write.only_if_null,
                    "otherwise": None if write.otherwise is None else _insert_data(write.otherwise),
                }
            )
    return json.dumps(items, default=_default, ensure_ascii=False).encode() + b"\n"


def _insert_of(item: dict[str, Any]) -> Insert:
    return Insert(item["insert"], tuple(item["columns"]), list(item["values"]), item["keep"])


def decode_unit(line: bytes) -> Unit:
    """The writes of one spooled line (``ValueError`` if it is not one)."""
    unit: Unit = []
    for item in json.loads(line, object_hook=_hook):
        if "insert" in item:
            unit.append(_insert_of(item))
        else:
            other = item["otherwise"]
            unit.append(
                Update(
                    item["update"],
                    dict(item["values"]),
                    item["key"],
                    list(item["keys"]),
                    item["only_if_null"],
                    None if other is None else _insert_of(other),
                )
            )
    return unit


# ------------------------------------------------------------------ the files


class LineFile(Generic[T]):
    """This process's file of JSON lines in ``folder`` (made on the first ``append``),
    held with an exclusive lock while the process lives; ``encode``/``decode`` turn one
    item into one line (newline included) and back."""

    def __init__(
        self, folder: Path, encode: Callable[[T], bytes], decode: Callable[[bytes], T]
    ) -> None:
        self.folder = folder
        self._encode = encode
        self._decode = decode
        self.path: Path | None = None
        self._fd: int | None = None
        self.size = 0  # bytes appended to our file (we are its only writer)

    def append(self, item: T) -> None:
        """Add ``item`` to our file; raises ``OSError`` if it cannot be written."""
        line = self._encode(item)
        if self._fd is None:
            self._open()
        assert self._fd is not None
        written = _write(self._fd, line)
        if written != len(line):  # a full disk: never leave half a line behind
            os.ftruncate(self._fd, self.size)
            raise OSError(f"the file {self.path} is full")
        self.size += written

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours alone while we live
        self.path, self._fd, self.size = path, fd, 0

    def read_from(self, offset: int) -> tuple[list[T], int]:
        """Our items from byte ``offset`` on (whole lines only); and the offset after them."""
        if self.path is None or offset >= self.size:
            return [], offset
        with open(self.path, "rb") as source:
            source.seek(offset)
            data = source.read(self.size - offset)
        end = data.rfind(b"\n") + 1
        return [self._decode(line) for line in data[:end].splitlines() if line], offset + end

    def clear(self) -> None:
        """Everything in our file is stored: empty it (the lock stays ours)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            self.size = 0

    def forget(self) -> None:
        """Stop using our file (without closing or deleting it)."""
        self.path, self._fd, self.size = None, None, 0

    def after_fork(self) -> None:
        """In a forked child: the parent's file is not ours. Its descriptor is closed, so
        the file is free once the parent is gone (the lock stays the parent's)."""
        fd = self._fd
        self.forget()
        if fd is not None:
            with suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close our file; delete it if it is empty (else the next open replays it)."""
        fd, path = self._fd, self.path
        self.forget()
        if fd is None or path is None:
            return
        if os.fstat(fd).st_size == 0:
            with suppress(OSError):
                os.remove(path)
        os.close(fd)

    def claim_orphans(self) -> Iterator[tuple[Path, list[T], int]]:
        """Files left by processes that are gone, each held while the caller replays it.

        Yields (path, items, lines that could not be read); the file is deleted when
        the caller asks for the next one, so a failed replay leaves it for next time.
        """
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.jsonl")):
            if path == self.path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # replayed and deleted by another process a moment ago
            try:
                if not _is_orphan(fd, path) or os.fstat(fd).st_nlink == 0:
                    continue
                with os.fdopen(os.dup(fd), "rb") as source:
                    lines = source.read().splitlines()
                items: list[T] = []
                broken = 0
                for line in lines:
                    try:
                        items.append(self._decode(line))
                    except (ValueError, KeyError, TypeError):
                        broken += 1  # a line cut by a crash mid-write
                yield path, items, broken
                with suppress(OSError):
                    os.remove(path)
            finally:
                os.close(fd)


def _gil_held_write() -> Callable[[int, bytes], int]:
    """``os.write`` that keeps the GIL: libc's ``write`` called through ``ctypes.PyDLL``.

    ``os.write`` lets go of the GIL for the system call, and a busy writer thread of the
    same process takes it: the loop, which appends a line per stored event, then waited
    for it to be handed back (up to the interpreter's 5 ms switch interval) on nearly
    every event. Appending a line to a local file takes microseconds; holding the GIL
    through it is cheaper than losing it. Falls back to ``os.write`` where libc is not
    reachable that way (Windows).
    """
    try:
        import ctypes

        libc = ctypes.PyDLL(None, use_errno=True)
        write = libc.write
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return os.write
    write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    write.restype = ctypes.c_ssize_t

    def held(fd: int, data: bytes) -> int:
        while True:
            written = int(write(fd, data, len(data)))
            if written >= 0:
                return written
            code = ctypes.get_errno()
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))

    return held


_write = _gil_held_write()


class Spool(LineFile[Unit]):
    """This process's spool file for one team store: row-write units as JSON lines."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, encode_unit, decode_unit)


def _is_orphan(fd: int, path: Path) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its process is alive and holds it
        return True
    pid = path.name.split("-", 1)[0]
    try:  # pragma: no cover - Windows only
        os.kill(int(pid), 0)
    except (ValueError, OSError):
        return True
    return False  # pragma: no cover
