"""The panel's model picker: the session's model first, then every model the server lists.

The server's list is asked for on nbchat's background loop, so a slow or failing
``/v1/models`` never holds the panel up for long: a new panel waits up to
``FIRST_LIST_WAIT`` s for it, then shows without it; until it answers (or when it fails)
the configured model is the only choice. Setting the list is not a pick.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ._runner import submit

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["FIRST_LIST_WAIT", "NO_MODEL", "ModelPicker"]

logger = logging.getLogger("nbchat")

NO_MODEL = "(no model)"
# How long a new panel waits for the server's list before it is shown. Within it, the
# list is in the widget's first state: Voila renders the page from the state the cell
# ended with, and in a CI run an update sent just after that never reached the page.
FIRST_LIST_WAIT = 1.0


class ModelPicker(widgets.Dropdown):  # type: ignore[misc]
    """A dropdown of models; ``on_pick(name)`` is called when the user picks one."""

    def __init__(
        self, current: str, *, lock: threading.RLock, on_pick: Callable[[str], None]
    ) -> None:
        super().__init__(options=[current], value=current, description="Model")
        self._panel_lock = lock  # the panel's: the list is set from the loop's thread
        self._on_pick = on_pick
        self._quiet = False
        self.layout.width = "auto"
        self.observe(self._picked, names="value")

    @property
    def picked(self) -> str | None:
        """The model picked, or ``None`` when there is none to pick."""
        name = self.value
        return name if name and name != NO_MODEL else None

    def load(self, session: Session, *, wait: float = 0.0) -> None:
        """Offer the models ``session``'s server lists, ``session.model`` picked; wait up
        to ``wait`` s for the list (never on the background loop, which fetches it)."""

        async def load() -> None:
            try:
                models = await session.client.list_models()
            except Exception:  # the configured model stays the only choice
                logger.debug("nbchat panel: could not list the server's models", exc_info=True)
                return
            self.show(models, session.model)

        asked = submit(load())
        if wait > 0 and threading.current_thread().name != "nbchat-loop":
            with contextlib.suppress(concurrent.futures.TimeoutError):
                asked.result(timeout=wait)  # later than that, it is set when it comes

    def show(self, models: list[str], current: str) -> None:
        """Offer ``models`` and ``current``, with ``current`` picked (not a pick)."""
        with self._panel_lock:
            self._quiet = True
            try:
                self.options = sorted({*models, current})
                self.value = current
            finally:
                self._quiet = False

    def _picked(self, change: dict[str, Any]) -> None:
        name = change["new"]
        if self._quiet or not name or name == NO_MODEL:
            return
        self._on_pick(name)
