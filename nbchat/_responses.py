"""The OpenAI Responses API (``POST /responses``) as a second wire format.

The session speaks chat completions: a list of ``system``/``user``/``assistant``/``tool``
messages and ``{"type": "function", "function": {...}}`` tools. ``request_body`` turns
that into a Responses request (leading system messages become ``instructions``, tool
calls and results become ``function_call`` / ``function_call_output`` items), and
``ResponsesStream`` turns the semantic events that come back into the same ``Chunk``
values chat completions produce, so ``RoundFolder`` and the loop above it are unchanged.

Requests are sent with ``store: false``: nbchat sends the whole history each time and
keeps it itself, so nothing needs to stay on the provider's side.
"""

from __future__ import annotations

import json
from typing import Any

from ._text import valid_data
from ._wire import Choice, Chunk, Delta, FunctionDelta, ToolCallChunk

__all__ = [
    "RESPONSES_ONLY_MODELS",
    "ResponsesStream",
    "reply_chunk",
    "request_body",
    "responses_only",
    "to_input",
    "to_tools",
]

# Models OpenAI serves on /responses only (chat completions answers 404 for them).
RESPONSES_ONLY_MODELS = (
    "o1-pro",
    "o3-pro",
    "o3-deep-research",
    "o4-mini-deep-research",
    "gpt-5-pro",
    "gpt-5-codex",
    "codex-mini-latest",
    "computer-use-preview",
)


def responses_only(model: str) -> bool:
    """Whether ``model`` exists only on the Responses API (``o3-pro``, ``o3-pro-2025-06-10``,
    ``openai/o1-pro``)."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return any(name == m or name.startswith(m + "-20") for m in RESPONSES_ONLY_MODELS)


# --------------------------------------------------------------------------- requests


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _parts(content: Any, role: str) -> Any:
    """Chat content (text, or a list of parts) as Responses content."""
    if not isinstance(content, list):
        return "" if content is None else content
    text_kind = "output_text" if role == "assistant" else "input_text"
    parts: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": text_kind, "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            out: dict[str, Any] = {"type": "input_image", "image_url": url}
            if isinstance(image, dict) and image.get("detail"):
                out["detail"] = image["detail"]
            parts.append(out)
        else:
            parts.append(part)  # already a Responses part (input_file, input_audio...)
    return parts


def to_input(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(instructions, input items) for a chat-format message list.

    The system messages before the first other message become ``instructions``; later
    ones (notes the loop appends) stay in place as system messages.
    """
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "system" and not items:
            instructions.append(_text_of(content))
        elif role == "tool":
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": message.get("tool_call_id") or "",
                    "output": _text_of(content),
                }
            )
        elif role == "assistant":
            if content:
                items.append({"role": "assistant", "content": _parts(content, "assistant")})
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                items.append(
                    {
                        "type": "function_call",
                        "call_id": call.get("id") or "",
                        "name": fn.get("name") or "",
                        "arguments": fn.get("arguments") or "",
                    }
                )
        else:
            items.append({"role": role or "user", "content": _parts(content, str(role))})
    return ("\n\n".join(instructions) if instructions else None), items


def to_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat-format function tools as Responses function tools (flat, ``strict`` explicit:
    the Responses API would otherwise make every schema strict)."""
    out: list[dict[str, Any]] = []
    for tool in tools:
        fn = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(fn, dict):
            out.append(tool)  # a built-in Responses tool (web_search...) passes as is
            continue
        flat: dict[str, Any] = {"type": "function", "name": fn.get("name", "")}
        if fn.get("description"):
            flat["description"] = fn["description"]
        flat["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
        flat["strict"] = bool(fn.get("strict", False))
        out.append(flat)
    return out


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """Chat completions request options under their Responses names."""
    out = dict(params)
    for cap in ("max_completion_tokens", "max_tokens"):
        if cap in out:
            value = out.pop(cap)
            out.setdefault("max_output_tokens", value)
    effort = out.pop("reasoning_effort", None)
    if effort is not None:
        out.setdefault("reasoning", {"effort": effort, "summary": "auto"})
    fmt = out.pop("response_format", None)
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict):
            fmt = {"type": "json_schema", **fmt["json_schema"]}
        out.setdefault("text", {"format": fmt})
    choice = out.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out["tool_choice"] = {"type": "function", "name": choice["function"].get("name")}
    out.pop("stream_options", None)
    out.pop("n", None)  # one output per request, always
    return out


def request_body(
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    stream: bool,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The JSON body of ``POST /responses`` for one request of the loop."""
    instructions, items = to_input(messages)
    body: dict[str, Any] = {"model": model, "input": items, "store": False}
    if instructions is not None:
        body["instructions"] = instructions
    body.update(_params(params))
    if tools:
        body["tools"] = to_tools(tools)
    if stream:
        body["stream"] = True
    return body


