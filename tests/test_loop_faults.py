"""The loop survives what tools, results and the model throw at it (issue 12: 1, 3, 4, 13)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

import pytest

import nbchat
from nbchat import _runner
from nbchat.testing import FakeOpenAIServer

pytestmark = pytest.mark.usefixtures("wire")  # every test here runs on both wire formats


def _session(server: FakeOpenAIServer, tools: list[Any], **kwargs: Any) -> nbchat.Session:
    return nbchat.Session(
        model="any-model", base_url=server.url, api_key="sk-test", tools=tools, **kwargs
    )


def _tool_results(server: FakeOpenAIServer, request: int) -> list[dict[str, Any]]:
    return [m for m in server.chat_requests[request]["messages"] if m["role"] == "tool"]


def sync_interrupt() -> str:
    """Raises KeyboardInterrupt from a thread."""
    raise KeyboardInterrupt


async def async_interrupt() -> str:
    """Raises KeyboardInterrupt on the event loop."""
    raise KeyboardInterrupt


async def async_exit() -> str:
    """Raises SystemExit on the event loop."""
    raise SystemExit(3)


class _HostileRepr:
    def __init__(self, exc: type[BaseException]) -> None:
        self.exc = exc

    def __repr__(self) -> str:
        raise self.exc()


def returns_exit_repr() -> object:
    """Returns a value whose repr raises SystemExit."""
    return _HostileRepr(SystemExit)


def returns_interrupt_repr() -> object:
    """Returns a value whose repr raises KeyboardInterrupt."""
    return _HostileRepr(KeyboardInterrupt)


def _run_with_watchdog(fn: Any, seconds: float = 20.0) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "send() hung"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("tool", [sync_interrupt, async_interrupt])
def test_keyboard_interrupt_in_a_tool_ends_the_turn_interrupted_and_keeps_the_loop(
    fake: FakeOpenAIServer, tool: Any
) -> None:
    s = _session(fake, [tool])
    fake.enqueue(tool_calls=[{"name": tool.__name__, "arguments": {}}])
    result = _run_with_watchdog(lambda: s.send("go"))
    assert result.status == "interrupted"
    assert result.tool_calls[0].is_error
    assert result.tool_calls[0].error_kind == "interrupted"
    # The history stays valid: every call has its answer, and the next turn works.
    assert s.pending_tool_calls == []
    fake.enqueue("still here")
    again = _run_with_watchdog(lambda: s.send("again"))
    assert (again.status, again.text) == ("completed", "still here")
    assert _runner.background_loop().is_running()


def test_system_exit_in_an_async_tool_is_a_tool_error(fake: FakeOpenAIServer) -> None:
    s = _session(fake, [async_exit])
    fake.enqueue(tool_calls=[{"name": "async_exit", "arguments": {}}])
    fake.enqueue("recovered")
    result = _run_with_watchdog(lambda: s.send("go"))
    assert (result.status, result.text) == ("completed", "recovered")
    payload = json.loads(_tool_results(fake, 1)[0]["content"])
    assert payload["ok"] is False and payload["error_kind"] == "tool_error"
    assert "SystemExit" in payload["message"]


@pytest.mark.parametrize("tool", [returns_exit_repr, returns_interrupt_repr])
def test_a_result_whose_repr_raises_base_exceptions_is_described_not_fatal(
    fake: FakeOpenAIServer, tool: Any
) -> None:
    s = _session(fake, [tool])
    fake.enqueue(tool_calls=[{"name": tool.__name__, "arguments": {}}])
    fake.enqueue("fine")
    result = _run_with_watchdog(lambda: s.send("go"))
    assert (result.status, result.text) == ("completed", "fine")
    content = _tool_results(fake, 1)[0]["content"]
    assert "_HostileRepr" in content and "repr() failed" in content


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
def test_a_base_exception_escaping_a_task_does_not_stop_the_background_loop(
    fake: FakeOpenAIServer, exc: type[BaseException]
) -> None:
    loop = _runner.background_loop()

    async def escape() -> None:
        raise exc  # asyncio re-raises these out of run_forever

    asyncio.run_coroutine_threadsafe(escape(), loop)
    s = _session(fake, [])
    fake.enqueue("same loop")
    assert _run_with_watchdog(lambda: s.send("hi")).text == "same loop"
    assert _runner.background_loop() is loop and _runner.loop_alive()


def test_a_stopped_background_loop_is_replaced_and_a_waiting_turn_fails_clearly(
    fake: FakeOpenAIServer,
) -> None:
    s = _session(fake, [])
    fake.enqueue("slow", chunk_size=1, delay=0.5)
    loop = _runner.background_loop()

    def stop_once_asked() -> None:
        # The loop goes away in the middle of the turn: once the server has the request
        # (a fixed delay would race a cold first turn, which the server had not seen yet).
        deadline = time.monotonic() + 10
        while not fake.chat_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=stop_once_asked, daemon=True).start()
    with pytest.raises(nbchat.LoopStopped, match="background event loop stopped"):
        _run_with_watchdog(lambda: s.send("hi"))
    fake.enqueue("new loop")
    assert _run_with_watchdog(lambda: s.send("again")).text == "new loop"
    assert _runner.background_loop() is not loop
    # The dead loop's turn was cancelled and ended there, not left pending on it.
    assert loop.is_closed()
    assert [t["status"] for t in nbchat.turns(s.store, s.id).to_dict("records")] == [
        "interrupted",
        "completed",
    ]


def test_a_lone_surrogate_in_a_tool_result_does_not_poison_the_session(
    fake: FakeOpenAIServer,
) -> None:
    def list_files() -> list[str]:
        """Names of files, one not valid UTF-8."""
        return [os.fsdecode(b"report-\xff.csv"), "ok.csv"]

    s = _session(fake, [list_files])
    fake.enqueue(tool_calls=[{"name": "list_files", "arguments": {}}])
    fake.enqueue("two files")
    result = s.send("what files?")
    assert (result.status, result.text) == ("completed", "two files")
    content = _tool_results(fake, 1)[0]["content"]
    assert "report-\ufffd.csv" in content
    fake.enqueue("next")
    assert s.send("and now?").status == "completed"
    stored = nbchat.transcript(s.id, db=s.store)
    assert stored["content"].str.contains("report-\ufffd.csv", regex=False).any()


def test_a_lone_surrogate_in_the_users_text_is_replaced_visibly(fake: FakeOpenAIServer) -> None:
    s = _session(fake, [])
    fake.enqueue("ok")
    assert s.send("look at \udcff this").status == "completed"
    assert fake.chat_requests[0]["messages"][-1]["content"] == "look at \ufffd this"


def lookup(key: str) -> str:
    """Look a key up."""
    return f"value of {key}"


def test_a_tool_call_without_a_name_becomes_an_error_the_model_sees(
    fake: FakeOpenAIServer,
) -> None:
    s = _session(fake, [lookup])
    fake.enqueue(tool_calls=[{"name": "", "arguments": {"key": "a"}}])
    fake.enqueue("sorry")
    result = s.send("go")
    assert (result.status, result.text) == ("completed", "sorry")
    call = fake.chat_requests[1]["messages"][-2]["tool_calls"][0]
    assert call["function"]["name"]  # never the empty string OpenAI rejects
    payload = json.loads(_tool_results(fake, 1)[0]["content"])
    assert payload["error_kind"] == "invalid_tool_call"
    assert "lookup" in payload["message"]  # tells the model what it can call


def test_duplicate_and_reused_tool_call_ids_are_made_unique(fake: FakeOpenAIServer) -> None:
    s = _session(fake, [lookup])
    fake.enqueue(
        tool_calls=[
            {"id": "call_x", "name": "lookup", "arguments": {"key": "a"}},
            {"id": "call_x", "name": "lookup", "arguments": {"key": "b"}},
        ]
    )
    fake.enqueue(tool_calls=[{"id": "call_x", "name": "lookup", "arguments": {"key": "c"}}])
    fake.enqueue("done")
    result = s.send("go")
    assert result.status == "completed"
    messages = fake.chat_requests[2]["messages"]
    call_ids = [c["id"] for m in messages if m.get("tool_calls") for c in m["tool_calls"]]
    answer_ids = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    assert len(call_ids) == 3 and len(set(call_ids)) == 3
    assert answer_ids == call_ids
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert results == ["value of a", "value of b", "value of c"]
    # Every tool call keeps its own row in the store.
    stored = nbchat.tool_calls(db=s.store, session_id=s.id)
    assert sorted(stored["result"]) == ["value of a", "value of b", "value of c"]


def test_a_cut_stream_keeps_the_partial_text_in_the_result(
    fake: FakeOpenAIServer, wire: str
) -> None:
    s = _session(fake, [])
    opening = 1 if wire == "chat" else 4  # the events before the text (see test_session)
    fake.enqueue("abcdefgh", chunk_size=2, cut_after=opening + 3)
    result = s.send("go")
    assert result.status == "error"
    assert result.text and "abcdefgh".startswith(result.text)
    assert s.messages[-1]["content"] == result.text


def test_a_tool_stopped_mid_run_is_recorded_as_a_cancelled_call(fake: FakeOpenAIServer) -> None:
    running = threading.Event()

    async def slow(n: int) -> int:
        """Sleep."""
        running.set()
        await asyncio.sleep(30)
        return n

    fake.enqueue(tool_calls=[{"name": "slow", "arguments": {"n": 1}}])
    s = _session(fake, [slow])

    def stop_once_it_runs() -> None:  # 0.2 s into the tool's run, however late it began
        if running.wait(30):
            time.sleep(0.2)
        s.cancel()

    threading.Thread(target=stop_once_it_runs, daemon=True).start()
    result = s.send("go")
    assert result.status == "interrupted"
    (record,) = result.tool_calls
    assert (record.name, record.is_error, record.error_kind) == ("slow", True, "cancelled")
    assert record.duration_ms >= 150
    stored = nbchat.tool_calls(db=s.store, session_id=s.id)
    assert list(stored["error_kind"]) == ["cancelled"]
    assert bool(stored["is_error"].iloc[0])


def test_max_rounds_zero_without_tool_calls_is_a_plain_answer(fake: FakeOpenAIServer) -> None:
    s = _session(fake, [lookup], max_rounds=0)
    fake.enqueue("just text")
    events: list[Any] = []
    result = s.send("hi", on_event=events.append)
    assert (result.status, result.text) == ("completed", "just text")
    assert [e for e in events if e.kind == "limit_reached"] == []
    assert "tools" not in fake.chat_requests[0]  # no tool rounds allowed: none offered


def test_a_cancel_after_the_turn_ended_is_no_error(fake: FakeOpenAIServer) -> None:
    """A stop that lands while the finished turn waits for the store does not raise."""
    s = _session(fake, [])
    fake.enqueue("done")

    def stop_at_the_end(event: Any) -> None:
        if event.kind == "turn_finished":
            s.cancel()

    result = s.send("hi", on_event=stop_at_the_end)
    assert (result.status, result.text) == ("completed", "done")
    fake.enqueue("next")
    assert s.send("again").text == "next"


def test_cancel_at_the_first_token_returns_interrupted_every_time(
    fake: FakeOpenAIServer,
) -> None:
    s = _session(fake, [])
    for _ in range(15):
        fake.enqueue("x" * 200, chunk_size=1)

        def stop(event: Any) -> None:
            if event.kind == "text_delta":
                s.cancel()

        result = s.send("go", on_event=stop)
        assert result.status in ("interrupted", "completed")


def test_a_reply_cut_at_max_tokens_says_so(fake: FakeOpenAIServer) -> None:
    s = _session(fake, [])
    fake.enqueue("The first half of an answ", finish_reason="length")
    events: list[Any] = []
    result = s.send("explain", on_event=events.append)
    assert (result.status, result.truncated) == ("completed", True)
    notices = [e.message for e in events if e.kind == "notice"]
    assert any("cut off at the reply length limit" in n for n in notices)
    assert nbchat.usage(db=s.store)["finish_reason"].tolist() == ["length"]
    fake.enqueue("fine")
    assert s.send("more").truncated is False


def test_a_prompt_the_server_silently_cut_is_said_and_recorded(fake: FakeOpenAIServer) -> None:
    """Ollama-style: a long prompt answered with 200 and far fewer prompt tokens."""
    s = _session(fake, [])
    fake.enqueue("ok", usage={"prompt_tokens": 100, "completion_tokens": 2})
    events: list[Any] = []
    result = s.send("lorem ipsum dolor sit amet " * 400, on_event=events.append)
    assert result.status == "completed"
    notices = [e.message for e in events if e.kind == "notice"]
    assert len(notices) == 1 and "cut" in notices[0]
    assert nbchat.usage(db=s.store)["suspected_truncation"].tolist() == [True]
    fake.enqueue("fine")  # an honest count: nothing said
    events.clear()
    s.send("short", on_event=events.append)
    assert not [e for e in events if e.kind == "notice"]


def test_reasoning_is_stored_and_survives_a_reopen(fake: FakeOpenAIServer, tmp_path: Any) -> None:
    db = tmp_path / "r.duckdb"
    s = nbchat.Session(model="m", base_url=fake.url, api_key="k", db=db)
    fake.enqueue("Four.", reasoning="2 + 2 = 4")
    s.send("2+2?")
    frame = nbchat.transcript(s.id, db=s.store)
    assert frame["reasoning"].tolist()[-1] == "2 + 2 = 4"
    again = nbchat.Session(session_id=s.id, model="m", base_url=fake.url, api_key="k", db=db)
    assert again.history[-1].reasoning == "2 + 2 = 4"
