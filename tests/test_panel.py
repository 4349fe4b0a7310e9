"""The chat panel without a browser: drive it through its widgets and check transcript and store.

Turns run on nbchat's background loop against the fake server over real HTTP; the
store is a real DuckDB file. What only a browser can show (keys, clicks, layout) is in
test_panel_browser.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import nbchat
from nbchat import ChatPanel, Session, panel
from nbchat._panel_transcript import history_html, markdown_to_html
from nbchat._render import THINKING_STYLE
from nbchat.testing import FakeOpenAIServer

TIMEOUT = 15.0


def wait_until(condition: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout} s")


def make(fake: FakeOpenAIServer, db: Any = False, **kw: Any) -> ChatPanel:
    kw.setdefault("max_retries", 0)
    return panel(model="fake-model", base_url=fake.url, db=db, **kw)


def bubbles(p: ChatPanel) -> list[tuple[str, str]]:
    out = []
    for w in p.messages.children:
        if "nbchat-approval" in w._dom_classes:
            continue  # Run / Skip buttons, not a message
        role = "user" if "nbchat-user" in w._dom_classes else "assistant"
        out.append((role, w.value))
    return out


def press_enter(p: ChatPanel, text: str) -> None:
    """What the front end does on Enter: a custom comm message with the box's text."""
    p.input._handle_msg(
        {
            "content": {"data": {"method": "custom", "content": {"type": "submit", "text": text}}},
            "buffers": [],
        }
    )


def stored(session_id: str, db: Path) -> list[tuple[str, str | None, str]]:
    """(role, content, status) of the session's stored messages."""
    frame = nbchat.transcript(session_id, db=str(db))
    return list(zip(frame["role"], frame["content"], frame["status"], strict=True))


# --------------------------------------------------------------------------- sending


def test_enter_streams_a_markdown_reply_and_stores_the_turn(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    fake.enqueue("Hello **there**, `panel`!", chunk_size=3, delay=0.01)
    p = make(fake, db=db_path)
    press_enter(p, "hi\nsecond line")
    result = p.wait(TIMEOUT)
    assert result is not None and result.status == "completed"
    (user_role, user_html), (bot_role, bot_html) = bubbles(p)
    assert (user_role, bot_role) == ("user", "assistant")
    assert "hi<br />\nsecond line" in user_html
    assert "Hello <strong>there</strong>, <code>panel</code>!" in bot_html
    assert "tokens" in bot_html  # the turn's footer
    assert p.state == "idle" and not p.busy
    assert "idle" in p.status_line.value and "tokens" in p.status_line.value
    assert not p.send_button.disabled and p.stop_button.disabled
    assert fake.requests[0]["messages"][-1] == {"role": "user", "content": "hi\nsecond line"}
    assert p.session is not None
    assert stored(p.session.id, db_path) == [
        ("user", "hi\nsecond line", "ok"),
        ("assistant", "Hello **there**, `panel`!", "ok"),
    ]


def test_send_button_takes_the_input_box_text_and_clears_it(fake: FakeOpenAIServer) -> None:
    fake.enqueue("ok")
    p = make(fake)
    p.input.value = "from the box"
    p.send_button.click()
    assert p.input.value == ""
    assert p.wait(TIMEOUT) is not None
    assert fake.requests[0]["messages"][-1]["content"] == "from the box"


def test_empty_text_sends_nothing(fake: FakeOpenAIServer) -> None:
    p = make(fake)
    p.input.value = "   "
    p.send_button.click()
    assert p.submit("").result() is None
    assert bubbles(p) == [] and fake.requests == []


def test_updates_are_coalesced_and_the_last_is_exact(fake: FakeOpenAIServer) -> None:
    text = "".join(f"word{i} " for i in range(600))
    fake.enqueue(text, chunk_size=2)
    p = make(fake)
    started = time.monotonic()
    p.submit("long please")
    bubble = wait_until(lambda: p.messages.children[1:])[0]
    values: list[str] = []
    bubble.observe(lambda change: values.append(change["new"]), names="value")
    p.wait(TIMEOUT)
    elapsed = time.monotonic() - started
    deltas = len(text) // 2
    # At most 15 a second, and only after 5% growth (~175 steps to reach 4,700 chars).
    assert len(values) <= 15 * elapsed + 2, f"{len(values)} updates in {elapsed:.1f} s"
    assert len(values) < deltas / 10, f"{len(values)} updates for {deltas} deltas"
    assert text.strip() in values[-1]


def test_a_tool_call_shows_as_a_block_and_the_state_says_running_tool(
    fake: FakeOpenAIServer,
) -> None:
    @nbchat.tool
    def add(a: float, b: float) -> float:
        """Add two numbers."""
        time.sleep(0.3)
        return a + b

    fake.enqueue(tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}])
    fake.enqueue("2 + 3 = **5**")
    p = make(fake, tools=[add])
    states: list[str] = []
    p.status_line.observe(lambda change: states.append(p.state), names="value")
    p.submit("add 2 and 3")
    assert p.wait(TIMEOUT) is not None
    html = bubbles(p)[1][1]
    assert "<details>" in html and "<code>add</code>" in html
    assert "5.0" in html  # the tool's result
    assert "2 + 3 = <strong>5</strong>" in html
    assert "running tool" in states and states[-1] == "idle"


