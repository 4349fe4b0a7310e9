"""Cells, config and figures that never say what isn't so (issue 13), in an IPython shell."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell
from test_magics import RecordingPublisher, one_line_error, pub, run, shell  # noqa: F401

import nbchat
from nbchat import ConfigError, TurnFailed
from nbchat._config import get_defaults, serve_embedded, set_defaults
from nbchat._magics import magics_of
from nbchat._pricing import forget_price
from nbchat._render import NO_REPLY, history_views
from nbchat.testing import FakeOpenAIServer


def _current(ip: InteractiveShell) -> object:
    magics = magics_of(ip)
    assert magics is not None
    return magics.session


def test_a_model_set_before_its_key_is_kept_and_the_key_asked_for(
    shell: InteractiveShell,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A new-user trial: `%chat config model=gpt-4o-mini` first, the key next, was
    # refused at step one. With no conversation going on, nothing can break: kept.
    monkeypatch.delenv("NBCHAT_BASE_URL")  # OpenAI's own API, and no key for it
    result = run(shell, "%chat config model=gpt-4o-mini")
    assert result.success, result.error_in_exec
    rows = dict(result.result.rows)
    assert rows["this change applies to"] == "new sessions"
    assert rows["still needed"].startswith("No API key for https://api.openai.com/v1")
    assert get_defaults()["model"] == "gpt-4o-mini"
    turn = run(shell, "%%chat\nhi")  # and the cell says the same, before any request
    assert isinstance(turn.error_in_exec, ConfigError)
    assert "No API key for https://api.openai.com/v1" in str(turn.error_in_exec)
    # Named as it can be caught: not the magics' own MissingKey (a trial asked what it was).
    (line,) = one_line_error(turn)
    assert line.startswith("\x1b[0;31mConfigError\x1b[0m: No API key"), line
    keyed = run(shell, "%chat config api_key=sk-test-abcdef")
    careful = dict(keyed.result.rows)["careful"]
    assert keyed.success and "saved with the notebook's source" in careful
    assert "sk-test-abcdef" not in repr(keyed.result)
    assert "still needed" not in dict(run(shell, "%chat config model=gpt-4o").result.rows)


def test_a_model_set_after_chat_local_leaves_the_embedded_server(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A new-user trial: after `%chat local`, `%chat config model=gpt-4o-mini` kept the
    # local URL, so SmolLM answered as "gpt-4o-mini" at $0, and was stored so. The fake
    # server stands in for the embedded one here (test_magics runs the real one).
    monkeypatch.delenv("NBCHAT_BASE_URL")
    monkeypatch.delenv("NBCHAT_MODEL")
    serve_embedded(fake.url)
    set_defaults(model="local/tiny", base_url=fake.url)  # what `%chat local` sets
    fake.enqueue("local answer")
    assert run(shell, "%%chat\nhi").success
    # With a conversation on the embedded model, a key the new model lacks refuses it...
    refused = run(shell, "%chat config model=gpt-4o-mini")
    assert isinstance(refused.error_in_exec, ConfigError)
    assert "No API key for https://api.openai.com/v1" in str(refused.error_in_exec)
    assert get_defaults() == {"model": "local/tiny", "base_url": fake.url}  # kept whole
    # ...and a cell's own --model does not send the name to the local server either.
    turn = run(shell, "%%chat --model gpt-4o-mini\nagain")
    assert isinstance(turn.error_in_exec, ConfigError)
    assert "No API key for https://api.openai.com/v1" in str(turn.error_in_exec)
    assert len(fake.requests) == 1
    # With none going on, the change is kept, the local URL dropped, and both are said.
    shell.run_line_magic("chat", "new")
    result = run(shell, "%chat config model=gpt-4o-mini")
    assert result.success, result.error_in_exec
    rows = dict(result.result.rows)
    assert rows["left the local model"].startswith("gpt-4o-mini is not a local/ model")
    assert rows["still needed"].startswith("No API key for https://api.openai.com/v1")
    assert get_defaults() == {"model": "gpt-4o-mini"}
    # From Python too: another model never goes to the embedded server by default.
    set_defaults(model="local/tiny", base_url=fake.url)
    assert nbchat.Session(model="local/tiny", db=False).client.settings.base_url == fake.url
    with pytest.raises(ConfigError, match=r"No API key for https://api\.openai\.com/v1"):
        nbchat.Session(model="gpt-4o-mini", db=False)
    served = nbchat.Session(model="gpt-4o-mini", api_key="sk-test-abcdef", db=False)
    assert served.client.settings.base_url == "https://api.openai.com/v1"


def test_a_cloud_key_is_kept_but_never_sent_to_the_embedded_server(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A trial set a key, then ran `%chat local`: the key stayed, unexplained, and went
    to the local server with every request. It stays (for leaving the local model) and
    says so; the local model's requests carry none."""
    monkeypatch.delenv("NBCHAT_BASE_URL")
    monkeypatch.delenv("NBCHAT_MODEL")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-cloud-key-123456")
    serve_embedded(fake.url)
    set_defaults(model="local/tiny", base_url=fake.url, api_key="sk-kernel-cloud-key-123456")
    settings = nbchat.Session(db=False).client.settings
    assert settings.keyless and "cloud-key" not in settings.api_key.get_secret_value()
    rows = dict(shell.run_line_magic("chat", "config").rows)
    assert rows["api_key"] == (
        "set (kernel); not sent to the local model, kept for when you leave it"
    )
    # A key given to the session itself is the user's choice: it is sent.
    given = nbchat.Session(api_key="sk-given-key-123456", db=False).client.settings
    assert given.api_key.get_secret_value() == "sk-given-key-123456"
    # Leaving the local model takes the kernel's key along.
    set_defaults(model="gpt-4o-mini")
    left = nbchat.Session(db=False).client.settings
    assert left.api_key.get_secret_value() == "sk-kernel-cloud-key-123456"
    assert "not sent" not in dict(shell.run_line_magic("chat", "config").rows)["api_key"]


