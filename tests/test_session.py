"""The session loop against the fake server, over real HTTP with the real openai client."""

from __future__ import annotations

import _thread
import asyncio
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import nbchat
from nbchat import ConfigError, Session, SessionPendingError
from nbchat._wire import SSEParser
from nbchat.testing import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


# How many events each wire format sends before the first text (chat: the role chunk;
# Responses: created, in_progress, output_item.added, content_part.added): a cut_after
# past them cuts inside the text on both.
OPENING = {"chat": 1, "responses": 4}


def make(fake: FakeOpenAIServer, db: Any = False, **kw: Any) -> Session:
    kw.setdefault("max_retries", 0)
    return Session(model="test-model", base_url=fake.url, api_key="sk-secret-123", db=db, **kw)


def kinds(events: list[Any]) -> list[str]:
    return [e.kind for e in events]


def payload(message: dict[str, Any]) -> dict[str, Any]:
    return json.loads(message["content"])  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- replies


def test_plain_streamed_reply(fake: FakeOpenAIServer, wire: str) -> None:
    fake.enqueue("Hello there, notebook!", chunk_size=3)
    s = make(fake, system="Be terse.")
    events: list[Any] = []
    r = s.send("hi", on_event=events.append)

    assert r.status == "completed"
    assert r.text == "Hello there, notebook!"
    assert r.usage.prompt_tokens and r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens and r.usage.completion_tokens > 0
    assert r.session_id == s.id and r.turn_id
    ks = kinds(events)
    assert ks[0] == "turn_started" and ks[-1] == "turn_finished"
    deltas = [e.text for e in events if e.kind == "text_delta"]
    assert "".join(deltas) == "Hello there, notebook!" and len(deltas) == 8
    assert s.messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there, notebook!"},
    ]
    body = fake.chat_requests[0]
    assert body["stream"] is True and body["model"] == "test-model"
    if wire == "chat":  # the Responses API always sends usage: it has no stream_options
        assert body["stream_options"] == {"include_usage": True}


def test_conversation_continues_across_sends(fake: FakeOpenAIServer) -> None:
    fake.enqueue("one")
    fake.enqueue("two")
    s = make(fake)
    s.send("first")
    s.send("second")
    assert [m["content"] for m in fake.chat_requests[1]["messages"]] == ["first", "one", "second"]


def test_multibyte_characters_split_across_chunks(fake: FakeOpenAIServer) -> None:
    text = "naïve café — 数据分析 🐼📊 done"
    fake.enqueue(text, chunk_size=1)
    assert make(fake).send("go").text == text


def test_sse_parser_joins_bytes_split_inside_a_utf8_character() -> None:
    line = 'data: {"choices":[{"delta":{"content":"🐼"}}]}\n\n'.encode()
    cut = line.index("🐼".encode()) + 2  # in the middle of the 4-byte panda
    parser = SSEParser()
    assert parser.feed(line[:cut]) == []
    [payload_bytes] = parser.feed(line[cut:] + b"data: [DONE]\n\n")
    assert json.loads(payload_bytes)["choices"][0]["delta"]["content"] == "🐼"
    assert parser.done


def test_server_without_usage_gives_unknown_not_zero(fake: FakeOpenAIServer) -> None:
    fake.enqueue("ok", usage=None)
    r = make(fake).send("hi")
    assert r.status == "completed"
    assert r.usage.prompt_tokens is None and r.usage.completion_tokens is None
    assert r.cost_usd is None and r.usage.requests == 1


def test_non_streaming_mode(fake: FakeOpenAIServer) -> None:
    fake.enqueue("whole reply")
    r = make(fake, stream=False).send("hi")
    assert r.text == "whole reply" and r.status == "completed"
    assert "stream" not in fake.chat_requests[0]


# --------------------------------------------------------------------------- tools


class Point(BaseModel):
    x: float
    y: float


