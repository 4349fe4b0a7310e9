"""What a test scripts the fake server to answer, and how those values are encoded.

``Reply`` (with its ``ToolCallSpec`` calls and ``ErrorSpec`` errors) is one answer; the
token estimate, the echo fallback and the JSON encoding are shared by both wire formats
(``_fake_chat`` and ``_fake_responses``). ``nbchat.testing`` is the public face of these.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ErrorSpec",
    "Fallback",
    "Reply",
    "ToolCallSpec",
    "chat_request",
    "dumps",
    "echo_reply",
    "estimate_prompt_tokens",
    "split_text",
    "with_usage",
]

# What OpenAI itself answers for these statuses: (type, code).
_OPENAI_ERRORS = {
    401: ("invalid_request_error", "invalid_api_key"),
    429: ("requests", "rate_limit_exceeded"),
}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def __repr_args__(self) -> Any:
        # Only what differs from the defaults: ``enqueue()`` returns its Reply, and as a
        # cell's last line the full repr of twenty fields buried what was scripted.
        fields = type(self).model_fields
        for name, value in super().__repr_args__():
            if name not in fields or value != fields[name].get_default(call_default_factory=True):
                yield name, value


class ToolCallSpec(_Spec):
    """One tool call in a scripted reply.

    ``arguments`` is a dict (sent as compact JSON) or a raw string, which is sent as is,
    so ``'{"city": "Par'`` scripts a model that emits malformed JSON. Without an ``id``
    the server makes a deterministic one (``call_<request>_<index>``).
    """

    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    id: str | None = None

    def arguments_json(self) -> str:
        """The arguments exactly as they go over the wire."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


class ErrorSpec(_Spec):
    """An HTTP error answered instead of a reply, with OpenAI's error body.

    The body is ``{"error": {"message", "type", "param", "code"}}``; ``type`` and ``code``
    default to what OpenAI sends for the status (429: ``requests`` /
    ``rate_limit_exceeded``; 5xx: ``server_error``; other 4xx: ``invalid_request_error``).
    ``retry_after`` sends a ``retry-after`` header (seconds); ``should_retry`` sends
    ``x-should-retry``, which the ``openai`` client obeys instead of its own rule.
    ``echo_key=True`` appends the credentials the request carried to the message
    (``... (Authorization: Bearer sk-...)``), as some proxies do in their 401s: a test
    that nothing shows or stores the key.
    """

    status: int = Field(ge=400, le=599)
    message: str
    type: str | None = None
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None
    should_retry: bool | None = None
    echo_key: bool = False

    def body(self, authorization: str | None = None) -> dict[str, Any]:
        """The JSON body of the error response (``authorization``: the request's header)."""
        default = "server_error" if self.status >= 500 else "invalid_request_error"
        kind, code = _OPENAI_ERRORS.get(self.status, (default, None))
        message = self.message
        if self.echo_key:
            message += f" (Authorization: {authorization or '(none sent)'})"
        error = {"message": message, "type": self.type or kind, "param": self.param}
        return {"error": {**error, "code": self.code or code}}


class Reply(_Spec):
    """One scripted answer of the fake server (what ``FakeOpenAIServer.enqueue`` builds).

    - ``text`` is streamed in pieces of ``chunk_size`` characters, or give the pieces
      yourself with ``chunks``. ``reasoning`` is streamed first as
      ``delta.reasoning_content``; tool-call arguments are split by ``chunk_size`` too,
      and the fragments of several calls are interleaved, as parallel calls arrive.
    - ``usage``: ``"auto"`` estimates it (prompt: ``estimate_prompt_tokens``; completion:
      ceil(generated characters / 4)), a dict is sent as given (``total_tokens``
      added when missing), ``None`` sends none, even when the request asks for usage.
      ``usage_json`` sends that JSON text verbatim as the usage value instead, for usage
      no well-behaved server sends: ``'{"prompt_tokens": 1e400}'``, ``'"n/a"'``,
      ``'{"prompt_tokens": -3, "completion_tokens": "12"}'``, 2**64.
    - ``finish_reason`` defaults to ``"tool_calls"`` when there are tool calls, else
      ``"stop"``. ``delay`` sleeps that many seconds before each chunk (a non-streamed
      reply waits it once).
    - ``cut_after=N`` sends N chunks, then drops the connection without ``[DONE]`` or the
      end of the chunked body; a non-streamed reply is dropped before any byte.
    - ``stall_after=N, stall_seconds=S`` sends N chunks, then nothing for S seconds
      (headers and chunks before it arrive at once), then the rest: a server that hangs
      mid-stream. ``stall_after=0`` stalls before the first chunk; a non-streamed reply
      waits ``stall_seconds`` before its answer.
    - Wire format variants, all valid SSE: ``line_ending="\\r"`` (or ``"\\r\\n"``) ends
      lines with a bare CR (CRLF) instead of LF; ``multiline_data=True`` spreads each
      event's JSON over several ``data:`` lines (pretty-printed, one line each).
    - ``raw_body`` answers that text verbatim with ``raw_status`` (200) and
      ``raw_content_type`` (``text/html``) instead of a reply, as a web page, a captive
      portal or a proxy's error page does; for streamed and plain requests alike.
    - Text and arguments may hold lone surrogates (``"\\udcff"``): they go out as the
      JSON escape, as a server that cuts a UTF-16 pair in two sends them.
    - ``error`` answers an HTTP error instead (see ``ErrorSpec``); ``stream_error``
      streams the reply's content, then reports that error inside the stream (chat: a
      ``{"error": ...}`` chunk; Responses: an ``error`` event and ``response.failed``).
    - The same reply serves ``/v1/responses`` in that API's events (see ``_fake_responses``):
      ``finish_reason="length"`` becomes ``response.incomplete``, ``usage`` is renamed
      (``input_tokens``...; a dict already using those names is sent as given).
    """

    text: str = ""
    chunks: list[str] | None = None
    chunk_size: int = Field(default=4, ge=1)
    tool_calls: list[ToolCallSpec] = Field(default_factory=list)
    reasoning: str | None = None
    usage: dict[str, Any] | Literal["auto"] | None = "auto"
    usage_json: str | None = None
    finish_reason: str | None = None
    delay: float = Field(default=0.0, ge=0)
    cut_after: int | None = Field(default=None, ge=0)
    stall_after: int | None = Field(default=None, ge=0)
    stall_seconds: float = Field(default=0.0, ge=0)
    line_ending: Literal["\n", "\r\n", "\r"] = "\n"
    multiline_data: bool = False
    raw_body: str | None = None
    raw_status: int = Field(default=200, ge=100, le=599)
    raw_content_type: str = "text/html; charset=utf-8"
    error: ErrorSpec | None = None
    stream_error: ErrorSpec | None = None

    @model_validator(mode="after")
    def _text_or_chunks(self) -> Self:
        if self.chunks is not None:
            if self.text and self.text != "".join(self.chunks):
                raise ValueError("give either text or chunks, not both")
            self.text = "".join(self.chunks)
        return self

    def text_pieces(self) -> list[str]:
        """The text as it is streamed, one piece per chunk."""
        return (
            list(self.chunks) if self.chunks is not None else split_text(self.text, self.chunk_size)
        )