# --------------------------------------------------------------------------- replies


def _finish(response: Any, has_calls: bool) -> str:
    """The chat-completions finish reason of a finished response."""
    status = response.get("status") if isinstance(response, dict) else None
    if status == "incomplete":
        details = response.get("incomplete_details") or {}
        reason = details.get("reason") if isinstance(details, dict) else None
        return {"max_output_tokens": "length", None: "length"}.get(reason, str(reason))
    return "tool_calls" if has_calls else "stop"


def _failure(response: Any) -> dict[str, Any]:
    error = response.get("error") if isinstance(response, dict) else None
    if not isinstance(error, dict):
        error = {"message": "the response failed"}
    return {"error": error}


_EMPTY = Chunk.model_construct(model=None, choices=[], usage=None, error=None)


def _chunk(
    delta: Delta | None = None,
    *,
    finish: str | None = None,
    usage: Any = None,
    error: dict[str, Any] | None = None,
    model: str | None = None,
) -> Chunk:
    choices = []
    if delta is not None or finish is not None:
        choices = [Choice.model_construct(delta=delta, message=None, finish_reason=finish)]
    return Chunk.model_construct(model=model, choices=choices, usage=usage, error=error)


def _call_chunk(index: int, call_id: str | None, name: str | None, args: str | None) -> Chunk:
    fn = FunctionDelta.model_construct(name=name, arguments=args or None)
    call = ToolCallChunk.model_construct(index=index, id=call_id, function=fn)
    return _chunk(Delta.model_construct(tool_calls=[call]))


def _text_chunk(text: str) -> Chunk:
    return _chunk(Delta.model_construct(content=text))


def _reasoning_chunk(text: str) -> Chunk:
    return _chunk(Delta.model_construct(reasoning=text))


def _load(payload: bytes) -> Any:
    data = json.loads(payload)
    # The standard parser accepts lone surrogate escapes; stored text must be valid.
    return valid_data(data) if b"\\ud" in payload.lower() else data