def test_three_parallel_tool_calls_with_interleaved_fragments(fake: FakeOpenAIServer) -> None:
    started: list[float] = []

    @nbchat.tool
    def slow_add(a: int, b: int) -> int:
        """Add two numbers slowly."""
        started.append(time.perf_counter())
        time.sleep(0.3)
        return a + b

    @nbchat.tool
    def norm(p: Point) -> float:
        """Length of a point."""
        return float((p.x**2 + p.y**2) ** 0.5)

    fake.enqueue(
        tool_calls=[
            {"name": "slow_add", "arguments": {"a": 1, "b": 2}},
            {"name": "norm", "arguments": {"p": {"x": 3, "y": 4}}},
            {"name": "slow_add", "arguments": {"a": 10, "b": 20}},
        ],
        chunk_size=3,
    )
    fake.enqueue("The answers are 3, 5 and 30.")
    events: list[Any] = []
    r = make(fake, tools=[slow_add, norm]).send("compute", on_event=events.append)

    assert r.status == "completed" and r.text == "The answers are 3, 5 and 30."
    assert [(c.name, c.result) for c in r.tool_calls] == [
        ("slow_add", "3"),
        ("norm", "5.0"),
        ("slow_add", "30"),
    ]
    assert abs(started[0] - started[1]) < 0.2, "the two slow calls ran concurrently"
    started_events = [e for e in events if e.kind == "tool_call_started"]
    assert [e.name for e in started_events] == ["slow_add", "norm", "slow_add"]
    second = fake.chat_requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "tool", "tool", "tool"]
    call_ids = [c["id"] for c in second[1]["tool_calls"]]
    assert [m["tool_call_id"] for m in second[2:]] == call_ids
    assert json.loads(second[1]["tool_calls"][1]["function"]["arguments"]) == {
        "p": {"x": 3, "y": 4}
    }
    assert fake.chat_requests[0]["tools"][0]["function"]["name"] == "slow_add"


@pytest.mark.parametrize(
    ("call", "error_kind"),
    [
        ({"name": "boom", "arguments": {}}, "tool_error"),
        ({"name": "no_such_tool", "arguments": {}}, "unknown_tool"),
        ({"name": "add", "arguments": '{"a": 1, "b": '}, "invalid_json"),
        ({"name": "add", "arguments": {"a": "one", "b": 2}}, "invalid_arguments"),
    ],
)
def test_tool_failures_go_back_to_the_model(
    fake: FakeOpenAIServer, call: dict[str, Any], error_kind: str
) -> None:
    def boom() -> None:
        """Always fails."""
        raise RuntimeError("disk on fire")

    def add(a: int, b: int) -> int:
        """Add."""
        return a + b

    fake.enqueue(tool_calls=[call])
    fake.enqueue("Sorry, that failed.")
    r = make(fake, tools=[boom, add]).send("try")

    assert r.status == "completed" and r.text == "Sorry, that failed."
    [record] = r.tool_calls
    assert record.is_error and record.error_kind == error_kind
    tool_message = fake.chat_requests[1]["messages"][-1]
    body = payload(tool_message)
    assert body["ok"] is False and body["error_kind"] == error_kind and body["message"]
    if error_kind == "tool_error":
        assert "disk on fire" in body["message"]


