"""The fake OpenAI server (nbchat.testing), driven through the real openai client and raw httpx."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import ValidationError

import nbchat.testing
from nbchat.testing import (
    ErrorSpec,
    FakeOpenAIServer,
    Reply,
    ToolCallSpec,
    echo_reply,
    estimate_prompt_tokens,
)

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def client(server: FakeOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=server.url, api_key="sk-test-secret", max_retries=0, timeout=10
    ) as c:
        yield c


def sse_payloads(server: FakeOpenAIServer, body: dict[str, Any]) -> list[Any]:
    """POST a streamed request with raw httpx; the decoded ``data:`` payloads, in order."""
    out: list[Any] = []
    url = f"{server.url}/chat/completions"
    with httpx.Client(timeout=10) as h, h.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream_text(client: openai.OpenAI, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(model="m1", messages=MESSAGES, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_docstring_example_runs() -> None:
    assert nbchat.testing.__doc__ is not None
    code = re.search(r"```python\n(.*?)```", nbchat.testing.__doc__, re.S)
    assert code is not None
    exec(compile(code.group(1), "nbchat.testing docstring", "exec"), {})


def test_streamed_text_reassembles_exactly(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    text = "The quick brown fox jumps over the lazy dog.\nSecond line."
    server.enqueue(text, chunk_size=3)
    got, chunks = stream_text(client, stream_options={"include_usage": True})
    assert got == text
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == -(-len(text) // 3)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.model for c in chunks} == {"m1"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-2].choices[0].finish_reason == "stop"
    # the usage chunk comes last, with empty choices and the automatic estimate
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.prompt_tokens == estimate_prompt_tokens(MESSAGES)
    assert usage.completion_tokens == -(-len(text) // 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_wire_format_and_done(server: FakeOpenAIServer) -> None:
    server.enqueue("abcdef", chunk_size=4)
    body = {
        "model": "wire",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_payloads(server, body)
    assert events[-1] == "[DONE]"
    first, *middle, finish, usage = events[:-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [e["choices"][0]["delta"]["content"] for e in middle] == ["abcd", "ef"]
    for e in [first, *middle, finish]:
        assert e["object"] == "chat.completion.chunk" and e["model"] == "wire"
        assert e["usage"] is None  # as OpenAI does when include_usage is on
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    # without include_usage: no usage key and no usage chunk at all
    server.enqueue("abcdef", chunk_size=4)
    events = sse_payloads(server, {"model": "wire", "messages": MESSAGES, "stream": True})
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_multibyte_characters_split_across_chunks(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    text = "héllo 🌍 世界 👩\u200d👩\u200d👧 ça va? 🇫🇷"
    server.enqueue(text, chunk_size=1)
    assert stream_text(client)[0] == text
    pieces = ["日本", "語の", "テキ", "スト🎌", "👍🏽"]
    server.enqueue(chunks=pieces)
    got, chunks = stream_text(client)
    assert got == "".join(pieces)
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == pieces
    # raw UTF-8 on the wire, not \\u escapes
    server.enqueue("世界")
    with httpx.Client() as h:
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        raw = h.post(f"{server.url}/chat/completions", json=body).content
    assert "世界".encode() in raw


def test_parallel_tool_calls_interleave_and_reassemble(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    calls = [
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_time", "arguments": {"tz": "Europe/Paris"}, "id": "call_fixed"},
        {"name": "broken", "arguments": '{"x": 1, "y": [unterminated'},
    ]
    reply = server.enqueue(tool_calls=calls, chunk_size=3)
    server.enqueue(reply)
    # the wire: after the three headers, argument fragments alternate between indices
    events = sse_payloads(server, {"model": "m", "messages": MESSAGES, "stream": True})
    order = [
        e["choices"][0]["delta"]["tool_calls"][0]["index"]
        for e in events[:-1]
        if e["choices"][0]["delta"].get("tool_calls")
    ]
    assert order[:6] == [0, 1, 2, 0, 1, 2]
    assert order != sorted(order)
    # the real client: fold the deltas per index
    _, chunks = stream_text(client)
    folded: dict[int, dict[str, str]] = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            slot = folded.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            if tc.function is not None:
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
    assert folded == {
        0: {
            "id": "call_2_0",
            "name": "get_weather",
            "arguments": '{"city":"Paris","unit":"celsius"}',
        },
        1: {"id": "call_fixed", "name": "get_time", "arguments": '{"tz":"Europe/Paris"}'},
        2: {"id": "call_2_2", "name": "broken", "arguments": '{"x": 1, "y": [unterminated'},
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[0].choices[0].delta.content is None


def test_reasoning_content_and_explicit_usage(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    usage = {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 5},
    }
    server.enqueue("Answer.", reasoning="Let me think about it.", usage=usage)
    _, chunks = stream_text(client, stream_options={"include_usage": True})
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    assert reasoning == "Let me think about it."
    got = chunks[-1].usage
    assert got is not None and got.prompt_tokens_details is not None
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (11, 7, 18)
    assert got.prompt_tokens_details.cached_tokens == 5


def test_no_usage_even_when_asked(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.enqueue("no usage here", usage=None)
    text, chunks = stream_text(client, stream_options={"include_usage": True})
    assert text == "no usage here"
    assert all(c.usage is None and c.choices for c in chunks)
    server.enqueue("nor here", usage=None)
    completion = client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.usage is None


def test_non_stream_json_reply(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.enqueue(
        "Calling a tool.",
        tool_calls=[ToolCallSpec(name="f", arguments={"a": [1, 2]})],
        reasoning="hmm",
        finish_reason="length",
    )
    completion = client.chat.completions.create(model="plain", messages=MESSAGES)
    assert completion.object == "chat.completion" and completion.model == "plain"
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "Calling a tool."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_1_0",
        "f",
        '{"a":[1,2]}',
    )
    assert (choice.message.model_extra or {})["reasoning_content"] == "hmm"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == estimate_prompt_tokens(MESSAGES)
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 1


def test_http_errors_raise_matching_openai_exceptions(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.enqueue_error(429, "Rate limit reached, slow down", retry_after=2)
    server.enqueue_error(500, "The server had an error")
    server.enqueue_error(
        400,
        "This model's maximum context length is 10 tokens",
        code="context_length_exceeded",
        param="messages",
    )
    with pytest.raises(openai.RateLimitError) as rate:
        client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert rate.value.status_code == 429
    assert rate.value.response.headers["retry-after"] == "2"
    assert rate.value.body == {
        "message": "Rate limit reached, slow down",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    with pytest.raises(openai.InternalServerError) as internal:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert internal.value.status_code == 500
    assert "The server had an error" in str(internal.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert bad.value.code == "context_length_exceeded"
    assert bad.value.param == "messages" and bad.value.type == "invalid_request_error"
    assert len(server.requests) == 3


def test_retry_after_is_honoured_by_client_retries(server: FakeOpenAIServer) -> None:
    server.enqueue_error(429, "slow down", retry_after=0.1)
    server.enqueue("second try")
    with openai.OpenAI(base_url=server.url, api_key="k", max_retries=1) as c:
        completion = c.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.choices[0].message.content == "second try"
    assert len(server.requests) == 2


def test_enqueue_error_takes_every_field_of_the_error_spec(server: FakeOpenAIServer) -> None:
    spec = server.enqueue_error(503, "busy", should_retry=False, type="overloaded").error
    assert spec == ErrorSpec(status=503, message="busy", should_retry=False, type="overloaded")
    r = httpx.post(f"{server.url}/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert (r.status_code, r.headers["x-should-retry"]) == (503, "false")
    with pytest.raises(ValidationError, match="retry_afterr"):
        server.enqueue_error(429, retry_afterr=1)


def test_context_window_rejects_long_prompts_without_using_the_queue(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.context_window = 50
    server.enqueue("short answer")
    long_messages: Any = [{"role": "user", "content": "word " * 100}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=long_messages)
    assert bad.value.code == "context_length_exceeded"
    assert "maximum context length is 50 tokens" in str(bad.value)
    assert server.pending == 1
    assert stream_text(client)[0] == "short answer"


def test_cut_stream_breaks_the_client(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.enqueue("0123456789" * 5, chunk_size=5, cut_after=3)
    received: list[str] = []
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    with pytest.raises((httpx.RemoteProtocolError, openai.APIConnectionError)):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    stream.close()
    assert "".join(received) == "0123456789"  # the role chunk + two text chunks arrived
    # a non-streamed reply with cut_after is dropped before any byte
    server.enqueue("never sent", cut_after=0)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MESSAGES)
    # the server stays healthy
    server.enqueue("after the cut")
    assert stream_text(client)[0] == "after the cut"


def test_empty_queue_answers_an_explicit_error(server: FakeOpenAIServer) -> None:
    # default retries: x-should-retry: false stops the client from retrying in vain
    with (
        openai.OpenAI(base_url=server.url, api_key="k", max_retries=2) as c,
        pytest.raises(openai.InternalServerError) as err,
    ):
        c.chat.completions.create(model="mine", messages=MESSAGES)
    assert err.value.status_code == 500
    assert "FakeOpenAIServer: the reply queue is empty" in str(err.value)
    assert "model 'mine'" in str(err.value) and "enqueue" in str(err.value)
    assert err.value.code == "fake_queue_empty"
    assert len(server.requests) == 1


def test_fallback_and_repeat(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.enqueue("again", repeat=2)
    assert [stream_text(client)[0] for _ in range(2)] == ["again", "again"]
    server.fallback = echo_reply
    assert stream_text(client)[0] == "Echo: hi"
    server.fallback = lambda body: f"{len(body['messages'])} messages"
    assert stream_text(client)[0] == "1 messages"
    server.fallback = Reply(text="constant")
    assert stream_text(client)[0] == "constant"

    def broken(body: dict[str, Any]) -> str:
        raise ValueError("oops")

    server.fallback = broken
    with pytest.raises(openai.InternalServerError, match="the fallback raised ValueError"):
        stream_text(client)
    assert server.errors == ["the fallback raised ValueError('oops')"]


def test_client_disconnect_is_quiet_and_does_not_stall(
    server: FakeOpenAIServer, client: openai.OpenAI, capfd: pytest.CaptureFixture[str]
) -> None:
    server.enqueue("x" * 400, chunk_size=1, delay=0.01)
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    server.enqueue("next one")
    started = time.perf_counter()
    assert stream_text(client)[0] == "next one"
    assert time.perf_counter() - started < 3.0  # not after the cut reply's 4 s
    deadline = time.monotonic() + 5
    while server.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.disconnects == 1
    assert server.errors == []
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_slow_stream_does_not_block_other_requests(server: FakeOpenAIServer) -> None:
    server.enqueue("slow" * 5, chunk_size=1, delay=0.1)  # ~2 s
    server.enqueue("fast")
    arrivals: list[float] = []

    def slow() -> None:
        with openai.OpenAI(base_url=server.url, api_key="k", max_retries=0) as c:
            stream = c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            arrivals.extend(time.perf_counter() for _ in stream)

    thread = threading.Thread(target=slow)
    thread.start()
    server.wait_for_requests(1)
    with openai.OpenAI(base_url=server.url, api_key="k", max_retries=0) as c:
        assert stream_text(c)[0] == "fast"
        fast_done = time.perf_counter()
    thread.join(5)
    assert len(arrivals) == 22
    assert fast_done < arrivals[-1]  # answered while the slow stream was still going
    # delayed chunks are sent one by one as they are due, not buffered to the end
    assert arrivals[-1] - arrivals[1] > 0.2


def test_async_client_streams_concurrently(server: FakeOpenAIServer) -> None:
    for i in range(5):
        server.enqueue(f"reply {i}", chunk_size=1, delay=0.15)  # each open ~1 s
    firsts: list[float] = []
    ends: list[float] = []

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0) as c:

            async def one() -> str:
                stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                text = ""
                async for chunk in stream:
                    if chunk.choices[0].delta.role:  # only the first chunk has it
                        firsts.append(time.perf_counter())
                    text += chunk.choices[0].delta.content or ""
                ends.append(time.perf_counter())
                return text

            return await asyncio.gather(*(one() for _ in range(5)))

    texts = asyncio.run(run())
    assert sorted(texts) == [f"reply {i}" for i in range(5)]
    assert max(firsts) < min(ends)  # all five streams were open at the same time


def test_models_endpoint() -> None:
    with (
        FakeOpenAIServer(models=["alpha", "beta"]) as srv,
        openai.OpenAI(base_url=srv.url, api_key="k", max_retries=0) as c,
    ):
        assert [m.id for m in c.models.list()] == ["alpha", "beta"]
        assert c.models.retrieve("beta").id == "beta"
        with pytest.raises(openai.NotFoundError) as missing:
            c.models.retrieve("gamma")
        assert missing.value.code == "model_not_found"


def test_unknown_routes_and_bad_json_get_openai_errors(server: FakeOpenAIServer) -> None:
    with httpx.Client() as h:
        r = h.post(f"{server.url}/embeddings", json={"input": "x"})
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "Invalid URL (POST /v1/embeddings)"
        r = h.post(f"{server.url}/chat/completions", content=b"{not json")
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert server.requests == []


def test_requests_and_headers_are_recorded_without_keys(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.enqueue("one")
    server.enqueue("two")
    stream_text(client, temperature=0.5)
    client.chat.completions.create(model="m2", messages=[{"role": "user", "content": "yo"}])
    requests = server.wait_for_requests(2, timeout=1)
    assert [r["model"] for r in requests] == ["m1", "m2"]
    assert requests[0]["stream"] is True and requests[0]["temperature"] == 0.5
    assert requests[1]["messages"] == [{"role": "user", "content": "yo"}]
    headers = server.request_headers
    assert len(headers) == 2 and headers[0]["content-type"] == "application/json"
    assert "authorization" not in headers[0]
    assert "sk-test-secret" not in json.dumps(headers)
    with pytest.raises(TimeoutError, match="got 2 requests, expected 3"):
        server.wait_for_requests(3, timeout=0.05)
    server.reset()
    assert server.requests == [] and server.pending == 0


def test_reply_validation() -> None:
    with pytest.raises(ValidationError):
        Reply(text="abc", chunks=["x"])
    with pytest.raises(ValidationError):
        Reply(txt="typo")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Reply(chunk_size=0)
    assert Reply(chunks=["a", "b"]).text == "ab"
    assert Reply(text="abcde", chunk_size=2).text_pieces() == ["ab", "cd", "e"]
    assert ToolCallSpec(name="f", arguments={"é": 1}).arguments_json() == '{"é":1}'


def test_start_stop_and_explicit_port() -> None:
    srv = FakeOpenAIServer().start()
    port = srv.port
    assert srv.url == f"http://127.0.0.1:{port}/v1"
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.url
    with FakeOpenAIServer(port=port) as again, httpx.Client() as h:
        assert again.port == port
        assert h.get(f"{again.url}/models").json()["data"][0]["id"] == "fake-model"


def test_streaming_throughput(server: FakeOpenAIServer) -> None:
    n = 20_000
    server.enqueue("x" * n, chunk_size=1)
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    started = time.perf_counter()
    events = 0
    url = f"{server.url}/chat/completions"
    with httpx.Client(timeout=10) as h, h.stream("POST", url, json=body) as r:
        for line in r.iter_lines():
            events += line.startswith("data: {")
    rate = events / (time.perf_counter() - started)
    print(f"\nfake server streamed {rate:,.0f} chunks/s to httpx")
    assert events == n + 2  # role chunk + n content chunks + finish chunk
    assert rate > 1_000  # ~25,000 on an idle machine; a syscall per byte would be ~100


def test_command_line_serves_until_killed(tmp_path: Any) -> None:
    script = tmp_path / "replies.json"
    script.write_text(
        json.dumps([{"text": "scripted"}, {"error": {"status": 429, "message": "busy"}}])
    )
    cmd = [sys.executable, "-m", "nbchat.testing", "--port", "0", "--script", str(script), "--echo"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url), url
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
            assert stream_text(c)[0] == "scripted"
            with pytest.raises(openai.RateLimitError):
                c.chat.completions.create(model="m", messages=MESSAGES)
            assert stream_text(c)[0] == "Echo: hi"
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert err == ""


def test_a_used_up_command_line_script_says_how_to_go_on(tmp_path: Any) -> None:
    """It said to call server.enqueue(...), which a command-line user cannot."""
    script = tmp_path / "replies.json"
    script.write_text(json.dumps([{"text": "scripted"}]))
    cmd = [sys.executable, "-m", "nbchat.testing", "--port", "0", "--script", str(script)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as c:
            assert stream_text(c)[0] == "scripted"
            with pytest.raises(openai.InternalServerError) as raised:
                c.chat.completions.create(model="m", messages=MESSAGES)
        proc.terminate()
        proc.communicate(timeout=10)
    said = str(raised.value)
    assert f"The script {script} is used up" in said and "--echo" in said
    assert "enqueue" not in said


def raw_stream(server: FakeOpenAIServer, **body: Any) -> tuple[httpx.Response, bytes]:
    """POST a streamed request with raw httpx; the response and its whole (de-chunked) body."""
    request = {"model": "m1", "messages": MESSAGES, "stream": True, **body}
    with (
        httpx.Client(timeout=10) as h,
        h.stream("POST", f"{server.url}/chat/completions", json=request) as r,
    ):
        return r, r.read()


@pytest.mark.parametrize("ending", ["\r", "\r\n"])
def test_line_endings_variant_is_valid_sse(
    server: FakeOpenAIServer, client: openai.OpenAI, ending: str
) -> None:
    server.enqueue("one two three", chunk_size=4, line_ending=ending, repeat=2)
    _, body = raw_stream(server)
    assert body.endswith(f"data: [DONE]{ending}{ending}".encode())
    if ending == "\r":
        assert b"\n" not in body
    assert stream_text(client)[0] == "one two three"  # the openai SDK reads it


def test_multiline_data_variant_is_valid_sse(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.enqueue('a, "quoted" text', chunk_size=3, multiline_data=True, repeat=2)
    _, body = raw_stream(server)
    first_event = body.split(b"\n\n")[0].split(b"\n")
    assert len(first_event) > 3 and all(line.startswith(b"data: ") for line in first_event)
    assert stream_text(client)[0] == 'a, "quoted" text'


def test_raw_body_is_answered_verbatim(server: FakeOpenAIServer) -> None:
    server.enqueue(raw_body="<html>portal</html>")
    server.enqueue(raw_body="gone", raw_status=502, raw_content_type="text/plain")
    r, body = raw_stream(server)
    assert (r.status_code, r.headers["content-type"], body) == (
        200,
        "text/html; charset=utf-8",
        b"<html>portal</html>",
    )
    r = httpx.post(f"{server.url}/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert (r.status_code, r.headers["content-type"], r.text) == (502, "text/plain", "gone")


def test_usage_json_is_sent_verbatim(server: FakeOpenAIServer) -> None:
    raw = '{"prompt_tokens": 18446744073709551616, "completion_tokens": -1.5e400}'
    server.enqueue("x", usage_json=raw, repeat=2)
    _, body = raw_stream(server, stream_options={"include_usage": True})
    assert b'"usage":' + raw.encode() + b"}" in body
    r = httpx.post(f"{server.url}/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert b'"usage":' + raw.encode() + b"}" in r.content


def test_stall_pauses_after_n_chunks(server: FakeOpenAIServer) -> None:
    server.enqueue("abcdef", chunk_size=1, stall_after=3, stall_seconds=1.0)
    arrivals: list[tuple[float, bytes]] = []
    request = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx.Client(timeout=10) as h:
        t0 = time.perf_counter()
        with h.stream("POST", f"{server.url}/chat/completions", json=request) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.perf_counter() - t0, line.encode()))
    assert len(arrivals) == 9  # role, 6 text chunks, finish, [DONE]
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(arrivals)]
    # The one long silence is after the third chunk (role chunk, "a", "b", then "c"...).
    assert gaps[2] >= 0.95 and max(gaps[:2] + gaps[3:]) < gaps[2] - 0.5, gaps


def test_stop_wakes_a_stalled_reply() -> None:
    with FakeOpenAIServer() as server:
        server.enqueue("x", stall_after=0, stall_seconds=60)
        request = {"model": "m", "messages": MESSAGES, "stream": True}
        h = httpx.Client(timeout=1)
        with h.stream("POST", f"{server.url}/chat/completions", json=request) as r:
            assert r.status_code == 200
        h.close()
        t0 = time.perf_counter()
    assert time.perf_counter() - t0 < 5


def test_lone_surrogates_go_out_as_json_escapes(server: FakeOpenAIServer) -> None:
    server.enqueue("a\udcffb")
    server.enqueue_error(500, "bad \ud800 error")
    _, body = raw_stream(server)
    assert b'"content":"a\\udcffb"' in body
    r = httpx.post(f"{server.url}/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert b"bad \\ud800 error" in r.content


# ---------------------------------------------------------------------- Responses API and more


def test_responses_stream_from_the_same_script(server: FakeOpenAIServer) -> None:
    server.enqueue(
        "Hi!", reasoning="Greet.", tool_calls=[{"name": "f", "arguments": {"a": 1}}], chunk_size=2
    )
    with (
        httpx.Client(timeout=10) as h,
        h.stream(
            "POST", f"{server.url}/responses", json={"model": "m", "input": "hi", "stream": True}
        ) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == names, "each event: line names its data"
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed" and "[DONE]" not in "".join(lines)
    text = "".join(d["delta"] for d in data if d["type"] == "response.output_text.delta")
    summary = "".join(
        d["delta"] for d in data if d["type"] == "response.reasoning_summary_text.delta"
    )
    args = "".join(
        d["delta"] for d in data if d["type"] == "response.function_call_arguments.delta"
    )
    assert (text, summary, args) == ("Hi!", "Greet.", '{"a":1}')
    usage = data[-1]["response"]["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["output_tokens_details"]["reasoning_tokens"] == 2
    assert server.request_paths == ["/v1/responses"]


def test_responses_usage_is_renamed_and_extra_fields_kept(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.enqueue("x", usage={"prompt_tokens": 5, "completion_tokens": 2, "cost": 0.01})
    r = client.responses.create(model="m", input="hi")
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (5, 2)
    assert r.usage.model_extra == {"cost": 0.01}
    assert server.requests[0]["input"] == "hi"


def test_stream_error_on_chat_completions(server: FakeOpenAIServer) -> None:
    server.enqueue("so far", stream_error={"status": 500, "message": "overloaded"})
    payloads = sse_payloads(server, {"model": "m", "messages": MESSAGES, "stream": True})
    assert payloads[-2] == {
        "error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}
    }
    assert payloads[-1] == "[DONE]"
    assert all(
        p == "[DONE]" or "error" in p or p["choices"][0]["finish_reason"] is None for p in payloads
    )


def test_model_info_props_and_azure_paths() -> None:
    info = {"big": {"max_model_len": 32768}}
    props = {"default_generation_settings": {"n_ctx": 2048}}
    with FakeOpenAIServer(models=["big"], model_info=info, props=props) as srv, httpx.Client() as h:
        assert h.get(f"{srv.url}/models").json()["data"][0]["max_model_len"] == 32768
        root = srv.url.removesuffix("/v1")
        assert h.get(f"{root}/props").json() == props
        srv.enqueue("az")
        url = f"{root}/openai/deployments/dep/chat/completions?api-version=2024-10-21"
        r = h.post(url, json={"messages": MESSAGES})
        assert r.json()["choices"][0]["message"]["content"] == "az"
        assert srv.request_paths == [
            "/openai/deployments/dep/chat/completions?api-version=2024-10-21"
        ]
    with FakeOpenAIServer() as srv, httpx.Client() as h:
        assert h.get(f"{srv.url.removesuffix('/v1')}/props").status_code == 404


def test_a_scripted_reply_shows_only_what_was_scripted() -> None:
    """enqueue() returns its Reply, often as a cell's last line: its repr names the
    fields given, not the twenty defaults."""
    with FakeOpenAIServer() as fake:
        reply = fake.enqueue("hello", chunk_size=2)
        assert repr(reply) == "Reply(text='hello', chunk_size=2)"
        error = fake.enqueue_error(429, retry_after=1)
        assert "chunk_size" not in repr(error) and "retry_after=1" in repr(error)
    call = Reply(tool_calls=[{"name": "f", "arguments": {"x": 1}}])
    assert repr(call) == "Reply(tool_calls=[ToolCallSpec(name='f', arguments={'x': 1})])"
