"""Budgets, guardrails and on_event, against the fake server over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbchat
from nbchat import GuardrailRejected, Session
from nbchat._pricing import forget_price, register_price
from nbchat._render import TurnView
from nbchat._store import Store
from nbchat.testing import FakeOpenAIServer, Reply

# Each scripted request reports 30 prompt + 10 completion tokens = 40 tokens. At $1,000
# per million tokens for input and output alike, it costs $0.04.
USAGE = {"prompt_tokens": 30, "completion_tokens": 10}
PRICED = "priced-model"
CHEAP = "cheap-model"
COSTLY_SUMMARISER = "costly-summariser"


pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


@pytest.fixture
def prices() -> Iterator[None]:
    register_price(PRICED, input_per_mtok=1000, output_per_mtok=1000)
    register_price(CHEAP, input_per_mtok=1, output_per_mtok=1, context_window=1000)
    register_price(COSTLY_SUMMARISER, input_per_mtok=100_000, output_per_mtok=100_000)
    yield
    for model in (PRICED, CHEAP, COSTLY_SUMMARISER):
        forget_price(model)


@nbchat.tool
def ping() -> str:
    """Answer pong."""
    return "pong"


def tools_forever(body: dict[str, Any]) -> Reply:
    """A model that always wants one more tool call."""
    return Reply(tool_calls=[{"name": "ping"}], usage=USAGE)


def answer(body: dict[str, Any]) -> Reply:
    return Reply(text="an answer", usage=USAGE)


def make(fake: FakeOpenAIServer, model: str = "test-model", **kw: Any) -> Session:
    kw.setdefault("max_retries", 0)
    kw.setdefault("db", False)
    return Session(model=model, base_url=fake.url, api_key="sk-test", **kw)


def limit_events(events: list[Any]) -> list[Any]:
    return [e for e in events if e.kind == "limit_reached"]


# --------------------------------------------------------------------------- token limits


def test_turn_max_tokens_stops_before_the_request_that_would_pass_it(
    fake: FakeOpenAIServer,
) -> None:
    fake.fallback = tools_forever
    events: list[Any] = []
    s = make(fake, tools=[ping], turn_max_tokens=100, on_event=events.append)
    r = s.send("go")
    # Before request 1: 0 spent; 2: 40; 3: 80; 4: 120 >= 100 -> not sent.
    assert len(fake.requests) == 3 and r.rounds == 3
    assert r.status == "budget_exceeded"
    assert r.error == (
        "Stopped before the next request: the turn limit turn_max_tokens is reached "
        "(120 of 100 tokens used)."
    )
    [limit] = limit_events(events)
    assert limit.limit == "turn_max_tokens" and limit.message == r.error
    # The history stays valid: every tool call that ran has its result.
    assert s.pending_tool_calls == []
    # The next turn has its own allowance.
    assert s.send("again").status == "budget_exceeded" and len(fake.requests) == 6


def test_max_tokens_total_counts_across_turns(fake: FakeOpenAIServer) -> None:
    fake.fallback = answer
    s = make(fake, max_tokens_total=100)
    statuses = [s.send(f"turn {i}").status for i in range(5)]
    # Spent before each turn's request: 0, 40, 80 -> sent; 120 -> stopped, and stays so.
    assert statuses == ["completed"] * 3 + ["budget_exceeded"] * 2
    assert len(fake.requests) == 3
    r = s.send("more")
    assert r.rounds == 0 and r.text == "" and "max_tokens_total" in (r.error or "")
    assert "120 of 100 tokens" in (r.error or "")


# --------------------------------------------------------------------------- USD budgets


def test_budget_usd_stops_at_the_right_request(fake: FakeOpenAIServer, prices: None) -> None:
    fake.fallback = answer
    s = make(fake, model=PRICED, budget_usd=0.12)
    results = [s.send(f"turn {i}") for i in range(4)]
    # $0.04 a turn; the third turn's prompt alone (~40 tokens, $0.04) would cross $0.12
    # after $0.08 spent, so it is refused before it is sent.
    assert [r.status for r in results] == ["completed"] * 2 + ["budget_exceeded"] * 2
    assert results[0].cost_usd == pytest.approx(0.04)
    assert s.usage.cost_usd == pytest.approx(0.08)
    assert len(fake.requests) == 2
    assert results[2].error is not None
    assert results[2].error.startswith(
        "Stopped before the next request: the session limit budget_usd would cross "
        "($0.08 spent of $0.12; the next request would cost about $0.0"
    )
    assert "prompt tokens" in results[2].error


def test_budget_usd_reached_says_so_in_money(fake: FakeOpenAIServer, prices: None) -> None:
    fake.fallback = answer
    s = make(fake, model=PRICED, budget_usd=0.00001)
    s.usage = s.usage.add(nbchat.RequestUsage(prompt_tokens=10, completion_tokens=0), 0.000119)
    result = s.send("hello")
    assert result.status == "budget_exceeded" and not fake.requests
    assert result.error == (
        "Stopped before the next request: the session limit budget_usd is reached "
        "($0.000119 spent of $0.00001)."
    )


def test_a_request_that_would_cross_the_budget_is_never_sent(
    fake: FakeOpenAIServer, prices: None
) -> None:
    """The first turn of a tiny budget with a long prompt spends nothing (issue 13.4)."""
    fake.fallback = answer
    s = make(fake, model=PRICED, budget_usd=0.000001)
    result = s.send("a long prompt " * 200)
    assert result.status == "budget_exceeded"
    assert fake.requests == []
    assert s.usage.cost_usd == 0


def test_the_reply_cap_counts_in_the_estimate(fake: FakeOpenAIServer, prices: None) -> None:
    fake.fallback = answer
    # A short prompt fits $0.05; with room for a 100-token reply ($0.10) it does not.
    assert make(fake, model=PRICED, budget_usd=0.05).send("hi").status == "completed"
    capped = make(fake, model=PRICED, budget_usd=0.05, request_params={"max_tokens": 100})
    result = capped.send("hi")
    assert result.status == "budget_exceeded"
    assert "100-token reply cap" in (result.error or "")


def test_the_estimate_is_stored_beside_the_actual(fake: FakeOpenAIServer, prices: None) -> None:
    fake.fallback = answer
    s = make(fake, model=PRICED, db=":memory:")
    events: list[Any] = []
    s.send("hello there", on_event=events.append)
    (usage,) = [e for e in events if e.kind == "usage"]
    assert usage.estimated_prompt_tokens is not None and usage.estimated_prompt_tokens > 0
    assert usage.estimated_cost_usd == pytest.approx(usage.estimated_prompt_tokens / 1000)
    assert usage.usage.prompt_tokens == 30


def test_turn_budget_usd_is_per_turn(fake: FakeOpenAIServer, prices: None) -> None:
    fake.fallback = tools_forever
    s = make(fake, model=PRICED, tools=[ping], turn_budget_usd=0.2)
    first = s.send("one")
    # $0.04 a round spent; after three, the fourth (~$0.08 estimated) would pass $0.20.
    assert first.status == "budget_exceeded" and first.rounds == 3
    assert "turn_budget_usd would cross ($0.12 spent of $0.20" in (first.error or "")
    second = s.send("two")
    assert second.status == "budget_exceeded" and second.rounds == 3
    assert len(fake.requests) == 6


def test_summariser_cost_counts_toward_the_budget(fake: FakeOpenAIServer, prices: None) -> None:
    """A compaction's summary request is paid for; the next request must still fit."""

    def fallback(body: dict[str, Any]) -> Reply:
        if body["model"] == COSTLY_SUMMARISER:
            return Reply(
                text="summary of the chat", usage={"prompt_tokens": 50, "completion_tokens": 5}
            )
        return Reply(text="an answer " + "z" * 150, usage="auto")

    fake.fallback = fallback
    events: list[Any] = []
    s = make(
        fake,
        model=CHEAP,  # its registered context window is 1000 tokens
        budget_usd=1.0,
        summary_model=COSTLY_SUMMARISER,
        on_event=events.append,
    )
    statuses = []
    while "budget_exceeded" not in statuses:
        statuses.append(s.send(f"message {len(statuses)}: " + "q" * 200).status)
        assert len(statuses) < 40, "the context window of 1000 tokens forces a compaction"
    # The turn that compacted paid $5.50 for its summary, then stopped: no chat request.
    assert fake.chat_requests[-1]["model"] == COSTLY_SUMMARISER
    last_turn = events[max(i for i, e in enumerate(events) if e.kind == "turn_started") :]
    kinds = [e.kind for e in last_turn]
    assert kinds.index("usage") < kinds.index("compaction") < kinds.index("limit_reached")
    [summary_usage] = [e for e in last_turn if e.kind == "usage"]
    assert summary_usage.purpose == "summary" and summary_usage.cost_usd == pytest.approx(5.5)
    [compaction] = [e for e in last_turn if e.kind == "compaction"]
    assert compaction.cost_usd == pytest.approx(5.5) and compaction.model == COSTLY_SUMMARISER
    finished = last_turn[-1].result
    assert finished.status == "budget_exceeded" and finished.rounds == 0
    assert finished.usage.cost_usd == pytest.approx(5.5), "the turn's cost includes it"
    chat_costs = sum(e.cost_usd for e in events if e.kind == "usage")
    assert s.usage.cost_usd == pytest.approx(chat_costs)
    assert s.usage.requests == len(fake.requests)


