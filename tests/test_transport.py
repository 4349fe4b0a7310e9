"""The transport under the openai client: aiohttp when installed, httpx when asked for or
when aiohttp is missing. The same failures give the same errors on both, over real HTTP
(the fake server, or a socket that misbehaves on purpose)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import nbchat
from nbchat import ConfigError, ModelAPIError, Session, _http, sessions
from nbchat._assembler import ReplyAssembler
from nbchat._client import ModelClient
from nbchat._config import resolve_client
from nbchat.testing import FakeOpenAIServer

KEY = "sk-live-0123456789abcdefSECRET"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs on both transports."""
    monkeypatch.setenv(_http.TRANSPORT_ENV, request.param)
    return str(request.param)


def client(url: str, **kw: Any) -> ModelClient:
    kw.setdefault("max_retries", 0)
    return ModelClient(resolve_client("m", url, KEY), **kw)


def run(c: ModelClient, assembler: ReplyAssembler | None = None, **kw: Any) -> ReplyAssembler:
    assembler = assembler if assembler is not None else ReplyAssembler()

    async def collect() -> None:
        async for _ in c.astream(HI, assembler, **kw):
            pass

    asyncio.run(collect())
    return assembler


def error_of(c: ModelClient, assembler: ReplyAssembler | None = None, **kw: Any) -> ModelAPIError:
    with pytest.raises(ModelAPIError) as info:
        run(c, assembler, **kw)
    return info.value


def test_aiohttp_is_the_default_and_httpx_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_http.TRANSPORT_ENV, raising=False)
    assert _http.transport_of(_http.http_client(5.0)) == "aiohttp"
    monkeypatch.setenv(_http.TRANSPORT_ENV, "httpx")
    assert _http.transport_of(_http.http_client(5.0)) == "httpx"
    monkeypatch.setenv(_http.TRANSPORT_ENV, "curl")
    with pytest.raises(ConfigError, match="NBCHAT_HTTP_TRANSPORT is 'aiohttp' or 'httpx'"):
        _http.http_client(5.0)


def test_a_turn_streams_on_each_transport(fake: FakeOpenAIServer, transport: str) -> None:
    assert _http.transport_of(_http.http_client(5.0)) == transport
    fake.enqueue("hello there", chunk_size=3)
    assembler = run(client(fake.url))
    assert assembler.text == "hello there" and assembler.finish_reason == "stop"


def test_without_aiohttp_openai_falls_back_to_httpx(fake: FakeOpenAIServer) -> None:
    """aiohttp not importable (as on an install without openai's extra): httpx carries
    the turn; asking for aiohttp then says how to get it."""
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.modules["aiohttp"] = None  # import aiohttp fails, as when it is not installed
        import nbchat
        from nbchat import ConfigError, _http
        assert _http.transport_of(_http.http_client(5.0)) == "httpx"
        s = nbchat.Session(model="m", base_url={fake.url!r}, api_key="k", db=False)
        print(s.send("hi").text)
        os.environ[_http.TRANSPORT_ENV] = "aiohttp"
        try:
            _http.http_client(5.0)
        except ConfigError as exc:
            print(exc)
        """
    )
    fake.enqueue("over httpx")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(_http.TRANSPORT_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "over httpx"
    assert "pip install 'openai[aiohttp]'" in lines[1]


def test_exit_closes_kept_connections_quietly(fake: FakeOpenAIServer, transport: str) -> None:
    """send() keeps a client (and its connection) on nbchat's loop; exit closes it, so
    aiohttp has no "Unclosed client session" to report."""
    code = textwrap.dedent(
        f"""
        import nbchat
        s = nbchat.Session(model="m", base_url={fake.url!r}, api_key="k", db=False)
        print(s.send("hi").text)
        """
    )
    fake.enqueue("bye")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bye"
    assert "Unclosed" not in out.stderr and "Warning" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- failures


def test_a_refused_connection_is_a_connection_error(transport: str) -> None:
    url = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    error = error_of(client(url))
    assert str(error).startswith(f"Could not connect to the model server at {url} (")
    assert "(connection refused: nothing listens there; 1 attempt)." in str(error)


def _read_request(conn: socket.socket) -> None:
    """Read one HTTP request, its body included (``Content-Length``)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def test_a_request_whose_connection_was_never_made_costs_nothing(transport: str) -> None:
    """Nothing reached the server: $0, not "unknown" (which sessions() counts as spend it
    cannot see), even for a model whose price is known (new-user trial 4)."""
    s = Session(model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="k", db=":memory:")
    result = s.send("hi")
    assert result.status == "error" and result.cost_usd == 0.0
    spend = sessions(db=s.store)
    assert spend["cost_usd"][0] == 0.0 and spend["unknown_cost_requests"][0] == 0


