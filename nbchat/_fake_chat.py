"""The fake server's chat completions wire (``POST /v1/chat/completions``).

A reply is one ``chat.completion`` object, or streamed as ``chat.completion.chunk``
events: the role, the reasoning (``delta.reasoning_content``), the text, the tool calls'
fragments interleaved, the finish reason, the usage chunk when asked for, then ``data:
[DONE]``. Each event is one piece of an HTTP/1.1 chunked body (``frame``).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from typing import Any

from . import _fake_responses
from ._fake_script import ErrorSpec, Reply, dumps, estimate_prompt_tokens, split_text, with_usage

__all__ = [
    "END",
    "calls_of",
    "completion",
    "frame",
    "replay_refusal",
    "request_prompt",
    "reshaped",
    "stream_events",
    "usage_for",
]

_FINGERPRINT = "fp_nbchat_fake"


def usage_for(reply: Reply, body: dict[str, Any], calls: list[tuple[str, str, str]]) -> Any:
    if reply.usage_json is not None:
        return reply.usage_json  # any non-None marker: the text itself is sent verbatim
    if reply.usage != "auto":
        usage = dict(reply.usage) if reply.usage is not None else None
        if usage and "total_tokens" not in usage:
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(p, int) and isinstance(c, int):
                usage["total_tokens"] = p + c
        return usage
    reasoning = reply.reasoning or ""
    generated = len(reasoning) + len(reply.text) + sum(len(n) + len(a) for _, n, a in calls)
    prompt = estimate_prompt_tokens(request_prompt(body))
    completion = math.ceil(generated / 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": math.ceil(len(reasoning) / 4)},
    }


def request_prompt(body: dict[str, Any]) -> Any:
    """The prompt a request sends: chat ``messages``, or a Responses request's input."""
    if "messages" in body or "input" not in body:
        return body.get("messages", [])
    from ._fake_responses import prompt_of

    return prompt_of(body)


def _chat_head(body: dict[str, Any], number: int, kind: str) -> dict[str, Any]:
    """The fields a chat completion (or each of its chunks) opens with."""
    return {
        "id": f"chatcmpl-fake{number}",
        "object": kind,
        "created": int(time.time()),
        "model": body.get("model", ""),
        "system_fingerprint": _FINGERPRINT,
    }


def completion(reply: Reply, body: dict[str, Any], number: int) -> bytes:
    """The whole reply as one ``chat.completion`` object (non-streamed), encoded."""
    calls = calls_of(reply, number)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text if reply.text or not calls else None,
        "refusal": None,
    }
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in calls
        ]
    out = {
        **_chat_head(body, number, "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": reply.finish_reason or _finish(calls),
            }
        ],
    }
    usage = usage_for(reply, body, calls)
    return dumps(out) if usage is None else with_usage(dumps(out), reply, usage)


def replay_refusal(body: dict[str, Any], required: bool) -> ErrorSpec | None:
    """The error for a request that sends reasoning back wrongly, or (``required``)
    leaves it out of a tool round: DeepSeek's 400 on chat, OpenAI's on Responses."""
    if "input" in body:
        bad = _fake_responses.replay_error(body)
        if bad is not None:
            return ErrorSpec(status=bad[0], message=bad[1], param="input")
        call = _fake_responses.reasoning_missing(body) if required else None
        if call is None:
            return None
        message = (
            f"Item of type 'function_call' (call_id {call!r}) was provided without its "
            "required 'reasoning' item."
        )
        return ErrorSpec(status=400, message=message, param="input")
    if not required or not _reasoning_missing(body):
        return None
    return ErrorSpec(
        status=400,
        code="invalid_request_error",
        param="messages",
        message="The reasoning_content in the thinking mode must be passed back to the API.",
    )


def _reasoning_missing(body: dict[str, Any]) -> bool:
    """Whether a tool round of the current turn omits the reasoning it was answered with."""
    messages = body.get("messages") or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return any(
        m.get("role") == "assistant" and m.get("tool_calls") and not m.get("reasoning_content")
        for m in messages[last_user + 1 :]
    )


