"""The OpenAI Responses API (``POST /responses``) as a second wire format.

The session speaks chat completions: a list of ``system``/``user``/``assistant``/``tool``
messages and ``{"type": "function", "function": {...}}`` tools. ``request_body`` turns
that into a Responses request (leading system messages become ``instructions``, tool
calls and results become ``function_call`` / ``function_call_output`` items), and
``ResponsesStream`` turns the semantic events that come back into the same ``Chunk``
values chat completions produce, so ``ReplyAssembler`` and the loop above it are unchanged.

Requests are sent with ``store: false``: nbchat sends the whole history each time and
keeps it itself, so nothing needs to stay on the provider's side. A reasoning model's
reasoning then lives only in the encrypted reasoning items it answers with (asked for
with ``include: ["reasoning.encrypted_content"]``); they go back, before the function
calls they preceded, in the tool rounds of the same turn (``reasoning_replay``).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

from ._wire import REASONING_ITEM, PrefixCache, load_json

__all__ = [
    "ENCRYPTED_REASONING",
    "REASONING_ITEMS",
    "RESPONSES_ONLY_MODELS",
    "InputItems",
    "ResponsesStream",
    "input_items",
    "reasoning_model",
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


# OpenAI's reasoning models: their reasoning can come back encrypted, for replay.
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4-", "gpt-5", "codex-", "computer-use")
ENCRYPTED_REASONING = "reasoning.encrypted_content"
# The key of an assistant message (chat format) that carries its reasoning items.
REASONING_ITEMS = "reasoning_items"


def reasoning_model(model: str) -> bool:
    """Whether ``model`` is one of OpenAI's reasoning models (``o4-mini``, ``gpt-5``...)."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return name.startswith(REASONING_MODEL_PREFIXES)


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
            # The SDK's ResponseInputImageParam requires a detail (chat's defaults to auto).
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append({"type": "input_image", "image_url": url, "detail": detail or "auto"})
        else:
            parts.append(part)  # already a Responses part (input_file, input_audio...)
    return parts


InputItems = PrefixCache[dict[str, Any], list[dict[str, Any]]]


def input_items() -> InputItems:
    """What ``to_input`` keeps between one request's messages and the next's."""
    return PrefixCache(_items)