def test_unknown_price_is_said_once_and_early(fake: FakeOpenAIServer) -> None:
    fake.fallback = answer
    events: list[Any] = []
    s = make(fake, budget_usd=0.01, turn_budget_usd=0.01, on_event=events.append)
    first = s.send("one")
    notices = [e.message for e in events if e.kind == "notice"]
    assert first.cost_usd is None
    assert len(notices) == 2, "one for each limit, in the first turn already"
    assert "session budget of $0.01 cannot be checked" in notices[0]
    assert "turn budget of $0.01 cannot be checked" in notices[1]
    assert "register_price" in notices[0]
    for text in ("two", "three"):
        assert s.send(text).status == "completed", "unknown is not treated as over budget"
    assert len([e for e in events if e.kind == "notice"]) == 2


def test_refused_requests_do_not_make_spending_unknown(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(429, "slow down")
    fake.enqueue_error(500, "oops")
    fake.fallback = answer
    events: list[Any] = []
    s = make(fake, max_tokens_total=100, on_event=events.append)
    assert s.send("a").status == "error"
    assert s.send("b").status == "error"
    assert s.usage.total_tokens == 0 and s.usage.requests == 2
    assert [s.send(f"c{i}").status for i in range(4)] == ["completed"] * 3 + ["budget_exceeded"]
    assert not [e for e in events if e.kind == "notice"], "every budget stays checkable"


def test_a_reopened_session_counts_what_it_already_spent(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    fake.fallback = answer
    first = make(fake, db=db_path)
    first.send("one")
    first.send("two")
    again = make(fake, db=db_path, session_id=first.id, max_tokens_total=100)
    assert again.usage.requests == 2 and again.usage.total_tokens == 80
    assert again.send("three").status == "completed"
    assert again.send("four").status == "budget_exceeded"


# --------------------------------------------------------------------------- guardrails


def test_input_guardrail_rewrites_what_the_model_sees(fake: FakeOpenAIServer) -> None:
    fake.fallback = answer

    def mask_emails(text: str) -> str:
        return text.replace("ada@example.com", "<email>")

    def shout(text: str) -> str | None:
        return text.upper() if text.endswith("!") else None

    s = make(fake, input_guardrails=[mask_emails, shout])
    s.send("write to ada@example.com now!")
    assert fake.chat_requests[0]["messages"][-1]["content"] == "WRITE TO <EMAIL> NOW!"
    assert s.messages[0]["content"] == "WRITE TO <EMAIL> NOW!"
    s.send("and nothing else")  # shout returns None: unchanged
    assert fake.chat_requests[1]["messages"][-1]["content"] == "and nothing else"


def test_input_rejection_is_stored_with_a_clear_status(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    fake.fallback = answer

    def no_secrets(text: str) -> None:
        if "password" in text:
            raise GuardrailRejected("questions about passwords are not allowed")

    events: list[Any] = []
    s = make(fake, db=db_path, input_guardrails=[no_secrets], on_event=events.append)
    r = s.send("what is the admin password?")
    assert r.status == "rejected"
    assert r.error == "Input rejected by a guardrail: questions about passwords are not allowed"
    assert fake.requests == [] and s.messages == []
    [error] = [e for e in events if e.kind == "error"]
    assert error.error_kind == "guardrail"
    assert "Rejected by a guardrail" in _shown(events)
    assert s.send("hello").status == "completed"
    assert [m["content"] for m in fake.chat_requests[0]["messages"]] == ["hello"]
    with Store.open(str(db_path)) as store:
        result = store.query(
            "SELECT content, status, state FROM messages WHERE role = 'user' ORDER BY seq"
        )
    stored = list(
        zip(*(result.data[c].tolist() for c in ("content", "status", "state")), strict=True)
    )
    assert stored == [
        ("what is the admin password?", "rejected", "superseded"),
        ("hello", "ok", "active"),
    ]


def test_output_rewrite_is_what_is_shown_and_stored(fake: FakeOpenAIServer) -> None:
    fake.enqueue("the password is hunter2, keep it safe", chunk_size=2)

    def redact(text: str) -> str:
        return text.replace("hunter2", "[redacted]")

    events: list[Any] = []
    s = make(fake, output_guardrails=[redact])
    r = s.send("tell me", on_event=events.append)
    shown = "".join(e.text for e in events if e.kind == "text_delta")
    assert shown == r.text == "the password is [redacted], keep it safe"
    assert not any("hunter" in e.text for e in events if e.kind == "text_delta")
    assert s.messages[-1]["content"] == "the password is [redacted], keep it safe"
    assert "hunter2" not in _shown(events)


def test_output_rejection_keeps_the_reply_out_of_the_conversation(
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue("something unsafe", chunk_size=3)
    fake.enqueue("fine")

    def block(text: str) -> None:
        if "unsafe" in text:
            raise GuardrailRejected("unsafe content")

    events: list[Any] = []
    s = make(fake, output_guardrails=[block])
    r = s.send("go", on_event=events.append)
    assert r.status == "rejected" and r.error == "Reply rejected by a guardrail: unsafe content"
    assert r.text == "" and not [e for e in events if e.kind == "text_delta"]
    [stored] = [e.message for e in events if e.kind == "message" and e.message.role == "assistant"]
    assert stored.status == "rejected" and stored.state == "superseded"
    assert s.messages == [{"role": "user", "content": "go"}]
    s.send("again")
    assert "something unsafe" not in str(fake.chat_requests[-1]["messages"])


def test_output_guardrails_judge_text_before_tool_calls(fake: FakeOpenAIServer) -> None:
    ran: list[str] = []

    @nbchat.tool
    def delete_all() -> str:
        """Delete everything."""
        ran.append("delete_all")
        return "deleted"

    def no_deleting(text: str) -> None:
        if "delete" in text:
            raise GuardrailRejected("the reply announces a deletion")

    fake.enqueue(text="I will delete everything now.", tool_calls=[{"name": "delete_all"}])
    s = make(fake, tools=[delete_all], output_guardrails=[no_deleting])
    r = s.send("clean up")
    assert r.status == "rejected" and ran == [] and s.pending_tool_calls == []


def test_a_guardrail_returning_the_wrong_type_is_a_bug(fake: FakeOpenAIServer) -> None:
    def broken(text: str) -> Any:
        return 42

    s = make(fake, input_guardrails=[broken])
    with pytest.raises(TypeError, match="return a str, None, or raise GuardrailRejected"):
        s.send("hi")


# --------------------------------------------------------------------------- on_event


def test_on_event_receives_every_event(fake: FakeOpenAIServer) -> None:
    fake.enqueue(
        text="Let me check.",
        tool_calls=[{"name": "ping"}, {"name": "ping", "arguments": {}}],
        chunk_size=3,
    )
    fake.enqueue("All pong.", chunk_size=2)
    hooked: list[Any] = []
    seen: list[Any] = []
    s = make(fake, tools=[ping], on_event=hooked.append)
    s.send("ping twice", on_event=seen.append)
    assert [id(e) for e in hooked] == [id(e) for e in seen], "the same events, in order"
    kinds = {e.kind for e in hooked}
    assert kinds >= {
        "turn_started",
        "text_delta",
        "tool_call_started",
        "tool_call_delta",
        "tool_result",
        "message",
        "usage",
        "turn_finished",
    }

    async def consume() -> list[Any]:
        return [e async for e in s.stream("once more")]

    fake.enqueue("streamed", chunk_size=2)
    hooked.clear()
    streamed = asyncio.run(consume())
    assert [id(e) for e in hooked] == [id(e) for e in streamed]


def _shown(events: list[Any]) -> str:
    """What the cell renderer shows for these events."""
    view = TurnView("m")
    for event in events:
        view.handle(event)
    return view.markdown()
