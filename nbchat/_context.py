"""Notebook values and errors as a model should read them: bounded, readable text.

Pure functions, no IPython: ``to_context(value)`` writes a DataFrame as its shape,
dtypes and first rows (a Markdown table), a Series, an array, a dict or list, a long
string as a bounded form, anything else as its ``str``, and never more than
``max_chars``. ``cell_error`` writes an exception as its type, message and the frames
that matter (IPython's own frames are dropped). ``code_blocks`` finds the fenced code
in a reply, for ``%chat fix`` and ``--format code``.
"""

from __future__ import annotations

import pprint
import re
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_CONTEXT_CHARS",
    "FORMAT_INSTRUCTIONS",
    "CellError",
    "cell_error",
    "code_blocks",
    "context_section",
    "fix_candidates",
    "fix_prompt",
    "reply_code",
    "to_context",
    "without_format_instruction",
]

DEFAULT_MAX_CONTEXT_CHARS = 8_000
MAX_ROWS = 10  # rows of a DataFrame or Series shown before "… N more rows"
MAX_COLUMNS = 20
MAX_ITEMS = 20  # items of a list or dict, at each level
MAX_CELL_CHARS = 60  # one table cell
MAX_FRAMES = 6  # traceback frames kept (the innermost ones)


def to_context(value: Any, max_chars: int = DEFAULT_MAX_CONTEXT_CHARS) -> str:
    """``value`` as text for a model: readable, bounded to ``max_chars`` characters."""
    pandas = sys.modules.get("pandas")  # not imported: the value is no DataFrame
    numpy = sys.modules.get("numpy")
    if isinstance(value, str):
        text = value
    elif pandas is not None and isinstance(value, pandas.DataFrame):
        text = _frame(value, max_chars)
    elif pandas is not None and isinstance(value, pandas.Series):
        text = _series(value, max_chars)
    elif numpy is not None and isinstance(value, numpy.ndarray):
        text = _array(value, numpy)
    elif isinstance(value, dict | list | tuple | set | frozenset):
        text = _container(value)
    elif hasattr(value, "model_dump_json") and not isinstance(value, type):
        text = value.model_dump_json(indent=2)  # a pydantic model: its fields as JSON
    else:
        text = str(value)
    return _bounded(text, max_chars)


def context_section(items: Mapping[str, Any], max_chars: int = DEFAULT_MAX_CONTEXT_CHARS) -> str:
    """Values attached to a message (``--context a,b``): a heading per name, then the value."""
    parts = ["## Context from the notebook"]
    for name, value in items.items():
        kind = type(value).__name__
        parts.append(f"### `{name}` ({kind})\n\n{to_context(value, max_chars)}")
    return "\n\n".join(parts)


def _bounded(text: str, max_chars: int) -> str:
    """The start and the end of a long text: a traceback or a log says the most in its
    last lines (the error itself), a long string in its first."""
    if len(text) <= max_chars:
        return text
    keep = max(max_chars - 40, 0)  # room for the note
    tail = keep // 3
    head = keep - tail
    cut = len(text) - head - tail
    end = text[len(text) - tail :] if tail else ""
    return f"{text[:head]}\n… ({cut:,} characters cut) …\n{end}"


# ---------------------------------------------------------------------- tables