def to_input(
    messages: list[dict[str, Any]], known: InputItems | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """(instructions, input items) for a chat-format message list.

    A first system message (the session's system prompt) becomes ``instructions``;
    later ones (a compaction summary, notes the loop appends) stay in place as system
    messages, so the instructions stay what the user set. ``known`` keeps each message
    dict's items between requests (by identity: a session hands unchanged messages
    again), so a long history is converted once and its items are the same objects.
    """
    instructions: str | None = None
    if messages and messages[0].get("role") == "system":
        instructions = _text_of(messages[0].get("content"))
        messages = messages[1:]
    converted = known.convert(messages) if known is not None else map(_items, messages)
    return instructions, list(chain.from_iterable(converted))


def _items(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The input items of one chat message (not the leading system prompt)."""
    role = message.get("role")
    content = message.get("content")
    if role == "tool":
        output = _text_of(content)
        return [
            {
                "type": "function_call_output",
                "call_id": message.get("tool_call_id") or "",
                "output": output,
            }
        ]
    if role != "assistant":
        return [{"role": role or "user", "content": _parts(content, str(role))}]
    # Reasoning first, as it came: OpenAI refuses a function_call sent back without the
    # reasoning item that preceded it, and a reasoning item without what followed it (a
    # reply cut off before its text has nothing to follow).
    calls = message.get("tool_calls") or []
    items = list(message.get(REASONING_ITEMS) or []) if content or calls else []
    if content:
        items.append({"role": "assistant", "content": _parts(content, "assistant")})
    for call in calls:
        fn = call.get("function") or {}
        items.append(
            {
                "type": "function_call",
                "call_id": call.get("id") or "",
                "name": fn.get("name") or "",
                "arguments": fn.get("arguments") or "",
            }
        )
    return items


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
    known: InputItems | None = None,
) -> dict[str, Any]:
    """The JSON body of ``POST /responses`` for one request of the loop (``known``: see
    ``to_input``)."""
    instructions, items = to_input(messages, known)
    body: dict[str, Any] = {"model": model, "input": items, "store": False}
    if instructions is not None:
        body["instructions"] = instructions
    body.update(_params(params))
    if "reasoning" in body or reasoning_model(model):
        # Stateless requests keep a reasoning model's reasoning only in encrypted form,
        # sent back with the tool calls it led to (other models refuse this include).
        include = list(body.get("include") or [])
        if ENCRYPTED_REASONING not in include:
            body["include"] = [*include, ENCRYPTED_REASONING]
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


Chunk = dict[str, Any]  # a chat-completions chunk object, as ReplyAssembler reads it
_EMPTY: Chunk = {}


def _chunk(
    delta: dict[str, Any] | None = None,
    *,
    finish: str | None = None,
    usage: Any = None,
    error: dict[str, Any] | None = None,
    model: str | None = None,
) -> Chunk:
    chunk: Chunk = {}
    if delta is not None or finish is not None:
        chunk["choices"] = [{"delta": delta, "finish_reason": finish}]
    if usage is not None:
        chunk["usage"] = usage
    if error is not None:
        chunk["error"] = error
    if model is not None:
        chunk["model"] = model
    return chunk


def _call(index: int, call_id: Any, name: Any, args: Any) -> dict[str, Any]:
    return {"index": index, "id": call_id, "function": {"name": name, "arguments": args or None}}


def _call_chunk(index: int, call_id: Any, name: Any, args: Any) -> Chunk:
    return _chunk({"tool_calls": [_call(index, call_id, name, args)]})


def _replayable(item: dict[str, Any]) -> dict[str, Any] | None:
    """A reasoning output item as it can be sent back (id, summary, encrypted content),
    or ``None`` when it cannot: requests are ``store: false``, so an item without its
    encrypted content refers to nothing the server kept ("Item ... not found")."""
    if not item.get("encrypted_content") or not item.get("id"):
        return None
    summary = [
        {"type": "summary_text", "text": str(part.get("text") or "")}
        for part in item.get("summary") or []
        if isinstance(part, dict)
    ]
    return {
        "type": "reasoning",
        "id": item["id"],
        "summary": summary,
        "encrypted_content": item["encrypted_content"],
    }


class ResponsesStream:
    """Turns the events of one streamed response into chat-completions chunks.

    Function calls are numbered in the order their items appear; their argument deltas
    are matched by ``item_id``. A server that skips the deltas and sends only the
    finished item (or ``...arguments.done``) still yields the whole call, once. A
    finished reasoning item that can be sent back comes under ``REASONING_ITEM``.
    """

    def __init__(self) -> None:
        self.finished = False  # response.completed / incomplete / failed arrived
        self._calls: dict[str, int] = {}  # item id -> tool-call index
        self._streamed: set[str] = set()  # items whose text or arguments came as deltas
        self._summary_parts: set[tuple[str, int]] = set()

    def feed(self, payload: bytes) -> Chunk:
        """One SSE ``data`` payload as a chunk (an empty one for events that add nothing)."""
        event = load_json(payload)
        if not isinstance(event, dict):
            raise ValueError(f"a Responses event is a JSON object, got {payload[:60]!r}")
        kind = event.get("type")
        item_id = str(event.get("item_id") or "")
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            self._streamed.add(item_id)
            return _chunk({"content": str(event.get("delta") or "")})
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
        # Summary parts (and reasoning items) are paragraphs: keep them apart in the text.
        part = (item_id, int(event.get("summary_index") or 0))
        text = str(event.get("delta") or "")
        if part not in self._summary_parts:
            if self._summary_parts:
                text = "\n\n" + text
            self._summary_parts.add(part)
        return _chunk({"reasoning": text})

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
            text = _message_text(item)
            if text:
                return _chunk({"content": text})
        elif kind == "reasoning" and done:
            delta: dict[str, Any] = {}
            if not any(p[0] == item_id for p in self._summary_parts):
                # A server that sent the summary only in the finished item.
                summary = _summary_text(item)
                if summary:
                    delta["reasoning"] = summary
            replayable = _replayable(item)
            if replayable is not None:
                delta[REASONING_ITEM] = replayable
            if delta:
                return _chunk(delta)
        return _EMPTY


def _message_text(item: dict[str, Any]) -> str:
    return "".join(
        str(p.get("text") or p.get("refusal") or "")
        for p in item.get("content") or []
        if isinstance(p, dict)
    )


def _summary_text(item: dict[str, Any]) -> str:
    parts = [s.get("text") for s in item.get("summary") or [] if isinstance(s, dict)]
    return "\n\n".join(str(t) for t in parts if t)


def reply_chunk(raw: bytes) -> Chunk:
    """A whole (non-streamed) Responses answer as one chunk."""
    response = load_json(raw)
    if not isinstance(response, dict) or "output" not in response:
        if isinstance(response, dict) and isinstance(response.get("error"), dict):
            return _chunk(error={"error": response["error"]})
        raise ValueError("the answer is not a Responses API response (no 'output')")
    if response.get("status") == "failed":
        return _chunk(error=_failure(response))
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    choices: list[dict[str, Any]] = []
    for item in response.get("output") or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            text.append(_message_text(item))
        elif kind == "reasoning":
            reasoning.append(_summary_text(item))
            replayable = _replayable(item)
            if replayable is not None:
                choices.append({"delta": {REASONING_ITEM: replayable}})
        elif kind == "function_call":
            calls.append(
                _call(len(calls), item.get("call_id"), item.get("name"), item.get("arguments"))
            )
    message = {
        "content": "".join(text) or None,
        "reasoning": "\n\n".join(r for r in reasoning if r) or None,
        "tool_calls": calls or None,
    }
    chunk = _chunk(
        message,
        finish=_finish(response, bool(calls)),
        usage=response.get("usage"),
        model=response.get("model"),
    )
    chunk["choices"] += choices
    return chunk