def calls_of(reply: Reply, number: int) -> list[tuple[str, str, str]]:
    return [
        (tc.id or f"call_{number}_{i}", tc.name, tc.arguments_json())
        for i, tc in enumerate(reply.tool_calls)
    ]


def _finish(calls: list[tuple[str, str, str]]) -> str:
    return "tool_calls" if calls else "stop"


def stream_events(reply: Reply, body: dict[str, Any], number: int) -> Iterator[bytes]:
    """Every SSE event of a streamed reply, encoded as it is sent (``data: [DONE]`` not
    included): a long reply starts at once, and the encoding of one batch overlaps with
    the client reading the one before (in a server of its own process). What can fail
    (usage, calls, the head) is worked out before the first event."""
    calls = calls_of(reply, number)
    opts = body.get("stream_options")
    usage = usage_for(reply, body, calls)
    asked = isinstance(opts, dict) and bool(opts.get("include_usage")) and usage is not None
    head = _chat_head(body, number, "chat.completion.chunk")
    # Only the delta changes from chunk to chunk: encode the rest once.
    prefix = b"data: " + dumps(head)[:-1] + b',"choices":[{"index":0,"delta":'
    end = (b',"usage":null' if asked else b"") + b"}\n\n"
    usage_event = None
    if asked and reply.stream_error is None:
        usage_event = b"data: " + with_usage(dumps({**head, "choices": []}), reply, usage) + b"\n\n"
    reshape = reply.multiline_data or reply.line_ending != "\n"

    def ev(delta: dict[str, Any], finish: str | None = None) -> bytes:
        finish_json = dumps(finish) if finish else b"null"
        event = (
            prefix + dumps(delta) + b',"logprobs":null,"finish_reason":' + finish_json + b"}]" + end
        )
        return reshaped(event, reply) if reshape else event

    def events() -> Iterator[bytes]:
        first = {
            "role": "assistant",
            "content": "" if reply.text or not calls else None,
            "refusal": None,
        }
        yield ev(first)
        for p in split_text(reply.reasoning or "", reply.chunk_size):
            yield ev({"reasoning_content": p})
        for p in reply.text_pieces():
            yield ev({"content": p})
        per_call: list[list[dict[str, Any]]] = []
        for index, (call_id, name, args) in enumerate(calls):
            fn = {"name": name, "arguments": ""}
            deltas = [{"index": index, "id": call_id, "type": "function", "function": fn}]
            deltas += [
                {"index": index, "function": {"arguments": frag}}
                for frag in split_text(args, reply.chunk_size)
            ]
            per_call.append(deltas)
        for group in itertools.zip_longest(*per_call):  # round-robin: fragments interleave
            for d in group:
                if d is not None:
                    yield ev({"tool_calls": [d]})
        if reply.stream_error is not None:
            error = b"data: " + dumps(reply.stream_error.body()) + b"\n\n"
            yield reshaped(error, reply) if reshape else error
        else:
            yield ev({}, reply.finish_reason or _finish(calls))
        if usage_event is not None:
            yield reshaped(usage_event, reply) if reshape else usage_event

    return events()


def reshaped(event: bytes, reply: Reply) -> bytes:
    """One encoded ``data: ...\\n\\n`` event in the reply's SSE variant."""
    if reply.multiline_data:
        head, _, rest = event.partition(b"data: ")  # head: an "event: ..." line, or nothing
        payload = rest.rstrip(b"\n")
        if payload != b"[DONE]":
            pretty = dumps(json.loads(payload), indent=1)
            lines = b"".join(b"data: " + line + b"\n" for line in pretty.split(b"\n"))
            event = head + lines + b"\n"
    if reply.line_ending != "\n":
        event = event.replace(b"\n", reply.line_ending.encode())
    return event


def frame(data: bytes) -> bytes:
    """One piece of an HTTP/1.1 chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


END = b"0\r\n\r\n"  # the end of a chunked body
