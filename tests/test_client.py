"""The model client on its own: requests streamed (or not) and folded into one message."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from nbchat import ModelAPIError
from nbchat._assembler import ReplyAssembler
from nbchat._client import ModelClient, truncation_notice
from nbchat._config import resolve_client
from nbchat._events import Event
from nbchat.testing import FakeOpenAIServer

HI = [{"role": "user", "content": "hi"}]


def client_for(fake: FakeOpenAIServer, **kw: Any) -> ModelClient:
    return ModelClient(resolve_client("m", fake.url, "sk-test"), max_retries=0, **kw)


def run(client: ModelClient, assembler: ReplyAssembler, **kw: Any) -> list[Event]:
    """One request through ``astream`` on a fresh event loop; the events it yielded."""

    async def collect() -> list[Event]:
        return [e async for e in client.astream(kw.pop("messages", HI), assembler, **kw)]

    return asyncio.run(collect())


def test_stream_folds_text_tool_calls_and_usage(fake: FakeOpenAIServer) -> None:
    fake.enqueue(
        text="Let me check.",
        tool_calls=[
            {"name": "a", "arguments": {"x": 1}},
            {"name": "b", "arguments": {"y": "二"}},
        ],
        chunk_size=2,
        usage={"prompt_tokens": 12, "completion_tokens": 7},
    )
    assembler = ReplyAssembler()
    events = run(client_for(fake), assembler)
    assert assembler.text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in assembler.tool_calls()] == [
        ("a", {"x": 1}),
        ("b", {"y": "二"}),
    ]
    assert assembler.finish_reason == "tool_calls"
    assert assembler.usage is not None and assembler.usage.prompt_tokens == 12
    assert [e.kind for e in events].count("tool_call_started") == 2


def test_non_streamed_reply(fake: FakeOpenAIServer) -> None:
    fake.enqueue("whole")
    assembler = ReplyAssembler()
    run(client_for(fake), assembler, stream=False)
    assert assembler.text == "whole" and assembler.finish_reason == "stop"
    assert all("stream" not in body for body in fake.requests)


def test_http_error_keeps_status_code_and_server_code(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(400, "This model's maximum context length is 10", "context_length_exceeded")
    with pytest.raises(ModelAPIError) as info:
        run(client_for(fake), ReplyAssembler())
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    assert "maximum context length" in str(info.value)


def test_list_models(fake: FakeOpenAIServer) -> None:
    fake.models = ["zeta", "alpha"]
    assert asyncio.run(client_for(fake).list_models()) == ["alpha", "zeta"]


# --------------------------------------------------------------------------- what servers report


@pytest.mark.parametrize(
    ("server_kw", "window"),
    [
        ({"model_info": {"m": {"max_model_len": 8192}}}, 8192),  # vLLM
        ({"model_info": {"m": {"context_length": 131072}}}, 131072),  # OpenRouter
        ({"props": {"default_generation_settings": {"n_ctx": 4096}}}, 4096),  # llama.cpp
        ({}, None),  # says nothing
    ],
)
def test_context_window_from_the_server_asked_once(
    server_kw: dict[str, Any], window: int | None
) -> None:
    with FakeOpenAIServer(models=["m", "other"], **server_kw) as server:
        client = client_for(server)
        assert client.cached_context_window() is None
        assert asyncio.run(client.context_window()) == window
        server.models = []  # a second ask would now find nothing: the answer is cached
        server.props = None
        assert asyncio.run(client.context_window()) == window
        assert client.cached_context_window() == window
        assert server.requests == [], "asking is GETs only, no chat request"


def test_context_window_of_an_unreachable_server_is_none() -> None:
    with FakeOpenAIServer() as server:
        url = server.url
    client = ModelClient(resolve_client("m", url, "k"), max_retries=0)
    assert asyncio.run(client.context_window()) is None


def test_truncation_notice() -> None:
    assert truncation_notice(10_000, 9_000, 8192) is None  # close enough: not cut
    assert truncation_notice(500, 100, None) is None  # too small to judge
    assert truncation_notice(10_000, None, None) is None  # nothing reported
    notice = truncation_notice(10_000, 4_000, 4096)
    assert notice is not None and "\n" not in notice
    assert "4,000" in notice and "10,000" in notice and "4,096 tokens" in notice
    assert "context window" in (truncation_notice(10_000, 5_999, None) or "")


def test_server_reported_cost_and_cache_writes(fake: FakeOpenAIServer) -> None:
    fake.enqueue(
        "x",
        usage={
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "cache_creation_input_tokens": 30,
            "cost": 0.0042,
        },
    )
    client = client_for(fake)
    assembler = ReplyAssembler()
    run(client, assembler)
    event = client.usage_event(assembler, None)
    assert event.cost_usd == 0.0042 and event.cost_source == "server"
    assert event.usage is not None and event.usage.cache_write_tokens == 30
    assert event.usage.reported_cost_usd == 0.0042


def test_body_encoder_splices_the_same_json_and_encodes_each_message_once() -> None:
    from nbchat._wire import BodyEncoder

    messages = [{"role": "user", "content": f"m{i} é \udcff"} for i in range(3)]
    body = {"model": "m", "messages": messages, "temperature": 0.5, "stream": True}
    encoder = BodyEncoder()
    first = encoder.encode(body)
    assert json.loads(first) == {
        **body,
        "messages": [{**m, "content": m["content"].replace("\udcff", "\ufffd")} for m in messages],
    }
    messages.append({"role": "assistant", "content": 'a "messages":[] inside'})
    again = encoder.encode(body)
    assert json.loads(again)["messages"][-1]["content"] == 'a "messages":[] inside'
    assert again.startswith(first[: first.index(b"]")]), "the kept encodings are reused"
    assert json.loads(encoder.encode({"model": "m", "messages": []}))["messages"] == []
