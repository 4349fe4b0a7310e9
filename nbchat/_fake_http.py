"""The fake server's HTTP side: a threading server that can drop its connections, and
the handler that routes each request to ``FakeOpenAIServer`` and sends its answer."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

from . import _fake_responses
from ._fake_chat import END, calls_of, completion, frame, reshaped, stream_events, usage_for
from ._fake_script import ErrorSpec, Reply, dumps

if TYPE_CHECKING:
    from .testing import FakeOpenAIServer

__all__ = ["HTTPServer"]

# Headers that may carry credentials: never recorded.
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
)


class HTTPServer(ThreadingHTTPServer):
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
        return cast(HTTPServer, self.server).fake

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
                    calls_of(reply, number),
                    usage_for(reply, body, calls_of(reply, number)),
                )
                events = [reshaped(e, reply) for e in events]
                self._send_stream(events, reply, number, done=False)
            elif stream:
                self._send_stream(stream_events(reply, body, number), reply, number)
            elif reply.cut_after is not None:
                self.close_connection = True  # dropped before any byte of the answer
            else:
                calls = calls_of(reply, number)
                payload = (
                    _fake_responses.response_object(
                        reply, body, number, calls, usage_for(reply, body, calls)
                    )
                    if responses
                    else completion(reply, body, number)
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
        frames = (frame(e) for e in (events if cut is None else itertools.islice(events, cut)))
        tail = b"" if cut is not None else END
        if cut is None and done:  # the Responses API has no [DONE]
            tail = frame(reshaped(b"data: [DONE]\n\n", reply)) + END
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
        self._send_raw(status, dumps(obj), "application/json", extra)

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