Fallback = Callable[[dict[str, Any]], Reply | str]
"""A function from a request body to the reply it gets when the queue is empty."""


def estimate_prompt_tokens(messages: Any) -> int:
    """The fake's token estimate of a prompt: ceil(characters of its compact JSON / 4),
    with each image counted by OpenAI's tile rule (``ImagePart.tokens``), not its base64."""
    images: list[int] = []
    text = json.dumps(_without_images(messages, images), ensure_ascii=False, separators=(",", ":"))
    return math.ceil(len(text) / 4) + sum(images)


def _without_images(value: Any, images: list[int]) -> Any:
    """``value`` with its image parts (either wire) taken out and their tokens counted."""
    if isinstance(value, list):
        return [_without_images(v, images) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("type") in ("image_url", "input_image"):
        spec = value.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        detail = (spec.get("detail") if isinstance(spec, dict) else None) or value.get("detail")
        images.append(_image_tokens(url if isinstance(url, str) else "", detail))
        return {"type": value["type"]}
    return {k: _without_images(v, images) for k, v in value.items()}


def _image_tokens(url: str, detail: Any) -> int:
    from ._images import to_image
    from ._types import ImagePart

    part: ImagePart | None = None
    if url.startswith("data:"):
        try:
            part = to_image(base64.b64decode(url.partition(",")[2]))
        except Exception:  # a broken image still costs something; the model would say so
            part = None
    if part is None:
        part = ImagePart(mime="image/*", sha256="")
    level = detail if detail in ("low", "high") else "auto"
    return part.model_copy(update={"detail": level}).tokens()


def echo_reply(body: dict[str, Any]) -> Reply:
    """A deterministic reply to a request: ``"Echo: "`` + the last user message's text."""
    last = "(no user message)"
    messages = body.get("messages") or body.get("input") or []
    if isinstance(messages, str):  # a Responses request may send just a string
        messages = [{"role": "user", "content": messages}]
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # multi-part content: keep the text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            last = str(content)
            break
    return Reply(text=f"Echo: {last}")


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """A request body in the chat-completions form, whichever wire it came on.

    A Responses request's instructions and input items become ``messages`` (a reasoning
    item the ``reasoning_content`` of the assistant message after it), its tools and
    options take their chat names; a chat request is returned as it is. For tests and
    fallbacks that read requests the same way on both wire formats.
    """
    from ._fake_responses import chat_body  # it builds on this module

    return chat_body(body) if "input" in body else body


def split_text(s: str, size: int) -> list[str]:
    return [s[i : i + size] for i in range(0, len(s), size)]


# Made once: json.dumps with options builds an encoder per call, and the server encodes
# one object per streamed chunk (its time is on the test's CPU, like the client's).
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"))


def dumps(obj: Any, indent: int | None = None) -> bytes:
    if indent is None:
        try:
            return _COMPACT.encode(obj).encode()
        except UnicodeEncodeError:  # lone surrogates: send them as JSON escapes
            return _COMPACT_ASCII.encode(obj).encode()
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ": "), indent=indent)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ": "), indent=indent).encode()


def with_usage(obj_json: bytes, reply: Reply, usage: Any) -> bytes:
    """A JSON object (encoded) with its ``usage`` member added: verbatim ``usage_json``,
    or ``usage`` encoded."""
    raw = reply.usage_json.encode() if reply.usage_json is not None else dumps(usage)
    return obj_json[:-1] + b',"usage":' + raw + b"}"