# --------------------------------------------------------------------------- stop


def test_stop_while_streaming_keeps_the_partial_reply(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    full = "".join(f"token{i} " for i in range(200))
    fake.enqueue(full, chunk_size=7, delay=0.03)
    p = make(fake, db=db_path)
    p.submit("tell me a long story")
    bubble = wait_until(lambda: p.messages.children[1:])[0]
    wait_until(lambda: "token3" in bubble.value)
    assert p.state == "writing" and not p.stop_button.disabled
    p.stop_button.click()
    result = p.wait(TIMEOUT)
    assert result is not None and result.status == "interrupted"
    assert 0 < len(result.text) < len(full) and full.startswith(result.text)
    assert "Interrupted" in bubble.value and "token3" in bubble.value
    assert p.state == "idle" and "stopped" in p.status_line.value
    assert p.session is not None
    roles = stored(p.session.id, db_path)
    assert roles[-1] == ("assistant", result.text, "interrupted")
    # The panel stays usable: the next turn goes through.
    fake.enqueue("after the stop")
    p.submit("again")
    assert p.wait(TIMEOUT).status == "completed"  # type: ignore[union-attr]
    assert "after the stop" in bubbles(p)[-1][1]


def test_stop_right_after_send_cancels_before_any_text(fake: FakeOpenAIServer) -> None:
    fake.enqueue("x" * 400, chunk_size=4, delay=0.02)
    p = make(fake)
    p.submit("hi")
    p.stop()
    result = p.wait(TIMEOUT)
    assert result is not None and result.status == "interrupted"
    assert len(result.text) < 400


def test_enter_while_busy_keeps_the_text(fake: FakeOpenAIServer) -> None:
    fake.enqueue("slow " * 50, chunk_size=5, delay=0.05)
    p = make(fake)
    first = p.submit("first")
    wait_until(lambda: p.state == "writing")
    press_enter(p, "second")
    assert p.input.value == "second"  # given back, not lost
    assert "Still answering" in p.status_line.value
    first.result(TIMEOUT)
    assert len(fake.requests) == 1


def test_enter_in_a_busy_box_says_it_is_still_answering(fake: FakeOpenAIServer) -> None:
    # While busy, the box's own Enter keeps the text and sends "busy" (not "submit"):
    # the status line must say why nothing happened.
    fake.enqueue("slow " * 50, chunk_size=5, delay=0.05)
    p = make(fake)
    first = p.submit("first")
    wait_until(lambda: p.state == "writing")
    assert p.input.busy  # the front end's cue to keep the text
    p.input.value = "second"
    p.input._handle_msg(
        {"content": {"data": {"method": "custom", "content": {"type": "busy"}}}, "buffers": []}
    )
    assert "Still answering — press ■ Stop, or send when it ends." in p.status_line.value
    assert p.input.value == "second"
    first.result(TIMEOUT)
    assert len(fake.requests) == 1
    assert "Still answering" not in p.status_line.value  # the turn's end replaces the hint


# --------------------------------------------------------------------------- errors


def test_server_errors_show_in_the_panel_which_stays_usable(fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(500, "the fake server is on fire")
    fake.enqueue("back again")
    p = make(fake)
    result = p.submit("hi").result(TIMEOUT)
    assert result is not None and result.status == "error"
    assert p.state == "error" and "on fire" in p.status_line.value
    assert "on fire" in bubbles(p)[1][1]
    # Refused before any answer: the footer claims no count and no price of it.
    footer = bubbles(p)[1][1].split('class="nbchat-footer"')[1]
    assert "request failed · no tokens, no cost" in footer
    assert "0 tokens" not in footer and "0.00" not in footer
    assert p.submit("retry").result(TIMEOUT).status == "completed"  # type: ignore[union-attr]
    assert p.state == "idle"


def test_server_down_is_an_error_message() -> None:
    p = panel(model="m", base_url="http://127.0.0.1:9/v1", db=False, max_retries=0)
    result = p.submit("anyone there?").result(TIMEOUT)
    assert result is not None and result.status == "error"
    assert p.state == "error" and "⚠" in bubbles(p)[1][1]
    assert p.model_picker.options == ("m",)  # /v1/models failed: the configured model


def test_no_model_configured_says_so_and_send_retries(
    fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = panel(db=False)
    assert p.session is None and p.state == "error"
    assert "No model configured" in p.status_line.value
    assert p.submit("hi").result() is None
    monkeypatch.setenv("NBCHAT_MODEL", "fake-model")
    monkeypatch.setenv("NBCHAT_BASE_URL", fake.url)
    fake.enqueue("configured now")
    assert p.submit("hi").result(TIMEOUT).status == "completed"  # type: ignore[union-attr]
    assert p.session is not None and p.session.model == "fake-model"


def test_budget_reached_shows_and_new_chat_recovers(fake: FakeOpenAIServer) -> None:
    fake.enqueue("first answer")
    p = make(fake, max_tokens_total=5)
    assert p.submit("one").result(TIMEOUT).status == "completed"  # type: ignore[union-attr]
    result = p.submit("two").result(TIMEOUT)
    assert result is not None and result.status == "budget_exceeded"
    assert p.state == "error" and "Budget" in bubbles(p)[-1][1]
    first_id = p.session.id  # type: ignore[union-attr]
    assert p.new_chat()
    assert p.session is not None and p.session.id != first_id
    assert bubbles(p) == []
    fake.enqueue("fresh budget")
    assert p.submit("three").result(TIMEOUT).status == "completed"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- sessions, models


def test_an_existing_session_shows_its_history_first(fake: FakeOpenAIServer, db_path: Path) -> None:
    @nbchat.tool
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    fake.enqueue("First *reply*.")
    fake.enqueue(tool_calls=[{"name": "shout", "arguments": {"text": "hey"}}])
    fake.enqueue("It says HEY.")
    s = Session(
        model="fake-model", base_url=fake.url, db=str(db_path), tools=[shout], system="Be terse."
    )
    s.send("one")
    s.send("shout hey")
    expected = [
        ("user", "<p>one</p>"),
        ("assistant", "First <em>reply</em>."),
        ("user", "<p>shout hey</p>"),
        ("assistant", "<code>shout</code>"),
    ]

    def check(p: ChatPanel) -> None:
        got = bubbles(p)
        assert [role for role, _ in got] == [role for role, _ in expected]
        for (_, html), (_, part) in zip(got, expected, strict=True):
            assert part in html
        assert "HEY" in got[3][1] and "It says HEY." in got[3][1]

    check(panel(s))
    reopened = panel(s.id, db=str(db_path), base_url=fake.url)
    assert reopened.session is not None and reopened.session.id == s.id
    check(reopened)
    # New chat keeps the options of the given session (tools, system prompt, store).
    p = panel(s)
    assert p.new_chat() and p.session is not None
    assert p.session.tools.names() == ["shout"] and p.session.system == "Be terse."


def test_model_picker_lists_server_models_and_switches(fake: FakeOpenAIServer) -> None:
    fake.models = ["fake-model", "fake-large"]
    p = make(fake)
    # Already in the new panel's state, not an update after it (Voila renders that state).
    assert p.model_picker.options == ("fake-large", "fake-model")
    assert p.model_picker.value == "fake-model"
    p.model_picker.value = "fake-large"
    assert p.session is not None and p.session.model == "fake-large"
    fake.enqueue("big answer")
    p.submit("hi").result(TIMEOUT)
    assert fake.requests[-1]["model"] == "fake-large"
    # New chat uses the picked model.
    assert p.new_chat() and p.session.model == "fake-large"


# --------------------------------------------------------------------------- rendering


def test_the_front_end_sees_a_vbox_and_an_anywidget(fake: FakeOpenAIServer) -> None:
    p = make(fake)
    assert p.get_state()["_model_name"] == "VBoxModel"
    assert p.input.get_state()["_model_module"] == "anywidget"
    p.focus()  # ipywidgets' own custom messages are not chat messages
    assert bubbles(p) == [] and fake.requests == []


def test_markdown_is_rendered_safely() -> None:
    out = markdown_to_html(
        "**b** <img src=x onerror=alert(1)> [x](javascript:alert(1)) ![pic](http://e.test/p.png)"
        "\n\n<script>alert(1)</script>\n\n```py\nx < 1\n```"
    )
    assert "<strong>b</strong>" in out
    assert "<img" not in out and "<script" not in out and "javascript:" not in out
    unhighlighted = re.sub(r"<span[^>]*>|</span>", "", out)  # code is highlighted
    assert "&lt;script&gt;" in out and "x &lt; 1" in unhighlighted
    assert 'href="http://e.test/p.png"' in out  # an image becomes a link
    assert 'target="_blank"' in out


def test_history_html_marks_interrupted_and_cancelled() -> None:
    from nbchat._types import Message, ToolCall

    history = [
        Message(role="system", content="sys"),
        Message(role="user", content="go"),
        Message(
            role="assistant",
            content="Calling",
            tool_calls=[ToolCall(id="c1", name="slow", arguments='{"n": 1}')],
        ),
        Message(role="tool", tool_call_id="c1", name="slow", content="{}", status="cancelled"),
        Message(role="assistant", content="partial", status="interrupted"),
    ]
    out = history_html(history)
    assert [role for role, _ in out] == ["user", "assistant"]
    assert "⚠" in out[1][1] and "<code>slow</code>" in out[1][1]
    assert "Interrupted" in out[1][1] and "partial" in out[1][1]


# --------------------------------------------------------------------------- issue 11


def approval_row(p: ChatPanel) -> Any:
    return next((w for w in p.messages.children if "nbchat-approval" in w._dom_classes), None)


@pytest.mark.parametrize("click", ["Run", "Skip"])
def test_python_ask_shows_run_and_skip_buttons(fake: FakeOpenAIServer, click: str) -> None:
    namespace: dict[str, Any] = {}
    code = "ran = True\n6 * 7"
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": code}}])
    fake.enqueue("Done.")
    p = make(fake, tools=[nbchat.python_tool(namespace, approval="ask")])
    p.submit("compute")
    row = wait_until(lambda: approval_row(p))
    wait_until(lambda: p.state == "waiting for you")  # set just after the row appears
    assert "waiting for your approval" in bubbles(p)[1][1]
    time.sleep(0.5)  # the user reads the code
    (button,) = [b for b in row.children if getattr(b, "description", "") == click]
    button.click()
    result = p.wait(TIMEOUT)
    assert result is not None and result.status == "completed"
    assert approval_row(p) is None
    tool_message = fake.requests[1]["messages"][-1]
    shown = bubbles(p)[1][1]
    if click == "Run":
        assert tool_message["content"] == "result:\n42" and namespace["ran"] is True
        summary = shown[shown.index("<code>python</code>") :].split("</summary>")[0]
        assert " ms)" in summary  # the half second of reading is not the tool's time
    else:
        assert "declined" in tool_message["content"] and "ran" not in namespace
        assert "(skipped)" in shown


def test_stop_while_asking_skips_the_code(fake: FakeOpenAIServer) -> None:
    namespace: dict[str, Any] = {}
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": "ran = 1"}}])
    fake.enqueue("Skipped.")
    p = make(fake, tools=[nbchat.python_tool(namespace, approval="ask")])
    p.submit("compute")
    wait_until(lambda: approval_row(p))
    p.stop()
    p.wait(TIMEOUT)
    assert "ran" not in namespace and approval_row(p) is None and not p.busy


def test_turns_from_cells_show_in_the_panel_and_a_send_meanwhile_is_queued(
    fake: FakeOpenAIServer,
) -> None:
    s = Session(model="fake-model", base_url=fake.url, db=False, max_retries=0)
    fake.enqueue("earlier answer")
    s.send("earlier question")  # a cell ran before the panel was made
    p = panel(s)
    assert [role for role, _ in bubbles(p)] == ["user", "assistant"]
    # The cell's reply pauses 3 s, long enough for a send to find it running.
    fake.enqueue("slow cell answer " * 10, chunk_size=4, stall_after=2, stall_seconds=3)
    fake.enqueue("panel answer")
    cell = threading.Thread(target=lambda: s.send("from a cell"))
    cell.start()
    wait_until(lambda: len(bubbles(p)) == 4)
    assert "from a cell" in bubbles(p)[2][1]
    p.submit("from the panel")
    assert p.state == "queued" and "queued" in bubbles(p)[5][1]
    cell.join(TIMEOUT)
    result = p.wait(TIMEOUT)
    assert result is not None and result.status == "completed"
    shown = bubbles(p)
    assert [role for role, _ in shown] == ["user", "assistant"] * 3
    assert "slow cell answer" in shown[3][1] and "panel answer" in shown[5][1]
    # The panel's turn went after the cell's, with it in its context.
    assert [m["content"] for m in fake.requests[2]["messages"]][-3:] == [
        "from a cell",
        "slow cell answer " * 10,
        "from the panel",
    ]


def test_after_stop_the_status_keeps_the_token_count(fake: FakeOpenAIServer) -> None:
    fake.enqueue("first")
    p = make(fake)
    p.submit("one").result(TIMEOUT)
    assert "tokens unknown" not in p.status_line.value
    fake.enqueue("word " * 400, chunk_size=4, delay=0.02, usage=None)
    p.submit("two")
    wait_until(lambda: "word" in bubbles(p)[-1][1])
    p.stop()
    p.wait(TIMEOUT)
    assert "tokens unknown" not in p.status_line.value
    stopped = re.search(r"session: ≥ ([\d,]+) tokens", p.status_line.value)
    assert stopped, p.status_line.value
    fake.enqueue("third")
    p.submit("three").result(TIMEOUT)
    later = re.search(r"≥ ([\d,]+) tokens", p.status_line.value)
    assert later and int(later[1].replace(",", "")) > int(stopped[1].replace(",", ""))


def test_while_a_reply_streams_the_status_estimates_its_size_and_a_stop_keeps_it(
    fake: FakeOpenAIServer,
) -> None:
    # A trial: no running count while streaming, "tokens unknown" after Stop, though
    # the README promised the count so far. The server counts a reply only at its end,
    # so the panel says what it measured, marked as an estimate.
    fake.enqueue("word " * 400, chunk_size=4, delay=0.02, usage=None)
    p = make(fake)
    p.submit("one")
    wait_until(lambda: "this reply: ~" in p.status_line.value)
    first = int(re.search(r"this reply: ~([\d,]+) tokens so far", p.status_line.value)[1])
    wait_until(lambda: p._streamed_chars > 4 * (first + 20))
    p._render_status()
    later = int(re.search(r"this reply: ~([\d,]+) tokens so far", p.status_line.value)[1])
    assert 0 < first < later  # it moves as the reply grows
    p.stop()
    result = p.wait(TIMEOUT)
    assert result is not None and result.status == "interrupted"
    line = p.status_line.value
    stopped = re.search(
        r"stopped after ~([\d,]+) tokens \(estimated: the server sent no count\)", line
    )
    assert stopped, line
    # characters / 4: what arrived, not more (nothing was calibrated yet).
    assert int(stopped[1]) == -(-len(result.text) // 4), (stopped[1], len(result.text))
    assert "this reply" not in line  # a running figure, gone when the reply is
    # A reply the server counted says nothing estimated.
    fake.enqueue("counted")
    p.submit("two").result(TIMEOUT)
    assert "~" not in p.status_line.value and "estimated" not in p.status_line.value


def test_a_partly_unknown_cost_shows_its_known_part(fake: FakeOpenAIServer) -> None:
    from nbchat._pricing import forget_price, register_price

    # A trial: one stopped request made the whole session "cost unknown", where
    # %chat sessions said "$X + 1 unknown".
    register_price("priced-model", input_per_mtok=1_000.0, output_per_mtok=1_000.0)
    try:
        p = panel(model="priced-model", base_url=fake.url, db=False, max_retries=0)
        fake.enqueue("one", usage={"prompt_tokens": 10, "completion_tokens": 10})
        p.submit("first").result(TIMEOUT)
        plain = lambda: re.sub(r"<[^>]+>", "", p.status_line.value)  # noqa: E731
        assert "session: 20 tokens · $0.02" in plain(), plain()
        fake.enqueue("two", usage=None)
        p.submit("second").result(TIMEOUT)
        assert "session: ≥ 20 tokens · $0.02 + 1 request unknown" in plain(), plain()
    finally:
        forget_price("priced-model")


def test_new_chat_forgets_the_old_chats_reply_time(fake: FakeOpenAIServer) -> None:
    fake.enqueue("one")
    p = make(fake)
    p.submit("first").result(TIMEOUT)
    assert "last reply" in p.status_line.value
    assert p.new_chat()
    assert "last reply" not in p.status_line.value, p.status_line.value


def test_a_panel_opened_on_a_session_counts_the_tokens_its_earlier_turns_had(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    # A trial opened the panel after cell turns, one of them without usage: the status
    # said "tokens unknown", then counted only the panel's own turns.
    s = Session(model="m", base_url=fake.url, api_key="k", db=str(tmp_path / "p.duckdb"))
    fake.enqueue("one", usage={"prompt_tokens": 30, "completion_tokens": 5})
    s.send("first")
    fake.enqueue("two", usage=None)
    s.send("second")
    assert s.usage.total_tokens is None
    p = panel(s)
    assert "session: ≥ 35 tokens" in p.status_line.value, p.status_line.value


def test_while_streaming_the_status_claims_no_tokens_or_cost_it_does_not_know(
    fake: FakeOpenAIServer,
) -> None:
    # fake-model has no price: its cost is unknown, never "$0.00"; and the reply on
    # screen has tokens, so "0 tokens" while it streams would be made up.
    fake.enqueue("slow " * 60, chunk_size=5, delay=0.03)
    p = make(fake)
    p.submit("first")
    wait_until(lambda: p.state == "writing")
    line = p.status_line.value
    assert "cost unknown" in line, line
    assert not re.search(r"\b0 tokens", line) and "0.00" not in line, line
    assert re.search(r"\d\.\d s", line), line  # the elapsed time is known
    p.wait(TIMEOUT)
    assert re.search(r"\b[1-9][\d,]* tokens · cost unknown", p.status_line.value)


def test_while_streaming_a_priced_model_shows_the_totals_so_far_as_lower_bounds(
    fake: FakeOpenAIServer,
) -> None:
    from nbchat._pricing import forget_price, register_price

    register_price("priced-model", input_per_mtok=1.0, output_per_mtok=1.0)
    try:
        fresh = panel(model="priced-model", base_url=fake.url, db=False, max_retries=0)
        assert "tokens" not in fresh.status_line.value  # nothing counted yet, nor claimed
        assert "$" not in fresh.status_line.value and "cost" not in fresh.status_line.value
        fake.enqueue("one")
        p = panel(model="priced-model", base_url=fake.url, db=False, max_retries=0)
        p.submit("first").result(TIMEOUT)
        done = p.status_line.value
        assert re.search(r"[1-9][\d,]* tokens", done) and "≥" not in done, done
        fake.enqueue("slow " * 60, chunk_size=5, delay=0.03)
        p.submit("second")
        wait_until(lambda: p.state == "writing")
        line = p.status_line.value
        assert re.search(r"≥ [1-9][\d,]* tokens · ≥ <span", line), line
        p.wait(TIMEOUT)
    finally:
        forget_price("priced-model")


def test_math_is_kept_as_tex_and_code_is_highlighted() -> None:
    out = markdown_to_html("Thin space: \\(a\\,b\\) and $x_1 * y_2 * z$.\n\n```python\nx = 1\n```")
    assert '<span class="nbchat-math">\\(a\\,b\\)</span>' in out
    assert '<span class="nbchat-math">$x_1 * y_2 * z$</span>' in out  # no <em> from the *s
    assert '<code class="language-python">' in out and "style=" in out


def test_a_reply_with_math_ends_in_a_typesetting_bubble(fake: FakeOpenAIServer) -> None:
    import ipywidgets as widgets

    fake.enqueue("The area is $\\pi r^2$, at $5 a month.", chunk_size=3)
    p = make(fake)
    p.submit("area?").result(TIMEOUT)
    bubble = p.messages.children[-1]
    assert isinstance(bubble, widgets.HTMLMath) and "nbchat-assistant" in bubble._dom_classes
    assert '<span class="nbchat-math">$\\pi r^2$</span>' in bubble.value


def test_reasoning_shows_as_a_thinking_block_in_the_panel(fake: FakeOpenAIServer) -> None:
    fake.enqueue("Four.", reasoning="Two and two make four.", chunk_size=3)
    p = make(fake)
    p.submit("2+2?").result(TIMEOUT)
    shown = bubbles(p)[1][1]
    assert (
        f'<details class="nbchat-thinking" style="{THINKING_STYLE}"><summary>💭 Thinking</summary>'
        in shown
    )
    assert shown.index("Two and two") < shown.index("Four.")


def test_new_chat_keeps_every_setting_of_the_session(fake: FakeOpenAIServer) -> None:
    """Compaction, guardrails, temperature, request params and the window survive New chat."""

    def polite(text: str) -> str:
        return text + " please"

    s = Session(
        model="fake-model",
        base_url=fake.url,
        api_key="sk-test",
        db=":memory:",
        temperature=0.3,
        request_params={"seed": 11},
        input_guardrails=[polite],
        compaction="window",
        context_window=5000,
    )
    p = panel(s)
    assert p.new_chat() and p.session is not None and p.session is not s
    fake.enqueue("fresh")
    p.submit("hello")
    assert p.wait(10) is not None
    body = fake.requests[-1]
    assert (body["temperature"], body["seed"]) == (0.3, 11)
    assert body["messages"][-1]["content"] == "hello please"
    assert p.session.compactor is not None and p.session.compactor.context_window == 5000


def test_text_that_arrived_before_a_stall_shows_during_it(fake: FakeOpenAIServer) -> None:
    # The throttle held the last chunks back until the next one came, so a stalled
    # server left the bubble empty though text had arrived.
    reply = "Alpha beta gamma delta epsilon zeta eta theta iota kappa."
    fake.enqueue(reply, chunk_size=6, stall_after=6, stall_seconds=5)
    p = make(fake)
    p.submit("stall")
    wait_until(lambda: len(bubbles(p)) > 1 and "epsilon" in bubbles(p)[1][1])
    assert p.busy and "zeta" not in bubbles(p)[1][1]  # shown while the server is silent
    result = p.wait(TIMEOUT)
    assert result is not None and result.text == reply


def test_a_skipped_python_call_is_declined_not_an_error_when_read_back(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    from nbchat import _analysis
    from nbchat._magic_displays import Conversation

    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": "ran = True"}}])
    fake.enqueue("Fine, not run.")
    p = make(fake, db=db_path, tools=[nbchat.python_tool({}, approval="ask")])
    p.submit("compute")
    row = wait_until(lambda: approval_row(p))
    (skip,) = [b for b in row.children if getattr(b, "description", "") == "Skip"]
    skip.click()
    assert p.wait(TIMEOUT) is not None and p.session is not None
    sid = p.session.id

    calls = nbchat.tool_calls(db=str(db_path), session_id=sid)
    assert calls[["is_error", "error_kind"]].values.tolist() == [[False, "declined"]]
    assert [s for r, _, s in stored(sid, db_path) if r == "tool"] == ["declined"]
    (tools,) = _analysis.overview(db=str(db_path)).tools[["calls", "errors"]].values.tolist()
    assert tools == [1, 0]

    reopened = panel(sid, model="fake-model", base_url=fake.url, db=db_path)
    shown = bubbles(reopened)[1][1]
    assert "(skipped)" in shown and "(error)" not in shown and "⚠" not in shown
    assert reopened.session is not None
    history = Conversation(reopened.session.history)._repr_html_()
    assert "(skipped)" in history and "(error)" not in history
    exported = nbchat.export_session(sid, "markdown", db=str(db_path))
    assert "## Tool result: `python`" in exported and "skipped by the user" in exported


def test_the_status_says_thinking_while_reasoning_streams_then_writing(
    fake: FakeOpenAIServer,
) -> None:
    thought = "".join(f"step{i} " for i in range(60))
    fake.enqueue("".join(f"word{i} " for i in range(60)), reasoning=thought, delay=0.02)
    p = make(fake)
    p.submit("think first")
    wait_until(lambda: "step3" in "".join(v for _, v in bubbles(p)))
    assert p.state == "thinking" and "thinking" in p.status_line.value
    wait_until(lambda: "word3" in "".join(v for _, v in bubbles(p)))
    assert p.state == "writing" and "writing" in p.status_line.value
    assert p.wait(TIMEOUT) is not None and p.state == "idle"
