"""Context compaction against the fake server: real HTTP, real openai client, real DuckDB."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nbchat
from nbchat import ConfigError, Message, Session, ToolCall
from nbchat._compaction import Compaction, CompactionContext, CompactionStrategy
from nbchat._exceptions import ModelAPIError
from nbchat._history import (
    TokenEstimator,
    is_context_overflow,
    live_order,
    split_history,
    validate_history,
    window_from_error,
)
from nbchat._store import Store
from nbchat._summary import SUMMARY_HEADER
from nbchat.testing import (
    ErrorSpec,
    FakeOpenAIServer,
    Reply,
    chat_request,
    estimate_prompt_tokens,
)

SUMMARISER = "summariser"
Body = dict[str, Any]


pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


# --------------------------------------------------------------------------- helpers


def is_summary_request(body: Body) -> bool:
    first = chat_request(body)["messages"][0]
    return first["role"] == "system" and first["content"].startswith("You condense")


def last_user(body: Body) -> str:
    return str([m for m in chat_request(body)["messages"] if m["role"] == "user"][-1]["content"])


def chatty(
    reply_chars: int = 200, summary: Callable[[Body], Reply | str] | None = None
) -> Callable[[Body], Reply | str]:
    """A fallback: summaries for summariser requests, a longish answer to anything else."""
    count = 0

    def fallback(body: Body) -> Reply | str:
        nonlocal count
        if is_summary_request(body):
            count += 1
            if summary is not None:
                return summary(body)
            return f"Summary {count}: the user sent numbered messages; all were answered."
        return f"Answer to {last_user(body)[:20]}: " + "z" * reply_chars

    return fallback


def make(fake: FakeOpenAIServer, db: Any = False, **kw: Any) -> Session:
    kw.setdefault("max_retries", 0)
    return Session(model="test-model", base_url=fake.url, api_key="sk-test", db=db, **kw)


def chat_requests(fake: FakeOpenAIServer) -> list[Body]:
    return [b for b in fake.chat_requests if not is_summary_request(b)]


def summaries_in(body: Body) -> list[int]:
    """Indexes of compaction summaries in a request's messages."""
    return [
        i
        for i, m in enumerate(body["messages"])
        if m["role"] == "system" and (m["content"] or "").startswith(SUMMARY_HEADER)
    ]


def check_tool_pairs(messages: list[Body]) -> None:
    """Every assistant tool call is answered right after it; no orphan tool results."""
    expected: set[str] = set()
    for m in messages:
        if m["role"] == "tool":
            assert m["tool_call_id"] in expected, f"orphan tool result {m['tool_call_id']}"
            expected.discard(m["tool_call_id"])
            continue
        assert not expected, f"tool calls {expected} lost their results"
        if m["role"] == "assistant" and m.get("tool_calls"):
            expected = {c["id"] for c in m["tool_calls"]}
    assert not expected


def rows(db: Path, sql: str, *params: Any) -> list[dict[str, Any]]:
    with Store.open(str(db)) as store:
        result = store.query(sql, list(params))
    columns = {c: result.data[c].tolist() for c in result.columns}
    n = len(next(iter(columns.values()))) if columns else 0
    return [{c: v[i] for c, v in columns.items()} for i in range(n)]


