"""Python callables as model tools: JSON schema from type hints, validated calls, concurrent runs.

``@tool`` turns a typed function into a :class:`Tool`; a :class:`ToolSet` holds the tools of
one session and runs one round of tool calls. Choices a caller should know about:

- A parameter without an annotation accepts any JSON value (schema ``{}``). ``*args`` and
  ``**kwargs``, generator functions and types pydantic cannot describe raise
  :class:`~nbchat.ToolDefinitionError` when the tool is defined, not when the model calls it.
- Arguments the function does not declare are rejected (``additionalProperties: false``), so a
  misspelt argument comes back to the model as an error instead of being silently dropped.
- An empty or ``null`` argument string means "no arguments" (``{}``).
- Arguments the model left out are not passed, so the function's own defaults apply unchanged.
- Nothing raises out of :meth:`ToolSet.run` but cancellation: unknown tools, bad JSON,
  invalid arguments and anything a tool raises (``SystemExit`` and ``KeyboardInterrupt``
  included, and a result whose ``repr`` raises) become :func:`error_payload` results. A
  ``KeyboardInterrupt`` gets error kind ``"interrupted"`` so the session can stop the turn.
  (A ``BaseException`` escaping a task would stop the event loop itself.)
- Each sync tool call runs in its own daemon thread (``_tool_threads.py``: why, and what a
  cancelled run leaves running). A tool that must run on the event loop's thread
  (widgets, ``display()``) should be ``async def``: async tools run on the loop itself.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, overload

from pydantic import ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic.json_schema import PydanticJsonSchemaWarning

from ._exceptions import ToolDefinitionError
from ._tool_results import (
    DECLINED,
    DEFAULT_MAX_RESULT_CHARS,
    CallError,
    describe_exception,
    error_payload,
    images_of,
    serialise_result,
    truncate,
)
from ._tool_schema import (
    Param,
    callable_doc,
    callable_name,
    parse_docstring,
    tidy_schema,
    undescribable,
)
from ._tool_threads import in_thread, user_waits
from ._types import ImagePart, ToolCall, ToolCallRecord

__all__ = [
    "DEFAULT_MAX_RESULT_CHARS",
    "Tool",
    "ToolSet",
    "as_tool",
    "error_payload",
    "serialise_result",
    "tool",
]

_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
INVALID_TOOL_NAME = "invalid_tool_name"
"""What a tool call whose name OpenAI would refuse is renamed to in the history."""
_ARGS_CONFIG = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- Tool


def valid_tool_name(name: str) -> bool:
    """Whether OpenAI accepts ``name`` as a function name (1-64 of ``[a-zA-Z0-9_-]``)."""
    return bool(_NAME_RE.match(name))


class Tool:
    """A Python callable described to the model: a name, a description and a JSON schema.

    Calling a ``Tool`` calls the original function; ``fn`` is that function.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    is_async: bool

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
    ) -> None:
        if not callable(fn):
            got = f"the string {fn!r}" if isinstance(fn, str) else type(fn).__name__
            hint = (
                " (from Python the python tool is nbchat.python_tool(); names are for "
                "%%chat --tools)"
                if isinstance(fn, str)
                else ""
            )
            raise ToolDefinitionError(f"a tool must be a callable, got {got}{hint}")
        name = name if name is not None else callable_name(fn)
        if not _NAME_RE.match(name):
            raise ToolDefinitionError(
                f"tool name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
                "(for a lambda or partial, pass name=...)"
            )
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise ToolDefinitionError(
                f"tool {name!r} is a generator; a tool must return its result (return a list)"
            )
        try:
            sig = inspect.signature(fn, eval_str=True)
        except Exception as exc:
            raise ToolDefinitionError(
                f"cannot read the signature of tool {name!r}: {type(exc).__name__}: {exc}"
            ) from exc

        summary, param_docs = parse_docstring(callable_doc(fn))
        fields: dict[str, Any] = {}
        for i, p in enumerate(sig.parameters.values()):
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                star = "*" if p.kind is p.VAR_POSITIONAL else "**"
                raise ToolDefinitionError(
                    f"tool {name!r}: parameter {star}{p.name} cannot be described to a model; "
                    "declare each argument as a named parameter"
                )
            annotation = Any if p.annotation is p.empty else p.annotation
            typed: Any = Annotated[annotation, Field(alias=p.name)]
            # Without a signature default, an `Annotated[..., Field(default=...)]` may give one.
            fields[f"p{i}"] = typed if p.default is p.empty else (typed, p.default)
        try:
            # Defaults that JSON cannot show are left out of the schema; that is fine here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PydanticJsonSchemaWarning)
                model = create_model("Arguments", __config__=_ARGS_CONFIG, **fields)
                schema = tidy_schema(model.model_json_schema())
        except Exception as exc:
            raise ToolDefinitionError(undescribable(name, sig)) from exc
        params = [
            Param(
                field=field,
                name=p.name,
                positional_only=p.kind is p.POSITIONAL_ONLY,
                # A default the function itself lacks (Field() as default, or in Annotated)
                # must always be passed: leaving it out would not mean the same thing.
                always_pass=isinstance(p.default, FieldInfo)
                or (p.default is p.empty and not model.model_fields[field].is_required()),
            )
            for field, p in zip(fields, sig.parameters.values(), strict=True)
        ]

        schema["type"] = "object"
        properties: dict[str, Any] = schema.setdefault("properties", {})
        for pname, prop in properties.items():
            if pname in param_docs and "description" not in prop:
                properties[pname] = {"description": param_docs[pname], **prop}

        self.name = name
        self.description = description if description is not None else summary
        self.parameters = schema
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 -- an instance with `async def __call__`
        )
        self._model = model
        self._params = params
        self.__doc__ = callable_doc(fn)
        self.__wrapped__ = fn  # so inspect.signature(tool) shows the function's signature

    def openai_schema(self) -> dict[str, Any]:
        """This tool as one entry of the chat completions API's ``tools`` list."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": copy.deepcopy(self.parameters),
            },
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool(name={self.name!r}, description={self.description!r})"

    def _bind(self, arguments: str) -> tuple[list[Any], dict[str, Any]]:
        """Parse and validate raw JSON arguments into ``(args, kwargs)`` for ``fn``."""
        text = arguments.strip()
        try:
            data = json.loads(text) if text else None
        except json.JSONDecodeError as exc:
            raise CallError(
                "invalid_json",
                f"arguments are not valid JSON ({exc.msg} at line {exc.lineno} column "
                f"{exc.colno}); send one JSON object",
            ) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise CallError(
                "invalid_arguments",
                f"arguments must be a JSON object, got {type(data).__name__}: {_short(data)}",
            )
        try:
            validated = self._model.model_validate(data)
        except ValidationError as exc:
            raise CallError("invalid_arguments", self._describe(exc)) from None

        given = validated.model_fields_set
        positional: list[tuple[bool, Any]] = []
        kwargs: dict[str, Any] = {}
        for p in self._params:
            passed = p.field in given or p.always_pass
            if p.positional_only:
                positional.append((passed, getattr(validated, p.field)))
            elif passed:
                kwargs[p.name] = getattr(validated, p.field)
        # Positional-only values cannot be skipped: pass defaults up to the last one given.
        last = max((i for i, (passed, _) in enumerate(positional) if passed), default=-1)
        return [value for _, value in positional[: last + 1]], kwargs

    def _describe(self, exc: ValidationError) -> str:
        problems = []
        hint = False
        for err in exc.errors(include_url=False):
            loc = ".".join(str(x) for x in err["loc"]) or "arguments"
            text = f"{loc}: {err['msg']}"
            if err["type"] in ("missing", "extra_forbidden"):
                hint = True
            else:
                text += f" (got {_short(err.get('input'))})"
            problems.append(text)
        message = f"invalid arguments for {self.name}: " + "; ".join(problems)
        if hint:
            names = ", ".join(p.name for p in self._params) or "none"
            message += f". Parameters: {names}"
        return message

    async def invoke(self, arguments: str) -> Any:
        """Validate ``arguments`` (raw JSON) and call the function; sync ones in a thread.

        Raises ``ValueError`` (with a message meant for the model) for unusable arguments,
        and whatever the function raises.
        """
        args, kwargs = self._bind(arguments)
        if self.is_async:
            return await self.fn(*args, **kwargs)
        result = await in_thread(self.fn, args, kwargs, self.name)
        if inspect.isawaitable(result):  # a sync wrapper around something async
            result = await result
        return result


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@overload
def tool(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
) -> Tool: ...
@overload
def tool(
    fn: None = None, *, name: str | None = None, description: str | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function a tool; use as ``@tool`` or ``@tool(name=..., description=...)``.

    The docstring's first paragraph describes the tool, its ``Args:`` (or ``:param x:``)
    entries describe the parameters, and the type hints become the JSON schema.
    """

    def make(f: Callable[..., Any]) -> Tool:
        if isinstance(f, Tool):
            desc = description if description is not None else f.description
            return Tool(f.fn, name=name or f.name, description=desc)
        return Tool(f, name=name, description=description)

    if fn is None:
        return make
    if isinstance(fn, str):
        raise ToolDefinitionError("to name a tool, write @tool(name=...), not @tool('...')")
    return make(fn)


