"""The magics in-process: an IPython shell with rich display, the fake server over real HTTP."""

from __future__ import annotations

import _thread
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing import globalipapp

import nbchat
from nbchat import ConfigError, SessionInUseError, SessionPendingError, StoreError
from nbchat._events import ToolResult
from nbchat._exceptions import ExecutionFailed, TurnFailed, TurnInterrupted
from nbchat._magic_help import flag_of, split_line
from nbchat._magic_options import ChatOptions, interpolate, parse_options
from nbchat._magics import magics_of
from nbchat._pricing import forget_price, register_price
from nbchat._pytool import python_tool, run_code
from nbchat._render import TurnView
from nbchat.testing import FakeOpenAIServer


class RecordingPublisher(DisplayPublisher):  # type: ignore[misc]
    """Keeps every display (and update) the way a kernel would send it."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.calls: list[dict[str, Any]] = []

    def publish(  # type: ignore[override]
        self,
        data: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        source: Any = None,
        *,
        transient: dict[str, Any] | None = None,
        update: bool = False,
        **kw: Any,
    ) -> None:
        self.calls.append({"data": data, "metadata": metadata or {}, "update": update})

    @property
    def last(self) -> dict[str, Any]:
        return self.calls[-1]


@pytest.fixture
def shell(fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """A shell with rich display types, nbchat loaded, pointed at the fake server."""
    monkeypatch.setenv("NBCHAT_BASE_URL", fake.url)
    monkeypatch.setenv("NBCHAT_MODEL", "fake-model")
    globalipapp.start_ipython()  # once per process; later calls do nothing
    ip = globalipapp.get_ipython()
    formatter = ip.display_formatter
    saved_types, saved_pub = list(formatter.active_types), ip.display_pub
    formatter.active_types = list(formatter.format_types)
    ip.display_pub = RecordingPublisher(shell=ip)
    ip.run_line_magic("load_ext", "nbchat")
    try:
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "nbchat")
        ip.display_pub = saved_pub
        formatter.active_types = saved_types


def pub(ip: InteractiveShell) -> RecordingPublisher:
    assert isinstance(ip.display_pub, RecordingPublisher)
    return ip.display_pub


def run(ip: InteractiveShell, code: str, cell_id: str | None = None) -> Any:
    return ip.run_cell(code, store_history=True, cell_id=cell_id)


def one_line_error(result: Any) -> list[str]:
    exc = result.error_in_exec
    assert exc is not None, "the cell should have failed"
    lines: list[str] = exc._render_traceback_()
    assert len(lines) == 1
    return lines


# --------------------------------------------------------------------------- options


def test_magic_line_parses_into_one_model_with_shell_quoting() -> None:
    opts = parse_options(
        ChatOptions,
        '-s "be terse, please" --model=m2 --tools a,python:auto --budget 0.5 '
        "--max-rounds 3 --no-stream --out reply --temperature 0.2 --new",
    )
    assert opts == ChatOptions(
        system="be terse, please",
        model="m2",
        tools=["a", "python:auto"],
        budget=0.5,
        max_rounds=3,
        no_stream=True,
        out="reply",
        temperature=0.2,
        new=True,
    )
    assert parse_options(ChatOptions, "-m 'gpt 4' --tools none").tools == []
    assert parse_options(ChatOptions, "").tools is None


def test_a_repeated_list_option_adds_to_it_and_a_repeated_value_is_refused() -> None:
    opts = parse_options(ChatOptions, "--attach notes.txt --attach fig,fig2 --tag a --tag b")
    assert (opts.attach, opts.tag) == (["notes.txt", "fig", "fig2"], ["a", "b"])
    with pytest.raises(UsageError, match="-m is given twice; give it once"):
        parse_options(ChatOptions, "--model a -m b")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--bogus", "unknown option --bogus (see %%chat? for the options)"),
        ("--formt json", "unknown option --formt (did you mean --format? see"),
        ("--model", "--model needs a value"),
        ("--budget lots", "--budget: Input should be a valid number"),
        ("--max-rounds -1", "--max-rounds: Input should be greater than or equal to 0"),
        ("--out 2x", "--out: Value error, '2x' is not a valid variable name"),
        ("--new=yes", "--new takes no value"),
        ("hello there", "the message goes in the cell"),
        ('-s "unclosed', "cannot read the options"),
    ],
)
def test_bad_magic_lines_are_one_clear_line(line: str, message: str) -> None:
    with pytest.raises(UsageError, match=r"^%%chat: ") as info:
        parse_options(ChatOptions, line)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_help_lists_every_option_and_subcommand(shell: InteractiveShell) -> None:
    doc = shell.find_cell_magic("chat").__doc__
    for name in ChatOptions.model_fields:
        assert flag_of(name) in doc
    subs = ("config", "new", "use ID", "sessions", "history", "cost", "tools", "local", "export")
    for sub in (*subs, "import PATH"):
        assert f"%chat {sub}" in doc
    assert run(shell, "%%chat?").success
    info = shell.run_line_magic("chat", "help")
    assert "--max-rounds" in info._repr_markdown_()


def test_interpolation_of_the_cell_body() -> None:
    class Frame:
        name = "sales"

    ns = {"df_name": "sales", "n": 3, "df": Frame()}
    text = 'Columns of {df_name} ({df.name}), top {n}; keep {missing} and {"a": {"b": 1}}; {{n}}'
    assert interpolate(text, ns) == (
        'Columns of sales (sales), top 3; keep {missing} and {"a": {"b": 1}}; {n}'
    )


# --------------------------------------------------------------------------- turns


def test_streamed_cell_updates_one_display_and_ends_with_the_exact_text(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    reply = "Three plots:\n\n1. **histogram** of `price`\n2. scatter\n3. box — ünïcode ✓"
    fake.enqueue(reply, chunk_size=2, delay=0.002)
    shell.user_ns["df_name"] = "sales"
    result = run(shell, "%%chat --out answer\nSummarise {df_name}.")

    assert result.success, result.error_in_exec
    calls = pub(shell).calls
    assert not calls[0]["update"] and all(c["update"] for c in calls[1:])
    assert len(calls) >= 2
    final = calls[-1]
    assert final["data"]["text/plain"] == reply
    assert final["data"]["text/markdown"].startswith(reply)
    assert "fake-model" in final["data"]["text/markdown"]
    assert "cost unknown" in final["data"]["text/markdown"]
    assert final["metadata"]["nbchat"]["status"] == "completed"
    assert shell.user_ns["answer"] == reply
    assert fake.requests[0]["messages"][-1] == {"role": "user", "content": "Summarise sales."}


def test_next_cell_continues_the_conversation(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("First.")
    fake.enqueue("Second.")
    assert run(shell, "%%chat -s 'Be terse.'\none").success
    assert run(shell, "%%chat\ntwo").success
    assert [m["content"] for m in fake.requests[1]["messages"]] == [
        "Be terse.",
        "one",
        "First.",
        "two",
    ]


def test_fast_stream_is_coalesced_and_the_final_text_is_exact(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    text = "".join(f"w{i} " for i in range(3000))
    fake.enqueue(chunks=[f"w{i} " for i in range(3000)])
    assert run(shell, "%%chat\ngo").success
    calls = pub(shell).calls
    assert calls[-1]["data"]["text/plain"] == text
    # 3,000 deltas, a handful of updates: at most ~15/s and growth-paced.
    assert len(calls) < 40


def test_no_stream_shows_one_display(shell: InteractiveShell, fake: FakeOpenAIServer) -> None:
    fake.enqueue("All at once.")
    assert run(shell, "%%chat --no-stream\nhi").success
    calls = pub(shell).calls
    assert len(calls) == 1 and not calls[0]["update"]
    assert calls[0]["data"]["text/plain"] == "All at once."
    assert not fake.requests[0].get("stream")


def test_capture_keeps_only_the_final_reply(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("Captured reply.", chunk_size=1)
    assert run(shell, "%%capture cap\n%%chat\nhi").success
    outputs = shell.user_ns["cap"].outputs
    assert len(outputs) == 1
    assert outputs[0].data["text/plain"] == "Captured reply."
    assert pub(shell).calls == []


def test_cell_options_apply_to_that_cell_only(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    for text in ("a", "b", "c"):
        fake.enqueue(text)
    assert run(shell, "%%chat\nzero").success
    assert run(shell, "%%chat -m other-model --temperature 0.3 --max-rounds 2\none").success
    assert run(shell, "%%chat\ntwo").success
    _, first, second = fake.requests
    assert first["model"] == "other-model" and first["temperature"] == 0.3
    assert second["model"] == "fake-model" and "temperature" not in second
    session = magics_of(shell).session  # type: ignore[union-attr]
    assert session is not None and session.max_rounds == 16


def test_a_session_started_with_a_model_keeps_it(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("a")
    fake.enqueue("b")
    assert run(shell, "%%chat --new -m chosen-model\none").success
    assert run(shell, "%%chat\ntwo").success
    assert [r["model"] for r in fake.requests] == ["chosen-model", "chosen-model"]


def test_terminal_shell_streams_text_to_stdout(
    shell: InteractiveShell, fake: FakeOpenAIServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.display_formatter.active_types = ["text/plain"]
    fake.enqueue("Plain terminal reply.", chunk_size=3)
    assert run(shell, "%%chat\nhi").success
    out = capsys.readouterr().out
    assert out.startswith("Plain terminal reply.\n")
    assert "[fake-model · " in out and "cost unknown" in out
    assert pub(shell).calls == []


# --------------------------------------------------------------------------- sessions


def test_new_session_use_and_system_prompt_switch(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("r1")
    fake.enqueue("r2")
    fake.enqueue("r3")
    fake.enqueue("r4")
    magics = magics_of(shell)
    assert magics is not None
    assert run(shell, "%%chat\nfirst").success
    first = magics.session
    assert first is not None
    assert run(shell, "%%chat --new\nsecond").success
    second = magics.session
    assert second is not None and second.id != first.id
    assert fake.requests[1]["messages"] == [{"role": "user", "content": "second"}]

    info = shell.run_line_magic("chat", f"use {first.id}")
    assert first.id in repr(info)
    assert run(shell, "%%chat\nthird").success
    assert [m["content"] for m in fake.requests[2]["messages"]] == ["first", "r1", "third"]

    # A different system prompt is a different conversation.
    assert run(shell, "%%chat -s 'You are a pirate.'\nfourth").success
    assert magics.session is not None and magics.session.id not in (first.id, second.id)
    assert fake.requests[3]["messages"][0] == {"role": "system", "content": "You are a pirate."}

    shell.run_line_magic("chat", "new")
    assert magics.session is None


def test_session_flag_reopens_a_stored_session(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("r1")
    fake.enqueue("r2")
    assert run(shell, "%%chat\nfirst").success
    magics = magics_of(shell)
    assert magics is not None and magics.session is not None
    sid = magics.session.id
    shell.run_line_magic("chat", "new")
    assert run(shell, f"%%chat --session {sid}\nagain").success
    assert [m["content"] for m in fake.requests[1]["messages"]] == ["first", "r1", "again"]
    unknown = run(shell, "%%chat --session nope\nhi")
    assert isinstance(unknown.error_in_exec, StoreError)
    assert "nope" in one_line_error(unknown)[0]


def test_use_reads_a_stored_session_without_a_key_and_a_turn_then_asks_for_one(
    shell: InteractiveShell, fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new-user trial: %chat use failed with "No API key" before showing anything.
    fake.enqueue("hello back")
    stored = nbchat.Session(model="m", base_url=fake.url, api_key="sk-old")
    stored.send("hi")
    monkeypatch.delenv("NBCHAT_BASE_URL")  # this kernel: OpenAI's own API, and no key
    with pytest.warns(UserWarning, match="it continues on https://api.openai.com"):
        info = shell.run_line_magic("chat", f"use {stored.id}")
    assert "(2 messages). No API key is configured" in repr(info)
    assert run(shell, "%chat history").success
    magics = magics_of(shell)
    assert magics is not None and magics.session is not None
    assert [m.content for m in magics.session.history] == ["hi", "hello back"]

    turn = run(shell, "%%chat\nmore")
    assert isinstance(turn.error_in_exec, ConfigError)
    assert "No API key for https://api.openai.com/v1" in one_line_error(turn)[0]
    assert len(fake.requests) == 1  # nothing was sent, with a placeholder or otherwise

    # With a key (and an endpoint) set since, the next turn continues the conversation.
    monkeypatch.setenv("NBCHAT_API_KEY", "sk-new")
    monkeypatch.setenv("NBCHAT_BASE_URL", fake.url)
    fake.enqueue("again")
    assert run(shell, "%%chat\nmore").success
    assert [m["content"] for m in fake.requests[1]["messages"]] == ["hi", "hello back", "more"]
    assert magics.session.id == stored.id


def test_rerunning_a_cell_replaces_its_turn(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    for text in ("one", "two", "one again"):
        fake.enqueue(text)
    assert run(shell, "%%chat\nQ1", cell_id="cell-a").success
    assert run(shell, "%%chat\nQ2", cell_id="cell-b").success
    assert run(shell, "%%chat\nQ1 edited", cell_id="cell-a").success
    assert fake.requests[2]["messages"] == [{"role": "user", "content": "Q1 edited"}]
    session = magics_of(shell).session  # type: ignore[union-attr]
    assert session is not None
    assert [m["content"] for m in session.messages] == ["Q1 edited", "one again"]


def test_two_turns_in_one_cell_run_are_both_kept(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("a1")
    fake.enqueue("a2")
    code = "for q in ('q1', 'q2'):\n    get_ipython().run_cell_magic('chat', '', q)"
    assert run(shell, code, cell_id="loop").success
    session = magics_of(shell).session  # type: ignore[union-attr]
    assert session is not None
    assert [m["content"] for m in session.messages] == ["q1", "a1", "q2", "a2"]
    assert [m.cell_id for m in session.history] == ["loop", "loop", "loop#2", "loop#2"]


# --------------------------------------------------------------------------- failures


def test_no_model_configured_is_one_line(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NBCHAT_MODEL")
    result = run(shell, "%%chat\nhi")
    assert isinstance(result.error_in_exec, ConfigError)
    (line,) = one_line_error(result)
    assert "ConfigError" in line and "No model configured" in line


def test_the_first_turn_shows_its_placeholder_before_the_store_is_opened(
    shell: InteractiveShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store path that cannot be opened: the "⏳" line was already out when it failed,
    # and it goes again, leaving the cell's one error line to say why.
    monkeypatch.setenv("NBCHAT_DB", str(tmp_path))  # a folder
    shell.run_line_magic("chat", "new")
    result = run(shell, "%%chat\nhi")
    assert isinstance(result.error_in_exec, StoreError)
    assert "is a directory" in one_line_error(result)[0]
    first, *_, last = pub(shell).calls
    assert "⏳" in first["data"]["text/markdown"] and not first["update"]
    assert last["update"] and last["data"] == {"text/plain": ""}


def test_no_model_leaves_no_placeholder_behind(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NBCHAT_MODEL")
    shell.run_line_magic("chat", "new")
    pub(shell).calls.clear()
    result = run(shell, "%%chat\nhi")
    assert isinstance(result.error_in_exec, ConfigError)
    assert [c["data"] for c in pub(shell).calls if c["update"]][-1] == {"text/plain": ""}


def test_server_down_is_one_line_and_the_next_cell_works(
    shell: InteractiveShell, fake: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    shell.run_line_magic("chat", "config base_url=http://127.0.0.1:9/v1")
    result = run(shell, "%%chat\nhi")
    assert isinstance(result.error_in_exec, TurnFailed)
    assert "Could not connect" in one_line_error(result)[0]
    # Said once: by the error line, not again in the turn's display (issue 11, item 4).
    assert "Could not connect" not in pub(shell).last["data"]["text/markdown"]
    shell.run_line_magic("chat", f"config base_url={fake.url}")
    fake.enqueue("back")
    assert run(shell, "%%chat\nagain").success
    # The conversation carried over to the working endpoint, failed turn included (its
    # question joined with the next: no two user messages in a row).
    assert [m["content"] for m in fake.requests[0]["messages"]] == ["hi\n\nagain"]


def test_server_error_line_says_failed_once_and_hides_the_key(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    shell.run_line_magic("chat", "config api_key=sk-very-secret-key-123456")
    fake.enqueue_error(500, "upstream broke", echo_key=True, repeat=5)
    result = run(shell, "%%chat\nhi")
    assert isinstance(result.error_in_exec, TurnFailed)
    (line,) = one_line_error(result)
    assert "TurnFailed\x1b[0m: The model server answered HTTP 500: upstream broke" in line
    assert "Error:" not in line and "sk-very-secret" not in line
    assert str(result.error_in_exec) == result.error_in_exec.result.error
    session = magics_of(shell).session  # type: ignore[union-attr]
    assert session is not None
    (stored,) = session.store.sql("SELECT error FROM turns")["error"]
    assert stored.startswith("The model server answered HTTP 500") and "sk-very" not in stored


def test_budget_reached_is_one_line(shell: InteractiveShell, fake: FakeOpenAIServer) -> None:
    register_price("priced-model", input_per_mtok=1000.0, output_per_mtok=1000.0)
    try:
        shell.run_line_magic("chat", "config model=priced-model budget_usd=0.02")
        fake.enqueue("expensive answer")
        assert run(shell, "%%chat\nhi").success
        result = run(shell, "%%chat\nmore")
        assert isinstance(result.error_in_exec, TurnFailed)
        (line,) = one_line_error(result)
        assert "Budget reached (the notice above says which limit)" in line
        assert "Stopped before" not in line, "the limit is said once, in the cell's notice"
        assert len(fake.requests) == 1
    finally:
        forget_price("priced-model")


def test_interrupt_keeps_the_partial_reply_and_stops_run_all(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("x" * 400, chunk_size=1, delay=0.01)

    def interrupt_once_streaming() -> None:
        fake.wait_for_requests(1, timeout=10)
        time.sleep(0.5)  # ~50 of the 400 characters have arrived by now
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_streaming).start()
    result = run(shell, "%%chat --out partial\nlong answer please")
    assert isinstance(result.error_in_exec, TurnInterrupted)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    final = pub(shell).last
    assert final["metadata"]["nbchat"]["status"] == "interrupted"
    partial = final["data"]["text/plain"]
    assert 0 < len(partial) < 400 and shell.user_ns["partial"] == partial
    # Said once, by the error line, under its own name: the display has no badge.
    (line,) = one_line_error(result)
    assert "TurnInterrupted\x1b[0m: " in line and "KeyboardInterrupt" not in line
    assert "the partial reply above was kept" in line
    assert "Interrupted" not in final["data"]["text/markdown"]
    assert "Interrupted" not in final["data"]["text/html"]
    fake.enqueue("fine")
    assert run(shell, "%%chat\nnext").success
    session = magics_of(shell).session  # type: ignore[union-attr]
    assert session is not None
    assert [m.status for m in session.history] == ["ok", "interrupted", "ok", "ok"]


def test_interrupt_during_a_hung_tool_call_says_no_partial_reply(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    run(shell, "import time\ndef hang() -> str:\n    'Hang.'\n    time.sleep(3)\n    return 'x'")
    fake.enqueue(tool_calls=[{"name": "hang", "arguments": {}}])
    interrupt_during_request(fake, 1)
    result = run(shell, "%%chat --tools hang\ncall hang")
    assert isinstance(result.error_in_exec, TurnInterrupted)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)  # "Run all" stops here
    (line,) = one_line_error(result)
    assert "TurnInterrupted\x1b[0m: The turn was interrupted before any reply text" in line
    assert "partial reply" not in line
    assert "partial reply" not in str(result.error_in_exec)
    shown = pub(shell).last["data"]
    assert "Interrupted" not in shown["text/markdown"] and "partial" not in shown["text/html"]


def interrupt_during_request(fake: FakeOpenAIServer, n: int) -> None:
    """Ctrl-C, from another thread, half a second into the server's ``n``-th request."""

    def interrupt() -> None:
        fake.wait_for_requests(n, timeout=10)
        time.sleep(0.5)
        _thread.interrupt_main()

    threading.Thread(target=interrupt).start()


