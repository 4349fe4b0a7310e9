"""The options of the magics: one pydantic model per magic, parsed from the magic line.

The line is split with ``shlex`` (so quotes work) and each ``--flag`` is matched to a
field of the model; the same fields write the help that ``%%chat?`` shows, so the
parser and the help cannot drift apart. ``interpolate`` fills ``{name}`` in a cell body.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from typing import Any, TypeVar

from IPython.core.error import UsageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ChatOptions", "SqlOptions", "interpolate", "options_help", "parse_options"]

M = TypeVar("M", bound=BaseModel)
_IDENT = r"[A-Za-z_]\w*"


# ---------------------------------------------------------------------- options


def _flag(short: str | None = None, metavar: str | None = None) -> dict[str, Any]:
    return {"short": short, "metavar": metavar}


class ChatOptions(BaseModel):
    """The options of a ``%%chat`` cell; each applies to that cell's turn only."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="model for this cell (a session this cell starts keeps it)",
        json_schema_extra=_flag("-m", "NAME"),
    )
    system: str | None = Field(
        None,
        description="system prompt (a different one starts a new session)",
        json_schema_extra=_flag("-s", "TEXT"),
    )
    new: bool = Field(False, description="start a new session (it becomes the current one)")
    session: str | None = Field(
        None,
        description="continue the stored session ID (it becomes the current one)",
        json_schema_extra=_flag(metavar="ID"),
    )
    tools: list[str] | None = Field(
        None,
        description="tools for this cell: functions in the notebook, comma-separated; "
        "python[:ask|auto|never] runs code here; none for no tools",
        json_schema_extra=_flag(metavar="A,B"),
    )
    budget: float | None = Field(
        None,
        ge=0,
        description="spend at most USD on this turn",
        json_schema_extra=_flag(None, "USD"),
    )
    max_rounds: int | None = Field(
        None,
        ge=0,
        description="rounds of tool calls before a final answer (default 16)",
        json_schema_extra=_flag(metavar="N"),
    )
    no_stream: bool = Field(False, description="show the reply once it is complete")
    out: str | None = Field(
        None,
        description="also store the reply text in variable VAR",
        json_schema_extra=_flag(metavar="VAR"),
    )
    temperature: float | None = Field(
        None, ge=0, description="sampling temperature", json_schema_extra=_flag(metavar="T")
    )

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

    out: str | None = Field(
        None,
        description="also store the DataFrame in variable VAR",
        json_schema_extra=_flag(metavar="VAR"),
    )
    db: str | None = Field(
        None,
        description="store file to query (default: the kernel's store)",
        json_schema_extra=_flag(metavar="PATH"),
    )


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
    lines = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        short = extra.get("short")
        flag = ("" if short is None else f"{short}, ") + "--" + name.replace("_", "-")
        if not _is_switch(model, name):
            flag += f" {extra.get('metavar') or name.upper()}"
        text = textwrap.wrap(field.description or "", 60)
        lines.append(f"  {flag:<24} {text[0]}")
        lines.extend(f"  {'':<24} {more}" for more in text[1:])
    return "\n".join(lines)


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
