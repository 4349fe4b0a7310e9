"""What a misbehaving server sends, through the fake server over real HTTP, and what the
client makes of it: keys echoed in errors, unusual SSE, HTML pages, stalls, odd usage,
lone surrogates, unreachable servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest

import nbchat
from nbchat import ConfigError, ModelAPIError, Session
from nbchat._assembler import ReplyAssembler
from nbchat._client import ModelClient
from nbchat._config import resolve_client
from nbchat._events import Event
from nbchat._http import _http_library
from nbchat._pricing import forget_price, register_price
from nbchat._wire import SSEParser
from nbchat.testing import FakeOpenAIServer

KEY = "sk-live-0123456789abcdefSECRET"
HI = [{"role": "user", "content": "hi"}]


def client_for(fake: FakeOpenAIServer, key: str | None = KEY, **kw: Any) -> ModelClient:
    kw.setdefault("max_retries", 0)
    return ModelClient(resolve_client("m", fake.url, key), **kw)


def run(client: ModelClient, assembler: ReplyAssembler | None = None, **kw: Any) -> list[Event]:
    async def collect() -> list[Event]:
        f = assembler if assembler is not None else ReplyAssembler()
        return [e async for e in client.astream(kw.pop("messages", HI), f, **kw)]

    return asyncio.run(collect())


def error_of(
    client: ModelClient, assembler: ReplyAssembler | None = None, **kw: Any
) -> ModelAPIError:
    with pytest.raises(ModelAPIError) as info:
        run(client, assembler, **kw)
    return info.value


def all_text(error: BaseException) -> str:
    """Everything an error could show: message, repr, body, code, and its whole chain."""
    parts = []
    seen: BaseException | None = error
    while seen is not None:
        parts += [str(seen), repr(seen), repr(getattr(seen, "body", None))]
        parts.append(str(getattr(seen, "code", None)))
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return "\n".join(parts)


# --------------------------------------------------------------------------- A. secrets


def test_fake_server_echoes_the_key_in_a_401(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(401, "Incorrect API key provided", echo_key=True)
    with (
        openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=0) as raw,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        raw.chat.completions.create(model="m", messages=HI)  # type: ignore[arg-type]
    assert f"Authorization: Bearer {KEY}" in str(info.value.body)


def test_a_401_echoing_the_key_is_redacted_from_message_body_and_chain(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue_error(401, f"Incorrect API key provided: {KEY}.", echo_key=True)
    error = error_of(client_for(fake))
    assert error.status_code == 401
    assert KEY not in all_text(error)
    assert "Bearer [redacted]" in str(error) and "[redacted]" in json.dumps(error.body)
    assert error.__cause__ is None and error.__suppress_context__


def test_key_shapes_are_redacted_even_when_the_key_is_another(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(500, "upstream said: bad key sk-other-9876543210zyxwvu for org")
    error = error_of(client_for(fake))
    assert "sk-other-9876543210zyxwvu" not in all_text(error)
    assert "sk-[redacted]" in str(error)


def test_a_session_never_shows_or_stores_an_echoed_key(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    fake.enqueue_error(401, "Incorrect API key provided", echo_key=True)
    s = Session(model="m", base_url=fake.url, api_key=KEY, db=db_path, max_retries=0)
    result = s.send("hi")
    assert result.status == "error" and result.error
    assert KEY not in result.error and KEY not in repr(result)
    assert "api_key= argument" in result.error  # F: which key was used, never the key
    requests = nbchat.sql("SELECT error FROM requests", db=db_path)
    turns = nbchat.sql("SELECT error FROM turns", db=db_path)
    stored = [*requests["error"], *turns["error"]]
    assert len(stored) == 2 and all(e and KEY not in e for e in stored)


# --------------------------------------------------------------------------- F. messages


def test_a_401_names_where_the_key_came_from(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake.enqueue_error(401, "Incorrect API key provided")
    error = error_of(client_for(fake, key=None))
    assert "came from OPENAI_API_KEY" in str(error)
    assert "%chat config api_key=" in str(error) and KEY not in str(error)

    nbchat.configure(api_key="sk-from-the-kernel-123456")
    fake.enqueue_error(401, "Incorrect API key provided")
    assert "%chat config" in str(error_of(client_for(fake, key=None)))


def test_could_not_connect_names_the_url() -> None:
    url = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    client = ModelClient(resolve_client("m", url, "k"), max_retries=0)
    error = error_of(client)
    # The reason in words; the transport's text (addresses, errno, "ssl:default") left out.
    assert str(error) == (
        f"Could not connect to the model server at {url} (connection refused: nothing "
        "listens there; 1 attempt)."
    )


def test_a_host_that_does_not_resolve_says_so() -> None:
    url = "http://no-such-host.invalid/v1"
    client = ModelClient(resolve_client("m", url, "k"), max_retries=0)
    assert "(the host name could not be resolved; 1 attempt)" in str(error_of(client))


def test_a_401_reads_as_sentences(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(401, "Incorrect API key provided")
    message = str(error_of(client_for(fake, key="sk-test-123456789")))
    assert "Incorrect API key provided. The key sent came from" in message
    assert "...." not in message and message.endswith(".")


def test_a_retried_status_says_how_many_attempts_were_made(fake: FakeOpenAIServer) -> None:
    # A trial's 429 line read as one refusal, after 2 s of retries it did not mention.
    fake.enqueue_error(429, "slow down", retry_after=0, repeat=3)
    message = str(error_of(client_for(fake, max_retries=2)))
    assert message == "The model server answered HTTP 429: slow down (3 attempts)."
    assert len(fake.requests) == 3
    # Not retried: a 400, or a status the server said not to retry, or no retries set.
    for status, fields, retries in ((400, {}, 2), (503, {"should_retry": False}, 2), (429, {}, 0)):
        fake.enqueue_error(status, "no", **fields)
        said = str(error_of(client_for(fake, max_retries=retries)))
        assert said == f"The model server answered HTTP {status}: no", said


def test_no_model_names_the_notebook_command() -> None:
    with pytest.raises(ConfigError, match="%chat local"):
        resolve_client(None, "http://127.0.0.1:1/v1", None)


# --------------------------------------------------------------------------- B. SSE


@pytest.mark.parametrize(
    "variant",
    [{"line_ending": "\r"}, {"line_ending": "\r\n"}, {"multiline_data": True}],
    ids=["cr", "crlf", "multiline-data"],
)
def test_valid_sse_variants_parse(fake: FakeOpenAIServer, variant: dict[str, Any]) -> None:
    text = 'Line one.\nLine two, with \r a CR and a quote: ", and a comma,'
    fake.enqueue(text, chunk_size=3, tool_calls=[{"name": "f", "arguments": {"a": [1, 2]}}])
    fake.enqueue(**variant, text=text, chunk_size=3, tool_calls=[{"name": "f", "arguments": {}}])
    assembler = ReplyAssembler()
    run(client_for(fake), ReplyAssembler())
    run(client_for(fake), assembler)
    assert assembler.text == text and assembler.finish_reason == "tool_calls"
    assert [c.name for c in assembler.tool_calls()] == ["f"]
    assert assembler.usage is not None and assembler.usage.completion_tokens


def test_parser_joins_data_lines_and_handles_line_ends_split_across_reads() -> None:
    stream = b': ping\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: x\rdata: [DONE]\r\r'
    parser = SSEParser()
    payloads = [p for i in range(len(stream)) for p in parser.feed(stream[i : i + 1])]
    assert payloads == [b'{"a":\n1}'] and not parser.done  # the last CR may start a CRLF
    assert parser.close() == [] and parser.done and parser.events == 2
    last = SSEParser()
    assert last.feed(b'data: {"b": 2}') == [] and last.close() == [b'{"b": 2}']


def test_a_200_html_page_says_so(fake: FakeOpenAIServer) -> None:
    page = "<!DOCTYPE html><html><head><title>Sign in to the Wi-Fi</title>" + "x" * 500
    fake.enqueue(raw_body=page + f"\n<p>{KEY}</p></html>", repeat=2)
    for stream in (True, False):
        message = str(error_of(client_for(fake), stream=stream))
        assert "answered HTTP 200 with an HTML page (text/html), not " in message
        assert "<!DOCTYPE html><html><head><title>Sign in" in message
        assert "chunks" not in message and KEY not in message
        assert len(message) < 600  # the first line is quoted, bounded


def test_a_200_that_is_neither_html_nor_sse_quotes_its_first_line(fake: FakeOpenAIServer) -> None:
    fake.enqueue(raw_body="Bad gateway: sk-abcdefgh12345678 refused\nmore", raw_content_type="")
    message = str(error_of(client_for(fake)))
    assert (
        "answered HTTP 200 with a body without a content type, not an event stream "
        "(first line: 'Bad gateway: sk-[redacted] refused')"
    ) in message


def test_a_json_answer_to_a_stream_request_is_folded(fake: FakeOpenAIServer) -> None:
    body = {"choices": [{"message": {"content": "plain"}, "finish_reason": "stop"}]}
    fake.enqueue(raw_body=json.dumps(body), raw_content_type="application/json")
    assembler = ReplyAssembler()
    run(client_for(fake), assembler)
    assert assembler.text == "plain" and assembler.finish_reason == "stop"


# --------------------------------------------------------------------------- C. stalls


def test_streams_default_to_a_60_s_stall_timeout(fake: FakeOpenAIServer) -> None:
    fake.enqueue("hi", repeat=2)
    client = client_for(fake)
    assert client.stall_timeout == 60.0
    run(client)
    run(client, stream=False)
    # The openai client tells the server its read timeout: 60 s streamed, `timeout` not.
    sent = [h["x-stainless-read-timeout"] for h in fake.request_headers]
    assert [float(t) for t in sent] == [60.0, 600.0]


def test_a_stalled_stream_fails_fast_and_keeps_the_partial_reply(fake: FakeOpenAIServer) -> None:
    fake.enqueue("abcdefgh", chunk_size=1, stall_after=4, stall_seconds=10)
    assembler = ReplyAssembler()
    error = error_of(client_for(fake, stall_timeout=0.3), assembler)
    assert str(error) == (
        "The model server stopped sending for 0.3 s (stall_timeout) after 4 chunks; "
        "the partial reply was kept."
    )
    assert assembler.text == "abc"  # chunk 1 is the role-only delta


def test_a_non_streamed_wait_is_bounded_by_timeout_with_a_detail(fake: FakeOpenAIServer) -> None:
    fake.enqueue("late", stall_after=0, stall_seconds=10)
    message = str(error_of(client_for(fake, timeout=0.3), stream=False))
    assert message.startswith("The model server at http://127.0.0.1:")
    assert "did not answer in time (connect/answer timeout 0.3 s; 1 attempt)" in message


def test_a_stall_before_any_chunk_under_timeout_only(fake: FakeOpenAIServer) -> None:
    fake.enqueue("x", stall_after=0, stall_seconds=10)
    message = str(error_of(client_for(fake, timeout=0.3, stall_timeout=None)))
    assert (
        message
        == "The model server sent nothing for 0.3 s (timeout) while answering; 0 chunks arrived."
    )


# --------------------------------------------------------------------------- D. usage


@pytest.mark.parametrize(
    ("usage_json", "prompt", "completion", "cached"),
    [
        ('{"prompt_tokens": 18446744073709551616, "completion_tokens": 5}', None, 5, None),
        ('{"prompt_tokens": 9223372036854775807, "completion_tokens": 0}', 2**63 - 1, 0, None),
        ('{"prompt_tokens": -3, "completion_tokens": -0.4}', None, 0, None),
        ('{"prompt_tokens": 12.6, "completion_tokens": "n/a"}', 13, None, None),
        ('{"prompt_tokens": "40", "completion_tokens": 1e400}', 40, None, None),
        ('{"prompt_tokens": true, "completion_tokens": [1]}', None, None, None),
        ('{"prompt_tokens": 7, "prompt_tokens_details": "n/a"}', 7, None, None),
        ('{"prompt_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2.2}}', 7, None, 2),
        # Cached tokens are counted in the prompt: more than the prompt is unknown.
        ('{"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}}', 10, None, None),
        ('{"input_tokens": 10, "input_tokens_details": {"cached_tokens": 11}}', 10, None, None),
        ('{"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 10}}', 10, None, 10),
    ],
)
def test_usage_numbers_are_checked_where_they_enter(
    fake: FakeOpenAIServer, usage_json: str, prompt: Any, completion: Any, cached: Any
) -> None:
    fake.enqueue("kept", usage_json=usage_json, repeat=2)
    for stream in (True, False):
        assembler = ReplyAssembler()
        run(client_for(fake), assembler, stream=stream)
        assert assembler.text == "kept" and assembler.usage is not None
        u = assembler.usage
        assert (u.prompt_tokens, u.completion_tokens, u.cached_tokens) == (
            prompt,
            completion,
            cached,
        )


@pytest.mark.parametrize("usage_json", ['"n/a"', "[1, 2]", "42", "null"])
def test_a_usage_that_is_not_an_object_is_unknown(fake: FakeOpenAIServer, usage_json: str) -> None:
    fake.enqueue("kept", usage_json=usage_json)
    assembler = ReplyAssembler()
    run(client_for(fake), assembler)
    assert assembler.text == "kept" and assembler.usage is None


def test_a_session_stores_a_reply_with_absurd_usage(fake: FakeOpenAIServer, db_path: Path) -> None:
    fake.enqueue(
        "kept", usage_json='{"prompt_tokens": 18446744073709551616, "completion_tokens": -1}'
    )
    s = Session(model="gpt-4o-mini", base_url=fake.url, api_key="k", db=db_path, max_retries=0)
    result = s.send("hi")
    assert result.status == "completed" and result.text == "kept"
    row = nbchat.sql("SELECT prompt_tokens, completion_tokens, cost_usd FROM requests", db=db_path)
    assert row.isna().all(axis=None)


def test_cached_tokens_beyond_the_prompt_are_not_priced(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    register_price("odd-model", input_per_mtok=1.0, cached_input_per_mtok=0.1, output_per_mtok=2.0)
    try:
        usage = {"prompt_tokens": 10, "completion_tokens": 1}
        fake.enqueue("kept", usage={**usage, "prompt_tokens_details": {"cached_tokens": 50}})
        s = Session(model="odd-model", base_url=fake.url, api_key="k", db=db_path, max_retries=0)
        assert s.send("hi").status == "completed"
    finally:
        forget_price("odd-model")
    row = nbchat.sql("SELECT cached_tokens, cost_usd FROM requests", db=db_path)
    assert row["cached_tokens"].isna().all()
    # The prompt at the input price, none of it at the cached one.
    assert row["cost_usd"].tolist() == [pytest.approx((10 * 1.0 + 1 * 2.0) / 1_000_000)]


# --------------------------------------------------------------------------- E. surrogates


def test_lone_surrogates_from_the_wire_become_replacement_characters(
    fake: FakeOpenAIServer,
) -> None:
    reply = {"text": "ok \udcff end \ud83d", "chunk_size": 3, "reasoning": "r\udc80"}
    fake.enqueue(**reply, repeat=2)
    for stream in (True, False):
        assembler = ReplyAssembler()
        events = run(client_for(fake), assembler, stream=stream)
        assert assembler.text == "ok \ufffd end \ufffd" and assembler.reasoning == "r\ufffd"
        for event in events:
            event.model_dump_json().encode()  # every event is valid UTF-8


def test_lone_surrogate_tool_arguments_are_repaired(fake: FakeOpenAIServer) -> None:
    fake.enqueue(tool_calls=[{"name": "f", "arguments": '{"a": "x\ud800y"}'}], chunk_size=2)
    assembler = ReplyAssembler()
    run(client_for(fake), assembler)
    assert json.loads(assembler.tool_calls()[0].arguments) == {"a": "x\ufffdy"}


def test_a_request_with_a_lone_surrogate_is_sent_repaired(fake: FakeOpenAIServer) -> None:
    fake.enqueue("fine")
    assembler = ReplyAssembler()
    messages = [{"role": "user", "content": "bad \udcff byte, good \U0001f600"}]
    run(client_for(fake), assembler, messages=messages)
    assert assembler.text == "fine"
    assert fake.requests[0]["messages"][0]["content"] == "bad \ufffd byte, good \U0001f600"


# --------------------------------------------------------------------------- G. dependencies


def test_the_http_library_under_openai_is_found_by_public_names(fake: FakeOpenAIServer) -> None:
    http = _http_library()
    assert issubclass(openai.DefaultAsyncHttpxClient, http.AsyncClient)
    assert issubclass(http.ReadTimeout, http.HTTPError)

    async def raw_response() -> Any:
        async with openai.AsyncOpenAI(base_url=fake.url, api_key="k", max_retries=0) as c:
            response = await c.post(
                "/chat/completions", body={"model": "m", "messages": HI}, cast_to=http.Response
            )
            return type(response)

    fake.enqueue("x")
    assert asyncio.run(raw_response()) is http.Response


def test_an_error_body_with_lone_surrogates_is_made_valid(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(500, "upstream \udcff broke")
    error = error_of(client_for(fake))
    assert "upstream \ufffd broke" in str(error)
    assert json.dumps(error.body, ensure_ascii=False).encode()  # storable as UTF-8


def test_an_event_stream_with_no_events_is_an_early_end_not_html(fake: FakeOpenAIServer) -> None:
    fake.enqueue(raw_body=": ping\n\n: ping\n\n", raw_content_type="text/event-stream")
    message = str(error_of(client_for(fake)))
    assert message.startswith("The model's stream ended early after 0 chunks")


def test_a_mislabelled_event_stream_still_parses(fake: FakeOpenAIServer) -> None:
    event = {"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}
    body = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n"
    fake.enqueue(raw_body=body, raw_content_type="text/plain")
    assembler = ReplyAssembler()
    run(client_for(fake), assembler)
    assert assembler.text == "ok"


def test_error_details_are_never_empty() -> None:
    from nbchat._request_errors import describe

    # httpx's timeouts often carry no message: "ReadTimeout: " told nobody anything.
    for exc in (_http_library().ReadTimeout(""), ValueError("")):
        name, detail = describe(exc).split(": ", 1)
        assert name == type(exc).__name__ and detail.strip()


def test_the_key_source_survives_set_model(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCHAT_API_KEY", KEY)
    s = Session(model="m", base_url=fake.url, db=False, max_retries=0)
    s.set_model("m2")
    fake.enqueue_error(401, "Incorrect API key provided")
    result = s.send("hi")
    assert result.error and "came from NBCHAT_API_KEY" in result.error


def test_a_session_stall_timeout_reaches_the_client(fake: FakeOpenAIServer) -> None:
    fake.enqueue("abcdef", chunk_size=1, stall_after=2, stall_seconds=10)
    s = Session(model="m", base_url=fake.url, api_key="k", db=False, stall_timeout=0.3)
    s.set_model("m2")  # a new model keeps the session's timeouts
    result = s.send("hi")
    assert result.error and "stopped sending for 0.3 s" in result.error


def test_a_401_from_a_local_server_without_a_key_says_none_was_set(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue_error(401, "This server wants a key")
    message = str(error_of(client_for(fake, key=None)))
    assert "No key was set" in message and "%chat config api_key=..." in message


def test_a_gzip_encoded_event_stream_is_decoded() -> None:
    """Most streams come unencoded (read raw, past httpx's decoder); a gzipped one too."""
    import gzip
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    events = [{"choices": [{"delta": {"content": piece}}]} for piece in ("zip", "ped")]
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    body = gzip.compress(sse + b"data: [DONE]\n\n")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assembler = ReplyAssembler()
        run(ModelClient(resolve_client("m", url, KEY), max_retries=0), assembler)
        assert assembler.text == "zipped"
    finally:
        server.shutdown()
        server.server_close()
