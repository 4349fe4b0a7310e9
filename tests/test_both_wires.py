"""The loop's key scenarios over both wire formats: chat completions and the Responses API.

The session is the same; only its ``ModelClient`` speaks one format or the other to the
same fake server script. What the server received is read back in the format sent.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

import nbchat
from nbchat import Session
from nbchat._client import ModelClient
from nbchat.testing import FakeOpenAIServer

WIRES = ["chat", "responses"]


@pytest.fixture(params=WIRES)
def wire(request: pytest.FixtureRequest) -> str:
    """The wire format the session's client speaks."""
    return str(request.param)


def make(fake: FakeOpenAIServer, wire: str, **kw: Any) -> Session:
    kw.setdefault("max_retries", 0)
    s = Session(model="test-model", base_url=fake.url, api_key="sk-secret-123", db=False, **kw)
    c = s.client
    s.client = ModelClient(
        c.settings,
        max_retries=c.max_retries,
        timeout=c.timeout,
        stall_timeout=c.stall_timeout,
        api=wire,  # type: ignore[arg-type]
    )
    return s


def sent(fake: FakeOpenAIServer, wire: str, n: int) -> list[dict[str, Any]]:
    """Request ``n``'s conversation, as (role, content/call/result) dicts in either format."""
    body = fake.requests[n]
    assert fake.request_paths[n] == (
        "/v1/responses" if wire == "responses" else "/v1/chat/completions"
    )
    if wire == "chat":
        out = []
        for m in body["messages"]:
            out.append({"role": m["role"], "content": m.get("content")})
            out += [
                {"call": c["id"], "name": c["function"]["name"]} for c in m.get("tool_calls") or []
            ]
            if m["role"] == "tool":
                out[-1] = {"result": m["tool_call_id"], "content": m["content"]}
        return out
    out = [{"role": "system", "content": body["instructions"]}] if "instructions" in body else []
    for item in body["input"]:
        if item.get("type") == "function_call":
            out.append({"call": item["call_id"], "name": item["name"]})
        elif item.get("type") == "function_call_output":
            out.append({"result": item["call_id"], "content": item["output"]})
        else:
            out.append({"role": item["role"], "content": item["content"]})
    return out


def test_text_reply(fake: FakeOpenAIServer, wire: str) -> None:
    fake.enqueue("Hello there, notebook!", chunk_size=3, reasoning="Think first.")
    s = make(fake, wire, system="Be terse.")
    events: list[Any] = []
    r = s.send("hi", on_event=events.append)
    assert r.status == "completed" and r.text == "Hello there, notebook!"
    deltas = [e.text for e in events if e.kind == "text_delta"]
    assert "".join(deltas) == r.text and len(deltas) == 8
    assert "".join(e.text for e in events if e.kind == "reasoning_delta") == "Think first."
    assert sent(fake, wire, 0) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
    ]
    assert r.usage.prompt_tokens and r.usage.completion_tokens


def test_streamed_tool_round_trip(fake: FakeOpenAIServer, wire: str) -> None:
    @nbchat.tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    fake.enqueue(tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}, "id": "c1"}])
    fake.enqueue("It is 5.")
    r = make(fake, wire, tools=[add]).send("2+3?")
    assert r.status == "completed" and r.text == "It is 5."
    assert [(c.name, c.result) for c in r.tool_calls] == [("add", "5")]
    assert sent(fake, wire, 1) == [
        {"role": "user", "content": "2+3?"},
        *([{"role": "assistant", "content": None}] if wire == "chat" else []),
        {"call": "c1", "name": "add"},
        {"result": "c1", "content": "5"},
    ]
    tool = fake.requests[0]["tools"][0]
    name = tool["function"]["name"] if wire == "chat" else tool["name"]
    assert name == "add"


