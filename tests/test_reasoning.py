"""Reasoning text: kept on the message and the result, sent back only within its turn."""

from __future__ import annotations

from typing import Any

import pytest

import nbchat
from nbchat.testing import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


def _session(fake: FakeOpenAIServer, **kw: Any) -> nbchat.Session:
    # A reasoning model's name: on the Responses API nbchat asks for its encrypted
    # reasoning, the only form in which a stateless request can send reasoning back.
    kw.setdefault("model", "o4-mini")
    return nbchat.Session(base_url=fake.url, api_key="sk-test", db=":memory:", **kw)


def _assistants(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in body["messages"] if m["role"] == "assistant"]


def test_reasoning_is_kept_and_replayed_within_the_turn_only(fake: FakeOpenAIServer) -> None:
    s = _session(fake, tools=[lookup])
    fake.enqueue(
        reasoning="I should look it up.", tool_calls=[{"name": "lookup", "arguments": {"key": "a"}}]
    )
    fake.enqueue("It is a.", reasoning="The tool said a.")
    first = s.send("what is a?")
    assert first.reasoning == "I should look it up.The tool said a."
    # The tool round sent the reasoning back: chat in the field the server used, the
    # Responses API as the reasoning item before the call (read back as that field).
    (replayed,) = _assistants(fake.chat_requests[1])
    assert replayed["reasoning_content"] == "I should look it up."
    fake.enqueue("Next.")
    s.send("and b?")
    # A later turn does not carry the earlier turn's reasoning.
    assert all("reasoning_content" not in m for m in _assistants(fake.chat_requests[2]))
    assert [m.reasoning for m in s.history if m.role == "assistant"] == [
        "I should look it up.",
        "The tool said a.",
        None,
    ]


@pytest.mark.parametrize(("mode", "sent"), [("always", True), ("never", False)])
def test_reasoning_replay_can_be_chosen(fake: FakeOpenAIServer, mode: str, sent: bool) -> None:
    s = _session(fake, reasoning_replay=mode)
    fake.enqueue("one", reasoning="thinking")
    s.send("hi")
    fake.enqueue("two")
    s.send("again")
    (earlier,) = _assistants(fake.chat_requests[1])
    assert ("reasoning_content" in earlier) is sent


@pytest.mark.parametrize(("mode", "status"), [("auto", "completed"), ("never", "error")])
def test_a_server_that_wants_reasoning_back_gets_it_within_the_turn(mode: str, status: str) -> None:
    """DeepSeek's thinking mode answers 400 when a tool round omits its reasoning."""
    with FakeOpenAIServer(require_reasoning_replay=True) as fake:
        s = _session(fake, tools=[lookup], reasoning_replay=mode, max_retries=0)
        fake.enqueue(
            reasoning="Look it up.", tool_calls=[{"name": "lookup", "arguments": {"key": "a"}}]
        )
        fake.enqueue("It is a.")
        result = s.send("what is a?")
        assert result.status == status
        if status == "error":
            assert "reasoning" in (result.error or "") and "400" in (result.error or "")


def test_first_text_is_timed_apart_from_the_first_reasoning_token(fake: FakeOpenAIServer) -> None:
    s = _session(fake)
    fake.enqueue("Answer.", reasoning="Thinking hard " * 20, chunk_size=5, delay=0.005)
    events: list[Any] = []
    s.send("hi", on_event=events.append)
    (usage,) = [e for e in events if e.kind == "usage"]
    assert usage.ttft_ms is not None and usage.first_text_ms is not None
    assert usage.first_text_ms > usage.ttft_ms
    assert nbchat.usage(db=s.store)["first_text_ms"].notna().all()
