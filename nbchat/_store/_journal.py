"""The store sink's journal: every stored event on local disk before the loop goes on.

A shared DuckDB file takes one writer at a time, so a chat that waited for the file at
its barriers waited for every other process writing it. Instead, the sink appends each
event it keeps to this process's journal, ``<store>.nbchat-journal/<pid>-<random>.jsonl``
(one JSON line per event, ``LineFile`` of ``_spool.py``), and a barrier waits only for
that append; the writer thread then takes the file when it can. A line reaches the
operating system before ``append`` returns, so a killed process loses nothing its
journal holds (a power cut may lose what the OS had not written to disk yet).

The journal is emptied each time the writer has stored everything it holds, and deleted
when the process ends with nothing unstored. One left by a process that is gone (its
lock is free) is replayed by the next process that opens the store, or loads a session
from it (``replay_orphans``); every row is written by id, so a replay of events that were
already stored changes nothing. Within a process replays take turns: a file another
thread is replaying is locked like a live process's, and a second replayer that skipped
it would read the store before its rows were in (a kernel's warm-up and its first cell,
both opening the store after a restart).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .._events import Event, EventAdapter
from .._exceptions import UnstorableRow
from ._spool import LineFile

if TYPE_CHECKING:
    from . import Store

__all__ = ["Journal", "journal_folder", "replay_orphans"]

_SUFFIX = ".nbchat-journal"
_REPLAYING = threading.Lock()  # one replay at a time in this process (module docstring)


def journal_folder(path: str) -> Path | None:
    """Where the journals of the store file at ``path`` live (None for ``:memory:``)."""
    return None if path == ":memory:" else Path(path + _SUFFIX)


def _line(event: Event) -> bytes:
    # The event's own serializer: the same bytes as EventAdapter.dump_json (a test checks
    # every stored kind), in about half the time, which the loop pays for each event.
    return type(event).__pydantic_serializer__.to_json(event) + b"\n"


def _event(line: bytes) -> Event:
    return EventAdapter.validate_json(line)


class Journal(LineFile[Event]):
    """This process's journal for one store."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, _line, _event)


def replay_orphans(store: Store) -> tuple[int, int, list[str]]:
    """Store the events of journals whose processes are gone, then delete those files.

    Returns how many events were stored, how many could not be, and the files' names.
    """
    stored = skipped = 0
    names: list[str] = []
    folder = store.journal_folder()
    if folder is None or not folder.is_dir():
        return stored, skipped, names
    with _REPLAYING:
        for path, events, broken in Journal(folder).claim_orphans():
            for event in events:
                try:
                    store.write(event)
                    stored += 1
                except UnstorableRow:
                    skipped += 1
            skipped += broken
            names.append(path.name)
    return stored, skipped, names