def test_max_rounds_asks_for_a_final_answer_without_tools(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    def ping() -> str:
        """Ping."""
        return "pong"

    fake.enqueue(tool_calls=[{"name": "ping"}], repeat=2)
    fake.enqueue("best effort answer")
    events: list[Any] = []
    r = make(fake, db=db_path, tools=[ping], max_rounds=2).send(
        "loop forever", on_event=events.append
    )

    assert r.status == "max_rounds" and r.text == "best effort answer"
    # It says why it ended, as a budget's stop does: the limit's notice, also stored.
    assert r.error == (
        "Stopped after 2 rounds of tool calls (max_rounds); "
        "the last answer was asked for without tools."
    )
    assert [e.message for e in events if e.kind == "limit_reached"] == [r.error]
    assert list(nbchat.turns(db_path)["error"]) == [r.error]
    assert len(fake.requests) == 3 and len(r.tool_calls) == 2
    assert "tools" in fake.chat_requests[1] and "tools" not in fake.chat_requests[2]
    assert fake.chat_requests[2]["messages"][-1]["role"] == "system"


def _assistant_messages_are_sendable(messages: list[dict[str, Any]]) -> None:
    """What OpenAI's spec (and Mistral's API) require: an assistant message has content
    or tool calls; and no two user messages in a row (chat templates that alternate)."""
    for m in messages:
        if m["role"] == "assistant":
            assert m.get("content") or m.get("tool_calls"), m
    roles = [m["role"] for m in messages]
    assert not any(a == b == "user" for a, b in itertools.pairwise(roles)), roles


def test_tool_calls_in_the_last_round_are_answered_not_dropped(fake: FakeOpenAIServer) -> None:
    """A model that still calls tools when asked for its final answer: its calls are kept
    and answered as not run, so the cell's tool block ends and the history stays valid."""

    def ping() -> str:
        """Ping."""
        return "pong"

    fake.enqueue(tool_calls=[{"name": "ping"}], repeat=2)
    fake.enqueue("after the limit")
    session = make(fake, tools=[ping], max_rounds=1)
    events: list[Any] = []
    r = session.send("loop forever", on_event=events.append)

    assert r.status == "max_rounds"
    started = [e.call_id for e in events if e.kind == "tool_call_started"]
    finished = [e.call.call_id for e in events if e.kind == "tool_result"]
    assert len(started) == 2 and sorted(finished) == sorted(started)
    not_run = r.tool_calls[-1]
    assert not_run.error_kind == "not_run" and "max_rounds" in not_run.result
    assert not not_run.is_error
    stopped = next(e for e in events if e.kind == "limit_reached")
    assert "Stopped after 1 round of tool calls" in stopped.message
    session.send("and now?")
    _assistant_messages_are_sendable(fake.chat_requests[-1]["messages"])


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        ({"text": ""}, "empty reply"),
        ({"text": "", "finish_reason": "length", "reasoning": "hmm " * 5}, "max_tokens"),
        ({"text": "", "finish_reason": "content_filter"}, "content filter"),
    ],
)
def test_an_empty_reply_fails_the_turn_and_leaves_the_conversation(
    fake: FakeOpenAIServer, db_path: Path, reply: dict[str, Any], said: str
) -> None:
    """No text and no tool calls is not an answer: the turn fails saying why, and leaves
    the conversation (stored, superseded), so no later request carries an assistant
    message without content, or two user messages in a row."""
    session = make(fake, db=db_path)
    fake.enqueue(**reply)
    r = session.send("a")
    assert r.status == "error" and said in (r.error or "")
    assert [m.role for m in session.history] == ["system"] or session.history == []
    fake.enqueue("fine")
    assert session.send("b").status == "completed"
    sent = fake.chat_requests[-1]["messages"]
    _assistant_messages_are_sendable(sent)
    assert [m["content"] for m in sent if m["role"] == "user"] == ["b"]
    stored = nbchat.transcript(session.id, db=db_path, include_superseded=True)
    first = stored[stored["content"].eq("a")]
    assert first["state"].tolist() == ["superseded"], "kept in the store, out of the context"


# --------------------------------------------------------------------------- server errors


def test_429_then_success_is_retried_by_the_client(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(429, "slow down", retry_after=0.05)
    fake.enqueue("made it")
    r = make(fake, max_retries=2).send("hi")
    assert r.status == "completed" and r.text == "made it"
    assert len(fake.requests) == 2


def test_429_that_never_clears_ends_the_turn_with_error(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(429, "rate limited", retry_after=0.01, repeat=2)
    s = make(fake, max_retries=1)
    events: list[Any] = []
    r = s.send("hi", on_event=events.append)
    assert r.status == "error" and "429" in (r.error or "")
    [err] = [e for e in events if e.kind == "error"]
    assert err.status_code == 429
    assert s.messages == [{"role": "user", "content": "hi"}], "the user message is kept"


def test_a_failed_turns_question_goes_with_the_next_as_one_user_message(
    fake: FakeOpenAIServer,
) -> None:
    """A trial: after a failed turn the next request carried two user messages in a row,
    which chat templates that want alternating roles refuse. The request joins them;
    the store keeps both."""
    fake.enqueue_error(500, "boom")
    fake.enqueue("answer")
    s = make(fake, max_retries=0)
    assert s.send("first question").status == "error"
    assert s.send("second question").status == "completed"
    sent = fake.chat_requests[-1]["messages"]
    roles = [m["role"] for m in sent]
    assert "user" not in [a for a, b in itertools.pairwise(roles) if a == b], roles
    assert sent[-1] == {"role": "user", "content": "first question\n\nsecond question"}
    assert [m.content for m in s.history if m.role == "user"] == [
        "first question",
        "second question",
    ]


def test_adjacent_user_messages_with_images_join_their_parts_in_order() -> None:
    from nbchat._turn_request import joined_user_messages

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    wire = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "look"},
        {"role": "user", "content": [{"type": "text", "text": "this"}, image]},
        {"role": "assistant", "content": "ok"},
    ]
    joined = joined_user_messages(wire)
    assert joined[1]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "text", "text": "this"},
        image,
    ]
    assert joined[0] is wire[0] and joined[2] is wire[3], "the others are the same dicts"
    alone = [wire[0], wire[1], wire[3]]
    assert joined_user_messages(alone) is alone


