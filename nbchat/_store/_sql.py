"""What both SQL backends answer with the same query: a session's existence, the latest
session, the session a notebook cell belongs to.

``SqlStore`` implements those methods of ``Store`` over ``_fetchall`` (``?``
placeholders, SQL that DuckDB and PostgreSQL both read); each backend supplies
``_fetchall`` and everything else.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from . import Store

__all__ = ["SqlStore"]


class SqlStore(Store):
    """A ``Store`` whose simple reads are one shared SQL query each."""

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
