"""The options of the magics: one pydantic model per magic, parsed from the magic line.

The line is split with ``shlex`` (so quotes work) and each ``--flag`` is matched to a
field of the model; the same fields write the help that ``%%chat?`` shows, so the
parser and the help cannot drift apart. ``interpolate`` fills ``{name}`` in a cell body.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, TypeVar

from IPython.core.error import UsageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._magic_help import CHAT_OPTIONS, SQL_OPTIONS, OptionDoc, render_options

__all__ = ["ChatOptions", "SqlOptions", "interpolate", "options_help", "parse_options"]

M = TypeVar("M", bound=BaseModel)
_IDENT = r"[A-Za-z_]\w*"


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
    system: str | None = Field(None, **_doc(CHAT_OPTIONS, "system"))
    new: bool = Field(False, **_doc(CHAT_OPTIONS, "new"))
    session: str | None = Field(None, **_doc(CHAT_OPTIONS, "session"))
    tools: list[str] | None = Field(None, **_doc(CHAT_OPTIONS, "tools"))
    budget: float | None = Field(None, ge=0, **_doc(CHAT_OPTIONS, "budget"))
    max_rounds: int | None = Field(None, ge=0, **_doc(CHAT_OPTIONS, "max_rounds"))
    no_stream: bool = Field(False, **_doc(CHAT_OPTIONS, "no_stream"))
    out: str | None = Field(None, **_doc(CHAT_OPTIONS, "out"))
    temperature: float | None = Field(None, ge=0, **_doc(CHAT_OPTIONS, "temperature"))

    @field_validator("tools", mode="before")
    @classmethod
    def _split_tools(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [n.strip() for n in value.split(",") if n.strip()]
            return [] if names == ["none"] else names
        return value

    @field_validator("out")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(_IDENT, value):
            raise ValueError(f"{value!r} is not a valid variable name")
        return value


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
        flags["--" + name.replace("_", "-")] = name
        short = extra.get("short")
        if isinstance(short, str):
            flags[short] = name
    return flags


def _is_switch(model: type[BaseModel], name: str) -> bool:
    return model.model_fields[name].annotation is bool


def parse_options(model: type[M], line: str, magic: str = "%%chat") -> M:
    """Parse a magic line (shell-like quoting) into ``model``; ``UsageError`` on bad input."""
    try:
        words = shlex.split(line)
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
                raise UsageError(f"{magic}: unknown option {flag} (see {magic}? for the options)")
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
            raw[name] = value
        given[name] = flag
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
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

_PLACEHOLDER = re.compile(
    r"\{\{(" + _IDENT + r"(?:\." + _IDENT + r")*)\}\}|\{(" + _IDENT + r"(?:\." + _IDENT + r")*)\}"
)
_MISSING = object()


def interpolate(text: str, namespace: dict[str, Any], missing: list[str] | None = None) -> str:
    """Replace ``{name}`` and ``{name.attr}`` with values from ``namespace``.

    Anything else in braces is left alone (JSON in prompts is common), and so is a name
    the namespace does not have (appended to ``missing``, when given, so the caller can
    say so). ``{{name}}`` gives a literal ``{name}``.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "{" + match.group(1) + "}"
        head, *attrs = match.group(2).split(".")
        value = namespace.get(head, _MISSING)
        for attr in attrs:
            if value is _MISSING:
                break
            value = getattr(value, attr, _MISSING)
        if value is _MISSING:
            if missing is not None:
                missing.append(match.group(0))
            return match.group(0)
        return str(value)

    return _PLACEHOLDER.sub(replace, text)