def test_500_ends_the_turn_with_error_and_the_next_turn_works(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(500, "kaboom")
    fake.enqueue("recovered")
    s = make(fake)
    r = s.send("hi")
    assert r.status == "error" and "500" in (r.error or "") and "kaboom" in (r.error or "")
    assert r.error == "The model server answered HTTP 500: kaboom"  # the status said once
    assert s.send("again").text == "recovered"


def test_stream_cut_midway_keeps_the_partial_reply(fake: FakeOpenAIServer, wire: str) -> None:
    fake.enqueue("abcdefghijklmnopqrstuvwxyz", chunk_size=2, cut_after=OPENING[wire] + 3)
    s = make(fake)
    r = s.send("hi")
    assert r.status == "error" and "stream" in (r.error or "")
    [assistant] = [m for m in r.messages if m.role == "assistant"]
    partial = assistant.content or ""
    assert partial and "abcdefghijklmnopqrstuvwxyz".startswith(partial) and len(partial) <= 8
    assert assistant.status == "error"
    assert s.messages[-1] == {"role": "assistant", "content": partial}


def test_unreachable_server_is_a_clear_error() -> None:
    with FakeOpenAIServer() as server:
        url = server.url
    r = Session(model="m", base_url=url, db=False, max_retries=0).send("hi")
    assert r.status == "error" and "connect" in (r.error or "").lower()


# --------------------------------------------------------------------------- cancellation


def test_cancel_from_another_thread_mid_stream(fake: FakeOpenAIServer) -> None:
    fake.enqueue("x" * 2000, chunk_size=1, delay=0.01)  # 20 s, were it not stopped
    fake.enqueue("fine")
    s = make(fake)
    first_delta = threading.Event()

    def watch(event: Any) -> None:
        if event.kind == "text_delta":
            first_delta.set()

    threading.Thread(target=lambda: (first_delta.wait(5), time.sleep(0.1), s.cancel())).start()
    t0 = time.perf_counter()
    r = s.send("long please", on_event=watch)
    assert time.perf_counter() - t0 < 15, "cancel stops at once, not at the end of the reply"
    assert r.status == "interrupted"
    assert 0 < len(r.text) < 2000
    [assistant] = [m for m in r.messages if m.role == "assistant"]
    assert assistant.status == "interrupted" and assistant.content == r.text
    assert s.send("next").text == "fine"
    assert fake.chat_requests[1]["messages"][1] == {"role": "assistant", "content": r.text}


def test_keyboard_interrupt_stops_the_turn(fake: FakeOpenAIServer) -> None:
    fake.enqueue("y" * 3000, chunk_size=1, delay=0.01)  # 30 s, were it not stopped
    s = make(fake)
    seen = threading.Event()

    def interrupt_soon() -> None:
        seen.wait(5)
        time.sleep(0.1)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_soon).start()
    r = s.send("go", on_event=lambda e: e.kind == "text_delta" and seen.set())
    assert r.status == "interrupted" and 0 < len(r.text) < 3000


