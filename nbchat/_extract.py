"""``nbchat.extract``: a typed answer for every value of a column, as a DataFrame.

The everyday "run the LLM over a column" job. Each value is one isolated turn (the
system prompt and that value, nothing else) of one stored session, run a few at a time;
a budget stops it part way — the rows done are kept, the others are marked — and a
progress bar says how far it is.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel

from ._session import Session
from ._turn import TurnOptions
from ._types import TurnResult

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["extract"]

DEFAULT_INSTRUCTIONS = (
    "Extract the requested information from the text the user gives. Use only what the "
    "text says; where it does not say, give null."
)


def extract(
    values: Iterable[Any],
    output_type: Any,
    *,
    instructions: str | None = None,
    concurrency: int = 4,
    budget_usd: float | None = None,
    progress: bool = True,
    **session_options: Any,
) -> pd.DataFrame:
    """Ask for an ``output_type`` answer for each value; one row per value, in order.

    ``values`` is a pandas Series (its index is kept) or any iterable; each value is sent
    as text, alone, with ``instructions`` as the system prompt. The columns are the
    fields of ``output_type`` (a pydantic model or dataclass; other types give one
    ``output`` column; whole-number and yes/no fields as pandas' nullable ``Int64`` and
    ``boolean``), then ``status`` (``completed``, ``error``, ``budget_exceeded``,
    ``not_run``, ``skipped`` for a missing or blank value, which is not sent) and
    ``error`` (``None`` when there is none). ``budget_usd`` caps the whole run: once a request
    would cross it, no further value is sent. The other keyword arguments are
    ``Session``'s (model, base_url, db, ...); the run is one stored session, whose id is
    in the frame's ``attrs["session_id"]``.
    """
    import pandas as pd

    index = values.index if isinstance(values, pd.Series) else None
    items = list(values)
    # A missing or blank value has nothing to extract from: it is not sent (not paid for).
    sent = [i for i, v in enumerate(items) if not _missing(v)]
    texts = [str(items[i]) for i in sent]
    session_options.setdefault("title", f"extract {getattr(output_type, '__name__', 'answer')}")
    session = Session(
        system=instructions or DEFAULT_INSTRUCTIONS, budget_usd=budget_usd, **session_options
    )
    bar = _Progress(len(texts)) if progress else None
    try:
        results = session.send_each(
            texts,
            options=TurnOptions(output_type=output_type),
            concurrency=concurrency,
            on_result=(lambda i, r: bar.step(r)) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    stop = _stop_reason(results)
    by_item = dict(zip(sent, results, strict=True))
    rows = [
        _row(by_item[i], output_type, stop) if i in by_item else _skipped(output_type)
        for i in range(len(items))
    ]
    frame = pd.DataFrame(rows, index=index)
    for name, dtype in _dtypes(output_type).items():
        frame[name] = frame[name].astype(dtype)  # an int field stays whole with gaps
    frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), None)
    frame.attrs["session_id"] = session.id
    return frame


def _missing(value: Any) -> bool:
    """None, NaN, NA, NaT, or text that is only white space."""
    import pandas as pd

    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array: a value, however odd
        return False


def _dtypes(output_type: Any) -> dict[str, Any]:
    """pandas' nullable dtypes for a model's whole-number, yes/no and text fields (a
    skipped row's text then shows as <NA> like its numbers, not NaN)."""
    if not (isinstance(output_type, type) and issubclass(output_type, BaseModel)):
        return {}
    import pandas as pd

    out: dict[str, Any] = {}
    for name, field in output_type.model_fields.items():
        kinds = {k for k in get_args(field.annotation) if k is not type(None)} or {field.annotation}
        if kinds == {int}:
            out[name] = pd.Int64Dtype()
        elif kinds == {bool}:
            out[name] = pd.BooleanDtype()
        elif kinds == {str}:
            out[name] = pd.StringDtype()
    return out


def _skipped(output_type: Any) -> dict[str, Any]:
    names = _fields(output_type)
    values: dict[str, Any] = dict.fromkeys(names, None) if names else {"output": None}
    return {**values, "status": "skipped", "error": "not sent: the value is missing or blank"}


def _fields(output_type: Any) -> list[str] | None:
    if isinstance(output_type, type) and issubclass(output_type, BaseModel):
        return list(output_type.model_fields)
    if dataclasses.is_dataclass(output_type) and isinstance(output_type, type):
        return [f.name for f in dataclasses.fields(output_type)]
    return None


def _row(result: TurnResult | None, output_type: Any, stop: str) -> dict[str, Any]:
    names = _fields(output_type)
    values: dict[str, Any] = dict.fromkeys(names, None) if names else {"output": None}
    if result is None:
        return {**values, "status": "not_run", "error": stop}
    output = result.output
    if output is not None and names is not None:
        if isinstance(output, BaseModel):
            values.update(output.model_dump())
        else:
            values.update({n: getattr(output, n) for n in names})
    elif output is not None:
        values["output"] = output
    return {**values, "status": result.status, "error": result.error}


def _stop_reason(results: list[TurnResult | None]) -> str:
    """Why values were left unsent (the first turn that stopped the run)."""
    for result in results:
        if result is not None and result.status in ("budget_exceeded", "interrupted"):
            return f"not sent: the run stopped ({result.status}: {result.error or 'stopped'})"
    return "not sent"


class _Progress:
    """A progress bar in a notebook (ipywidgets), or a counter line on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.widget: Any = None
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None and getattr(shell, "kernel", None) is not None:
                import ipywidgets as widgets
                from IPython.display import display

                self.widget = widgets.IntProgress(
                    value=0, min=0, max=max(total, 1), description="extract"
                )
                display(self.widget)  # type: ignore[no-untyped-call]
        except ImportError:
            self.widget = None
        self._show()

    def step(self, result: TurnResult) -> None:
        """One value finished."""
        self.done += 1
        self.failed += result.status != "completed"
        self._show()

    def _show(self) -> None:
        text = f"{self.done}/{self.total}" + (f" ({self.failed} failed)" if self.failed else "")
        if self.widget is not None:
            self.widget.value = self.done
            self.widget.description = text
        else:
            print(f"\rextract: {text}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        """The run ended."""
        if self.widget is None:
            print(file=sys.stderr)
