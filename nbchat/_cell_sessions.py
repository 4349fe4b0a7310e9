"""Which session a ``%%chat`` cell's turn goes to (mixed into the magics).

The current one; the one a re-run cell's earlier turn went to, even after another cell
started a new one; after a kernel restart, the stored one the cell was in; a session
another cell starts with ``--new``, ``--session ID`` or another system prompt. One
``Session`` object per stored session in a kernel, so two never number their messages
from the same ``seq``. ``%chat use`` opens a stored session to be read without a key;
its next turn reopens it with the key set since (or says none is).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

from ._config import KEY_FROM_NONE, Secret
from ._exceptions import ConfigError
from ._magic_commands import read_only

if TYPE_CHECKING:
    from ._magic_options import ChatOptions
    from ._session import Session

__all__ = ["CellSessions"]

# What a session opened to be read without a key sends (nothing: see _ready_to_send).
_NO_KEY_YET = Secret("no-key-configured", KEY_FROM_NONE)


class CellSessions:
    """The notebook's current session and each cell's (mixed into ``ChatMagics``)."""

    session: Session | None
    cell_sessions: dict[str, Session]

    def _session_for(self, opts: ChatOptions, cell_id: str | None) -> Session:
        if opts.new and opts.session:
            raise UsageError("%%chat: use either --new or --session, not both")
        # Re-running a cell goes back to the conversation its earlier turn is in, even
        # after another cell started a new one.
        earlier = self.cell_sessions.get(cell_id or "")
        current = earlier or self.session
        if opts.session:
            if current is None or current.id != opts.session:
                current = self._use(opts.session, model=opts.model)
        elif (
            current is None
            # A conversation has one system prompt: a different one starts another.
            or (opts.system is not None and opts.system != current.system)
            # --new starts a conversation; re-run, it regenerates the one it started
            # (its turn and every later one are replaced, as for any re-run cell).
            or (opts.new and earlier is None)
        ):
            current = self._open(system=opts.system, model=opts.model)
            if earlier is not None:
                # The cells below followed the conversation this cell began: they
                # follow the new one now.
                self._replace_session(earlier, current)
        self.session = current
        return current

    def _stored_session_of(self, opts: ChatOptions, cell_id: str | None) -> str | None:
        """After a kernel restart, go back to the stored conversation this cell was in.

        The kernel knows nothing of the cell, but the store does (cell ids last in the
        notebook file): its session becomes the current one, and the cell says so.
        """
        if cell_id is None or opts.new or opts.session or cell_id in self.cell_sessions:
            return None
        from ._config import current_notebook
        from ._store import open_store

        with open_store(None) as store:
            session_id = store.session_for_cell(cell_id, current_notebook())
        if session_id is None or (self.session is not None and self.session.id == session_id):
            return None
        self.cell_sessions[cell_id] = self._use(session_id, model=opts.model)
        return (
            f"Continuing session {session_id}, which this cell's earlier turn belongs to "
            "(the kernel restarted since); %chat new starts over."
        )

    def _open(self, **kwargs: Any) -> Session:
        """A new (or reopened) session; Session fills in this kernel's defaults (and the
        notebook it runs)."""
        from ._session import Session

        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return Session(**kwargs)

    def _use(self, session_id: str, model: str | None = None) -> Session:
        # One Session object per stored session in this kernel: two would both number
        # their messages from the same seq.
        for known in (self.session, *self.cell_sessions.values()):
            if known is not None and known.id == session_id:
                if model and model != known.model:
                    known.set_model(model)
                return known
        # An unknown id is a StoreError naming the store file: shown as one line.
        try:
            return self._open(session_id=session_id, model=model)
        except ConfigError as exc:
            refused = exc
        # Reading a stored conversation needs no key, only sending a turn does: without
        # one, it opens with a placeholder, and _ready_to_send asks again at the next turn.
        try:
            return self._open(session_id=session_id, model=model, api_key=_NO_KEY_YET)
        except ConfigError:
            raise refused from None  # not (only) the key: the first error says what

    def _ready_to_send(self, session: Session) -> Session:
        """``session``, able to send a turn: one ``%chat use`` opened without a key is
        reopened with the key set since, or its turn fails with the usual ``ConfigError``
        (no API key for ...) before anything is sent."""
        if not read_only(session):
            return session
        settings = session.client.settings
        model = f"{settings.endpoint}:{settings.model}" if settings.endpoint else settings.model
        reopened = self._open(session_id=session.id, model=model)
        self._replace_session(session, reopened)
        return reopened

    def _replace_session(self, old: Session, new: Session) -> None:
        """``new`` where ``old`` was: the current session, and each cell's."""
        if self.session is old:
            self.session = new
        for cell, known in self.cell_sessions.items():
            if known is old:
                self.cell_sessions[cell] = new