def test_cancel_while_tools_run_answers_every_call(fake: FakeOpenAIServer) -> None:
    async def slow(n: int) -> int:
        """Sleep."""
        await asyncio.sleep(5)
        return n

    fake.enqueue(
        tool_calls=[
            {"name": "slow", "arguments": {"n": 1}},
            {"name": "slow", "arguments": {"n": 2}},
        ]
    )
    fake.enqueue("after")
    s = make(fake, tools=[slow])

    def stop_when_tools_start(event: Any) -> None:
        if event.kind == "message" and event.message.tool_calls:
            threading.Timer(0.1, s.cancel).start()

    r = s.send("go", on_event=stop_when_tools_start)
    assert r.status == "interrupted"
    tools = [m for m in s.messages if m["role"] == "tool"]
    assert len(tools) == 2 and all(payload(m)["error_kind"] == "cancelled" for m in tools)
    assert s.send("continue").text == "after"


# --------------------------------------------------------------------------- event loops, lock


def test_send_inside_a_running_event_loop(fake: FakeOpenAIServer) -> None:
    fake.enqueue("from inside a loop")
    s = make(fake)

    async def notebook_cell() -> str:
        return s.send("hi").text

    assert asyncio.run(notebook_cell()) == "from inside a loop"


def test_async_stream_yields_typed_events(fake: FakeOpenAIServer) -> None:
    fake.enqueue("streamed", chunk_size=2)
    s = make(fake)

    async def collect() -> list[Any]:
        return [e async for e in s.stream("hi")]

    events = asyncio.run(collect())
    assert events[0].kind == "turn_started" and events[-1].kind == "turn_finished"
    assert events[-1].result.text == "streamed"
    assert isinstance(events[1], nbchat.TurnStarted) is False
    assert all(e.session_id == s.id for e in events)


def test_concurrent_sends_are_serialised(fake: FakeOpenAIServer) -> None:
    fake.enqueue("A", delay=0.05, chunk_size=1)
    fake.enqueue("B", delay=0.05, chunk_size=1)
    s = make(fake)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda q=q: results.append(s.send(q).text)) for q in ("1", "2")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == ["A", "B"]
    assert len(fake.chat_requests[1]["messages"]) == 3, "the second turn saw the whole first turn"


# --------------------------------------------------------------------------- configuration


def test_missing_model_is_a_config_error_saying_what_to_set() -> None:
    with pytest.raises(ConfigError, match="NBCHAT_MODEL"):
        Session(db=False, api_key="k")


def test_missing_key_for_a_remote_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBCHAT_MODEL", "gpt-4o-mini")
    with pytest.raises(ConfigError, match="NBCHAT_API_KEY"):
        Session(db=False)