class ResponsesStream:
    """Turns the events of one streamed response into chat-completions ``Chunk`` values.

    Function calls are numbered in the order their items appear; their argument deltas
    are matched by ``item_id``. A server that skips the deltas and sends only the
    finished item (or ``...arguments.done``) still yields the whole call, once.
    """

    def __init__(self) -> None:
        self.finished = False  # response.completed / incomplete / failed arrived
        self._calls: dict[str, int] = {}  # item id -> tool-call index
        self._streamed: set[str] = set()  # items whose text or arguments came as deltas
        self._summary_parts: set[tuple[str, int]] = set()

    def feed(self, payload: bytes) -> Chunk:
        """One SSE ``data`` payload as a chunk (an empty one for events that add nothing)."""
        event = _load(payload)
        if not isinstance(event, dict):
            raise ValueError(f"a Responses event is a JSON object, got {payload[:60]!r}")
        kind = event.get("type")
        item_id = str(event.get("item_id") or "")
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            self._streamed.add(item_id)
            return _text_chunk(str(event.get("delta") or ""))
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return self._reasoning(event, item_id)
        if kind == "response.function_call_arguments.delta":
            self._streamed.add(item_id)
            return _call_chunk(self._index(item_id), None, None, str(event.get("delta") or ""))
        if kind == "response.function_call_arguments.done" and item_id not in self._streamed:
            self._streamed.add(item_id)
            return _call_chunk(self._index(item_id), None, None, event.get("arguments"))
        if kind == "response.output_item.added":
            return self._item(event.get("item"), done=False)
        if kind == "response.output_item.done":
            return self._item(event.get("item"), done=True)
        if kind in ("response.created", "response.in_progress"):
            response = event.get("response") or {}
            return _chunk(model=response.get("model") if isinstance(response, dict) else None)
        if kind in ("response.completed", "response.incomplete"):
            self.finished = True
            response = event.get("response") or {}
            usage = response.get("usage") if isinstance(response, dict) else None
            return _chunk(finish=_finish(response, bool(self._calls)), usage=usage)
        if kind == "response.failed":
            self.finished = True
            return _chunk(error=_failure(event.get("response")))
        if kind == "error":
            inner = event.get("error")
            error = inner if isinstance(inner, dict) else event
            return _chunk(error={"error": {k: v for k, v in error.items() if k != "type"}})
        return _EMPTY

    def _index(self, item_id: str) -> int:
        index = self._calls.get(item_id)
        if index is None:  # a delta for a call whose item was never announced
            index = self._calls[item_id] = len(self._calls)
        return index

    def _reasoning(self, event: dict[str, Any], item_id: str) -> Chunk:
        # Summary parts are paragraphs: keep them apart in the joined reasoning text.
        part = (item_id, int(event.get("summary_index") or 0))
        text = str(event.get("delta") or "")
        if part not in self._summary_parts:
            if any(p[0] == item_id for p in self._summary_parts):
                text = "\n\n" + text
            self._summary_parts.add(part)
        return _reasoning_chunk(text)

    def _item(self, item: Any, *, done: bool) -> Chunk:
        if not isinstance(item, dict):
            return _EMPTY
        item_id = str(item.get("id") or item.get("call_id") or "")
        kind = item.get("type")
        if kind == "function_call":
            known = item_id in self._calls
            index = self._index(item_id)
            args = item.get("arguments") or None
            if not known:  # announced now: name and id, and arguments if it brought them
                if args:
                    self._streamed.add(item_id)
                return _call_chunk(index, item.get("call_id"), item.get("name"), args)
            if done and item_id not in self._streamed and args:
                self._streamed.add(item_id)
                return _call_chunk(index, None, None, args)
        elif kind == "message" and done and item_id not in self._streamed:
            text = "".join(
                str(p.get("text") or p.get("refusal") or "")
                for p in item.get("content") or []
                if isinstance(p, dict)
            )
            if text:
                return _text_chunk(text)
        return _EMPTY


def reply_chunk(raw: bytes) -> Chunk:
    """A whole (non-streamed) Responses answer as one chunk."""
    response = _load(raw)
    if not isinstance(response, dict) or "output" not in response:
        if isinstance(response, dict) and isinstance(response.get("error"), dict):
            return _chunk(error={"error": response["error"]})
        raise ValueError("the answer is not a Responses API response (no 'output')")
    if response.get("status") == "failed":
        return _chunk(error=_failure(response))
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCallChunk] = []
    for item in response.get("output") or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict):
                    text.append(str(part.get("text") or part.get("refusal") or ""))
        elif kind == "reasoning":
            reasoning += [str(s.get("text", "")) for s in item.get("summary") or []]
        elif kind == "function_call":
            fn = FunctionDelta.model_construct(
                name=item.get("name"), arguments=item.get("arguments") or None
            )
            calls.append(
                ToolCallChunk.model_construct(index=len(calls), id=item.get("call_id"), function=fn)
            )
    delta = Delta.model_construct(
        content="".join(text) or None,
        reasoning="\n\n".join(r for r in reasoning if r) or None,
        tool_calls=calls or None,
    )
    return _chunk(
        delta,
        finish=_finish(response, bool(calls)),
        usage=response.get("usage"),
        model=response.get("model"),
    )