def test_a_refused_config_change_saves_nothing(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue("first")
    assert run(shell, "%%chat\nhi").success  # a conversation the change would break
    fake_session_url = get_defaults().get("base_url")
    result = run(shell, "%chat config base_url=https://api.openai.com/v1")
    assert isinstance(result.error_in_exec, ConfigError)
    assert "No API key" in str(result.error_in_exec)
    assert get_defaults().get("base_url") == fake_session_url  # nothing was saved
    # ...and it says so, and how to get there (a trial could not tell).
    assert "Nothing was changed" in str(result.error_in_exec)
    assert "%chat new first" in str(result.error_in_exec)


def test_a_refused_change_keeps_the_current_session_on_its_endpoint(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue("first")
    assert run(shell, "%%chat\nhi").success
    before = _current(shell)
    result = run(shell, "%chat config base_url=https://api.openai.com/v1 temperature=0.3")
    assert isinstance(result.error_in_exec, ConfigError)
    assert "temperature" not in get_defaults()  # all or nothing
    assert _current(shell) is before
    fake.enqueue("second")
    assert run(shell, "%%chat\nagain").success
    assert len(fake.requests) == 2 and "temperature" not in fake.requests[1]


def test_a_refused_change_puts_the_kernels_key_back_as_it_was(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    # A trial found the key put back wrapped twice: the next server error then failed
    # inside redaction, with a traceback, and left its turn "running" in the store.
    assert run(shell, "%chat config api_key=sk-test-abcdef").success
    fake.enqueue("first")
    assert run(shell, "%%chat\nhi").success  # a conversation the change would break
    result = run(shell, "%chat config base_url=https://api.openai.com/v1 api_key=")
    assert isinstance(result.error_in_exec, ConfigError)
    assert get_defaults()["api_key"].get_secret_value() == "sk-test-abcdef"
    fake.enqueue_error(500, "boom (key sk-test-abcdef)", repeat=3)
    result = run(shell, "%%chat --new\nafter the refused change")
    assert isinstance(result.error_in_exec, TurnFailed)
    assert "HTTP 500" in str(result.error_in_exec) and "sk-test-abcdef" not in str(
        result.error_in_exec
    )
    session = _current(shell)
    assert nbchat.turns(session_id=session.id, db=session.store.path).status.tolist() == [  # type: ignore[attr-defined]
        "error"
    ]


def test_config_says_which_sessions_it_affects_and_applies_limits_now(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    info = shell.run_line_magic("chat", "config budget_usd=0.5")
    assert ("this change applies to", "new sessions") in info.rows
    fake.enqueue("ok")
    assert run(shell, "%%chat\nhi").success
    session = _current(shell)
    assert session.budgets.budget_usd == 0.5  # type: ignore[attr-defined]
    info = shell.run_line_magic("chat", "config budget_usd=none temperature=0.2")
    applies = dict(info.rows)["this change applies to"]
    assert applies.startswith(f"the current session {session.id}")  # type: ignore[attr-defined]
    assert session.budgets.budget_usd is None  # type: ignore[attr-defined]
    assert session.request_params["temperature"] == 0.2  # type: ignore[attr-defined]
    fake.enqueue("warmer")
    assert run(shell, "%%chat\nagain").success
    assert fake.requests[-1]["temperature"] == 0.2
    shell.run_line_magic("chat", "config temperature=none")
    assert "temperature" not in session.request_params  # type: ignore[attr-defined]
    assert isinstance(pub(shell), RecordingPublisher)


@pytest.mark.parametrize("line", ["config system=terse"])
def test_a_system_prompt_change_is_for_new_sessions(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
    line: str,
) -> None:
    fake.enqueue("ok")
    assert run(shell, "%%chat\nhi").success
    info = shell.run_line_magic("chat", line)
    assert "the system prompt: new sessions only" in dict(info.rows)["this change applies to"]


def test_chat_cost_is_readable_with_totals(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue("one", usage={"prompt_tokens": 12, "completion_tokens": 3})
    assert run(shell, "%%chat\nfirst question").success
    fake.enqueue("two", usage={"prompt_tokens": 20, "completion_tokens": 5})
    assert run(shell, "%%chat\nsecond question").success
    table = shell.run_line_magic("chat", "cost")
    assert list(table.columns) == [
        "started", "you asked", "status", "state", "requests", "tokens in", "tokens out",
        "cost", "seconds",
    ]  # fmt: skip
    assert list(table["you asked"]) == ["first question", "second question", ""]
    # A question's lines and a --format instruction do not show (a trial saw "\n\n
    # Answer with one...") and a count the server did not report reads "unknown".
    fake.enqueue("[1]", usage=None)
    assert run(shell, "%%chat --format json\nthird\nquestion").success
    table = shell.run_line_magic("chat", "cost")
    assert table["you asked"].iloc[2] == "third question"
    assert table["tokens in"].iloc[2] == "unknown"
    total = table.iloc[-1]
    assert (total["started"], total["tokens in"], total["tokens out"]) == (
        "total", "32 + 1 turn unknown", "8 + 1 turn unknown",
    )  # fmt: skip
    assert total["cost"] == "unknown"  # fake-model has no price: never "$0"
    assert table["started"].iloc[0].endswith(" UTC") and "." not in table["started"].iloc[0]
    by_model = shell.run_line_magic("chat", "cost model")
    assert by_model.iloc[-1]["model"] == "total" and by_model.iloc[0]["cost"] == "unknown"
    listed = shell.run_line_magic("chat", "sessions")
    assert list(listed.columns) == [
        "id", "title", "model", "last active", "turns", "requests", "cost", "notebook",
    ]  # fmt: skip


def test_chat_sessions_says_a_cost_is_partly_unknown_and_totals_it(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    # A new-user trial: a session with an unpriced request read "$0.00", as if free.
    nbchat.register_price("priced-model", input_per_mtok=1_000_000, output_per_mtok=0)
    try:
        fake.enqueue("one", usage={"prompt_tokens": 2, "completion_tokens": 1})
        assert run(shell, "%%chat -m priced-model\npriced").success
    finally:
        forget_price("priced-model")
    fake.enqueue("two", usage={"prompt_tokens": 2, "completion_tokens": 1})
    assert run(shell, "%%chat\nunpriced").success  # fake-model has no price
    fake.enqueue("three")
    assert run(shell, "%%chat --new\nalone").success
    listed = shell.run_line_magic("chat", "sessions")
    assert list(listed["cost"]) == [
        "unknown",
        "$2.00 + 1 request unknown",
        "$2.00 + 2 requests unknown",
    ]
    total = listed.iloc[-1]
    assert (total["id"], total["turns"], total["requests"]) == ("total", "3", "3")
    assert listed["last active"].iloc[0].endswith(" UTC")  # not a raw timestamp


def test_history_marks_a_failed_turn_with_its_error(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    # A trial: a failed turn's question stood in %chat history as if unanswered.
    fake.enqueue("first answer")
    assert run(shell, "%%chat\nfirst").success
    fake.enqueue_error(500, "the model fell over", repeat=3)  # the client's retries too
    assert isinstance(run(shell, "%%chat\nsecond").error_in_exec, TurnFailed)
    fake.enqueue("third answer")
    assert run(shell, "%%chat\nthird").success
    shown = shell.run_line_magic("chat", "history")._repr_html_()
    second = shown[shown.index("second") : shown.index("third")]
    assert "⚠ Error: The model server answered HTTP 500: the model fell over" in second
    assert "⚠" not in shown[: shown.index("second")] + shown[shown.index("third") :]
    # The panel's history says the same; without a store, that no reply was stored.
    session = _current(shell)
    board = nbchat.panel(session)
    bubbles = [w.value for w in board.messages.children]
    assert sum("HTTP 500: the model fell over" in b for b in bubbles) == 1
    (failed,) = [v for v in history_views(session.history) if v.user_text == "second"]
    assert failed.badges == [NO_REPLY]


def test_a_mistyped_placeholder_warns_in_one_line_and_is_sent_as_typed(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shell.user_ns["city"] = "Oslo"
    fake.enqueue("ok")
    assert run(shell, '%%chat\nweather in {city}? also {nosuch} and {"json": 1}').success
    assert fake.requests[0]["messages"][-1]["content"] == (
        'weather in Oslo? also {nosuch} and {"json": 1}'
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "nbchat: {nosuch} matched no variable, cell or error in the notebook; sent as typed "
        "(write {{name}} for literal braces)."
    ]


def test_chat_use_mentions_pending_tool_calls(shell: InteractiveShell) -> None:  # noqa: F811
    from nbchat._events import MessageAdded
    from nbchat._store import Store
    from nbchat._types import Message, ToolCall

    store = Store.open()  # the kernel's default store (NBCHAT_DB of this test)
    store.create_session(session_id="left-pending", model="fake-model", system_prompt=None)
    for seq, message in enumerate(
        [
            Message(role="user", content="weather?"),
            Message(role="assistant", tool_calls=[ToolCall(id="c1", name="get_weather")]),
        ]
    ):
        message.seq = seq
        store.handle(MessageAdded(session_id="left-pending", message=message))
    store.close()
    info = shell.run_line_magic("chat", "use left-pending")
    assert "1 pending tool call (get_weather)" in info.title
    assert "%chat resume" in info.title and "%chat abort" in info.title


def test_a_cell_can_tag_its_session_and_cost_groups_by_tag(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue("ok")
    assert run(shell, "%%chat --tag churn,q3\nhi").success
    session = _current(shell)
    assert session.tags == ["churn", "q3"]  # type: ignore[attr-defined]
    table = shell.run_line_magic("chat", "cost tag")
    assert list(table["tag"]) == ["churn", "q3", "total"]


def test_chat_search_finds_stored_messages(
    shell: InteractiveShell,  # noqa: F811
    fake: FakeOpenAIServer,
) -> None:
    fake.enqueue("Partition by the user column.")
    assert run(shell, "%%chat\nHow do window functions partition?").success
    found = shell.run_line_magic("chat", "search partition")
    assert len(found) == 2 and "**partition**" in found["snippet"].iloc[0].lower()
