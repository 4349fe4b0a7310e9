"""The fake server's Responses API (``POST /v1/responses``), from the same ``Reply`` script.

A streamed reply is the sequence OpenAI sends: ``response.created``, ``in_progress``,
then one output item after another — reasoning (summary text deltas), the message
(``output_text`` deltas), each function call (``function_call_arguments`` deltas) —
each opened by ``output_item.added`` and closed by ``output_item.done``, and last
``response.completed`` (``response.incomplete`` for ``finish_reason="length"``) with the
usage. Every event has an ``event:`` line and a ``sequence_number``; there is no
``[DONE]``. ``Reply(stream_error=...)`` ends the stream with an ``error`` event and
``response.failed`` instead.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .testing import Reply

__all__ = ["prompt_of", "response_object", "response_stream"]


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


def _output(reply: Reply, number: int, calls: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The finished output items of a reply, in order."""
    items: list[dict[str, Any]] = []
    if reply.reasoning:
        summary = [{"type": "summary_text", "text": reply.reasoning}]
        items.append({"id": f"rs_fake{number}", "type": "reasoning", "summary": summary})
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
    from .testing import _dumps

    encoded = _dumps(obj)
    raw = reply.usage_json.encode() if reply.usage_json is not None else _dumps(usage)
    return encoded[:-1] + b',"usage":' + raw + b"}"


def response_object(
    reply: Reply, body: dict[str, Any], number: int, calls: list[tuple[str, str, str]], usage: Any
) -> bytes:
    """The whole reply as one (non-streamed) ``response`` object, encoded."""
    status, incomplete = _status(reply)
    obj = {**_head(body, number), "status": status, "incomplete_details": incomplete}
    obj["output"] = _output(reply, number, calls)
    obj.pop("usage")
    return _with_usage(obj, reply, _usage(reply, usage))


def response_stream(
    reply: Reply, body: dict[str, Any], number: int, calls: list[tuple[str, str, str]], usage: Any
) -> list[bytes]:
    """Every SSE event of a streamed reply, encoded (``event:`` and ``data:`` lines)."""
    from .testing import _dumps, _split

    seq = itertools.count()

    def ev(kind: str, **fields: Any) -> bytes:
        data = _dumps({"type": kind, "sequence_number": next(seq), **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    head = _head(body, number)
    events = [ev("response.created", response=head), ev("response.in_progress", response=head)]
    pieces = reply.chunk_size
    for index, item in enumerate(_output(reply, number, calls)):
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
            for p in _split(text, pieces):
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
            for p in _split(item["arguments"], pieces):
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
    final["output"] = _output(reply, number, calls)
    final.pop("usage")
    kind = "response.completed" if status == "completed" else "response.incomplete"
    response = _with_usage(final, reply, _usage(reply, usage))
    prefix = _dumps({"type": kind, "sequence_number": next(seq)})[:-1]
    events.append(
        b"event: " + kind.encode() + b"\ndata: " + prefix + b',"response":' + response + b"}\n\n"
    )
    return events