def test_a_request_the_server_dropped_has_an_unknown_cost(
    bad_server: Callable[[bytes | None], str], transport: str
) -> None:
    """It reached the server, which may have billed it: the cost is not known."""
    s = Session(
        model="gpt-4o-mini", base_url=bad_server(None), api_key="k", db=":memory:", max_retries=0
    )
    result = s.send("hi")
    assert result.status == "error" and result.cost_usd is None
    assert sessions(db=s.store)["unknown_cost_requests"][0] == 1


@pytest.fixture
def bad_server() -> Iterator[Callable[[bytes | None], str]]:
    """``serve(answer)``: the URL of a server that reads a request and writes ``answer``
    (``None``: nothing), then closes the connection."""
    sockets: list[socket.socket] = []

    def serve(answer: bytes | None) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        sockets.append(listener)

        def loop() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                with conn:
                    _read_request(conn)  # all of it: a close with bytes unread is a reset
                    if answer is not None:
                        conn.sendall(answer)

        threading.Thread(target=loop, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}/v1"

    yield serve
    for listener in sockets:
        listener.close()


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (None, "Server disconnected"),
        (b"NOT HTTP AT ALL\r\n\r\n", "status line"),
    ],
)
def test_a_server_that_does_not_answer_http_is_a_connection_error_after_retries(
    bad_server: Callable[[bytes | None], str], transport: str, answer: bytes | None, detail: str
) -> None:
    url = bad_server(answer)
    error = error_of(client(url, max_retries=1))
    assert str(error).startswith(f"Could not connect to the model server at {url} (")
    assert "RemoteProtocolError" in str(error) and detail in str(error)
    assert "2 attempts" in str(error)


def test_a_cut_stream_keeps_what_arrived(fake: FakeOpenAIServer, transport: str) -> None:
    fake.enqueue("abcdef", chunk_size=1, cut_after=3)
    assembler = ReplyAssembler()
    error = error_of(client(fake.url), assembler)
    assert assembler.text == "ab"  # the first chunk holds the role alone
    assert str(error) == (
        "The model's stream broke after 3 chunks (the server closed the connection before "
        "its end); the partial reply was kept."
    )  # aiohttp's own words had a "400" in them that read as an HTTP status


def test_a_silent_stream_ends_at_the_stall_timeout(fake: FakeOpenAIServer, transport: str) -> None:
    fake.enqueue("abcdef", chunk_size=1, stall_after=2, stall_seconds=3)
    assembler = ReplyAssembler()
    error = error_of(client(fake.url, stall_timeout=0.5), assembler)
    assert assembler.text == "a"  # the first chunk holds the role alone
    assert str(error) == (
        "The model server stopped sending for 0.5 s (stall_timeout) after 2 chunks; "
        "the partial reply was kept."
    )


def test_a_server_that_never_answers_times_out(fake: FakeOpenAIServer, transport: str) -> None:
    fake.enqueue("late", stall_after=0, stall_seconds=3)
    error = error_of(client(fake.url, timeout=0.5), stream=False)
    assert "did not answer in time (connect/answer timeout 0.5 s; 1 attempt)" in str(error)


def test_429_and_500_are_retried_as_retry_after_says(
    fake: FakeOpenAIServer, transport: str
) -> None:
    fake.enqueue_error(429, "slow down", retry_after=0.2)
    fake.enqueue_error(500, "boom")
    fake.enqueue("finally")
    assert run(client(fake.url, max_retries=2)).text == "finally"
    assert len(fake.requests) == 3