def _cell(value: Any) -> str:
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _fit_rows(head: str, header: list[str], rows: list[list[str]], total: int, budget: int) -> str:
    """The table with as many of ``rows`` as fit in ``budget`` next to ``head``."""
    shown = list(rows)
    while True:
        more = total - len(shown)
        parts = [head, _table(header, shown)]
        if more:
            parts.append(f"… {more:,} more rows")
        text = "\n\n".join(parts)
        if len(text) <= budget or not shown:
            return text
        shown = shown[: len(shown) // 2] if len(shown) > 1 else []


def _frame(frame: Any, max_chars: int) -> str:
    rows, columns = frame.shape
    names = [str(c) for c in frame.columns[:MAX_COLUMNS]]
    dtypes = ", ".join(f"{n} {d}" for n, d in zip(names, frame.dtypes[:MAX_COLUMNS], strict=True))
    hidden = columns - len(names)
    head = f"DataFrame: {rows:,} rows × {columns:,} columns\n\ndtypes: {dtypes}"
    if hidden:
        head += f" (… {hidden:,} more columns, not shown)"
    part = frame.iloc[:MAX_ROWS, :MAX_COLUMNS]
    index = [str(frame.index.name or "")]
    body = [
        [_cell(label), *(_cell(v) for v in values)]
        for label, values in zip(part.index, part.itertuples(index=False), strict=True)
    ]
    return _fit_rows(head, index + names, body, rows, max_chars)


def _series(series: Any, max_chars: int) -> str:
    name = "" if series.name is None else f" {series.name!r}"
    head = f"Series{name}: {len(series):,} values, dtype {series.dtype}"
    part = series.iloc[:MAX_ROWS]
    body = [[_cell(label), _cell(v)] for label, v in zip(part.index, part, strict=True)]
    header = [str(series.index.name or ""), str(series.name if series.name is not None else "")]
    return _fit_rows(head, header, body, len(series), max_chars)


def _array(array: Any, numpy: Any) -> str:
    shape = " × ".join(f"{n:,}" for n in array.shape) or "scalar"
    body = numpy.array2string(array, threshold=200, edgeitems=3, max_line_width=100)
    return f"ndarray: shape {shape}, dtype {array.dtype}\n{body}"


class _More:
    """What stands for the items left out of a list or dict."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __repr__(self) -> str:
        return f"…({self.count:,} more)"


def _brief(value: Any, depth: int = 0) -> Any:
    """``value`` with at most ``MAX_ITEMS`` items per level and long strings cut."""
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:199] + "…"
    if depth >= 4 and isinstance(value, dict | list | tuple | set | frozenset):
        return _More(len(value))
    if isinstance(value, dict):
        items = list(value.items())
        out: dict[Any, Any] = {k: _brief(v, depth + 1) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out[_More(len(items) - MAX_ITEMS)] = ""
        return out
    if isinstance(value, list | tuple | set | frozenset):
        seq = list(value)
        kept: list[Any] = [_brief(v, depth + 1) for v in seq[:MAX_ITEMS]]
        if len(seq) > MAX_ITEMS:
            kept.append(_More(len(seq) - MAX_ITEMS))
        return tuple(kept) if isinstance(value, tuple) else kept
    return value


def _container(value: Any) -> str:
    kind = type(value).__name__
    text = pprint.pformat(_brief(value), width=100, sort_dicts=False)
    return f"{kind} of {len(value):,} items:\n{text}"


# ---------------------------------------------------------------------- errors


@dataclass(frozen=True)
class CellError:
    """A cell's error, kept as text: the cell, its source, and what went wrong."""

    execution_count: int | None
    source: str
    kind: str
    message: str
    traceback: str

    def render(self) -> str:
        """The error as a model reads it (``{Err}``): the trimmed traceback, then the error."""
        return self.traceback


def _kind(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def cell_error(
    exc: BaseException,
    execution_count: int | None,
    source: str,
    cell_of: Callable[[str], str | None] = lambda filename: None,
) -> CellError:
    """The error ``exc`` raised by cell ``execution_count`` as text.

    ``cell_of(filename)`` names the cell a code file belongs to (``"In[3]"``: IPython
    compiles each cell under a file name of its own), so frames read
    ``Cell In[3], line 2``.
    Frames of IPython itself are dropped; of the rest, the outermost and the innermost
    ``MAX_FRAMES - 1`` are kept.
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _is_ipython(f.filename)]
    lines = []
    if frames:
        lines.append("Traceback (most recent call last):")
        # The outermost frame (usually the cell) and the innermost ones say the most.
        hidden = len(frames) - MAX_FRAMES
        for i, frame in enumerate(frames):
            if 0 < i <= hidden:
                if i == 1:
                    lines.append(f"  … {hidden} frames")
                continue
            lines.append(f"  {_where(frame.filename, frame.lineno, cell_of)}, in {frame.name}")
            if frame.line:
                lines.append(f"    {frame.line.strip()}")
    only = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
    if isinstance(exc, SyntaxError) and exc.filename:  # its own "File ..., line N" line
        place = _where(exc.filename, None, cell_of)
        only = only.replace(f'File "{exc.filename}", line', f"{place}, line")
    lines.append(_bounded(only, 2_000))
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        lines.append(f"(raised while handling {_kind(cause)}: {_bounded(str(cause), 300)})")
    message = _bounded(str(exc), 2_000)
    return CellError(execution_count, source, _kind(exc), message, "\n".join(lines))


def _is_ipython(filename: str) -> bool:
    parts = re.split(r"[\\/]", filename)
    return "IPython" in parts or "ipykernel" in parts


def _where(filename: str, lineno: int | None, cell_of: Callable[[str], str | None]) -> str:
    cell = cell_of(filename)
    place = f'File "{filename}"' if cell is None else f"Cell {cell}"
    return place if lineno is None else f"{place}, line {lineno}"


# ---------------------------------------------------------------------- code in replies

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of Markdown ``text``, in order, as (language, code).

    An unclosed fence runs to the end of the text (a reply cut short).
    """
    blocks: list[tuple[str, str]] = []
    fence: str | None = None
    language, body = "", list[str]()
    for line in text.splitlines():
        if fence is None:
            match = _FENCE.match(line)
            if match:
                fence, language, body = match.group(1), match.group(2).lower(), []
            continue
        stripped = line.strip()
        if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            blocks.append((language, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        blocks.append((language, "\n".join(body)))
    return blocks


def reply_code(text: str, *, last_only: bool = False) -> str:
    """The code of a reply: its fenced blocks joined (the whole text when it has none).

    ``last_only`` takes the last Python (or untagged) block: a fix explains first, then
    gives the corrected cell.
    """
    blocks = code_blocks(text)
    if not blocks:
        return text.strip()
    if last_only:
        return fix_candidates(text)[-1]
    return "\n\n".join(code.strip("\n") for _, code in blocks)


def fix_candidates(text: str) -> list[str]:
    """The blocks of a reply that could be its corrected cell, in order (``reply_code``
    with ``last_only`` takes the last): those marked Python, else the untagged ones (an
    untagged block beside a Python one may be the traceback quoted back), else the last
    block of any language. Empty when the reply has no fenced block."""
    blocks = code_blocks(text)
    if not blocks:
        return []
    python = [code for lang, code in blocks if lang in ("python", "py", "python3", "ipython")]
    untagged = [code for lang, code in blocks if not lang]
    return [code.strip("\n") for code in (python or untagged or [blocks[-1][1]])]


def fix_prompt(error: CellError, instructions: str = "") -> str:
    """The message ``%chat fix`` sends: the failing cell, its error, what to answer."""
    cell = (
        "this notebook cell"
        if error.execution_count is None
        else f"cell In[{error.execution_count}]"
    )
    parts = [
        f"Running {cell} failed.",
        f"The cell:\n\n```python\n{error.source.rstrip()}\n```",
        f"The error:\n\n```\n{error.render()}\n```",
        "Explain in a sentence or two what went wrong, then give the whole corrected "
        "cell in one ```python block.",
    ]
    if instructions.strip():
        parts.append(instructions.strip())
    return "\n\n".join(parts)


FORMAT_INSTRUCTIONS = {
    "markdown": "Format your answer as Markdown.",
    "text": "Answer in plain text, without Markdown.",
    "code": "Answer with the code only, in one fenced code block.",
    "json": "Answer with one JSON value and nothing else.",
}
"""What a ``--format`` adds at the end of the message, so the model answers in that form."""


def without_format_instruction(text: str) -> str:
    """A stored user message as the user wrote it: without the ``--format`` instruction
    the cell added at its end (a trial saw it in the panel's history, as if typed)."""
    for instruction in FORMAT_INSTRUCTIONS.values():
        if text.endswith("\n\n" + instruction):
            return text[: -len(instruction) - 2]
    return text
