"""The fake server's Responses API (``POST /v1/responses``), from the same ``Reply`` script.

A streamed reply is the sequence OpenAI sends: ``response.created``, ``in_progress``,
then one output item after another — reasoning (summary text deltas), the message
(``output_text`` deltas), each function call (``function_call_arguments`` deltas) —
each opened by ``output_item.added`` and closed by ``output_item.done``, and last
``response.completed`` (``response.incomplete`` for ``finish_reason="length"``) with the
usage. Every event has an ``event:`` line and a ``sequence_number``; there is no
``[DONE]``. ``Reply(stream_error=...)`` ends the stream with an ``error`` event and
``response.failed`` instead. A request that asks ``include:
["reasoning.encrypted_content"]`` gets its reasoning item's encrypted content, which
it must send back as given (a stateless request's reasoning item without it is 404).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from ._fake_script import Reply, dumps, split_text, with_usage

__all__ = [
    "ENCRYPTED_REASONING",
    "chat_body",
    "input_error",
    "prompt_of",
    "reasoning_missing",
    "replay_error",
    "response_object",
    "response_stream",
]

ENCRYPTED_REASONING = "reasoning.encrypted_content"


def prompt_of(body: dict[str, Any]) -> Any:
    """What a Responses request sends as its prompt (for token estimates)."""
    instructions = body.get("instructions")
    items = body.get("input", [])
    return [instructions, items] if instructions else items


def _usage(reply: Reply, chat_usage: Any) -> Any:
    """The reply's usage under the Responses API's names (a dict already using them, or
    verbatim ``usage_json``, is sent as given)."""
    if reply.usage_json is not None or not isinstance(chat_usage, dict):
        return chat_usage
    if "input_tokens" in chat_usage or "output_tokens" in chat_usage:
        return chat_usage
    usage = dict(chat_usage)
    prompt_details = usage.pop("prompt_tokens_details", None) or {}
    completion_details = usage.pop("completion_tokens_details", None) or {}
    out: dict[str, Any] = {
        "input_tokens": usage.pop("prompt_tokens", None),
        "output_tokens": usage.pop("completion_tokens", None),
        "total_tokens": usage.pop("total_tokens", None),
        "input_tokens_details": {"cached_tokens": 0, **prompt_details},
        "output_tokens_details": {"reasoning_tokens": 0, **completion_details},
    }
    return {**out, **usage}  # anything else (cost...) as given


def _status(reply: Reply) -> tuple[str, dict[str, Any] | None]:
    reason = reply.finish_reason
    if reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _encrypted(number: int) -> str:
    """The encrypted content of request ``number``'s reasoning item (opaque to clients)."""
    return f"gAAAA_fake_reasoning_{number}"


def _output(
    reply: Reply, body: dict[str, Any], number: int, calls: list[tuple[str, str, str]]
) -> list[dict[str, Any]]:
    """The finished output items of a reply, in order."""
    items: list[dict[str, Any]] = []
    if reply.reasoning:
        summary = [{"type": "summary_text", "text": reply.reasoning}]
        item = {"id": f"rs_fake{number}", "type": "reasoning", "summary": summary}
        if ENCRYPTED_REASONING in (body.get("include") or []):
            item["encrypted_content"] = _encrypted(number)
        items.append(item)
    if reply.text or not calls:
        text = {"type": "output_text", "text": reply.text, "annotations": []}
        items.append(
            {
                "id": f"msg_fake{number}",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [text],
            }
        )
    for i, (call_id, name, args) in enumerate(calls):
        items.append(
            {
                "id": f"fc_fake{number}_{i}",
                "type": "function_call",
                "status": "completed",
                "call_id": call_id,
                "name": name,
                "arguments": args,
            }
        )
    return items


def replay_error(body: dict[str, Any]) -> tuple[int, str] | None:
    """What OpenAI answers a stateless request whose reasoning items cannot be used:
    one sent back without its encrypted content (404: the server kept nothing), or one
    that is not what this server issued (400)."""
    for item in body.get("input") or []:
        if not isinstance(item, dict) or item.get("type") != "reasoning":
            continue
        item_id = str(item.get("id") or "")
        if body.get("store") is False and not item.get("encrypted_content"):
            return 404, (
                f"Item with id '{item_id}' not found. Items are not persisted when `store` is "
                "set to false. Try again with `store` set to true, or remove this item from "
                "your input."
            )
        number = item_id.removeprefix("rs_fake")
        if item.get("encrypted_content") and (
            not number.isdigit() or item["encrypted_content"] != _encrypted(int(number))
        ):
            return 400, f"The encrypted content for item {item_id} could not be verified."
    return None


def reasoning_missing(body: dict[str, Any]) -> str | None:
    """The call id of a function call of the current turn (after the last user message)
    sent back without the reasoning item that preceded it, as OpenAI refuses it."""
    items = [i for i in body.get("input") or [] if isinstance(i, dict)]
    users = [n for n, i in enumerate(items) if i.get("role") == "user"]
    reasoning = False  # a reasoning item since the last function call output
    for item in items[users[-1] + 1 if users else 0 :]:
        kind = item.get("type")
        if kind == "reasoning":
            reasoning = True
        elif kind == "function_call_output":
            reasoning = False
        elif kind == "function_call" and not reasoning:
            return str(item.get("call_id"))
    return None