def test_parallel_tools_run_together(fake: FakeOpenAIServer, wire: str) -> None:
    started: list[float] = []

    @nbchat.tool
    def slow(n: int) -> int:
        """Double a number slowly."""
        started.append(time.perf_counter())
        time.sleep(0.3)
        return 2 * n

    fake.enqueue(
        tool_calls=[{"name": "slow", "arguments": {"n": i}} for i in (1, 2, 3)], chunk_size=3
    )
    fake.enqueue("2, 4, 6")
    events: list[Any] = []
    r = make(fake, wire, tools=[slow]).send("go", on_event=events.append)
    assert [c.result for c in r.tool_calls] == ["2", "4", "6"]
    assert max(started) - min(started) < 0.2, "the calls ran concurrently"
    assert [e.index for e in events if e.kind == "tool_call_started"] == [0, 1, 2]
    results = [m for m in sent(fake, wire, 1) if "result" in m]
    calls = [m for m in sent(fake, wire, 1) if "call" in m]
    assert [m["result"] for m in results] == [m["call"] for m in calls]
    assert [json.loads(c.arguments) for c in r.tool_calls] == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_usage_and_cost(fake: FakeOpenAIServer, wire: str) -> None:
    nbchat.register_price("test-model", input_per_mtok=1.0, output_per_mtok=2.0)
    try:
        usage = {
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 40},
            "completion_tokens_details": {"reasoning_tokens": 7},
        }
        fake.enqueue("priced", usage=usage)
        fake.enqueue("server priced", usage={**usage, "cost": 0.25})
        s = make(fake, wire)
        events: list[Any] = []
        r = s.send("hi", on_event=events.append)
        [u] = [e for e in events if e.kind == "usage"]
        assert u.usage.cached_tokens == 100 and u.usage.reasoning_tokens == 7
        assert u.usage.cache_write_tokens == 40
        assert r.cost_usd == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
        assert u.cost_source == "registered"
        events.clear()
        r = s.send("again", on_event=events.append)
        [u] = [e for e in events if e.kind == "usage"]
        assert r.cost_usd == 0.25 and u.cost_source == "server"
    finally:
        nbchat._pricing.forget_price("test-model")


@pytest.mark.parametrize("status", [429, 500])
def test_http_error_ends_the_turn_and_the_next_works(
    fake: FakeOpenAIServer, wire: str, status: int
) -> None:
    fake.enqueue_error(status, "no luck")
    fake.enqueue("recovered")
    s = make(fake, wire)
    events: list[Any] = []
    r = s.send("hi", on_event=events.append)
    assert r.status == "error" and str(status) in (r.error or "")
    [err] = [e for e in events if e.kind == "error"]
    assert err.status_code == status
    assert s.send("again").text == "recovered"


def test_error_inside_the_stream(fake: FakeOpenAIServer, wire: str) -> None:
    fake.enqueue(
        "partial", stream_error={"status": 500, "message": "overloaded", "code": "overloaded"}
    )
    r = make(fake, wire).send("hi")
    assert r.status == "error" and "overloaded" in (r.error or "")
    assert r.text == "partial"


def test_cut_stream_keeps_the_partial_reply(fake: FakeOpenAIServer, wire: str) -> None:
    text = "abcdefghijklmnopqrstuvwxyz"
    # Both formats open with bookkeeping events before the first text: cut inside the text.
    fake.enqueue(text, chunk_size=2, cut_after=5 if wire == "chat" else 7)
    s = make(fake, wire)
    r = s.send("hi")
    assert r.status == "error" and "stream" in (r.error or "")
    [assistant] = [m for m in r.messages if m.role == "assistant"]
    partial = assistant.content or ""
    assert partial and text.startswith(partial) and len(partial) < len(text)
    assert assistant.status == "error"


def test_interruption_mid_stream(fake: FakeOpenAIServer, wire: str) -> None:
    fake.enqueue("x" * 200, chunk_size=1, delay=0.01)
    fake.enqueue("fine")
    s = make(fake, wire)
    first = threading.Event()

    def watch(event: Any) -> None:
        if event.kind == "text_delta":
            first.set()

    threading.Thread(target=lambda: (first.wait(5), time.sleep(0.1), s.cancel())).start()
    t0 = time.perf_counter()
    r = s.send("long please", on_event=watch)
    assert time.perf_counter() - t0 < 1.5
    assert r.status == "interrupted" and 0 < len(r.text) < 200
    assert s.send("next").text == "fine"
    assert sent(fake, wire, 1)[1] == {"role": "assistant", "content": r.text}


def test_non_streamed(fake: FakeOpenAIServer, wire: str) -> None:
    fake.enqueue("whole reply", reasoning="hmm")
    r = make(fake, wire, stream=False).send("hi")
    assert r.text == "whole reply" and r.status == "completed"
    assert "stream" not in fake.requests[0]


def test_a_responses_only_model_needs_no_setting(fake: FakeOpenAIServer) -> None:
    fake.enqueue("pro answer")
    s = Session(model="o3-pro", base_url=fake.url, api_key="k", db=False, max_retries=0)
    assert s.send("hi").text == "pro answer"
    assert fake.request_paths == ["/v1/responses"] and s.client.api == "responses"
