"""What only the two wire formats' differences can break, on both: usage under either
format's names, an error reported inside the stream, a model that exists only on the
Responses API.

The core loop suites (test_session, test_loop_faults, test_reasoning, test_typed_answers,
test_limits, test_compaction, test_turn_options, test_extract) run on both formats
through the ``wire`` fixture; this file keeps the scenarios they do not cover.
"""

from __future__ import annotations

from typing import Any

import pytest

import nbchat
from nbchat import Session
from nbchat.testing import FakeOpenAIServer


def make(fake: FakeOpenAIServer, **kw: Any) -> Session:
    kw.setdefault("max_retries", 0)
    return Session(model="test-model", base_url=fake.url, api_key="sk-secret-123", db=False, **kw)


@pytest.mark.usefixtures("wire")
def test_usage_and_cost(fake: FakeOpenAIServer) -> None:
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
        s = make(fake)
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


@pytest.mark.usefixtures("wire")
def test_error_inside_the_stream(fake: FakeOpenAIServer) -> None:
    fake.enqueue(
        "partial", stream_error={"status": 500, "message": "overloaded", "code": "overloaded"}
    )
    r = make(fake).send("hi")
    assert r.status == "error" and "overloaded" in (r.error or "")
    assert r.text == "partial"


def test_a_responses_only_model_needs_no_setting(fake: FakeOpenAIServer) -> None:
    """(Not on both wires: a kernel default api= would choose the wire instead.)"""
    fake.enqueue("pro answer")
    s = Session(model="o3-pro", base_url=fake.url, api_key="k", db=False, max_retries=0)
    assert s.send("hi").text == "pro answer"
    assert fake.request_paths == ["/v1/responses"] and s.client.api == "responses"