def test_interrupt_in_round_two_shows_round_one_usage_as_a_lower_bound(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    register_price("fake-model", input_per_mtok=1000.0, output_per_mtok=1000.0)
    try:
        run(shell, "def lookup(key: str) -> str:\n    'Look a key up.'\n    return key.upper()")
        fake.enqueue(
            tool_calls=[{"name": "lookup", "arguments": {"key": "a"}}],
            usage={"prompt_tokens": 1000, "completion_tokens": 234},
        )
        fake.enqueue("x" * 400, chunk_size=1, delay=0.01)
        interrupt_during_request(fake, 2)
        result = run(shell, "%%chat --tools lookup\nlook a up")
        assert isinstance(result.error_in_exec, TurnInterrupted)
        final = pub(shell).last
        footer = final["metadata"]["nbchat"]["footer"]
        assert "≥ 1,234 tokens (1,000 in / 234 out) · ≥ $1.23 (1 of 2 requests unknown)" in footer
        assert "unknown · cost unknown" not in final["data"]["text/html"]
        assert "≥ 1,234 tokens" in final["data"]["text/html"]
        # Interrupted before anything was counted: still plainly unknown.
        fake.reset()
        fake.enqueue("y" * 400, chunk_size=1, delay=0.01)
        interrupt_during_request(fake, 1)
        run(shell, "%%chat\nagain")
        assert "tokens unknown · cost unknown" in pub(shell).last["metadata"]["nbchat"]["footer"]
    finally:
        forget_price("fake-model")


def test_chat_export_writes_or_shows_a_conversation_and_chat_import_continues_one(
    shell: InteractiveShell, fake: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fake.enqueue("Hello <b>there</b>, it costs $5.")
    assert run(shell, "%%chat --new\nhi").success
    first = shell.run_line_magic("chat", "session")
    shown = shell.run_line_magic("chat", "export")  # no path: the Markdown, in the cell
    assert shown.data.startswith("# hi") and "Hello &lt;b>there&lt;/b>" in shown.data
    assert "Wrote session" in shell.run_line_magic("chat", "export talk.md")._repr_markdown_()
    assert (tmp_path / "talk.md").read_text() == nbchat.export_session(first.id, "markdown")
    with pytest.raises(UsageError, match=r"talk\.md exists already \(--force replaces it\)"):
        shell.run_line_magic("chat", "export talk.md")
    shell.run_line_magic("chat", "export talk.md --force --all")
    shell.run_line_magic("chat", "export talk.json")  # .json: the nbchat format
    assert json.loads((tmp_path / "talk.json").read_text())["session_id"] == first.id
    shell.run_line_magic("chat", f"export --format openai --id {first.id} wire.json")
    assert [m["role"] for m in json.loads((tmp_path / "wire.json").read_text())] == [
        "user",
        "assistant",
    ]
    # Imported, the conversation becomes the current one: the next cell continues it.
    said = shell.run_line_magic("chat", "import talk.json --title Again")._repr_markdown_()
    imported = shell.run_line_magic("chat", "session")
    assert imported.id != first.id and f"as session `{imported.id}`" in said
    assert nbchat.sessions().set_index("id").loc[imported.id, "title"] == "Again"
    fake.enqueue("Still here.")
    assert run(shell, "%%chat\nand now?").success
    assert fake.chat_requests[-1]["messages"][-3]["content"] == "hi"
    for line, says in (
        ("export notes.txt", r"which format for notes\.txt\? Name it \.md or \.json"),
        ("export --format yaml", "--format is markdown, openai or nbchat, not 'yaml'"),
        ("export --format openai", "the openai format goes to a file: give a path"),
        ("export --all x.json", "--all is for markdown"),
        ("export --id", "--id takes a value"),
        ("export --id nope", r"No session nope in .*%chat sessions lists them"),
        ("export a.md b.md", "one path, not 'b.md' as well"),
        ("export --verbose", "unknown option '--verbose'"),
        ("import", "give the path of an exported conversation"),
        ("import missing.json", "cannot read missing.json"),
        ("import talk.md", r"talk\.md is a Markdown export, for reading; import takes a JSON"),
    ):
        with pytest.raises(UsageError, match=says):
            shell.run_line_magic("chat", line)
    assert shell.run_line_magic("chat", "session") is imported  # nothing changed by those
    (tmp_path / "broken.json").write_text('{"messages": ')
    with pytest.raises(UsageError, match=r"%chat import: broken\.json: Cannot import"):
        shell.run_line_magic("chat", "import broken.json")
    # It continues with this kernel's model: the file's may not exist on this endpoint
    # (a trial's local/ name went to another server, priced as free).
    data = json.loads((tmp_path / "talk.json").read_text())
    (tmp_path / "local.json").write_text(json.dumps({**data, "model": "local/tiny"}))
    said = shell.run_line_magic("chat", "import local.json")._repr_markdown_()
    assert "(recorded with `local/tiny`)" in said and "continues it with `fake-model`" in said
    fake.enqueue("From the kernel's model.")
    assert run(shell, "%%chat\nstill there?").success
    assert fake.chat_requests[-1]["model"] == "fake-model"
    # Stored, but not continued without a model: the message names the stored session.
    monkeypatch.delenv("NBCHAT_MODEL")
    with pytest.raises(UsageError, match=r"recorded with the embedded model local/tiny: run"):
        shell.run_line_magic("chat", "import local.json")
    before = set(nbchat.sessions()["id"])
    with pytest.raises(UsageError, match=r"stored wire\.json as session (\w+), but it") as info:
        shell.run_line_magic("chat", "import wire.json")
    (added,) = set(nbchat.sessions()["id"]) - before
    assert f"%chat use {added} continues it" in str(info.value)


def test_unknown_subcommand_and_bad_config(shell: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="unknown subcommand 'frobnicate'"):
        shell.run_line_magic("chat", "frobnicate")
    with pytest.raises(UsageError, match="key=value"):
        shell.run_line_magic("chat", "config model")
    # The magics' own setting is among the known ones (a trial found it left out).
    with pytest.raises(
        UsageError, match=r"unknown setting modle \(did you mean model\?\); known: .*max_context"
    ):
        shell.run_line_magic("chat", "config modle=x")
    with pytest.raises(UsageError, match="%chat fix takes options only, not 'extra words'"):
        shell.run_line_magic("chat", "fix extra words")
    with pytest.raises(UsageError, match="temperature must be a number"):
        shell.run_line_magic("chat", "config temperature=hot")
    with pytest.raises(UsageError, match=r"%chat config: max_rounds must be at least 0, got -1"):
        shell.run_line_magic("chat", "config max_rounds=-1")
    assert "max_rounds" not in nbchat._config.get_defaults()


def test_subcommand_mistakes_are_named_and_nothing_is_kept_from_them(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    """A new user's typos and stray words (trial 5): each gets an error that names the
    mistake and what to do, and a refused line changes nothing."""

    def refused(line: str, says: str) -> None:
        with pytest.raises(UsageError, match=says):
            shell.run_line_magic("chat", line)

    refused("cots", r"unknown subcommand 'cots' \(did you mean %chat cost\? ")
    refused("confg x=1", r"did you mean %chat config\?")
    refused("zzzz", r"unknown subcommand 'zzzz' \(%chat help lists them\)")
    refused("new extra-arg", "%chat new takes nothing, not 'extra-arg'")
    refused("sessions all", "%chat sessions takes nothing")
    refused("tools none extra", "'none' clears the tools and stands alone")
    refused("local --help", r"%chat local \[PATH\]: .*'--help' is not a path")
    refused("use 0123456789abcdef", r"No session 0123456789abcdef in .*%chat sessions lists them")
    # Aliases: checked as a whole, never one naming itself, never a silent no-op.
    shell.run_line_magic("chat", "alias fast=gpt-4o-mini")
    refused("alias a=b b=a", "would make 'b' name itself")
    refused("alias quick=quick", "would make 'quick' name itself")
    refused("alias slow=", "write name=model \\(or name=none to remove it\\)")
    refused("alias nothere=none", "there is no alias 'nothere' to remove")
    assert shell.run_line_magic("chat", "alias").rows == [("fast", "gpt-4o-mini")]
    gone = shell.run_line_magic("chat", "alias fast=none")
    assert "Removed fast." in gone._repr_markdown_()
    # Search words are text, not shell syntax: an apostrophe is one of them.
    fake.enqueue("I don't know.")
    assert run(shell, "%%chat\nsay don't").success
    found = shell.run_line_magic("chat", "search don't")
    assert len(found.frame) >= 1


def test_config_shows_settings_without_the_key(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    info = shell.run_line_magic("chat", "config api_key=sk-very-secret temperature=0.5")
    text = repr(info) + info._repr_markdown_()
    assert "sk-very-secret" not in text
    assert "set (kernel)" in text and "fake-model (NBCHAT_MODEL)" in text
    assert "temperature" in text and "0.5" in text
    fake.enqueue("warm")
    assert run(shell, "%%chat\nhi").success
    assert fake.requests[0]["temperature"] == 0.5
    shell.run_line_magic("chat", "config api_key=none temperature=none")


def test_config_names_the_base_url_requests_go_to(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial read ``base_url —`` beside a 'still needed' line naming api.openai.com:
    the row says where requests go, and what set it."""
    for name in ("NBCHAT_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    rows = dict(shell.run_line_magic("chat", "config").rows)
    assert rows["base_url"] == "https://api.openai.com/v1 (default)"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    rows = dict(shell.run_line_magic("chat", "config").rows)
    assert rows["base_url"] == "http://127.0.0.1:9/v1 (OPENAI_BASE_URL)"
    info = shell.run_line_magic("chat", "config base_url=http://127.0.0.1:8/v1")
    assert dict(info.rows)["base_url"] == "http://127.0.0.1:8/v1 (kernel)"
    assert info.title == "nbchat settings in this kernel"
    shell.run_line_magic("chat", "config base_url=none")


def test_config_lists_every_setting_it_was_given(shell: InteractiveShell) -> None:
    """``%chat config`` shows each setting the kernel has, not a hand-kept few: after
    ``config api=responses budget_usd=2`` both are listed."""
    try:
        info = shell.run_line_magic("chat", "config api=responses budget_usd=2")
        rows = dict(info.rows)
        assert rows["api"] == "responses" and rows["budget_usd"] == "2.0"
        assert [k for k, _ in info.rows].count("api") == 1
    finally:
        shell.run_line_magic("chat", "config api=none budget_usd=none")


def test_config_api_reaches_the_conversation_going_on(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    """``%chat config api=responses`` said it applied to the current session, whose next
    turn still went to /chat/completions (new-user trial 4); and back again."""
    try:
        fake.enqueue("one")
        assert run(shell, "%%chat\nfirst").success
        shell.run_line_magic("chat", "config api=responses")
        fake.enqueue("two")
        assert run(shell, "%%chat\nsecond").success
        shell.run_line_magic("chat", "config api=chat")
        fake.enqueue("three")
        assert run(shell, "%%chat\nthird").success
    finally:
        shell.run_line_magic("chat", "config api=none")
    paths = [p.split("?")[0].removeprefix("/v1") for p in fake.request_paths]
    assert paths == ["/chat/completions", "/responses", "/chat/completions"]
    assert [m["content"] for m in fake.chat_requests[-1]["messages"]] == [
        "first",
        "one",
        "second",
        "two",
        "third",
    ]


# --------------------------------------------------------------------------- tools


def test_tools_from_the_notebook_and_the_python_tool(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    run(shell, "def get_weather(city: str) -> str:\n    'Weather.'\n    return f'sunny in {city}'")
    shell.user_ns["numbers"] = [1, 2, 3]
    fake.enqueue(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    fake.enqueue(
        tool_calls=[{"name": "python", "arguments": {"code": "total = sum(numbers)\ntotal * 2"}}]
    )
    fake.enqueue("Sunny, and the total doubled is 12.")
    assert run(shell, "%%chat --tools get_weather,python:auto\nweather and sum?").success
    assert shell.user_ns["total"] == 6
    tool_messages = [m for m in fake.requests[2]["messages"] if m["role"] == "tool"]
    assert tool_messages[0]["content"] == "sunny in Paris"
    assert tool_messages[1]["content"] == "result:\n12"
    markdown = pub(shell).last["data"]["text/markdown"]
    assert "<code>get_weather</code>" in markdown and "<code>python</code>" in markdown
    # Without --tools the next cell has none.
    fake.enqueue("no tools")
    assert run(shell, "%%chat\nplain").success
    assert "tools" not in fake.requests[3]


def test_chat_tools_sets_the_tools_of_later_cells(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    run(shell, "def lookup(key: str) -> str:\n    'Look a key up.'\n    return key.upper()")
    info = shell.run_line_magic("chat", "tools lookup,python:never")
    assert "lookup" in repr(info) and "python" in repr(info)
    fake.enqueue("ok")
    assert run(shell, "%%chat\nhi").success
    names = [t["function"]["name"] for t in fake.requests[0]["tools"]]
    assert names == ["lookup", "python"]
    with pytest.raises(UsageError, match=r"^%chat tools nothing: no function called 'nothing'"):
        shell.run_line_magic("chat", "tools nothing")
    with pytest.raises(UsageError, match=r"^%chat tools python:maybe: the python tool's approval"):
        shell.run_line_magic("chat", "tools python:maybe")
    # The function exists: only python takes a mode (it said "no function called").
    with pytest.raises(UsageError, match=r"lookup:ask: only the python tool takes an approval"):
        shell.run_line_magic("chat", "tools lookup:ask")
    assert "No tools" in repr(shell.run_line_magic("chat", "tools none"))


def test_python_tool_never_and_declined_ask(fake: FakeOpenAIServer) -> None:
    from nbchat import Session

    ns: dict[str, Any] = {}
    asked: list[str] = []

    def decline(code: str) -> bool:
        asked.append(code)
        return False

    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": "x = 1"}}])
    fake.enqueue("ok")
    never = python_tool(ns, approval="never")
    r = Session(model="m", base_url=fake.url, db=False, tools=[never]).send("run")
    assert r.tool_calls[0].is_error and "approval='never'" in r.tool_calls[0].result
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": "x = 1"}}])
    fake.enqueue("ok")
    ask = python_tool(ns, approval="ask", confirm=decline)
    r = Session(model="m", base_url=fake.url, db=False, tools=[ask]).send("run")
    assert asked == ["x = 1"] and "declined" in r.tool_calls[0].result
    declined = r.tool_calls[0]  # the user's choice, not the tool's failure
    assert (declined.is_error, declined.error_kind) == (False, "declined")
    view = TurnView()
    view.handle(ToolResult(session_id="s", turn_id="t", call=declined))
    assert "(skipped)" in view.html() and "error" not in view.html().split("</summary>")[0]
    assert "x" not in ns
    with pytest.raises(ValueError, match="approval must be one of"):
        python_tool(ns, approval="sometimes")  # type: ignore[arg-type]


def test_run_code_output_value_and_errors() -> None:
    ns: dict[str, Any] = {"data": {"a": 1}}
    assert run_code("print('hi')\nimport sys\nprint('warn', file=sys.stderr)\ndata", ns) == (
        "stdout:\nhi\nstderr:\nwarn\nresult:\n{'a': 1}"
    )
    assert run_code("y = 2", ns).startswith("(the code ran") and ns["y"] == 2
    with pytest.raises(ExecutionFailed) as info:
        run_code("print('before')\ndef f():\n    return 1 / 0\nf()", ns)
    message = str(info.value)
    assert message.startswith("stdout:\nbefore\nerror:\nTraceback")
    assert "return 1 / 0" in message and "ZeroDivisionError" in message
    assert "_pytool" not in message
    with pytest.raises(ExecutionFailed, match="SyntaxError"):
        run_code("def (", ns)


def test_python_tool_output_does_not_capture_other_threads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    started, release = threading.Event(), threading.Event()
    ns: dict[str, Any] = {"started": started, "release": release}
    worker = threading.Thread(
        target=run_code, args=("started.set(); release.wait(5); print('tool output')", ns)
    )
    worker.start()
    started.wait(5)
    print("user output")
    release.set()
    worker.join(5)
    assert capsys.readouterr().out == "user output\n"


# --------------------------------------------------------------------------- loading


def test_load_ext_imports_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython()\n"
        "ip.run_line_magic('load_ext', 'nbchat')\n"
        "assert 'chat' in ip.magics_manager.magics['cell']\n"
        "heavy = ('openai', 'pandas', 'duckdb', 'httpx', 'pydantic')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_unload_removes_the_magics(shell: InteractiveShell) -> None:
    shell.run_line_magic("unload_ext", "nbchat")
    assert "chat" not in shell.magics_manager.magics["cell"]
    assert "chat_sql" not in shell.magics_manager.magics["cell"]
    shell.run_line_magic("load_ext", "nbchat")
    assert "chat" in shell.magics_manager.magics["line"]


# --------------------------------------------------------------------------- the store


def test_chat_search_marks_matches_in_escaped_html(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("Use **bold** <b>tags</b> & $5 for a window function.")
    assert run(shell, "%%chat\nwindow?").success
    found = shell.run_line_magic("chat", "search window")
    assert list(found.frame["role"]) == ["assistant", "user"]
    table = found._repr_html_()
    # Model text is escaped, the match marked: no raw ** markers added, no live tags.
    assert "<mark>window</mark> function." in table and "<b>tags" not in table
    assert "Use **bold** &lt;b&gt;tags&lt;/b&gt; &amp;" in table
    assert "**window**" not in table and "**window**" not in repr(found)
    assert "Use **bold** <b>tags</b> & $5 for a window function." in repr(found)
    assert "**window**" in found.frame["snippet"][0]  # search()'s own contract is kept
    nothing = shell.run_line_magic("chat", "search zebra")
    assert "No stored message" in nothing._repr_html_() and "No stored" in repr(nothing)


def test_a_json_answer_is_shown_once_pretty_printed_in_the_replys_place(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    """A trial saw a --format json reply twice: as streamed, and again pretty-printed
    in a display of its own. The cell's one display ends with the pretty form."""
    fake.enqueue('{"name": "Oslo", "note": "<b>x</b>"}')
    assert run(shell, "%%chat --format json --out city\nA city as JSON.").success
    assert shell.user_ns["city"] == {"name": "Oslo", "note": "<b>x</b>"}
    calls = pub(shell).calls
    final = calls[-1]["data"]
    assert len([c for c in calls if not c["update"]]) == 1, "one display: the turn's own"
    assert '```json\n{\n  "name": "Oslo",\n  "note": "<b>x</b>"\n}\n```' in final["text/markdown"]
    assert '{"name": "Oslo", "note"' not in final["text/markdown"], "the raw reply is replaced"
    assert "<b>x</b>" not in final["text/html"] and "&lt;b&gt;x&lt;/b&gt;" in final["text/html"]
    assert calls[-1]["update"], "the turn's own display is updated, no second display"
    assert calls[-1]["metadata"]["nbchat"]["status"] == "completed"


def test_history_labels_the_answers_and_leaves_nbchats_instruction_out(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    """A trial found the replies in %chat history unlabelled beside "You:", and the
    plain-text form showed the --format instruction as if the user typed it."""
    fake.enqueue("Hello!")
    fake.enqueue('{"n": 3}')
    assert run(shell, "%%chat\nhi there").success
    assert run(shell, "%%chat --format json\ngive json").success
    history = shell.run_line_magic("chat", "history")
    markdown = history._repr_markdown_()
    assert markdown.count("**You:**") == 2 and markdown.count("**Assistant:**") == 2
    assert markdown.index("**Assistant:**") > markdown.index("hi there")
    assert history._repr_html_().count("<b>Assistant:</b>") == 2
    assert repr(history).splitlines() == [
        "user: hi there",
        "assistant: Hello!",
        "user: give json",
        'assistant: {"n": 3}',
    ]


def test_chat_fix_says_which_of_several_blocks_the_next_cell_holds(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    """A trial's fix reply had two Python blocks; the next cell held the last with no word
    about the first. The cell says which it took."""
    assert not run(shell, "rates = 1 / 0").success
    fake.enqueue(
        "You divided by zero.\n\n```python\nn = max(n, 1)\n```\n\nThen:\n\n"
        "```python\nrates = 1 / n\n```"
    )
    assert run(shell, "%chat fix").success
    assert shell.rl_next_input == "rates = 1 / n"
    final = pub(shell).last["data"]["text/markdown"]
    assert "The next cell holds the last of the reply's 2 Python blocks" in final
    fake.enqueue("Fixed:\n\n```python\nrates = 1\n```")
    assert not run(shell, "rates = 1 / 0").success
    assert run(shell, "%chat fix").success
    assert "The next cell holds" not in pub(shell).last["data"]["text/markdown"]


def test_chat_cost_totals_the_live_turns_and_what_was_spent_on_all(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    """A trial's %chat cost total left out a re-run cell's old turn, so it disagreed with
    %chat sessions: a second row says what all turns cost."""
    fake.enqueue("one", repeat=3)
    assert run(shell, "%%chat\nfirst", cell_id="a").success
    assert run(shell, "%%chat\nfirst again", cell_id="a").success  # the old turn superseded
    assert run(shell, "%%chat\nsecond", cell_id="b").success
    table = shell.run_line_magic("chat", "cost")
    live, spent = table.iloc[-2], table.iloc[-1]
    assert (live["started"], live["state"], live["requests"]) == ("total", "live turns", "2")
    assert (spent["started"], spent["state"], spent["requests"]) == ("spent", "all turns", "3")
    listed = shell.run_line_magic("chat", "sessions")
    assert str(listed.iloc[0]["requests"]) == "3"  # the session's total agrees with "spent"


def test_chat_search_says_which_messages_left_their_conversation(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    """A trial found a re-run cell's old messages listed like live ones, and raw times:
    the role says ``(superseded)``, the time reads as a time."""
    fake.enqueue("a window answer")
    fake.enqueue("another window answer")
    assert run(shell, "%%chat\nwindow one?", cell_id="c1").success
    assert run(shell, "%%chat\nwindow two?", cell_id="c1").success  # the cell re-run
    found = shell.run_line_magic("chat", "search window")
    roles = dict(zip(found.frame["content"], found._shown()["role"], strict=True))
    assert roles["window one?"] == "user (superseded)"
    assert roles["a window answer"] == "assistant (superseded)"
    assert roles["window two?"] == "user" and roles["another window answer"] == "assistant"
    assert "user (superseded)" in found._repr_html_() and "(superseded)" in repr(found)
    assert re.search(r"\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\b", repr(found)), repr(found)


def test_sessions_history_cost_and_sql_from_the_store(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    with pytest.raises(UsageError, match="no current session yet"):
        shell.run_line_magic("chat", "history")
    fake.enqueue("Hi!")
    fake.enqueue("Bye!")
    assert run(shell, "%%chat\nhello").success
    assert run(shell, "%%chat\nbye").success
    session = magics_of(shell).session  # type: ignore[union-attr]
    assert session is not None

    listed = shell.run_line_magic("chat", "sessions")
    assert session.id in set(listed["id"])
    # No notebook here (a plain shell): the column is blank, not "NaN".
    assert listed["notebook"].tolist() == ["", ""] and "NaN" not in listed.to_html()
    assert listed["id"].iloc[-1] == "total"
    history = shell.run_line_magic("chat", "history")
    assert [(m.role, m.content) for m in history.history] == [
        ("user", "hello"),
        ("assistant", "Hi!"),
        ("user", "bye"),
        ("assistant", "Bye!"),
    ]
    shown = history._repr_html_()
    assert shown.index("hello") < shown.index("Hi!") < shown.index("bye") < shown.index("Bye!")
    cost = shell.run_line_magic("chat", "cost")
    assert list(cost["you asked"]) == ["hello", "bye", ""]  # the last row: totals
    assert list(cost["status"]) == ["completed", "completed", ""]
    assert "session_id" not in cost.columns
    by_model = shell.run_line_magic("chat", "cost model")
    assert list(by_model["model"]) == ["fake-model", "total"] and by_model["requests"][0] == 2

    frame = shell.run_cell_magic(
        "chat_sql", "--out rows", "SELECT role, content FROM messages ORDER BY seq"
    )
    assert list(frame["content"]) == ["hello", "Hi!", "bye", "Bye!"]
    assert shell.user_ns["rows"] is frame
    bad = run(shell, "%%chat_sql\nSELEC nonsense")
    assert bad.error_in_exec is not None
    assert len(one_line_error(bad)) == 1
    refused = run(shell, "%%chat_sql\nDELETE FROM messages")
    assert refused.error_in_exec is not None and len(one_line_error(refused)) == 1
    assert len(shell.run_line_magic("chat", "history").history) == 4


@pytest.mark.local_model
def test_chat_local_starts_the_embedded_model_and_cells_use_it(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NBCHAT_BASE_URL")
    monkeypatch.delenv("NBCHAT_MODEL")
    info = shell.run_line_magic("chat", "local")
    assert "local/" in repr(info) and "http://127.0.0.1:" in repr(info)
    result = run(shell, "%%chat --out hello --no-stream\nSay hello.")
    assert result.success, result.error_in_exec
    assert shell.user_ns["hello"].strip()
    assert pub(shell).last["metadata"]["nbchat"]["status"] == "completed"
    # Another model leaves the local server (it would answer under that model's name).
    shell.run_line_magic("chat", "new")
    moved = shell.run_line_magic("chat", "config model=gpt-4o-mini")
    assert "left the local model" in dict(moved.rows)
    assert "base_url" not in nbchat._config.get_defaults()
    back = shell.run_line_magic("chat", "local")
    assert nbchat._config.get_defaults()["model"].startswith("local/") and "127.0.0.1" in repr(back)


def test_rerunning_a_cell_goes_back_to_its_conversation(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    for text in ("a1", "a2", "pirate", "a2 again", "a3"):
        fake.enqueue(text)
    magics = magics_of(shell)
    assert magics is not None
    assert run(shell, "%%chat\nQ1", cell_id="c1").success
    assert run(shell, "%%chat\nQ2", cell_id="c2").success
    first = magics.session
    assert run(shell, "%%chat --new -s 'Be a pirate.'\nAhoy", cell_id="c3").success
    assert magics.session is not first
    # Re-running c2 forks the first conversation, not the pirate one...
    assert run(shell, "%%chat\nQ2 edited", cell_id="c2").success
    assert magics.session is first and first is not None
    # (one Session object per conversation: %chat use finds the open one)
    shell.run_line_magic("chat", "new")
    shell.run_line_magic("chat", f"use {first.id}")
    assert magics.session is first
    assert [m["content"] for m in fake.requests[3]["messages"]] == ["Q1", "a1", "Q2 edited"]
    # ...and a new cell continues from there.
    assert run(shell, "%%chat\nQ3", cell_id="c4").success
    assert [m["content"] for m in fake.requests[4]["messages"]] == [
        "Q1",
        "a1",
        "Q2 edited",
        "a2 again",
        "Q3",
    ]


def test_pending_session_resume_and_abort(
    shell: InteractiveShell, fake: FakeOpenAIServer, isolated_env: Path
) -> None:
    from nbchat._store import Store
    from nbchat._types import Message, ToolCall

    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    with Store.open(isolated_env) as store:
        for sid in ("crashed-1", "crashed-2"):
            store.create_session(
                session_id=sid,
                model="fake-model",
                system_prompt=None,
                messages=[
                    Message(role="user", content="weather?", seq=0, turn_id="t1"),
                    Message(role="assistant", tool_calls=[call], seq=1, turn_id="t1"),
                ],
            )
    run(shell, "def get_weather(city: str) -> str:\n    'Weather.'\n    return 'sunny'")
    shell.run_line_magic("chat", "use crashed-1")
    pending = run(shell, "%%chat\nhello?")
    assert isinstance(pending.error_in_exec, SessionPendingError)
    assert "%chat resume" in one_line_error(pending)[0]

    fake.enqueue("It is sunny in Paris.")
    assert run(shell, "%chat resume get_weather").success
    assert pub(shell).last["data"]["text/plain"] == "It is sunny in Paris."
    tool_message = fake.requests[0]["messages"][-1]
    assert (tool_message["role"], tool_message["content"]) == ("tool", "sunny")
    assert tool_message["tool_call_id"] == "call_1"

    shell.run_line_magic("chat", "use crashed-2")
    assert "Closed 1 pending" in repr(shell.run_line_magic("chat", "abort"))
    fake.enqueue("ok")
    assert run(shell, "%%chat\nhello?").success


def test_a_session_another_process_runs_refuses_the_cell_in_one_line_and_shows_nothing(
    shell: InteractiveShell, fake: FakeOpenAIServer, isolated_env: Path
) -> None:
    fake.enqueue("first")
    assert run(shell, "%%chat\nhello").success
    session = shell.run_line_magic("chat", "session")
    hold = session.store.hold_session(session.id)  # as a second kernel's running turn does
    try:
        refused = run(shell, "%%chat\nagain")
    finally:
        hold.release(session.history[-1].seq)
    assert isinstance(refused.error_in_exec, SessionInUseError)
    assert "wait for it to finish" in one_line_error(refused)[0]
    assert pub(shell).last["data"]["text/plain"] == ""  # the placeholder withdrawn
    assert len(fake.requests) == 1


def test_written_out_help_matches_the_options_models() -> None:
    from nbchat._magic_options import ChatOptions, SqlOptions, options_help
    from nbchat._magics import CHAT_OPTIONS_HELP, SQL_OPTIONS_HELP

    assert options_help(ChatOptions) == CHAT_OPTIONS_HELP
    assert options_help(SqlOptions) == SQL_OPTIONS_HELP


def test_every_option_word_names_a_field_in_order() -> None:
    from nbchat._magic_help import CHAT_OPTIONS, SQL_OPTIONS
    from nbchat._magic_options import ChatOptions, SqlOptions

    assert [o.name for o in CHAT_OPTIONS] == list(ChatOptions.model_fields)
    assert [o.name for o in SQL_OPTIONS] == list(SqlOptions.model_fields)


def test_unload_really_removes_the_magics(shell: InteractiveShell) -> None:
    shell.run_line_magic("unload_ext", "nbchat")
    try:
        assert shell.find_line_magic("chat") is None
        assert shell.find_cell_magic("chat") is None
        assert shell.find_cell_magic("chat_sql") is None
    finally:
        shell.run_line_magic("load_ext", "nbchat")
    assert shell.find_cell_magic("chat") is not None


def test_chat_sql_reads_files_only_when_allowed(shell: InteractiveShell, tmp_path: Path) -> None:
    data = tmp_path / "numbers.csv"
    data.write_text("n\n1\n2\n")
    query = f"SELECT sum(n) AS total FROM read_csv('{data}')"
    refused = run(shell, f"%%chat_sql\n{query}")
    assert isinstance(refused.error_in_exec, StoreError)
    assert "allow_files" in str(refused.error_in_exec)
    frame = shell.run_cell_magic("chat_sql", "--allow-files", query)
    assert int(frame["total"][0]) == 3


def test_chat_endpoint_and_cost_plot_subcommands(
    shell: InteractiveShell, fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    added = shell.run_line_magic("chat", f"endpoint add work base_url={fake.url} api_key_env=WK")
    assert "work" in repr(added) or "work" in added.title
    listed = shell.run_line_magic("chat", "endpoint list")
    assert any("work" in str(row) for row in listed.rows)
    fake.enqueue("via the endpoint", usage={"prompt_tokens": 5, "completion_tokens": 2})
    assert run(shell, "%%chat -m work:fake-model\nhi").success
    assert fake.requests[-1]["model"] == "fake-model"
    image = shell.run_line_magic("chat", "cost model --plot")
    assert image.data[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="Usage: %chat endpoint"):
        shell.run_line_magic("chat", "endpoint frobnicate")


def test_magic_lines_take_a_trailing_comment(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    with FakeOpenAIServer() as work:
        # The README's cell, as written: the comment's apostrophe once read as an open quote.
        run(shell, f"%chat endpoint add work base_url={work.url}  # a second server")
        done = run(shell, "%chat config endpoint=work          # the kernel's default endpoint")
        assert done.error_in_exec is None
        # A cell's options too; a # inside quotes or inside a word is kept.
        work.enqueue("ok")
        cell = run(shell, '%%chat -s "rule #1: be C# brief" --out reply  # it\'s a note\nhi')
        assert cell.error_in_exec is None
        assert work.requests[-1]["messages"][0]["content"] == "rule #1: be C# brief"
        assert "ok" in str(shell.user_ns["reply"])
        assert fake.requests == []


def test_a_warning_from_a_magic_points_at_the_cell_not_at_nbchat(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    with FakeOpenAIServer() as elsewhere:
        stored = nbchat.Session(model="m", base_url=elsewhere.url, api_key="k")
    with pytest.warns(UserWarning, match="it continues on") as told:
        assert run(shell, f"%chat use {stored.id}").error_in_exec is None
    (warning,) = told
    nbchat_dir = str(Path(nbchat.__file__).parent)
    assert not warning.filename.startswith(nbchat_dir)  # it said _magics.py:427
    assert "IPython" not in warning.filename  # the cell's own line


def test_split_line_drops_only_a_comment_that_starts_a_word() -> None:
    assert split_line("config k=v   # it's the default") == ["config", "k=v"]
    assert split_line("search C# 'a #b' \"#c\" d\\ #e #f g") == [
        "search",
        "C#",
        "a #b",
        "#c",
        "d #e",
    ]
    assert split_line("# all comment") == []
    with pytest.raises(ValueError, match="No closing quotation"):
        split_line("config system='unclosed # not a comment")


# --------------------------------------------------------------------------- -e NAME


def test_endpoint_flag_sends_the_cell_to_a_saved_endpoint(
    shell: InteractiveShell, fake: FakeOpenAIServer
) -> None:
    with FakeOpenAIServer() as work:
        run(shell, f"%chat endpoint add work base_url={work.url}")
        work.enqueue("from work")
        work.enqueue("a bigger one")
        fake.enqueue("from the default", repeat=2)
        assert run(shell, "%%chat\nfirst").error_in_exec is None  # the session: default server
        assert run(shell, "%%chat -e work\nhello").error_in_exec is None
        assert run(shell, "%%chat -e work -m big-model\nhello again").error_in_exec is None
        assert "a bigger one" in pub(shell).last["data"]["text/plain"]
        assert run(shell, "%%chat\nand here?").error_in_exec is None  # -e was that cell's only
        assert [r["model"] for r in work.requests] == ["fake-model", "big-model"]
        assert [r["model"] for r in fake.requests] == ["fake-model", "fake-model"]
        # The work server saw the whole conversation, as any model of the session would.
        assert [m["content"] for m in work.requests[0]["messages"]][-1] == "hello"
        unknown = run(shell, "%%chat -e nowhere\nhello")
        assert isinstance(unknown.error_in_exec, UsageError)
        assert "-e nowhere: no saved endpoint of that name" in str(unknown.error_in_exec)
        assert len(work.requests) == 2 and len(fake.requests) == 2


def test_images_for_the_text_only_embedded_model_are_refused_before_sending(
    shell: InteractiveShell, fake: FakeOpenAIServer, db_path: Path
) -> None:
    import io

    from PIL import Image as PILImage

    import nbchat
    from nbchat import AttachmentError, Session
    from nbchat._images import forget_text_only
    from nbchat._local import LocalServer, _serving
    from nbchat._pricing import forget_free_endpoint

    picture = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(picture, format="PNG")
    shell.user_ns["pic"] = nbchat.Image(picture.getvalue())
    # What %chat local records of the server it started, here for the fake server's URL.
    _serving(LocalServer(fake.url, "local/smollm2", "m.gguf", 1, 512, 64, ""))
    try:
        s = Session(model="local/smollm2", base_url=fake.url, db=db_path)
        with pytest.raises(AttachmentError, match="text-only model") as info:
            s.send("what is this?", attachments=[picture.getvalue()])
        assert "(local/smollm2)" in str(info.value) and "use a vision model" in str(info.value)
        result = run(shell, "%%chat --attach pic\nwhat is this?")
        (line,) = one_line_error(result)
        assert "text-only model" in line and "vision model" in line
        assert fake.requests == [] and nbchat.transcript(s.id, db=str(db_path)).empty
        fake.enqueue("text is fine")
        assert s.send("and without it?").text == "text is fine"
    finally:
        forget_text_only(fake.url)
        forget_free_endpoint(fake.url)
