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
import json
import signal
import sys
import threading
from collections import deque
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any, Self

from . import _fake_responses
from ._fake_chat import replay_refusal, request_prompt
from ._fake_http import HTTPServer
from ._fake_script import (
    ErrorSpec,
    Fallback,
    Reply,
    ToolCallSpec,
    chat_request,
    echo_reply,
    estimate_prompt_tokens,
)

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

    # What the error of a request the empty queue cannot answer tells the user to do.
    _empty_hint = (
        "Call server.enqueue(...) before the request, or give FakeOpenAIServer a fallback=."
    )

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
        self._httpd: HTTPServer | None = None
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
        self._httpd = HTTPServer((self.host, self.port), self)
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
                tokens = estimate_prompt_tokens(request_prompt(body))
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
            refusal = replay_refusal(body, self.require_reasoning_replay)
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
                    f"#{number}, model {body.get('model')!r}). {self._empty_hint}",
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
        server._empty_hint = (
            f"The script {args.script} is used up: add replies to it, or add --echo to "
            "answer the rest with the last user message."
        )
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