def _head(body: dict[str, Any], number: int) -> dict[str, Any]:
    return {
        "id": f"resp_fake{number}",
        "object": "response",
        "created_at": int(time.time()),
        "model": body.get("model", ""),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }


def _with_usage(obj: dict[str, Any], reply: Reply, usage: Any) -> bytes:
    return with_usage(dumps(obj), reply, usage)


def response_object(
    reply: Reply, body: dict[str, Any], number: int, calls: list[tuple[str, str, str]], usage: Any
) -> bytes:
    """The whole reply as one (non-streamed) ``response`` object, encoded."""
    status, incomplete = _status(reply)
    obj = {**_head(body, number), "status": status, "incomplete_details": incomplete}
    obj["output"] = _output(reply, body, number, calls)
    obj.pop("usage")
    return _with_usage(obj, reply, _usage(reply, usage))


def response_stream(
    reply: Reply, body: dict[str, Any], number: int, calls: list[tuple[str, str, str]], usage: Any
) -> list[bytes]:
    """Every SSE event of a streamed reply, encoded (``event:`` and ``data:`` lines)."""
    seq = itertools.count()

    def ev(kind: str, **fields: Any) -> bytes:
        data = dumps({"type": kind, "sequence_number": next(seq), **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    head = _head(body, number)
    events = [ev("response.created", response=head), ev("response.in_progress", response=head)]
    pieces = reply.chunk_size
    for index, item in enumerate(_output(reply, body, number, calls)):
        item_id, kind = item["id"], item["type"]
        at = {"item_id": item_id, "output_index": index}
        if kind == "reasoning":
            events.append(
                ev("response.output_item.added", output_index=index, item={**item, "summary": []})
            )
            text = item["summary"][0]["text"]
            part: dict[str, Any] = {"type": "summary_text", "text": ""}
            events.append(
                ev("response.reasoning_summary_part.added", **at, summary_index=0, part=part)
            )
            for p in split_text(text, pieces):
                events.append(
                    ev("response.reasoning_summary_text.delta", **at, summary_index=0, delta=p)
                )
            events.append(
                ev("response.reasoning_summary_text.done", **at, summary_index=0, text=text)
            )
            part = {"type": "summary_text", "text": text}
            events.append(
                ev("response.reasoning_summary_part.done", **at, summary_index=0, part=part)
            )
        elif kind == "message":
            opened = {**item, "status": "in_progress", "content": []}
            events.append(ev("response.output_item.added", output_index=index, item=opened))
            part = {"type": "output_text", "text": "", "annotations": []}
            events.append(ev("response.content_part.added", **at, content_index=0, part=part))
            for p in reply.text_pieces():
                events.append(
                    ev("response.output_text.delta", **at, content_index=0, delta=p, logprobs=[])
                )
            events.append(
                ev("response.output_text.done", **at, content_index=0, text=reply.text, logprobs=[])
            )
            part = item["content"][0]
            events.append(ev("response.content_part.done", **at, content_index=0, part=part))
        else:
            opened = {**item, "status": "in_progress", "arguments": ""}
            events.append(ev("response.output_item.added", output_index=index, item=opened))
            for p in split_text(item["arguments"], pieces):
                events.append(ev("response.function_call_arguments.delta", **at, delta=p))
            events.append(
                ev("response.function_call_arguments.done", **at, arguments=item["arguments"])
            )
        events.append(ev("response.output_item.done", output_index=index, item=item))
    if reply.stream_error is not None:
        error = reply.stream_error.body()["error"]
        events.append(ev("error", code=error["code"], message=error["message"], param=None))
        failed = head | {
            "status": "failed",
            "error": {"code": error["code"], "message": error["message"]},
        }
        events.append(ev("response.failed", response=failed))
        return events
    status, incomplete = _status(reply)
    final = head | {"status": status, "incomplete_details": incomplete}
    final["output"] = _output(reply, body, number, calls)
    final.pop("usage")
    kind = "response.completed" if status == "completed" else "response.incomplete"
    response = _with_usage(final, reply, _usage(reply, usage))
    prefix = dumps({"type": kind, "sequence_number": next(seq)})[:-1]
    events.append(
        b"event: " + kind.encode() + b"\ndata: " + prefix + b',"response":' + response + b"}\n\n"
    )
    return events


# --------------------------------------------------------------------------- requests


_ROLES = ("user", "assistant", "system", "developer")
_PARTS = {
    "user": ("input_text", "input_image", "input_file", "input_audio"),
    "system": ("input_text",),
    "developer": ("input_text",),
    "assistant": ("output_text", "refusal"),
}


def input_error(body: dict[str, Any]) -> str | None:
    """Why OpenAI would refuse a request's ``input`` (400), or ``None``: items of a
    known type and shape, and every function call answered by a later output (and no
    output without its call), as the API checks them."""
    items = body.get("input")
    if isinstance(items, str):
        return None
    if not isinstance(items, list):
        return f"Invalid type for 'input': expected a string or an array, got {items!r:.40}."
    calls: dict[str, int] = {}
    answered: set[str] = set()
    for n, item in enumerate(items):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            return f"Invalid type for '{where}': expected an object."
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            problem = _message_error(item, where)
        elif kind == "function_call":
            problem = _fields_error(item, where, ("call_id", "name", "arguments"))
            calls[str(item.get("call_id"))] = n
        elif kind == "function_call_output":
            problem = _fields_error(item, where, ("call_id", "output"))
            call_id = str(item.get("call_id"))
            if call_id not in calls:
                problem = f"No tool call found for function call output with call_id {call_id}."
            answered.add(call_id)
        elif kind == "reasoning":
            summary = item.get("summary")
            problem = None if isinstance(summary, list) else f"Missing '{where}.summary'."
            if not item.get("id"):
                problem = f"Missing required parameter: '{where}.id'."
        else:
            problem = f"Invalid value for '{where}.type': {kind!r}."
        if problem is not None:
            return problem
    for call_id in calls:
        if call_id not in answered:
            return f"No tool output found for function call {call_id}."
    return None


def _fields_error(item: dict[str, Any], where: str, fields: tuple[str, ...]) -> str | None:
    for field in fields:
        value = item.get(field)
        if not isinstance(value, str) or (field != "arguments" and field != "output" and not value):
            return (
                f"Invalid value for '{where}.{field}': expected a non-empty string, got {value!r}."
            )
    return None


def _message_error(item: dict[str, Any], where: str) -> str | None:
    role = item.get("role")
    if role not in _ROLES:
        return f"Invalid value for '{where}.role': {role!r}."
    content = item.get("content")
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return (
            f"Invalid type for '{where}.content': expected one of an array of objects or "
            f"string, but got {type(content).__name__} instead."
        )
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _PARTS[str(role)]:
            return f"Invalid value for '{where}.content[{k}].type': {kind!r} (role {role})."
        if kind == "input_image" and part.get("detail") not in ("low", "high", "auto"):
            return f"Invalid value for '{where}.content[{k}].detail': {part.get('detail')!r}."
    return None


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat-completions request it stands for: instructions
    and input items become ``messages`` (a reasoning item becomes the next assistant
    message's ``reasoning_content``, function calls its ``tool_calls``), flat function
    tools get their chat shape, ``text.format`` becomes ``response_format``, and
    ``max_output_tokens`` / ``reasoning.effort`` / ``tool_choice`` their chat names."""
    out = {k: v for k, v in body.items() if k not in ("input", "instructions", "text")}
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input") or []
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    reasoning: list[str] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning += [str(s.get("text") or "") for s in item.get("summary") or []]
            continue
        if kind in ("message", "function_call"):
            message = _chat_message(item, messages, kind == "function_call")
            if reasoning and message["role"] == "assistant":
                message["reasoning_content"] = "\n\n".join(reasoning)
                reasoning = []
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {"role": "tool", "tool_call_id": item.get("call_id"), "content": output}
            )
    out["messages"] = messages
    if "tools" in body:
        out["tools"] = [_chat_tool(t) for t in body["tools"]]
    fmt = (body.get("text") or {}).get("format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            schema = {k: v for k, v in fmt.items() if k != "type"}
            fmt = {"type": "json_schema", "json_schema": schema}
        out["response_format"] = fmt
    if "max_output_tokens" in out:
        out["max_tokens"] = out.pop("max_output_tokens")
    effort = out.pop("reasoning", None)
    if isinstance(effort, dict) and effort.get("effort"):
        out["reasoning_effort"] = effort["effort"]
    choice = out.get("tool_choice")
    if isinstance(choice, dict) and "name" in choice:
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    return out


def _chat_message(
    item: dict[str, Any], messages: list[dict[str, Any]], call: bool
) -> dict[str, Any]:
    """Append (or extend, for a function call after its assistant message) one message."""
    if not call:
        content = item.get("content")
        if isinstance(content, list):
            content = [_chat_part(p) for p in content]
            if all(p.get("type") == "text" for p in content) and item.get("role") == "assistant":
                content = "".join(p["text"] for p in content)
        messages.append({"role": item.get("role"), "content": content})
        return messages[-1]
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant":
        last = {"role": "assistant", "content": None}
        messages.append(last)
    fn = {"name": item.get("name"), "arguments": item.get("arguments")}
    last.setdefault("tool_calls", []).append(
        {"id": item.get("call_id"), "type": "function", "function": fn}
    )
    return last


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "input_image":
        image = {"url": part.get("image_url")}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    return part


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        return tool
    fn = {k: v for k, v in tool.items() if k not in ("type", "strict")}
    if tool.get("strict"):
        fn["strict"] = True
    return {"type": "function", "function": fn}
