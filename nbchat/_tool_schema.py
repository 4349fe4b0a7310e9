"""What a tool's schema is made of: its callable's name and docstring (the summary and
Google- or Sphinx-style parameter docs), pydantic's JSON schema without its noise, and
the error that names the parameter pydantic cannot describe."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import re
import warnings
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import PydanticJsonSchemaWarning

__all__ = [
    "Param",
    "callable_doc",
    "callable_name",
    "parse_docstring",
    "tidy_schema",
    "undescribable",
]

# Keys whose values are maps of names to schemas: a property may well be called "title".
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
# Keys whose values are data, not schemas: leave them exactly as they are.
_DATA_KEYS = frozenset({"default", "enum", "const", "examples"})


# --------------------------------------------------------------------------- docstrings

_GOOGLE_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Keyword Args):\s*$")
_GOOGLE_ITEM = re.compile(r"^\s*\**(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_PARAM = re.compile(r"^\s*:param\s+(?:[^:]*\s)?\**(\w+)\s*:\s*(.*)$")
_SECTION_START = re.compile(r"^\s*(:\w+|[A-Z][\w ]*:\s*$)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The first paragraph of a docstring, and its Google- or Sphinx-style parameter docs."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary = itertools.takewhile(lambda ln: ln.strip() and not _SECTION_START.match(ln), lines)
    params: dict[str, str] = {}
    current, current_indent = "", 0  # the parameter whose description is being read
    section: int | None = None  # indentation of the open "Args:" header
    for line in lines:
        if not line.strip():
            continue
        indent = _indent(line)
        if current and indent > current_indent:  # a continuation line
            params[current] = f"{params[current]} {line.strip()}".strip()
            continue
        current = ""
        if _GOOGLE_HEADER.match(line):
            section = indent
        elif section is not None and indent <= section:
            section = None
        if (m := _SPHINX_PARAM.match(line)) or (
            section is not None and indent > section and (m := _GOOGLE_ITEM.match(line))
        ):
            current, current_indent = m.group(1), indent
            params[current] = m.group(2).strip()
    return " ".join(ln.strip() for ln in summary), {k: v for k, v in params.items() if v}


def tidy_schema(schema: Any) -> Any:
    """The schema without pydantic's generated ``title`` keys (noise for a model)."""
    if isinstance(schema, list):
        return [tidy_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: tidy_schema(sub) for name, sub in value.items()}
        elif key in _DATA_KEYS:
            out[key] = value
        else:
            out[key] = tidy_schema(value)
    return out


def callable_name(fn: Callable[..., Any]) -> str:
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(target, "__name__", None)
    return name if isinstance(name, str) else type(target).__name__


def callable_doc(fn: Callable[..., Any]) -> str | None:
    target = fn.func if isinstance(fn, functools.partial) else fn
    if inspect.isroutine(target) or inspect.isclass(target):
        return inspect.getdoc(target)
    # A callable instance: its class's own docstring, not one inherited from `object`.
    doc = type(target).__dict__.get("__doc__") or inspect.getdoc(type(target).__call__)
    return doc if isinstance(doc, str) else None


@dataclasses.dataclass(frozen=True)
class Param:
    field: str  # the field name in the arguments model (the parameter name is its alias)
    name: str
    positional_only: bool
    always_pass: bool  # the signature's default is a pydantic Field(): never let it through


def undescribable(name: str, sig: inspect.Signature) -> str:
    """Which parameter pydantic cannot describe, for the error message."""
    for p in sig.parameters.values():
        ann = Any if p.annotation is p.empty else p.annotation
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PydanticJsonSchemaWarning)
                TypeAdapter(ann).json_schema()
        except Exception:
            return (
                f"tool {name!r}: parameter {p.name!r} has type {ann!r}, which cannot be "
                "described as JSON schema; use JSON-like types (str, int, float, bool, list, "
                "dict, Literal, Enum) or a pydantic model"
            )
    return f"tool {name!r}: its parameters cannot be described as JSON schema"
