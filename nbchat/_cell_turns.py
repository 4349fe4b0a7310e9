"""A turn shown in a notebook cell, for ``%%chat`` and ``%chat resume`` alike.

``CellTurns`` runs one turn with a cell's options as that turn's options (the session
is left as it is) and shows it in the cell as it happens. It keeps the live display of
the latest cells' turns by cell id, so a re-run of an earlier cell can say on those
outputs, which stay on screen, that their turns no longer count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._display import CellRenderer, render_mode
from ._exceptions import SessionInUseError, SessionPendingError

if TYPE_CHECKING:
    from ._events import Event
    from ._magic_options import ChatOptions
    from ._session import Session
    from ._tools import Tool
    from ._turn import TurnOptions
    from ._types import TurnResult

__all__ = ["SUPERSEDED_NOTE", "CellTurns", "RunTurn", "turn_options"]

# Starts the turn: given the renderer (the turn's on_event) and the cell's turn options.
RunTurn = Callable[[Callable[["Event"], None], "TurnOptions"], "TurnResult"]

KEPT_OUTPUTS = 200  # live displays kept; the oldest go first
SUPERSEDED_NOTE = (
    "⤴ Superseded: an earlier cell of this conversation was re-run, so this turn is no "
    "longer part of it (it stays in the store, marked superseded)."
)


def turn_options(opts: ChatOptions, tools: list[Tool]) -> TurnOptions:
    """A cell's options as the options of its one turn."""
    from ._turn import TurnOptions

    return TurnOptions(
        model=opts.model,
        tools=tools,
        temperature=opts.temperature,
        max_rounds=opts.max_rounds,
        budget_usd=opts.budget,
        stream=False if opts.no_stream else None,
    )


class CellTurns:
    """Shows turns in the cells of one shell and keeps the latest cells' live displays."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._outputs: dict[str, CellRenderer] = {}  # by cell id, oldest first

    def begin(self, opts: ChatOptions, model: str) -> CellRenderer:
        """The display of a turn about to run, its "⏳" line shown at once: the first
        turn opens the store and the session after it, not before."""
        renderer = CellRenderer(model, render_mode(self.shell, stream=not opts.no_stream))
        renderer.placeholder()
        return renderer

    def show(
        self,
        session: Session,
        opts: ChatOptions,
        tools: list[Tool],
        run: RunTurn,
        *,
        notice: str | None = None,
        cell_id: str | None = None,
        renderer: CellRenderer | None = None,
    ) -> TurnResult:
        """Run one turn with the cell's options, shown in the cell as it happens.

        ``notice`` is said first (a re-run replacing later turns); the display is kept
        by ``cell_id`` so a later re-run elsewhere can mark it superseded. ``renderer``:
        the one ``begin`` made, its placeholder already shown.
        """
        from ._pytool import asking

        # Session.send turns a kernel interrupt into cancel(), so no event is lost.
        if renderer is None:
            renderer = CellRenderer(
                opts.model or session.model, render_mode(self.shell, stream=not opts.no_stream)
            )
        else:
            renderer.view.model = opts.model or session.model  # the placeholder's guess
        mode = renderer.mode
        if notice is not None:
            renderer.note(notice)
        if cell_id is not None and mode == "live":
            self._outputs.pop(cell_id, None)  # a re-run is the newest again
            self._outputs[cell_id] = renderer
            while len(self._outputs) > KEPT_OUTPUTS:
                self._outputs.pop(next(iter(self._outputs)))
        try:
            with asking(renderer.ask):  # python:ask asks in its tool block
                result = run(renderer, turn_options(opts, tools))
        except (SessionInUseError, SessionPendingError):
            renderer.withdraw()  # refused before it began: the cell's error line says why
            raise
        except BaseException:  # a bug: the display does not stay "⏳"
            renderer.finish()
            raise
        renderer.finish()
        return result

    def mark_superseded(self, cell_ids: list[str]) -> None:
        """Say on these cells' kept displays that their turns no longer count."""
        for cell_id in cell_ids:
            shown = self._outputs.get(cell_id)
            if shown is not None:
                shown.mark(SUPERSEDED_NOTE)
