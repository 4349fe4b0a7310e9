"""The notebook's cells as the magics see them: sources, results and errors by number.

``{In[3]}``, ``{Out[3]}``, ``{Err[3]}`` and ``{Err}`` in a ``%%chat`` cell, and
``%chat fix``, read them here. Light on purpose (no pydantic, no pandas): it is created
when the extension loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._context import CellError

__all__ = ["NotebookCells"]


class NotebookCells:
    """This kernel's cells as ``{In[3]}``, ``{Out[3]}``, ``{Err[3]}`` and ``{Err}`` see them.

    A ``post_run_cell`` handler keeps each failed cell's error as text (by execution
    count, the newest ``MAX_ERRORS``), for those placeholders and ``%chat fix``. Cells
    of nbchat's own magics are not kept: there is nothing in them to fix.
    """

    MAX_ERRORS = 100

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.errors: dict[int, CellError] = {}
        self.last_error: CellError | None = None

    def post_run_cell(self, result: Any) -> None:
        exc = result.error_before_exec or result.error_in_exec
        source = str(getattr(result.info, "raw_cell", "") or "")
        if (
            exc is None
            or source.lstrip().startswith("%chat")
            or source.lstrip().startswith("%%chat")
        ):
            return
        from ._context import cell_error

        error = cell_error(exc, result.execution_count, source, self._cell_of)
        self.last_error = error
        if error.execution_count is not None:
            self.errors[error.execution_count] = error
            while len(self.errors) > self.MAX_ERRORS:
                del self.errors[next(iter(self.errors))]

    def _cell_of(self, filename: str) -> str | None:
        """``"In[3]"`` for the file IPython compiled cell 3 under."""
        compiler = getattr(self.shell, "compile", None)
        label = compiler.format_code_name(filename) if compiler is not None else None
        return str(label[1]) if label else None

    def reference(self, kind: str, index: int | None) -> Any:
        """A cell's source (raw, as typed), result or error; ``MISSING`` if none."""
        from ._magic_options import MISSING

        if kind == "Err":
            error = self.last_error if index is None else self.errors.get(index)
            return MISSING if error is None else error.render()
        if kind == "Out":
            return self.shell.user_ns.get("Out", {}).get(index, MISSING)
        sources = self.shell.history_manager.input_hist_raw
        try:
            source = sources[index]
        except (IndexError, TypeError):
            return MISSING
        return source or MISSING