def msg(role: str, content: str = "", **kw: Any) -> Message:
    return Message(role=role, content=content, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the rules


def test_split_keeps_system_prompt_and_last_exchanges_and_tool_groups() -> None:
    call = ToolCall(id="c1", name="t", arguments="{}")
    history = [
        msg("system", "sys"),
        msg("system", SUMMARY_HEADER + "old", status="summary"),
        msg("user", "u1"),
        msg("assistant", "a1"),
        msg("user", "u2"),
        Message(role="assistant", tool_calls=[call]),
        Message(role="tool", tool_call_id="c1", content="r"),
        msg("assistant", "a2"),
        msg("user", "u3"),
        msg("assistant", "a3"),
    ]
    split = split_history(history, keep_last_n=2)
    assert split.head == history[:1]
    assert split.summary is history[1]
    assert split.middle == history[2:4]
    assert split.tail == history[4:], "the tool group stays with its exchange"
    assert split_history(history, keep_last_n=5).middle == [], "too few exchanges to fold"
    assert split_history(history[2:], keep_last_n=1).head == []


def test_validate_history_finds_split_tool_groups() -> None:
    calls = [ToolCall(id="a", name="t"), ToolCall(id="b", name="t")]
    asked = Message(role="assistant", tool_calls=calls)
    ra = Message(role="tool", tool_call_id="a", content="1")
    rb = Message(role="tool", tool_call_id="b", content="2")
    assert validate_history([msg("user", "q"), asked, ra, rb, msg("assistant", "ok")]) is None
    assert "lost their results" in (validate_history([msg("user", "q"), asked, ra]) or "")
    assert "no assistant tool call" in (validate_history([msg("user", "q"), rb]) or "")
    assert "lost their results" in (validate_history([asked, ra, msg("user", "x"), rb]) or "")


def test_live_order_moves_the_summary_back_after_the_system_prompt() -> None:
    system, u, a = msg("system", "sys"), msg("user", "u"), msg("assistant", "a")
    summary = msg("system", "s", status="summary")
    assert live_order([system, u, a, summary]) == [system, summary, u, a]
    assert live_order([u, a, summary]) == [summary, u, a]
    assert live_order([system, u]) == [system, u]


def test_estimate_is_calibrated_and_only_estimates_what_was_added() -> None:
    est = TokenEstimator()
    history = [msg("system", "s" * 400), msg("user", "u" * 400)]
    raw = TokenEstimator.heuristic(history)
    assert est.estimate(history) == math.ceil(raw), "uncalibrated: characters / 4"
    # A server whose tokenizer counts double, plus 50 tokens of fixed overhead.
    est.observe(history, 0, prompt_tokens=int(2 * raw) + 50)
    added = [msg("assistant", "a" * 800)]
    # The anchor is exact; what was added is estimated with the ratio, still 1.0 ...
    assert est.estimate(history + added) == int(2 * raw) + 50 + math.ceil(
        TokenEstimator.heuristic(added)
    )
    # ... until the server's count has grown once: the ratio comes from the growth.
    history += added
    est.observe(history, 0, prompt_tokens=int(2 * TokenEstimator.heuristic(history)) + 50)
    assert est.ratio == pytest.approx(2.0, rel=0.01)
    more = [msg("user", "u" * 400)]
    expected = 2 * TokenEstimator.heuristic(history + more) + 50
    assert est.estimate(history + more) == pytest.approx(expected, abs=2)
    # A history that is not an extension of the observed one follows the same line.
    other = [history[0], msg("user", "x" * 400)]
    assert est.estimate(other) == pytest.approx(2 * TokenEstimator.heuristic(other) + 50, abs=2)
    # Tool definitions count too.
    assert est.estimate(history, extra_chars=400) == pytest.approx(
        2 * TokenEstimator.heuristic(history) + 50 + 200, abs=2
    )


def test_an_estimate_grown_request_by_request_equals_one_measured_at_once() -> None:
    """Observing an extended history measures only what was added; the sums agree."""
    grown, fresh = TokenEstimator(), TokenEstimator()
    history = [msg("system", "s" * 120)]
    for n in range(1, 40):
        history = [*history, msg("user" if n % 2 else "assistant", f"{n} " + "w" * (n * 37))]
        grown.observe(history, extra_chars=n % 3 * 100, prompt_tokens=10 * n + 200)
    fresh.observe(history, extra_chars=39 % 3 * 100, prompt_tokens=10 * 39 + 200)
    fresh.ratio = grown.ratio
    later = [*history, msg("user", "x" * 500)]
    assert grown.estimate(later, 300) == fresh.estimate(later, 300)
    assert grown._anchor_raw == fresh._anchor_raw and grown._anchor_ids == fresh._anchor_ids
    # A history that is no extension (a compaction) is measured again from the start.
    folded = [history[0], *history[30:]]
    grown.observe(folded, extra_chars=0, prompt_tokens=300)
    assert grown._anchor_raw == TokenEstimator.heuristic(folded)
    assert set(grown._sizes) <= {m.id for m in later}


def test_overflow_errors_are_recognised_in_openai_and_llama_cpp_shapes() -> None:
    openai_style = ModelAPIError(
        "The model server answered HTTP 400: This model's maximum context length is 8192 "
        "tokens. However, your messages resulted in 9000 tokens.",
        status_code=400,
        code="context_length_exceeded",
    )
    llama_style = ModelAPIError(
        "the request exceeds the available context size",
        status_code=400,
        body={"error": {"type": "exceed_context_size_error", "n_ctx": 2048, "code": 400}},
        code="400",
    )
    other = ModelAPIError("rate limited", status_code=429, code="rate_limit_exceeded")
    assert is_context_overflow(openai_style) and window_from_error(openai_style) == 8192
    assert is_context_overflow(llama_style) and window_from_error(llama_style) == 2048
    assert not is_context_overflow(other) and window_from_error(other) is None


def test_bad_options_are_refused(fake: FakeOpenAIServer) -> None:
    with pytest.raises(ConfigError, match="compaction="):
        make(fake, compaction="shrink")
    with pytest.raises(ConfigError, match="trigger_ratio"):
        make(fake, trigger_ratio=1.5)
    with pytest.raises(ConfigError, match="keep_last_n"):
        make(fake, keep_last_n=0)
    with pytest.raises(ConfigError, match="context_window"):
        make(fake, context_window=0)


# --------------------------------------------------------------------------- long sessions


def test_sixty_turns_compact_repeatedly_with_bounded_prompts(db_path: Path) -> None:
    window = 2000
    events: list[Any] = []
    with FakeOpenAIServer(context_window=window, fallback=chatty()) as fake:
        s = make(
            fake,
            db=db_path,
            system="You are terse.",
            context_window=window,
            summary_model=SUMMARISER,
            on_event=events.append,
        )
        for i in range(60):
            r = s.send(f"message {i}: " + "q" * 150)
            assert r.status == "completed", r.error
            assert r.rounds == 1, "summariser requests are not rounds"
        chat = chat_requests(fake)
        summary_bodies = [b for b in fake.chat_requests if is_summary_request(b)]

    assert len(chat) == 60
    sizes = [estimate_prompt_tokens(b["messages"]) for b in chat]
    assert max(sizes) <= 0.8 * window, "compaction keeps every prompt under the trigger"
    assert sizes[-1] < sizes[len(sizes) // 2] * 2, "no growth with the conversation"
    compactions = [e for e in events if e.kind == "compaction"]
    assert len(compactions) >= 5 and all(c.error is None for c in compactions)
    assert all(c.tokens_after < c.tokens_before for c in compactions)
    assert all(b["model"] == SUMMARISER for b in summary_bodies)
    assert len(summary_bodies) == len(compactions)

    # Exactly one summary is live after the first compaction, right after the system prompt.
    first = next(i for i, b in enumerate(chat) if summaries_in(b))
    assert all(summaries_in(b) == [] for b in chat[:first])
    assert all(summaries_in(b) == [1] for b in chat[first:])
    assert all(b["messages"][0]["content"] == "You are terse." for b in chat)
    # Each new summary is written from the previous one (folded in, not stacked).
    assert all("[earlier summary]" in b["messages"][1]["content"] for b in summary_bodies[1:])
    # The last 4 exchanges are always there verbatim.
    assert [m["content"] for m in chat[-1]["messages"] if m["role"] == "user"][-4:] == [
        f"message {i}: " + "q" * 150 for i in range(56, 60)
    ]
    [live_summary] = [m for m in s.history if m.status == "summary"]
    assert live_summary.content == SUMMARY_HEADER + compactions[-1].summary

    # The store has every compaction, and every folded message, marked compacted.
    stored = rows(db_path, "SELECT * FROM compactions ORDER BY created_at")
    assert len(stored) == len(compactions)
    assert all(r["from_seq"] <= r["to_seq"] and r["model"] == SUMMARISER for r in stored)
    states = rows(
        db_path,
        "SELECT state, status, count(*) AS n FROM messages GROUP BY ALL ORDER BY ALL",
    )
    by = {(r["state"], r["status"]): r["n"] for r in states}
    assert by[("active", "summary")] == 1
    assert by[("compacted", "summary")] == len(compactions) - 1
    assert by[("compacted", "ok")] + by[("active", "ok")] == 1 + 120, "nothing is lost"
    purposes = rows(db_path, "SELECT purpose, count(*) AS n FROM requests GROUP BY ALL")
    assert {r["purpose"]: r["n"] for r in purposes} == {"chat": 60, "summary": len(compactions)}


def test_tool_groups_are_never_split(fake: FakeOpenAIServer) -> None:
    @nbchat.tool
    def lookup(key: str) -> str:
        """Look a key up."""
        return f"value of {key}: " + "v" * 120

    def fallback(body: Body) -> Reply | str:
        if is_summary_request(body):
            return "Summary: lookups were made and answered."
        messages = chat_request(body)["messages"]
        last_user_at = max(i for i, m in enumerate(messages) if m["role"] == "user")
        rounds = sum(
            1 for m in messages[last_user_at:] if m["role"] == "assistant" and m.get("tool_calls")
        )
        if rounds < 2:  # two rounds of three parallel calls per turn
            return Reply(
                tool_calls=[{"name": "lookup", "arguments": {"key": f"k{j}"}} for j in range(3)]
            )
        return "done: " + "d" * 80

    fake.fallback = fallback
    events: list[Any] = []
    s = make(fake, tools=[lookup], context_window=3000, on_event=events.append)
    for i in range(20):
        r = s.send(f"turn {i}")
        assert r.status == "completed" and len(r.tool_calls) == 6
    compactions = [e for e in events if e.kind == "compaction"]
    assert len(compactions) >= 3 and all(c.error is None for c in compactions)
    for body in chat_requests(fake):
        check_tool_pairs(body["messages"])
        assert estimate_prompt_tokens(body["messages"]) <= 3000
    assert validate_history(s.history) is None
    summary_prompt = next(b for b in fake.chat_requests if is_summary_request(b))
    assert "(calls tool lookup with" in summary_prompt["messages"][1]["content"]


def test_a_failing_summariser_leaves_the_turn_working(fake: FakeOpenAIServer) -> None:
    broken = Reply(error=ErrorSpec(status=500, message="summariser is down", should_retry=False))
    fake.fallback = chatty(summary=lambda body: broken)
    events: list[Any] = []
    s = make(fake, context_window=1200, on_event=events.append)
    for i in range(12):
        assert s.send(f"message {i}: " + "q" * 200).status == "completed"
    failures = [e for e in events if e.kind == "compaction"]
    assert failures and all("summariser is down" in (e.error or "") for e in failures)
    assert not any(e.kind == "messages_marked" for e in events), "nothing was folded"
    assert len(s.history) == 24, "the history is intact"
    summary_requests = [b for b in fake.chat_requests if is_summary_request(b)]
    assert len(summary_requests) == len(failures), "one attempt per turn, not per request"
    usage = [e for e in events if e.kind == "usage" and e.purpose == "summary"]
    assert len(usage) == len(failures) and all(u.error for u in usage)
    # Once the summariser works again, the next turn compacts.
    fake.fallback = chatty()
    events.clear()
    assert s.send("and now?").status == "completed"
    [ok] = [e for e in events if e.kind == "compaction"]
    assert ok.error is None and ok.tokens_after < ok.tokens_before


def test_an_empty_summary_is_a_failure_not_a_compaction(fake: FakeOpenAIServer) -> None:
    fake.fallback = chatty(summary=lambda body: "   ")
    events: list[Any] = []
    s = make(fake, context_window=1000, on_event=events.append)
    for i in range(10):
        assert s.send(f"m{i} " + "q" * 200).status == "completed"
    errors = [e.error for e in events if e.kind == "compaction"]
    assert errors and all("empty summary" in (e or "") for e in errors)


def test_a_summary_that_saves_little_is_refused(fake: FakeOpenAIServer) -> None:
    """An "echo" summariser repeats the transcript: folding it would gain nothing."""
    fake.fallback = chatty(summary=lambda body: chat_request(body)["messages"][-1]["content"])
    events: list[Any] = []
    s = make(fake, context_window=1500, on_event=events.append)
    for i in range(12):
        assert s.send(f"m{i} " + "q" * 200).status == "completed"
    errors = [e.error or "" for e in events if e.kind == "compaction"]
    assert errors and all("not much shorter" in e for e in errors)
    assert not any(m.status == "summary" for m in s.history)
    turns_with_attempts = {e.turn_id for e in events if e.kind == "compaction"}
    assert len(turns_with_attempts) == len(errors), "at most one attempt per turn"


def test_context_length_exceeded_forces_one_compaction_and_a_retry(db_path: Path) -> None:
    events: list[Any] = []
    # The session does not know the window (test-model is unknown to genai-prices);
    # the server enforces 1500 tokens and says so in its error message.
    with FakeOpenAIServer(context_window=1500, fallback=chatty()) as fake:
        s = make(fake, db=db_path, on_event=events.append)
        for i in range(30):
            r = s.send(f"message {i}: " + "q" * 200)
            assert r.status == "completed", r.error
        refused = [e for e in events if e.kind == "usage" and e.error]
    assert len(refused) == 1, "after one overflow the window is known: compaction comes first"
    assert "context length" in (refused[0].error or "")
    assert refused[0].usage.prompt_tokens == 0 and refused[0].cost_usd == 0.0
    [recovered] = [
        e.result for e in events if e.kind == "turn_finished" and e.turn_id == refused[0].turn_id
    ]
    assert recovered.status == "completed" and recovered.rounds == 1
    compactions = [e for e in events if e.kind == "compaction"]
    assert len(compactions) >= 3 and all(c.error is None for c in compactions)
    stored = rows(db_path, "SELECT count(*) AS n FROM requests WHERE error IS NOT NULL")
    assert stored == [{"n": 1}]


def test_llama_cpp_overflow_without_a_window_still_recovers(fake: FakeOpenAIServer) -> None:
    def fallback(body: Body) -> Reply | str:
        messages = chat_request(body)["messages"]
        if not is_summary_request(body) and estimate_prompt_tokens(messages) > 1200:
            return Reply(
                error=ErrorSpec(
                    status=400,
                    type="exceed_context_size_error",
                    message="the request exceeds the available context size",
                )
            )
        return chatty()(body)

    fake.fallback = fallback
    events: list[Any] = []
    s = make(fake, on_event=events.append)
    for i in range(20):
        assert s.send(f"message {i}: " + "q" * 200).status == "completed"
    compactions = [e for e in events if e.kind == "compaction"]
    refused = [e for e in events if e.kind == "usage" and e.error]
    assert compactions and len(refused) == len(compactions), "each overflow: compact, retry"


def test_an_exchange_too_long_to_fold_ends_the_turn_with_the_error(
    fake: FakeOpenAIServer,
) -> None:
    fake.context_window = 300
    fake.fallback = chatty()
    events: list[Any] = []
    r = make(fake, on_event=events.append).send("x" * 2000)
    assert r.status == "error" and "context length" in (r.error or "")
    [failed] = [e for e in events if e.kind == "compaction"]
    assert "nothing can be folded" in (failed.error or "")
    assert len(fake.requests) == 1, "no retry without a compaction"


def test_without_compaction_an_overflow_is_an_error(fake: FakeOpenAIServer) -> None:
    fake.context_window = 800
    fake.fallback = chatty()
    s = make(fake, compaction=None, context_window=800)
    statuses = [s.send(f"m{i} " + "q" * 300).status for i in range(8)]
    assert "error" in statuses and not any(b for b in fake.chat_requests if is_summary_request(b))


def test_unknown_window_means_no_automatic_compaction(fake: FakeOpenAIServer) -> None:
    fake.fallback = chatty()
    events: list[Any] = []
    s = make(fake, on_event=events.append)
    for i in range(15):
        s.send(f"m{i} " + "q" * 300)
    assert not [e for e in events if e.kind == "compaction"]
    assert estimate_prompt_tokens(chat_requests(fake)[-1]["messages"]) > 2000


def test_the_trigger_follows_the_servers_token_counts(fake: FakeOpenAIServer) -> None:
    """A server whose tokenizer counts 2x the heuristic: compaction comes at half the size."""

    def fallback(body: Body) -> Reply | str:
        if is_summary_request(body):
            return "Summary: numbered messages."
        tokens = 2 * estimate_prompt_tokens(chat_request(body)["messages"])
        return Reply(
            text="ok " + "z" * 100, usage={"prompt_tokens": tokens, "completion_tokens": 30}
        )

    fake.fallback = fallback
    events: list[Any] = []
    s = make(fake, context_window=4000, on_event=events.append)
    reported: list[int] = []
    for i in range(20):
        reported.append(s.send(f"m{i} " + "q" * 200).usage.prompt_tokens or 0)
    compactions = [e for e in events if e.kind == "compaction"]
    assert compactions and all(c.error is None for c in compactions)
    # No prompt the server counted passed 0.8 × 4000: compaction always came first ...
    assert max(reported) < 3200
    # ... and not much earlier: the estimate that triggered it was the server's count
    # plus one turn's growth (a turn adds ~85 heuristic tokens, 170 server tokens).
    assert 3200 <= compactions[0].tokens_before <= 3200 + 200
    assert max(reported) > 3200 - 400, "an uncalibrated estimate would compact at half size"


# --------------------------------------------------------------------------- strategies


def test_window_strategy_drops_oldest_exchanges_without_a_model(fake: FakeOpenAIServer) -> None:
    fake.fallback = chatty()
    events: list[Any] = []
    s = make(fake, system="sys", compaction="window", context_window=2000, on_event=events.append)
    for i in range(40):
        assert s.send(f"message {i}: " + "q" * 150).status == "completed"
    assert not [b for b in fake.chat_requests if is_summary_request(b)]
    compactions = [e for e in events if e.kind == "compaction"]
    assert compactions and all(c.strategy == "window" and c.model is None for c in compactions)
    assert all(c.cost_usd == 0.0 and c.summary is None for c in compactions)
    sizes = [estimate_prompt_tokens(b["messages"]) for b in fake.chat_requests]
    assert max(sizes) <= 1600
    assert fake.chat_requests[-1]["messages"][0] == {"role": "system", "content": "sys"}
    kept = [m for m in s.history if m.role == "user"]
    assert len(kept) > 4, "a sliding window keeps more than keep_last_n when it fits"
    assert kept[-1].content == "message 39: " + "q" * 150


def test_a_custom_strategy_is_used_and_checked(fake: FakeOpenAIServer) -> None:
    class KeepLastExchange:
        name = "last-only"

        async def compact(self, ctx: CompactionContext) -> Compaction | None:
            everything = ctx.split.middle + ctx.split.tail
            last_user = max(i for i, m in enumerate(everything) if m.role == "user")
            summary = await ctx.summarise(everything[:last_user])
            return Compaction(fold=everything[:last_user], summary=summary.upper())

    class SplitsAToolGroup:
        name = "broken"

        async def compact(self, ctx: CompactionContext) -> Compaction | None:
            return Compaction(fold=[m for m in ctx.messages if m.role == "tool"][:1])

    assert isinstance(KeepLastExchange(), CompactionStrategy)
    fake.fallback = chatty()
    events: list[Any] = []
    s = make(fake, compaction=KeepLastExchange(), context_window=900, on_event=events.append)
    for i in range(8):
        assert s.send(f"m{i} " + "q" * 200).status == "completed"
    done = [e for e in events if e.kind == "compaction"]
    assert done and all(e.strategy == "last-only" and e.error is None for e in done)
    assert [m.role for m in s.history[:2]] == ["system", "user"]
    assert "SUMMARY" in (s.history[0].content or "")

    @nbchat.tool
    def ping() -> str:
        """Ping."""
        return "pong " + "p" * 1200

    fake.reset()
    fake.enqueue(tool_calls=[{"name": "ping"}])
    fake.fallback = chatty()
    events.clear()
    s = make(
        fake,
        compaction=SplitsAToolGroup(),
        tools=[ping],
        context_window=300,
        on_event=events.append,
    )
    r = s.send("go")
    assert r.status == "completed"
    [refused] = [e for e in events if e.kind == "compaction"]
    assert "invalid" in (refused.error or "") and "lost their results" in (refused.error or "")
    check_tool_pairs(fake.chat_requests[-1]["messages"])


def test_a_reopened_session_puts_the_summary_back_in_place(db_path: Path) -> None:
    with FakeOpenAIServer(fallback=chatty()) as fake:
        s = make(fake, db=db_path, system="sys", context_window=1500)
        for i in range(15):
            s.send(f"m{i} " + "q" * 200)
        assert [m.status for m in s.history[:2]] == ["ok", "summary"]
        live = [m.id for m in s.history]
        again = make(fake, db=db_path, session_id=s.id, context_window=1500)
        assert [m.id for m in again.history] == live
        assert again.messages == s.messages
        again.send("after reopening")
        body = fake.chat_requests[-1]
        assert summaries_in(body) == [1] and body["messages"][0]["content"] == "sys"
    compacted = rows(
        db_path, "SELECT count(*) AS n FROM messages WHERE state = 'compacted' AND role = 'user'"
    )
    assert compacted[0]["n"] > 0, "folded messages stay in the store"


def test_the_compaction_notice_reads_well() -> None:
    from nbchat._render import TurnView

    view = TurnView("m")
    view.handle(nbchat.CompactionEvent(strategy="summary", tokens_before=3210, tokens_after=812))
    view.handle(nbchat.CompactionEvent(strategy="summary", error="the summary model failed"))
    text = view.markdown()
    assert "Context compacted (summary)" in text and "3210" in text and "812" in text
    assert "continuing uncompacted" in text


def test_the_window_the_server_reports_drives_compaction() -> None:
    """vLLM-style: genai-prices does not know the model; /v1/models says max_model_len."""
    with FakeOpenAIServer(
        fallback="Noted.",
        models=["local-model"],
        model_info={"local-model": {"max_model_len": 1500}},
    ) as fake:
        s = nbchat.Session(
            model="local-model", base_url=fake.url, api_key="k", db=":memory:", compaction="window"
        )
        for i in range(20):
            s.send(f"note {i}: " + "lorem ipsum " * 30)
        assert len(nbchat.compactions(db=s.store)) >= 1
        assert max(len(r["messages"]) for r in fake.chat_requests) < 40
        assert s.client.cached_context_window() == 1500  # asked once, then cached


def test_transcript_export_and_import_keep_the_summary_where_the_context_has_it(
    db_path: Path,
) -> None:
    """The summary replaces the start of the conversation: every view of the session puts
    it there (after the system prompt), not at the place its number was given, which
    would put the summary of old turns after newer ones and split a question from its
    answer; with the folded messages shown too, it follows the last one it folds."""
    import json

    with FakeOpenAIServer(fallback=chatty()) as fake:
        s = make(fake, db=db_path, system="sys", context_window=1500)
        for i in range(15):
            s.send(f"m{i} " + "q" * 200)
        live = [m.id for m in s.history]
        assert s.history[1].status == "summary"
        summary = s.history[1]

        frame = nbchat.transcript(s.id, db=db_path)
        assert frame["id"].tolist() == live
        exported = json.loads(nbchat.export_session(s.id, db=db_path))
        assert [m["role"] for m in exported][:2] == ["system", "system"]
        assert exported[1]["content"] == summary.content
        assert [m.get("content") for m in exported] == [m.content for m in s.history]

        everything = nbchat.transcript(s.id, db=db_path, include_compacted=True)
        ids = everything["id"].tolist()
        at = ids.index(summary.id)
        folded = everything[everything["state"] == "compacted"]
        assert at > max(ids.index(i) for i in folded["id"] if i != summary.id)
        assert everything["state"].iloc[at + 1 :].eq("active").all()

        copy = nbchat.import_session(nbchat.export_session(s.id, db=db_path), db=db_path)
        again = make(fake, db=db_path, session_id=copy)
        assert [m.content for m in again.history] == [m.content for m in s.history]
        again.send("after import")
        assert summaries_in(fake.chat_requests[-1]) == [1]


def test_a_summary_numbered_after_newer_messages_is_still_shown_in_place(db_path: Path) -> None:
    """Stores written before summaries were numbered in place have the live summary
    after the messages it precedes: transcript() and export put it back."""
    import json

    history = [
        msg("system", "sys", seq=0),
        msg("user", "kept question", seq=31),
        msg("assistant", "kept answer", seq=32),
        msg("system", SUMMARY_HEADER + "earlier", status="summary", seq=33),
    ]
    with Store.open(db_path) as store:
        store.create_session(session_id="old", model="m", system_prompt="sys", messages=history)
    order = ["sys", SUMMARY_HEADER + "earlier", "kept question", "kept answer"]
    assert nbchat.transcript("old", db=db_path)["content"].tolist() == order
    exported = json.loads(nbchat.export_session("old", db=db_path))
    assert [m["content"] for m in exported] == order


def test_a_markdown_export_can_hold_the_whole_conversation(db_path: Path) -> None:
    """A compacted chat's export shows its summary as one (not as a system message), and
    ``include_compacted`` gives back every turn, the folded ones marked, in order."""
    with FakeOpenAIServer(fallback=chatty()) as fake:
        s = make(fake, db=db_path, system="sys", context_window=1500)
        for i in range(15):
            s.send(f"m{i} " + "q" * 200)
    live = nbchat.export_session(s.id, "markdown", db=db_path)
    assert "## Summary of the earlier conversation" in live and "\n\nm0 q" not in live
    assert "[Summary of the earlier part" not in live
    whole = nbchat.export_session(s.id, "markdown", db=db_path, include_compacted=True)
    at = [whole.index(f"\n\nm{i} q") for i in range(15)]
    assert at == sorted(at), "every turn, in order"
    assert "## User (folded into a summary)" in whole
    last_folded = whole.rindex("(folded into a summary)")
    summary = whole.index("## Summary of the earlier conversation")
    first_kept = whole.index("\n## User\n")
    assert last_folded < summary < first_kept
    with pytest.raises(ValueError, match="include_compacted=True is for format='markdown'"):
        nbchat.export_session(s.id, db=db_path, include_compacted=True)
