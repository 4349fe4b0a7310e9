"""CellTurns: the cell displays a re-run marks superseded, and which ones it keeps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from nbchat._cell_turns import KEPT_OUTPUTS, SUPERSEDED_NOTE, CellTurns
from nbchat._magic_options import ChatOptions
from nbchat._types import TurnResult


class _Shell:
    """What render_mode reads of a shell whose front end shows Markdown (live mode)."""

    display_pub = object()
    display_formatter = SimpleNamespace(active_types=["text/plain", "text/markdown"])


def _show(turns: CellTurns, cell_id: str, seen: list[Any]) -> None:
    def run(on_event: Any, options: Any) -> TurnResult:
        seen.append(options)
        return TurnResult(session_id="s", turn_id=cell_id, status="completed")

    turns.show(SimpleNamespace(model="m"), ChatOptions(budget=0.5), [], run, cell_id=cell_id)  # type: ignore[arg-type]


def test_a_turn_runs_with_the_cells_options_and_its_display_can_be_marked_superseded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    turns = CellTurns(_Shell())
    seen: list[Any] = []
    _show(turns, "a", seen)
    assert seen[0].budget_usd == 0.5  # the cell's option, for this turn only
    shown = turns._outputs["a"]
    marked: list[str] = []
    shown.mark = marked.append  # type: ignore[method-assign]
    turns.mark_superseded(["a", "never-shown"])
    assert marked == [SUPERSEDED_NOTE]


def test_the_latest_displays_are_kept_and_a_rerun_cell_counts_as_the_newest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    turns = CellTurns(_Shell())
    seen: list[Any] = []
    for i in range(KEPT_OUTPUTS):
        _show(turns, f"c{i}", seen)
    _show(turns, "c0", seen)  # re-run of the oldest cell
    _show(turns, "new", seen)  # one more than kept: the oldest not re-run goes
    assert len(turns._outputs) == KEPT_OUTPUTS
    assert "c0" in turns._outputs and "c1" not in turns._outputs
    assert list(turns._outputs)[-2:] == ["c0", "new"]
