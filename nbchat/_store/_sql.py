"""What both SQL backends share: a handle on a ``Lease`` (open, closed, the lock
timeout), replaying the journals dead processes left, and the reads answered by the
same query — a session's existence, the latest session, the session a notebook cell
belongs to.

``SqlStore`` implements those methods of ``Store`` over ``_fetchall`` (``?``
placeholders, SQL that DuckDB and PostgreSQL both read); each backend supplies
``_fetchall`` and everything else.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from .._warn import warn_user
from . import Lease, Store, release_lease
from ._journal import replay_orphans

L = TypeVar("L", bound=Lease)

__all__ = ["END_TURNS", "SqlStore", "load_queries"]

# ``end_unfinished_turns``: status, error, now, session id, and the turn to keep twice.
END_TURNS = (
    "UPDATE turns SET status = ?, error = coalesce(error, ?),"
    " finished_at = coalesce(finished_at, ?)"
    " WHERE session_id = ? AND (status IS NULL OR status = 'running')"
    " AND (CAST(? AS VARCHAR) IS NULL OR id <> ?)"
)


def load_queries(
    created_at: str, message_columns: str, *, include_compacted: bool = False
) -> tuple[str, str, str]:
    """``load_session``'s three reads (``?`` placeholders): the session's row, its active
    messages (and with ``include_compacted`` those folded into a summary) in order, its
    highest ``seq``. ``created_at`` and ``message_columns`` are how the backend selects
    timestamps (as epoch microseconds, or as they are)."""
    states = "('active', 'compacted')" if include_compacted else "('active')"
    return (
        "SELECT id, model, system_prompt, title, parent_id, notebook, "
        f"{created_at}, metadata FROM sessions WHERE id = ?",
        f"SELECT {message_columns} FROM messages"
        f" WHERE session_id = ? AND state IN {states} ORDER BY seq, created_at",
        "SELECT coalesce(max(seq), -1) FROM messages WHERE session_id = ?",
    )


class SqlStore(Store, Generic[L]):
    """A ``Store`` holding one ``Lease``, whose simple reads are one shared SQL query each."""

    def __init__(self, lease: L, *, lock_timeout: float, path: str) -> None:
        """Use ``Store.open()``; this wraps an already-open lease."""
        self._lease: L | None = lease
        self._lock_timeout = lock_timeout
        self.path = path
        # What the last open wrote from recovery or spool files (also a warning), or None.
        self.recovered: str | None = None

    def _tell_recovered(self, what: str, names: list[str], skipped: int, *, warn: bool) -> None:
        """Say what was stored from files a process left: ``recovered``, and a warning.

        ``what`` reads on to the files' names: "3 events that ... had kept in".
        """
        if not names:
            return
        lost = f"; {skipped} could not be stored" if skipped else ""
        self.recovered = f"nbchat stored {what} {', '.join(names)}{lost}."
        if warn:
            warn_user(self.recovered)

    def _replay_journals(self) -> None:
        """Store what the journals of processes that are gone hold (``_journal.py``).

        Quietly (``recovered`` says what was done): it is the journal's normal use, most
        of what a killed process journaled was stored already, and nothing is lost.
        Backends call it when a store is opened and before a session is loaded.
        """
        stored, skipped, names = replay_orphans(self)
        self._tell_recovered(
            f"{stored} events that a process which ended before writing them to "
            f"{self.path} had kept in its journal",
            names,
            skipped,
            warn=False,
        )

    def close(self, *, linger: bool = False) -> None:
        """Release this handle; the lease is let go when no other handle in the process
        uses it (``linger=True``: kept a moment for the next ``open``)."""
        lease, self._lease = self._lease, None
        if lease is not None:
            release_lease(lease, linger=linger)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._lease is None

    @property
    def lock_timeout(self) -> float:
        """Seconds an operation waits for another writer (a file's lease, a server's lock)."""
        return self._lock_timeout

    @abstractmethod
    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one query (``?`` placeholders)."""

    def has_session(self, session_id: str) -> bool:
        """Whether a session with this id is stored."""
        return bool(self._fetchall("SELECT 1 FROM sessions WHERE id = ?", [session_id]))

    def latest_session_id(self, notebook: str | None = None) -> str | None:
        """The most recently created session (in ``notebook``, if given), or ``None``."""
        rows = self._fetchall(
            "SELECT id FROM sessions WHERE CAST(? AS TEXT) IS NULL OR notebook = ?"
            " ORDER BY created_at DESC, id DESC LIMIT 1",
            [notebook, notebook],
        )
        return str(rows[0][0]) if rows else None

    def session_for_cell(self, cell_id: str, notebook: str | None = None) -> str | None:
        """The latest session whose live messages include a user message from ``cell_id``."""
        rows = self._fetchall(
            "SELECT m.session_id FROM messages m JOIN sessions s ON s.id = m.session_id"
            " WHERE m.role = 'user' AND m.state = 'active' AND m.cell_id = ?"
            " AND (CAST(? AS TEXT) IS NULL OR s.notebook = ?)"
            " ORDER BY m.created_at DESC, m.seq DESC LIMIT 1",
            [cell_id, notebook, notebook],
        )
        return str(rows[0][0]) if rows else None
