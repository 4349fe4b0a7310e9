"""A fake OpenAI-compatible server for tests: real HTTP on 127.0.0.1, scripted replies.

``FakeOpenAIServer`` speaks ``POST /v1/chat/completions`` and ``POST /v1/responses`` (the
Responses API), each as SSE streaming or plain JSON in OpenAI's wire format, and ``GET
/v1/models`` (plus llama.cpp's ``GET /props``); Azure OpenAI's paths
(``/openai/deployments/{name}/chat/completions?api-version=...``) reach the same replies.
You queue the replies it gives, one per request, and it records every request it
receives. Point the real ``openai`` client, or nbchat itself, at ``server.url``:

```python
import openai
from nbchat.testing import FakeOpenAIServer

with FakeOpenAIServer() as server:
    server.enqueue("Hello from the fake!", chunk_size=3)
    server.enqueue(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    with openai.OpenAI(base_url=server.url, api_key="test") as client:
        stream = client.chat.completions.create(
            model="any-model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(
            model="any-model", messages=[{"role": "user", "content": "weather?"}]
        )
    assert text == "Hello from the fake!"
    assert reply.choices[0].message.tool_calls[0].function.arguments == '{"city":"Paris"}'
    assert server.requests[0]["messages"][0]["content"] == "hi"
```

From a shell (for notebooks run in another process), ``python -m nbchat.testing --echo``
prints the server's URL on one line and answers every request with an echo of the last
user message until it is killed; ``--script replies.json`` plays a list of replies.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import math
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal, Self, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import _fake_responses

__all__ = [
    "ErrorSpec",
    "FakeOpenAIServer",
    "Fallback",
    "Reply",
    "ToolCallSpec",
    "chat_request",
    "echo_reply",
    "estimate_prompt_tokens",
    "main",
]

# What OpenAI itself answers for these statuses: (type, code).
_OPENAI_ERRORS = {
    401: ("invalid_request_error", "invalid_api_key"),
    429: ("requests", "rate_limit_exceeded"),
}
# Headers that may carry credentials: never recorded.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
)
_FINGERPRINT = "fp_nbchat_fake"


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
        return list(self.chunks) if self.chunks is not None else _split(self.text, self.chunk_size)


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
    return _fake_responses.chat_body(body) if "input" in body else body


def _split(s: str, size: int) -> list[str]:
    return [s[i : i + size] for i in range(0, len(s), size)]


# Made once: json.dumps with options builds an encoder per call, and the server encodes
# one object per streamed chunk (its time is on the test's CPU, like the client's).
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"))


def _dumps(obj: Any, indent: int | None = None) -> bytes:
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


class FakeOpenAIServer:
    """An OpenAI-compatible chat server on 127.0.0.1 that plays scripted replies.

    Use it as a context manager, or call ``start()`` and ``stop()``. Each request to
    ``/v1/chat/completions`` takes the next queued reply (FIFO); when the queue is empty
    it asks ``fallback`` (a ``Reply``, a string, or a function of the request body), and
    without one answers HTTP 500 saying the queue is empty. With ``context_window=N``, a
    request whose ``estimate_prompt_tokens`` exceeds N is answered 400
    ``context_length_exceeded`` without taking a reply from the queue. With
    ``require_reasoning_replay=True`` it behaves like DeepSeek's thinking mode: a tool
    round whose assistant message (after the last user message) comes back without its
    ``reasoning_content`` is answered 400; on ``/v1/responses`` like OpenAI's reasoning
    models: a function call of the current turn sent back without the reasoning item
    that preceded it is answered 400.
    ``GET /v1/models`` lists ``models``, each card with the fields ``model_info`` gives
    it (``{"m": {"max_model_len": 8192}}`` as vLLM, ``{"context_length": ...}`` as
    OpenRouter); ``props`` is answered at ``GET /props`` as llama.cpp does
    (``{"default_generation_settings": {"n_ctx": 4096}}``; 404 without it). Every request
    body is kept in ``requests``, its path and query in ``request_paths``.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        models: Sequence[str] = ("fake-model",),
        fallback: Reply | str | Fallback | None = None,
        context_window: int | None = None,
        require_reasoning_replay: bool = False,
        model_info: dict[str, dict[str, Any]] | None = None,
        props: dict[str, Any] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.models: list[str] = list(models)
        self.model_info: dict[str, dict[str, Any]] = dict(model_info or {})
        self.props = props
        self.fallback = fallback
        self.context_window = context_window
        self.require_reasoning_replay = require_reasoning_replay
        self.disconnects = 0
        """How many streamed replies the client dropped before their end."""
        self.errors: list[str] = []
        """Bugs inside the fake (or a raising fallback), also answered as HTTP 500."""
        self._queue: deque[Reply] = deque()
        self._requests: list[dict[str, Any]] = []
        self._headers: list[dict[str, str]] = []
        self._paths: list[str] = []
        self._cond = threading.Condition()
        self._stopping = threading.Event()  # wakes stalled replies when the server stops
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The base URL to give an OpenAI client, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not started; use start() or `with`")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        """Bind the port and serve from a background thread; returns the server."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        # A short poll interval so stop() returns quickly.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeOpenAIServer:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and free the port (safe to call twice)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ script

    def enqueue(
        self,
        reply: Reply | str | dict[str, Any] | None = None,
        /,
        *,
        repeat: int = 1,
        **fields: Any,
    ) -> Reply:
        """Queue the reply to the next request (``repeat`` times); returns it.

        ``enqueue("text", chunk_size=2)``, ``enqueue(tool_calls=[{"name": ..., "arguments":
        {...}}])``, ``enqueue(Reply(...))`` and ``enqueue({...})`` all work; the keyword
        arguments are the fields of ``Reply``, faults included:

        - ``cut_after=N``: drop the connection after N chunks;
        - ``stall_after=N, stall_seconds=S``: go silent for S seconds after N chunks;
        - ``delay=S``: S seconds before every chunk;
        - ``raw_body="<html>...", raw_status=200, raw_content_type="text/html"``: answer
          something that is not the API at all;
        - ``line_ending="\\r"`` / ``"\\r\\n"``, ``multiline_data=True``: unusual but valid SSE;
        - ``usage={...}`` (any values) or ``usage_json="<raw JSON>"``: odd usage reports;
        - ``text="\\udcff"``: lone surrogates, sent as JSON escapes.

        HTTP errors, including a 401 that echoes the key, are ``enqueue_error``.
        """
        if isinstance(reply, Reply):
            if fields:
                raise TypeError("pass either a Reply or Reply fields, not both")
            built = reply
        elif isinstance(reply, dict):
            built = Reply.model_validate({**reply, **fields})
        else:
            built = Reply(**({"text": reply} if reply is not None else {}), **fields)
        with self._cond:
            self._queue.extend([built] * repeat)
        return built

    def enqueue_error(
        self,
        status: int,
        message: str = "fake error",
        code: str | None = None,
        *,
        repeat: int = 1,
        **fields: Any,
    ) -> Reply:
        """Queue an HTTP error in OpenAI's shape, e.g. ``enqueue_error(429, retry_after=1)``.

        The keyword arguments are the other fields of ``ErrorSpec`` (``type``, ``param``,
        ``retry_after``, ``should_retry``, ``echo_key``).
        ``enqueue_error(401, "Incorrect API key", echo_key=True)`` echoes the request's
        ``Authorization`` header in the message, as careless proxies do.
        """
        spec = ErrorSpec(status=status, message=message, code=code, **fields)
        return self.enqueue(Reply(error=spec), repeat=repeat)

    @property
    def pending(self) -> int:
        """How many queued replies have not been served yet."""
        with self._cond:
            return len(self._queue)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request body received (either wire format), parsed, in order (a copy)."""
        with self._cond:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        """``requests``, each in the chat-completions form: a Responses request's
        instructions and input items read back as ``messages`` (its reasoning items as
        the ``reasoning_content`` of the assistant message they precede), its tools and
        options under their chat names. For tests that run on both wire formats."""
        return [
            _fake_responses.chat_body(body) if "input" in body else body for body in self.requests
        ]

    @property
    def request_headers(self) -> list[dict[str, str]]:
        """The headers of each request in ``requests``, lower-cased, minus credentials."""
        with self._cond:
            return list(self._headers)

    @property
    def request_paths(self) -> list[str]:
        """The path and query of each request in ``requests`` (``/v1/responses``, Azure's
        ``/openai/deployments/m/chat/completions?api-version=...``)."""
        with self._cond:
            return list(self._paths)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Block until at least ``n`` requests arrived; returns them. Raises TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                raise TimeoutError(
                    f"FakeOpenAIServer got {len(self._requests)} requests, "
                    f"expected {n} within {timeout} s"
                )
            return list(self._requests)

    def reset(self) -> None:
        """Forget queued replies, recorded requests, errors and the disconnect count."""
        with self._cond:
            self._queue.clear()
            self._requests.clear()
            self._headers.clear()
            self._paths.clear()
            self.errors.clear()
            self.disconnects = 0

    # ------------------------------------------------------------------ serving

    def _take(
        self, body: dict[str, Any], headers: dict[str, str], path: str = ""
    ) -> tuple[int, Reply]:
        """Record a request and choose its reply; returns (request number, reply)."""
        with self._cond:
            self._requests.append(body)
            self._headers.append(headers)
            self._paths.append(path)
            number = len(self._requests)
            self._cond.notify_all()
            window = self.context_window
            if window is not None:
                tokens = estimate_prompt_tokens(_prompt(body))
                if tokens > window:
                    return number, Reply(
                        error=ErrorSpec(
                            status=400,
                            code="context_length_exceeded",
                            param="messages",
                            message=f"This model's maximum context length is {window} tokens. "
                            f"However, your messages resulted in {tokens} tokens.",
                        )
                    )
            problem = _fake_responses.input_error(body) if "input" in body else None
            if problem is not None:  # OpenAI checks the items before anything else
                return number, Reply(error=ErrorSpec(status=400, message=problem, param="input"))
            refusal = _replay_refusal(body, self.require_reasoning_replay)
            if refusal is not None:
                return number, Reply(error=refusal)
            if self._queue:
                return number, self._queue.popleft()
            fallback = self.fallback
        if fallback is None:
            return number, Reply(
                error=ErrorSpec(
                    status=500,
                    code="fake_queue_empty",
                    type="fake_server_error",
                    should_retry=False,
                    message=f"nbchat FakeOpenAIServer: the reply queue is empty (request "
                    f"#{number}, model {body.get('model')!r}). Call server.enqueue(...) before "
                    "the request, or give FakeOpenAIServer a fallback=.",
                )
            )
        try:
            made = fallback if isinstance(fallback, Reply | str) else fallback(body)
            return number, made if isinstance(made, Reply) else Reply(text=made)
        except Exception as exc:
            return number, Reply(error=self._internal_error(f"the fallback raised {exc!r}"))

    def _internal_error(self, message: str) -> ErrorSpec:
        with self._cond:
            self.errors.append(message)
        message = f"nbchat FakeOpenAIServer: {message}"
        return ErrorSpec(status=500, type="fake_server_error", should_retry=False, message=message)

    def _note_disconnect(self) -> None:
        with self._cond:
            self.disconnects += 1


# ---------------------------------------------------------------------- wire format


def _with_usage(obj_json: bytes, reply: Reply, usage: Any) -> bytes:
    """A JSON object (encoded) with its ``usage`` member added: verbatim ``usage_json``,
    or ``usage`` encoded."""
    raw = reply.usage_json.encode() if reply.usage_json is not None else _dumps(usage)
    return obj_json[:-1] + b',"usage":' + raw + b"}"


def _usage_for(reply: Reply, body: dict[str, Any], calls: list[tuple[str, str, str]]) -> Any:
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
    prompt = estimate_prompt_tokens(_prompt(body))
    completion = math.ceil(generated / 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": math.ceil(len(reasoning) / 4)},
    }


def _prompt(body: dict[str, Any]) -> Any:
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


def _completion(reply: Reply, body: dict[str, Any], number: int) -> bytes:
    """The whole reply as one ``chat.completion`` object (non-streamed), encoded."""
    calls = _calls(reply, number)
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
    usage = _usage_for(reply, body, calls)
    return _dumps(out) if usage is None else _with_usage(_dumps(out), reply, usage)


def _replay_refusal(body: dict[str, Any], required: bool) -> ErrorSpec | None:
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


def _calls(reply: Reply, number: int) -> list[tuple[str, str, str]]:
    return [
        (tc.id or f"call_{number}_{i}", tc.name, tc.arguments_json())
        for i, tc in enumerate(reply.tool_calls)
    ]


def _finish(calls: list[tuple[str, str, str]]) -> str:
    return "tool_calls" if calls else "stop"


def _stream_events(reply: Reply, body: dict[str, Any], number: int) -> Iterator[bytes]:
    """Every SSE event of a streamed reply, encoded as it is sent (``data: [DONE]`` not
    included): a long reply starts at once, and the encoding of one batch overlaps with
    the client reading the one before (in a server of its own process). What can fail
    (usage, calls, the head) is worked out before the first event."""
    calls = _calls(reply, number)
    opts = body.get("stream_options")
    usage = _usage_for(reply, body, calls)
    with_usage = isinstance(opts, dict) and bool(opts.get("include_usage")) and usage is not None
    head = _chat_head(body, number, "chat.completion.chunk")
    # Only the delta changes from chunk to chunk: encode the rest once.
    prefix = b"data: " + _dumps(head)[:-1] + b',"choices":[{"index":0,"delta":'
    end = (b',"usage":null' if with_usage else b"") + b"}\n\n"
    usage_event = None
    if with_usage and reply.stream_error is None:
        usage_event = (
            b"data: " + _with_usage(_dumps({**head, "choices": []}), reply, usage) + b"\n\n"
        )
    reshape = reply.multiline_data or reply.line_ending != "\n"

    def ev(delta: dict[str, Any], finish: str | None = None) -> bytes:
        finish_json = _dumps(finish) if finish else b"null"
        event = (
            prefix
            + _dumps(delta)
            + b',"logprobs":null,"finish_reason":'
            + finish_json
            + b"}]"
            + end
        )
        return _reshaped(event, reply) if reshape else event

    def events() -> Iterator[bytes]:
        first = {
            "role": "assistant",
            "content": "" if reply.text or not calls else None,
            "refusal": None,
        }
        yield ev(first)
        for p in _split(reply.reasoning or "", reply.chunk_size):
            yield ev({"reasoning_content": p})
        for p in reply.text_pieces():
            yield ev({"content": p})
        per_call: list[list[dict[str, Any]]] = []
        for index, (call_id, name, args) in enumerate(calls):
            fn = {"name": name, "arguments": ""}
            deltas = [{"index": index, "id": call_id, "type": "function", "function": fn}]
            deltas += [
                {"index": index, "function": {"arguments": frag}}
                for frag in _split(args, reply.chunk_size)
            ]
            per_call.append(deltas)
        for group in itertools.zip_longest(*per_call):  # round-robin: fragments interleave
            for d in group:
                if d is not None:
                    yield ev({"tool_calls": [d]})
        if reply.stream_error is not None:
            error = b"data: " + _dumps(reply.stream_error.body()) + b"\n\n"
            yield _reshaped(error, reply) if reshape else error
        else:
            yield ev({}, reply.finish_reason or _finish(calls))
        if usage_event is not None:
            yield _reshaped(usage_event, reply) if reshape else usage_event

    return events()


def _reshaped(event: bytes, reply: Reply) -> bytes:
    """One encoded ``data: ...\\n\\n`` event in the reply's SSE variant."""
    if reply.multiline_data:
        head, _, rest = event.partition(b"data: ")  # head: an "event: ..." line, or nothing
        payload = rest.rstrip(b"\n")
        if payload != b"[DONE]":
            pretty = _dumps(json.loads(payload), indent=1)
            lines = b"".join(b"data: " + line + b"\n" for line in pretty.split(b"\n"))
            event = head + lines + b"\n"
    if reply.line_ending != "\n":
        event = event.replace(b"\n", reply.line_ending.encode())
    return event