def test_each_attempt_the_client_makes_is_counted(fake: FakeOpenAIServer, transport: str) -> None:
    # The openai client retries by itself; a trial saw a rate-limited turn counted as
    # one plain request. The transport's hooks see each attempt.
    fake.enqueue_error(429, "slow down", retry_after=0)
    fake.enqueue_error(503, "busy", retry_after=0)
    fake.enqueue("finally")
    c = client(fake.url, max_retries=2)
    assembler = run(c)
    assert assembler.attempts == [429, 503, 200]
    event = c.usage_event(assembler, None)
    assert (event.attempts, event.retried_after) == (3, "HTTP 429, HTTP 503")
    # An attempt that got no answer at all (the connection dropped) is one too.
    fake.enqueue("lost", cut_after=0)
    fake.enqueue("second try")
    assembler = run(c, stream=False)
    assert assembler.text == "second try" and assembler.attempts == [None, 200]
    assert c.usage_event(assembler, None).retried_after == "no answer"
    fake.enqueue("first try")
    event = c.usage_event(run(c), None)
    assert (event.attempts, event.retried_after) == (1, None)


def test_an_error_says_the_attempts_that_were_made(fake: FakeOpenAIServer, transport: str) -> None:
    # A dropped connection is retried; a 503 the server says not to retry ends it: two
    # attempts, not the three max_retries=2 would allow.
    fake.enqueue("lost", cut_after=0)
    fake.enqueue_error(503, "busy", should_retry=False)
    error = error_of(client(fake.url, max_retries=2), stream=False)
    assert str(error) == "The model server answered HTTP 503: busy (2 attempts)."


def test_a_followed_redirect_is_not_another_attempt(fake: FakeOpenAIServer, transport: str) -> None:
    class Moved(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(307)
            self.send_header("Location", fake.url + "/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fake.enqueue("moved here")
        assembler = run(client(f"http://127.0.0.1:{server.server_port}/v1"))
    finally:
        server.shutdown()
        server.server_close()
    assert assembler.text == "moved here" and assembler.attempts == [200]


def test_an_echoed_key_never_reaches_the_error(fake: FakeOpenAIServer, transport: str) -> None:
    fake.enqueue_error(401, "Incorrect API key", echo_key=True)
    error = error_of(client(fake.url))
    assert error.status_code == 401
    assert KEY not in f"{error} {error!r} {error.body!r}"


# --------------------------------------------------------------------------- environment


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself: one streamed reply."""

    seen: list[str]

    def do_POST(self) -> None:
        self.seen.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        chunk = {"choices": [{"index": 0, "delta": {"content": "via proxy"}}]}
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(done)}\n\ndata: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_proxy_from_the_environment_is_used(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    handler = type("Proxy", (_Proxy,), {"seen": seen})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        assembler = run(client("http://model.invalid/v1"))
        proxy.shutdown()
    assert assembler.text == "via proxy"
    assert seen == ["http://model.invalid/v1/chat/completions"]


def test_clients_on_fresh_loops_load_the_ca_bundle_once(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """A turn on a loop other than nbchat's opens its own client; the SSL context (the
    CA bundle, ~40 ms to load) is shared by all of them, and still verifies."""
    loads: list[Any] = []
    load = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args)
        load(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    _http._ssl_context.cache_clear()
    fake.enqueue("one", repeat=3)
    c = client(fake.url)
    for _ in range(3):
        assert run(c).text == "one"
    assert len(loads) == 1
    context = _http._ssl_context(*_http._ssl_env())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    certifi = pytest.importorskip("certifi")
    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    assert _http._ssl_context(*_http._ssl_env()) is not context  # the setting is honoured


def test_send_keeps_one_client_per_transport(fake: FakeOpenAIServer, transport: str) -> None:
    """The background loop's kept clients are per transport too: changing the setting
    between turns takes effect on the next one."""
    fake.enqueue("first", repeat=2)
    # A key no other test uses: a port the kernel hands out again (an earlier test's
    # server) would otherwise find that test's kept clients under the same URL.
    key = f"k-{uuid.uuid4().hex}"
    s = nbchat.Session(model="m", base_url=fake.url, api_key=key, db=False)
    assert s.send("a").text == "first"
    other = "httpx" if transport == "aiohttp" else "aiohttp"
    os.environ[_http.TRANSPORT_ENV] = other  # the fixture's monkeypatch restores it
    assert s.send("b").text == "first"
    from nbchat import _client

    kept = [k for k in _client._async_clients if key in k]
    assert len(kept) == 2
    assert {k[-1] for k in kept} == {transport, other}