def as_tool(obj: Tool | Callable[..., Any]) -> Tool:
    """``obj`` itself if it is a :class:`Tool`, else a new tool made from the callable."""
    return obj if isinstance(obj, Tool) else Tool(obj)


# --------------------------------------------------------------------------- ToolSet


class ToolSet:
    """The tools of one session, by name; runs a round of tool calls concurrently."""

    def __init__(
        self,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        *,
        max_result_chars: int | None = DEFAULT_MAX_RESULT_CHARS,
    ) -> None:
        self.max_result_chars = max_result_chars
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, obj: Tool | Callable[..., Any], *, replace: bool = False) -> Tool:
        """Add a tool (or a plain callable); a different tool with the same name is an error
        unless ``replace=True``."""
        t = as_tool(obj)
        existing = self._tools.get(t.name)
        if existing is not None and existing is not t and not replace:
            raise ToolDefinitionError(
                f"two tools are named {t.name!r}; rename one with @tool(name=...)"
            )
        self._tools[t.name] = t
        return t

    def remove(self, name: str) -> None:
        """Remove the tool called ``name`` (``KeyError`` if there is none)."""
        del self._tools[name]

    def names(self) -> list[str]:
        """The tool names, in the order the tools were added."""
        return list(self._tools)

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, or ``None``."""
        return self._tools.get(name)

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, Tool):
            return self._tools.get(name.name) is name
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __repr__(self) -> str:
        return f"ToolSet({self.names()!r})"

    def specs(self) -> list[dict[str, Any]]:
        """The ``tools`` list for a chat completions request."""
        return [t.openai_schema() for t in self._tools.values()]

    async def run(
        self,
        calls: Iterable[ToolCall],
        *,
        turn_id: str | None = None,
        round: int | None = None,
        bad_names: dict[str, str] | None = None,
    ) -> list[ToolCallRecord]:
        """Run every call at once; records come back in call order and never raise.

        Cancelling the awaiting task cancels async tools and returns promptly; sync tools
        already running in threads are abandoned (see the module docstring). ``bad_names``
        maps the ids of calls the model named unusably to the name it gave.
        """
        names = bad_names or {}
        jobs = [
            self.run_one(c, turn_id=turn_id, round=round, bad_name=names.get(c.id)) for c in calls
        ]
        return list(await asyncio.gather(*jobs)) if jobs else []

    async def run_one(
        self,
        call: ToolCall,
        *,
        turn_id: str | None = None,
        round: int | None = None,
        bad_name: str | None = None,
    ) -> ToolCallRecord:
        """Run one call; every failure becomes an :func:`error_payload` record.

        ``bad_name`` is the name the model gave when it was not a usable one.
        """
        start = time.perf_counter()
        error_kind: str | None = None
        images: list[ImagePart] | None = None
        with user_waits() as waited:
            try:
                value, images = images_of(await self._call(call, bad_name))
                result = serialise_result(value, self.max_result_chars)
            except CallError as err:
                error_kind = err.kind
                result = error_payload(err.kind, truncate(err.message, self.max_result_chars))
        return ToolCallRecord(
            call_id=call.id,
            name=call.name,
            arguments=call.arguments,
            result=result,
            is_error=error_kind not in (None, DECLINED),
            error_kind=error_kind,
            duration_ms=(time.perf_counter() - start - waited[0]) * 1000,
            turn_id=turn_id,
            round=round,
            images=images or None,
        )

    async def _call(self, call: ToolCall, bad_name: str | None) -> Any:
        """What the called tool returns; every way it can fail is a ``CallError``."""
        available = ", ".join(self._tools) or "none"
        if bad_name is not None:
            raise CallError(
                "invalid_tool_call",
                f"this tool call's name {bad_name!r} is not a tool name; call one of: {available}",
            )
        t = self._tools.get(call.name)
        if t is None:
            raise CallError(
                "unknown_tool", f"unknown tool {call.name!r}; available tools: {available}"
            )
        try:
            return await t.invoke(call.arguments)
        except (CallError, asyncio.CancelledError, GeneratorExit):
            raise
        except KeyboardInterrupt:
            raise CallError("interrupted", "KeyboardInterrupt: the tool was interrupted") from None
        except BaseException as exc:  # SystemExit from argparse-style code, and the rest
            raise CallError("tool_error", describe_exception(exc)) from None