def test_env_configuration_and_key_never_in_repr(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCHAT_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    fake.enqueue("ok")
    s = Session(db=False)
    s.send("hi")
    assert fake.chat_requests[0]["model"] == "env-model"
    for text in (repr(s), repr(s.client), repr(s.client.settings), str(s.client.settings)):
        assert "sk-very-secret" not in text
    assert all("sk-very-secret" not in json.dumps(h) for h in fake.request_headers)


def test_kernel_defaults_beat_the_environment(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCHAT_MODEL", "env-model")
    nbchat.configure(model="kernel-model", base_url=fake.url)
    fake.enqueue("ok")
    Session(db=False).send("hi")
    assert fake.chat_requests[0]["model"] == "kernel-model"
    with pytest.raises(ConfigError, match="Unknown setting"):
        nbchat.configure(modle="typo")


# --------------------------------------------------------------------------- guardrails, budgets


def test_guardrails_rewrite_and_reject(fake: FakeOpenAIServer) -> None:
    fake.enqueue("my password is hunter2")
    fake.enqueue("never shown")

    def redact(text: str) -> str:
        return text.replace("hunter2", "[redacted]")

    def no_secrets_in(text: str) -> None:
        if "secret" in text:
            raise nbchat.GuardrailRejected("the question asks for a secret")

    s = make(fake, output_guardrails=[redact], input_guardrails=[no_secrets_in])
    assert s.send("what is it?").text == "my password is [redacted]"
    r = s.send("tell me the secret")
    assert r.status == "rejected" and "asks for a secret" in (r.error or "")
    assert len(fake.requests) == 1, "a rejected input never reaches the model"


def test_turn_token_budget_stops_before_the_next_request(fake: FakeOpenAIServer) -> None:
    def ping() -> str:
        """Ping."""
        return "pong"

    fake.enqueue(
        tool_calls=[{"name": "ping"}], usage={"prompt_tokens": 50, "completion_tokens": 10}
    )
    fake.enqueue("unreachable")
    r = make(fake, tools=[ping], turn_max_tokens=40).send("go")
    assert r.status == "budget_exceeded" and "turn_max_tokens" in (r.error or "")
    assert len(fake.requests) == 1


def test_usd_budget_with_unknown_price_says_so(fake: FakeOpenAIServer) -> None:
    fake.enqueue("a")
    fake.enqueue("b")
    events: list[Any] = []
    s = make(fake, budget_usd=0.01)
    s.send("1", on_event=events.append)
    s.send("2", on_event=events.append)
    notices = [e for e in events if e.kind == "notice"]
    assert len(notices) == 1 and "cannot be checked" in notices[0].message


# --------------------------------------------------------------------------- cell re-runs


def test_rerunning_a_cell_forks_the_conversation(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    fake.enqueue("r1")
    fake.enqueue("r2")
    fake.enqueue("r1 again")
    s = make(fake)
    s.send("cell one", cell_id="c1")
    s.send("cell two", cell_id="c2")
    s.send("cell one edited", cell_id="c1")
    assert s.messages == [
        {"role": "user", "content": "cell one edited"},
        {"role": "assistant", "content": "r1 again"},
    ]
    assert fake.chat_requests[2]["messages"] == [{"role": "user", "content": "cell one edited"}]


def test_pending_session_refuses_send(fake: FakeOpenAIServer) -> None:
    s = make(fake)
    s._messages.append(
        nbchat.Message(
            role="assistant", tool_calls=[nbchat.ToolCall(id="c1", name="t", arguments="{}")]
        )
    )
    with pytest.raises(SessionPendingError, match=r"resume\(\).*abort_pending\(\)"):
        s.send("hi")
    [aborted] = s.abort_pending()
    assert aborted.status == "aborted" and payload(aborted.to_openai())["error_kind"] == "aborted"
    fake.enqueue("ok now")
    assert s.send("hi").text == "ok now"


def test_configure_defaults_fill_session_options(fake: FakeOpenAIServer) -> None:
    nbchat.configure(system="Be brief.", temperature=0.25, max_rounds=3, budget_usd=2.0)
    fake.enqueue("ok")
    s = Session(model="m", base_url=fake.url, db=False)
    s.send("hi")
    body = fake.chat_requests[0]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["temperature"] == 0.25
    assert s.max_rounds == 3 and s.budgets.budget_usd == 2.0
    assert Session(model="m", base_url=fake.url, db=False, max_rounds=5).max_rounds == 5


def test_a_failing_on_event_stops_the_turn_and_raises(fake: FakeOpenAIServer) -> None:
    fake.enqueue("z" * 3000, chunk_size=1, delay=0.01)  # 30 s, were it not stopped
    fake.enqueue("next one")
    s = make(fake)

    def broken_display(event: Any) -> None:
        if event.kind == "text_delta":
            raise ValueError("display broke")

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="display broke"):
        s.send("go", on_event=broken_display)
    assert time.perf_counter() - t0 < 15, "the turn was cancelled, not run to its end"
    assert s.history[-1].status == "interrupted"
    assert s.send("again").text == "next one"


def test_send_each_raises_a_failure_of_the_loop_itself_instead_of_dropping_it(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Session(model="m", base_url=fake.url, api_key="k", db=False)
    real = Session._turn

    def broken(self: Session, text: str | None, *args: Any, **kwargs: Any) -> Any:
        if text == "boom":
            raise RuntimeError("a bug in the loop")  # not a turn outcome: nothing to store
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Session, "_turn", broken)
    fake.enqueue("fine")
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        s.send_each(["fine", "boom"], concurrency=1)