def _frame(data: bytes) -> bytes:
    """One piece of an HTTP/1.1 chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


_END = b"0\r\n\r\n"  # the end of a chunked body


# ---------------------------------------------------------------------- HTTP


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], fake: FakeOpenAIServer) -> None:
        self.fake = fake
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake every handler thread (idle keep-alive or mid-stream) so it ends."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away is normal for a test server: no traceback on stderr.
        if isinstance(sys.exc_info()[1], OSError):
            return
        self.fake._internal_error(f"handler crashed: {sys.exc_info()[1]!r}")
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, like real servers
    server_version = "nbchat-fake/1"
    disable_nagle_algorithm = True  # each delayed chunk leaves at once

    @property
    def fake(self) -> FakeOpenAIServer:
        return cast(_HTTPServer, self.server).fake

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request access log: tests read stderr."""

    def _path(self) -> str:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.startswith("/openai/"):  # Azure: /openai[/v1][/deployments/NAME]/...
            path = path.removeprefix("/openai")
            if path.startswith("/deployments/"):
                path = "/" + path.removeprefix("/deployments/").partition("/")[2]
        return path.removeprefix("/v1")

    def do_GET(self) -> None:
        """``GET /v1/models`` and ``GET /v1/models/{id}``."""
        path = self._path()
        cards = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "nbchat-fake",
                **self.fake.model_info.get(m, {}),
            }
            for m in self.fake.models
        ]
        if path == "/props" and self.fake.props is not None:
            self._send_json(200, self.fake.props)
            return
        if path == "/models":
            self._send_json(200, {"object": "list", "data": cards})
            return
        model = path.removeprefix("/models/")
        if not path.startswith("/models/"):
            self._send_error(ErrorSpec(status=404, message=f"Invalid URL (GET {self.path})"))
        elif model in self.fake.models:
            self._send_json(200, cards[self.fake.models.index(model)])
        else:
            message = f"The model {model!r} does not exist"
            self._send_error(ErrorSpec(status=404, message=message, code="model_not_found"))

    def do_POST(self) -> None:
        """``POST /v1/chat/completions`` or ``/v1/responses``: the next scripted reply."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        route = self._path()
        if route not in ("/chat/completions", "/responses"):
            self._send_error(ErrorSpec(status=404, message=f"Invalid URL (POST {self.path})"))
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("the body is not a JSON object")
        except ValueError as exc:
            self._send_error(ErrorSpec(status=400, message=f"invalid JSON body: {exc}"))
            return
        headers = {
            k.lower(): v for k, v in self.headers.items() if k.lower() not in _SECRET_HEADERS
        }
        number, reply = self.fake._take(body, headers, self.path)
        stream = bool(body.get("stream"))
        responses = route == "/responses"
        try:
            if reply.error is not None:
                self._send_error(reply.error, self.headers.get("Authorization"))
            elif reply.raw_body is not None:
                self._send_raw(reply.raw_status, reply.raw_body.encode(), reply.raw_content_type)
            elif stream and responses:
                events = _fake_responses.response_stream(
                    reply,
                    body,
                    number,
                    _calls(reply, number),
                    _usage_for(reply, body, _calls(reply, number)),
                )
                events = [_reshaped(e, reply) for e in events]
                self._send_stream(events, reply, number, done=False)
            elif stream:
                self._send_stream(_stream_events(reply, body, number), reply, number)
            elif reply.cut_after is not None:
                self.close_connection = True  # dropped before any byte of the answer
            else:
                calls = _calls(reply, number)
                payload = (
                    _fake_responses.response_object(
                        reply, body, number, calls, _usage_for(reply, body, calls)
                    )
                    if responses
                    else _completion(reply, body, number)
                )
                time.sleep(reply.delay)
                if reply.stall_after is not None:
                    self.fake._stopping.wait(reply.stall_seconds)
                self._send_raw(200, payload, "application/json")
        except OSError:  # the client went away; not an error of ours to report
            self.close_connection = True
            self.fake._note_disconnect()
        except Exception as exc:  # a bug in the fake or in a scripted reply: tell the client
            self._send_error(self.fake._internal_error(f"could not answer: {exc!r}"))

    def _send_stream(
        self, events: Iterable[bytes], reply: Reply, number: int, *, done: bool = True
    ) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", f"req_fake{number}")
        self.end_headers()
        cut = reply.cut_after
        frames = (_frame(e) for e in (events if cut is None else itertools.islice(events, cut)))
        tail = b"" if cut is not None else _END
        if cut is None and done:  # the Responses API has no [DONE]
            tail = _frame(_reshaped(b"data: [DONE]\n\n", reply)) + _END
        stall = reply.stall_after
        if reply.delay or stall is not None:
            sent = 0
            for i, f in enumerate(frames):
                if i == stall:
                    self.wfile.flush()
                    self.fake._stopping.wait(reply.stall_seconds)
                time.sleep(reply.delay)
                self.wfile.write(f)
                sent = i + 1
            if stall is not None and stall >= sent:
                self.fake._stopping.wait(reply.stall_seconds)
            self.wfile.write(tail)
        else:  # batched: one syscall per few hundred chunks
            batch: list[bytes] = []
            for f in frames:
                batch.append(f)
                if len(batch) == 512:
                    self.wfile.write(b"".join(batch))
                    batch.clear()
            self.wfile.write(b"".join(batch) + tail)
        if cut is not None:
            # Close without the chunked terminator: the client sees a broken stream.
            self.close_connection = True

    def _send_json(self, status: int, obj: Any, extra: Iterable[tuple[str, str]] = ()) -> None:
        self._send_raw(status, _dumps(obj), "application/json", extra)

    def _send_raw(
        self,
        status: int,
        data: bytes,
        content_type: str,
        extra: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, spec: ErrorSpec, authorization: str | None = None) -> None:
        extra = []
        if spec.retry_after is not None:
            extra.append(("retry-after", f"{spec.retry_after:g}"))
        if spec.should_retry is not None:
            extra.append(("x-should-retry", "true" if spec.should_retry else "false"))
        self._send_json(spec.status, spec.body(authorization), extra)


# ---------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fake server from the command line until it is killed (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m nbchat.testing",
        description="Serve a fake OpenAI-compatible API on 127.0.0.1; print its URL.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument(
        "--echo",
        action="store_true",
        help="echo the last user message (the default without --script; "
        "with --script: once the script is used up)",
    )
    parser.add_argument("--script", help="JSON file: a list of replies (Reply fields)")
    parser.add_argument("--model", action="append", help="model id for /v1/models (repeatable)")
    parser.add_argument("--chunk-size", type=int, default=4, help="characters per chunk")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each chunk")
    parser.add_argument("--context-window", type=int, default=None)
    args = parser.parse_args(argv)

    defaults = {"chunk_size": args.chunk_size, "delay": args.delay}

    def echo(body: dict[str, Any]) -> Reply:
        return echo_reply(body).model_copy(update=defaults)

    server = FakeOpenAIServer(
        host=args.host,
        port=args.port,
        models=args.model or ["fake-model"],
        context_window=args.context_window,
        fallback=echo if args.echo or not args.script else None,
    )
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            script = json.load(f)
        for item in script if isinstance(script, list) else [script]:
            server.enqueue(Reply.model_validate({**defaults, **item}))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with server:
        print(server.url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
