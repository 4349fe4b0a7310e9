"""The options of the magics: one pydantic model per magic, parsed from the magic line.

The line is split as a shell does (``split_line``: quotes work, a ``# comment`` ends it)
and each ``--flag`` is matched to a field of the model; the same fields write the help
that ``%%chat?`` shows, so the parser and the help cannot drift apart. ``interpolate``
fills ``{name}`` in a cell body.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal, Protocol, TypeVar, get_args, get_origin

from IPython.core.error import UsageError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ._context import DEFAULT_MAX_CONTEXT_CHARS, to_context
from ._images import is_image
from ._magic_help import (
    CHAT_OPTIONS,
    SQL_OPTIONS,
    OptionDoc,
    flag_of,
    render_options,
    split_line,
)

__all__ = [
    "MISSING",
    "CellReferences",
    "ChatOptions",
    "SqlOptions",
    "interpolate",
    "options_help",
    "parse_options",
    "resolve",
]

M = TypeVar("M", bound=BaseModel)
_IDENT = r"[A-Za-z_]\w*"
_DOTTED = _IDENT + r"(?:\." + _IDENT + r")*"
_CELL_REF = r"(?:In|Out|Err)\[-?\d+\]"
# What a placeholder or a --context entry may name: a variable (``df``, ``df.shape``),
# a cell's source, result or error (``In[3]``, ``Out[3]``, ``Err[3]``), the last error.
_NAME = re.compile(_CELL_REF + "|" + _DOTTED)
# The options whose values are names, each checked by one validator: the pattern a name
# must match, and what the error says a name that does not match is not.
_NAMES = {
    "context": (_NAME, "a variable name, In[n], Out[n], Err[n] or Err"),
    "out": (re.compile(_IDENT), "a valid variable name"),
    "schema_": (re.compile(_DOTTED), "the name of a type in the notebook"),
}


# ---------------------------------------------------------------------- options


def _doc(options: tuple[OptionDoc, ...], name: str) -> dict[str, Any]:
    """The ``Field`` keywords (help, flag, value name) of option ``name`` in ``options``."""
    option = next(o for o in options if o.name == name)
    extra = {"short": option.short, "metavar": option.metavar}
    return {"description": option.help, "json_schema_extra": extra}


class ChatOptions(BaseModel):
    """The options of a ``%%chat`` cell; each applies to that cell's turn only."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, **_doc(CHAT_OPTIONS, "model"))
    endpoint: str | None = Field(None, **_doc(CHAT_OPTIONS, "endpoint"))
    system: str | None = Field(None, **_doc(CHAT_OPTIONS, "system"))
    new: bool = Field(False, **_doc(CHAT_OPTIONS, "new"))
    session: str | None = Field(None, **_doc(CHAT_OPTIONS, "session"))
    tools: list[str] | None = Field(None, **_doc(CHAT_OPTIONS, "tools"))
    budget: float | None = Field(None, ge=0, **_doc(CHAT_OPTIONS, "budget"))
    max_rounds: int | None = Field(None, ge=0, **_doc(CHAT_OPTIONS, "max_rounds"))
    no_stream: bool = Field(False, **_doc(CHAT_OPTIONS, "no_stream"))
    out: str | None = Field(None, **_doc(CHAT_OPTIONS, "out"))
    temperature: float | None = Field(None, ge=0, **_doc(CHAT_OPTIONS, "temperature"))
    tag: list[str] | None = Field(None, **_doc(CHAT_OPTIONS, "tag"))
    context: list[str] | None = Field(None, **_doc(CHAT_OPTIONS, "context"))
    attach: list[str] | None = Field(None, **_doc(CHAT_OPTIONS, "attach"))
    max_context_chars: int | None = Field(None, ge=1, **_doc(CHAT_OPTIONS, "max_context_chars"))
    fix: bool = Field(False, **_doc(CHAT_OPTIONS, "fix"))
    format: Literal["markdown", "text", "code", "json"] | None = Field(
        None, **_doc(CHAT_OPTIONS, "format")
    )
    # ``schema`` is a BaseModel attribute: the field is ``schema_``, the flag --schema.
    schema_: str | None = Field(None, **_doc(CHAT_OPTIONS, "schema_"))

    @field_validator("tools", mode="before")
    @classmethod
    def _split_tools(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [n.strip() for n in value.split(",") if n.strip()]
            return [] if names == ["none"] else names
        return value

    @field_validator("context", "tag", "attach", mode="before")
    @classmethod
    def _split_context(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    @field_validator(*_NAMES)
    @classmethod
    def _names(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        pattern, what = _NAMES[str(info.field_name)]
        for name in [value] if isinstance(value, str) else value or []:
            if not pattern.fullmatch(name):
                raise ValueError(f"{name!r} is not {what}")
        return value

    @model_validator(mode="after")
    def _one_kind_of_answer(self) -> ChatOptions:
        if self.schema_ is not None and (self.format is not None or self.fix):
            raise ValueError("--schema gives a typed answer: use it without --format or --fix")
        if self.fix and self.format not in (None, "code"):
            raise ValueError("--fix answers with code: use it without --format")
        return self


class SqlOptions(BaseModel):
    """The options of a ``%%chat_sql`` cell."""

    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(None, **_doc(SQL_OPTIONS, "out"))
    db: str | None = Field(None, **_doc(SQL_OPTIONS, "db"))
    allow_files: bool = Field(False, **_doc(SQL_OPTIONS, "allow_files"))


def _flags(model: type[BaseModel]) -> dict[str, str]:
    flags = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flags[flag_of(name)] = name
        short = extra.get("short")
        if isinstance(short, str):
            flags[short] = name
    return flags


def _is_switch(model: type[BaseModel], name: str) -> bool:
    return model.model_fields[name].annotation is bool


def _is_list(model: type[BaseModel], name: str) -> bool:
    """A field of several names (``--attach a,b``), which a repeated flag adds to."""
    kinds = get_args(model.model_fields[name].annotation) or (model.model_fields[name].annotation,)
    return any(get_origin(kind) is list for kind in kinds)


def parse_options(model: type[M], line: str, magic: str = "%%chat") -> M:
    """Parse a magic line (shell-like quoting) into ``model``; ``UsageError`` on bad input."""
    try:
        words = split_line(line)
    except ValueError as exc:
        raise UsageError(f"{magic}: cannot read the options ({exc}): {line}") from None
    flags = _flags(model)
    raw: dict[str, Any] = {}
    given: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        flag, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
        name = flags.get(flag)
        if name is None:
            if word.startswith("-"):
                long_flags = [f for f in flags if f.startswith("--")]
                close = difflib.get_close_matches(flag, long_flags, 1, cutoff=0.75)
                hint = f"did you mean {close[0]}? " if close else ""
                raise UsageError(
                    f"{magic}: unknown option {flag} ({hint}see {magic}? for the options)"
                )
            raise UsageError(
                f"{magic}: unexpected {word!r} on the magic line; "
                "the message goes in the cell, below the magic line"
            )
        if _is_switch(model, name):
            if eq:
                raise UsageError(f"{magic}: {flag} takes no value")
            raw[name] = True
        else:
            if not eq:
                if i >= len(words):
                    raise UsageError(f"{magic}: {flag} needs a value")
                value = words[i]
                i += 1
            if name in raw and _is_list(model, name):
                value = f"{raw[name]},{value}"  # --attach a --attach b: both
            elif name in raw:
                raise UsageError(f"{magic}: {flag} is given twice; give it once")
            raw[name] = value
        given[name] = flag
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a rule about several options together
            raise UsageError(f"{magic}: {err['msg'].removeprefix('Value error, ')}") from None
        name = str(err["loc"][0])
        raise UsageError(f"{magic}: {given.get(name, name)}: {err['msg']}") from None


def options_help(model: type[BaseModel]) -> str:
    """The help table of a model's options, from the fields (the words of ``_magic_help``)."""
    options = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        short, metavar = extra.get("short"), extra.get("metavar")
        if _is_switch(model, name):
            metavar = None
        elif not isinstance(metavar, str):
            metavar = name.upper()
        options.append(
            OptionDoc(
                name, short if isinstance(short, str) else None, metavar, field.description or ""
            )
        )
    return render_options(tuple(options))


# ---------------------------------------------------------------------- {var} in the cell

_PLACEHOLDER = re.compile(r"\{\{(" + _NAME.pattern + r")\}\}|\{(" + _NAME.pattern + r")\}")
_CELL = re.compile(r"(In|Out|Err)\[(-?\d+)\]")
MISSING: Any = object()
"""What ``resolve`` gives for a name that matches nothing."""


class CellReferences(Protocol):
    """The notebook's cells as placeholders see them (the magic gives its shell's)."""

    def reference(self, kind: str, index: int | None) -> Any:
        """``In``/``Out``/``Err`` of cell ``index`` (``Err``, ``None``: the last error).

        ``MISSING`` when there is no such cell, result or error.
        """
        ...


def resolve(name: str, namespace: dict[str, Any], cells: CellReferences | None = None) -> Any:
    """The value ``name`` stands for: ``df``, ``df.attr``, ``In[3]``, ``Out[3]``, ``Err``...

    Cell references come from ``cells`` (without it, from ``In``/``Out`` in
    ``namespace``, as IPython keeps them); ``MISSING`` when nothing matches.
    """
    cell = _CELL.fullmatch(name)
    if cell is not None or (name == "Err" and cells is not None):
        kind, index = (cell.group(1), int(cell.group(2))) if cell else ("Err", None)
        if cells is not None:
            return cells.reference(kind, index)
        try:
            return namespace[kind][index]
        except (KeyError, IndexError, TypeError):
            return MISSING
    head, *attrs = name.split(".")
    value = namespace.get(head, MISSING)
    for attr in attrs:
        if value is MISSING:
            break
        value = getattr(value, attr, MISSING)
    return value


def interpolate(
    text: str,
    namespace: dict[str, Any],
    missing: list[str] | None = None,
    *,
    cells: CellReferences | None = None,
    max_chars: int = DEFAULT_MAX_CONTEXT_CHARS,
    images: list[Any] | None = None,
) -> str:
    """Replace ``{name}``, ``{name.attr}`` and ``{In[3]}``-style references with values.

    Values are written for a model (``to_context``: a DataFrame as shape, dtypes and
    first rows; at most ``max_chars`` characters each). Anything else in braces is left
    alone (JSON in prompts is common), and so is a name that matches nothing (appended
    to ``missing``, when given, so the caller can say so). ``{{name}}`` gives a literal
    ``{name}``. With ``images``, a value that is an image (a figure, a PIL image,
    ``nbchat.Image``) is appended there and stands in the text as ``[image: name]``.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        value = resolve(match.group(2), namespace, cells)
        if value is MISSING:
            if missing is not None:
                missing.append(match.group(0))
            return match.group(0)
        if images is not None and is_image(value):
            images.append((match.group(2), value))
            return f"[image: {match.group(2)}]"
        return to_context(value, max_chars)

    return _PLACEHOLDER.sub(replace, text)
