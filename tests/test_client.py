"""The model client on its own: requests streamed (or not) and folded into one message."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from nbchat import ModelAPIError
from nbchat._client import ModelClient, RoundFolder
from nbchat._config import resolve_client
from nbchat._types import Event
from nbchat.testing import FakeOpenAIServer

HI = [{"role": "user", "content": "hi"}]


def client_for(fake: FakeOpenAIServer, **kw: Any) -> ModelClient:
    return ModelClient(resolve_client("m", fake.url, "sk-test"), max_retries=0, **kw)


def run(client: ModelClient, folder: RoundFolder, **kw: Any) -> list[Event]:
    """One request through ``astream`` on a fresh event loop; the events it yielded."""

    async def collect() -> list[Event]:
        return [e async for e in client.astream(kw.pop("messages", HI), folder, **kw)]

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
    folder = RoundFolder()
    events = run(client_for(fake), folder)
    assert folder.text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in folder.tool_calls()] == [
        ("a", {"x": 1}),
        ("b", {"y": "二"}),
    ]
    assert folder.finish_reason == "tool_calls"
    assert folder.usage is not None and folder.usage.prompt_tokens == 12
    assert [e.kind for e in events].count("tool_call_started") == 2


def test_non_streamed_reply(fake: FakeOpenAIServer) -> None:
    fake.enqueue("whole")
    folder = RoundFolder()
    run(client_for(fake), folder, stream=False)
    assert folder.text == "whole" and folder.finish_reason == "stop"
    assert all("stream" not in body for body in fake.requests)


def test_http_error_keeps_status_code_and_server_code(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(400, "This model's maximum context length is 10", "context_length_exceeded")
    with pytest.raises(ModelAPIError) as info:
        run(client_for(fake), RoundFolder())
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    assert "maximum context length" in str(info.value)


def test_list_models(fake: FakeOpenAIServer) -> None:
    fake.models = ["zeta", "alpha"]
    assert asyncio.run(client_for(fake).list_models()) == ["alpha", "zeta"]
