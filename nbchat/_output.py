"""Typed answers: a Python type the model's final answer must fit, validated by pydantic.

``OutputSpec(output_type)`` describes the answer to the server in one of two ways:

- ``"json_schema"``: ``response_format={"type": "json_schema", "json_schema": {...,
  "strict": true}}`` — OpenAI and most OpenAI-compatible servers constrain the reply
  to the schema;
- ``"tool"``: a ``final_answer`` tool whose arguments are the answer, for servers that
  refuse ``response_format`` (the session falls back to it when one does).

Strict mode wants an object at the root with every property required and no extra
properties, so other types (``list[Model]``, ``Literal``, ``int``, a ``dict``) are
wrapped as ``{"result": ...}`` and unwrapped after validation; optional fields become
required-but-nullable. ``parse`` validates the reply and says what was wrong in words the
model can act on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

__all__ = ["FINAL_ANSWER_TOOL", "OutputMode", "OutputSpec", "Parsed"]

OutputMode = Literal["auto", "json_schema", "tool"]
FINAL_ANSWER_TOOL = "final_answer"
_WRAP_KEY = "result"


@dataclass(frozen=True)
class Parsed:
    """The outcome of validating an answer: ``value`` when ``error`` is ``None``."""

    value: Any = None
    error: str | None = None


class OutputSpec:
    """The type a turn's final answer must have, and how to ask a server for it."""

    def __init__(self, output_type: Any, *, name: str | None = None) -> None:
        self.output_type = output_type
        self.adapter: TypeAdapter[Any] = TypeAdapter(output_type)
        schema = self.adapter.json_schema()
        self.wrapped = schema.get("type") != "object" or "properties" not in schema
        if self.wrapped:
            defs = schema.pop("$defs", None)
            schema = {"type": "object", "properties": {_WRAP_KEY: schema}, "required": [_WRAP_KEY]}
            if defs:
                schema["$defs"] = defs
        self.schema = _strict(schema)
        named = output_type.__name__ if isinstance(output_type, type) else None
        self.name = _schema_name(name or named or "answer")

    def __repr__(self) -> str:
        return f"OutputSpec({self.name!r})"

    def response_format(self) -> dict[str, Any]:
        """The ``response_format`` request parameter asking for this type."""
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.schema, "strict": True},
        }

    def tool_spec(self) -> dict[str, Any]:
        """The ``final_answer`` tool whose arguments are the answer."""
        return {
            "type": "function",
            "function": {
                "name": FINAL_ANSWER_TOOL,
                "description": "Give your final answer; its arguments are the answer.",
                "parameters": copy.deepcopy(self.schema),
            },
        }

    def instruction(self, mode: OutputMode) -> str:
        """What the system is told about the answer's form (said once per turn)."""
        if mode == "tool":
            return (
                f"When you have the answer, call the {FINAL_ANSWER_TOOL} tool with it as "
                "arguments; do not answer in text."
            )
        return "Answer with one JSON value that matches the given schema, and nothing else."

    def parse(self, text: str) -> Parsed:
        """Validate the JSON ``text`` of an answer (from a reply or the tool's arguments)."""
        stripped = _strip_fence(text)
        try:
            data = json.loads(stripped) if stripped else None
        except json.JSONDecodeError as exc:
            return Parsed(error=f"the answer is not valid JSON ({exc.msg} at column {exc.colno})")
        if self.wrapped:
            if isinstance(data, dict) and _WRAP_KEY in data:
                data = data[_WRAP_KEY]
            else:
                # A model (or a script) that answers the bare value: take it if it fits.
                try:
                    return Parsed(value=self.adapter.validate_python(data))
                except ValidationError:
                    wrap = f'{{"{_WRAP_KEY}": ...}}'
                    return Parsed(error=f"the answer must be a JSON object {wrap}")
        try:
            return Parsed(value=self.adapter.validate_python(data))
        except ValidationError as exc:
            # Strict mode makes optional fields required-but-nullable, so a model may send
            # null where the type wants the field left out (its default then applies).
            pruned = _without_nulls(data)
            if pruned != data:
                try:
                    return Parsed(value=self.adapter.validate_python(pruned))
                except ValidationError:
                    pass
            problems = []
            for err in exc.errors(include_url=False)[:8]:
                where = ".".join(str(x) for x in err["loc"]) or "the answer"
                problems.append(f"{where}: {err['msg']}")
            return Parsed(error="the answer does not match the schema: " + "; ".join(problems))

    def correction(self, error: str) -> str:
        """The message that gives the model its next try after a failed validation."""
        return f"That answer could not be used: {error}. Answer again, fixing this."


def _schema_name(name: str) -> str:
    """A ``json_schema.name`` OpenAI accepts: letters, digits, ``_`` and ``-``, ≤ 64."""
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    return cleaned[:64] or "answer"


def _strip_fence(text: str) -> str:
    """The JSON inside a ```json fence, if the model wrapped its answer in one."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```"):
        body = body[3:-3]
        first, _, rest = body.partition("\n")
        body = rest if first.strip().isalpha() or not first.strip() else body
    return body.strip()


def _strict(schema: Any) -> Any:
    """``schema`` in the form strict structured outputs accept.

    Every object: all properties required, ``additionalProperties: false``; an optional
    property stays optional in meaning by allowing ``null``. Defaults and titles are
    dropped (strict mode refuses ``default``).
    """
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if k not in ("default", "title")}
    if "properties" in out and isinstance(out["properties"], dict):
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        required = set(schema.get("required", []))
        for key, prop in out["properties"].items():
            if key not in required:
                out["properties"][key] = _nullable(prop)
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
        out["type"] = "object"
    if "$defs" in schema:
        out["$defs"] = {k: _strict(v) for k, v in schema["$defs"].items()}
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema.get("anyOf")
    if isinstance(options, list) and any(o.get("type") == "null" for o in options):
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def _without_nulls(data: Any) -> Any:
    """``data`` with every ``null`` member of an object left out, at any depth."""
    if isinstance(data, dict):
        return {k: _without_nulls(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_without_nulls(v) for v in data]
    return data
