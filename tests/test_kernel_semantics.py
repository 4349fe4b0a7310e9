"""Cells keep to their conversations through a real ipykernel (issue 13: 1 and 3)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbchat.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from magics_kernel import kernel_env, running_kernel

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(fallback="Noted.") as fake:
        yield fake


@pytest.fixture
def env(server: FakeOpenAIServer, tmp_path: Path) -> dict[str, str]:
    return kernel_env(server.url, str(tmp_path / "kernel.duckdb"))


def _contents(server: FakeOpenAIServer, request: int) -> list[str]:
    return [m["content"] for m in server.requests[request]["messages"]]


def test_rerunning_a_new_cell_regenerates_the_conversation_the_cells_below_follow(
    server: FakeOpenAIServer, env: dict[str, str]
) -> None:
    with running_kernel(env) as k:
        assert k.execute("%load_ext nbchat").status == "ok"
        first = "%%chat --new\nMy favourite colour is RED."
        ask = "%%chat\nWhat is my favourite colour?"
        runs = [k.execute(first, cell_id="c-new"), k.execute(ask, cell_id="c-ask")]
        # Edit RED -> BLUE and run all again.
        runs.append(k.execute(first.replace("RED", "BLUE"), cell_id="c-new"))
        runs.append(k.execute(ask, cell_id="c-ask"))
    assert [r.status for r in runs] == ["ok"] * 4
    assert _contents(server, 3) == [
        "My favourite colour is BLUE.",
        "Noted.",
        "What is my favourite colour?",
    ]
    # One conversation, regenerated: every cell's output names the same session.
    sessions = {r.displays()[-1]["metadata"]["nbchat"]["session_id"] for r in runs}
    assert len(sessions) == 1


def _display_id(run: object) -> str:
    (shown,) = run.of_type("display_data")  # type: ignore[attr-defined]
    return str(shown["content"]["transient"]["display_id"])


def test_a_rerun_says_which_later_turns_it_replaces_and_marks_their_outputs(
    server: FakeOpenAIServer, env: dict[str, str]
) -> None:
    with running_kernel(env) as k:
        assert k.execute("%load_ext nbchat").status == "ok"
        x = k.execute("%%chat\nX", cell_id="c-x")
        z = k.execute("%%chat\nZ", cell_id="c-z")
        y = k.execute("%%chat\nY", cell_id="c-y")  # run out of order: X, Z, Y
        again = k.execute("%%chat\nZ again", cell_id="c-z")
    assert [r.status for r in (x, z, y, again)] == ["ok"] * 4
    html = again.displays()[-1]["data"]["text/html"]
    assert "replaces this cell" in html and "earlier turn and 1 later turn" in html
    # Y's output, still on screen, is updated in place to say it no longer counts.
    updates = [
        m
        for m in again.of_type("update_display_data")
        if m["content"]["transient"]["display_id"] == _display_id(y)
    ]
    assert updates and "Superseded" in updates[-1]["content"]["data"]["text/html"]
    assert updates[-1]["content"]["data"]["text/plain"] == "Noted."  # Y's reply, still shown
    # X's output is not touched: it is still part of the conversation.
    assert all(
        m["content"]["transient"]["display_id"] != _display_id(x)
        for m in again.of_type("update_display_data")
    )
    assert _contents(server, 3) == ["X", "Noted.", "Z again"]


@pytest.mark.parametrize("warm_up", ["1", "0"])
def test_load_ext_in_a_kernel_warms_up_what_the_first_turn_needs(
    server: FakeOpenAIServer, env: dict[str, str], warm_up: str
) -> None:
    """The first %%chat need not pay for importing openai and DuckDB (NBCHAT_WARMUP=0: off)."""
    check = (
        "import sys, time\n"
        "deadline = time.monotonic() + 30\n"
        "while 'openai' not in sys.modules and time.monotonic() < deadline and WAIT:\n"
        "    time.sleep(0.05)\n"
        "time.sleep(0 if WAIT else 1.0)\n"
        "print(sorted(m for m in ('openai', 'duckdb') if m in sys.modules))"
    )
    with running_kernel({**env, "NBCHAT_WARMUP": warm_up}) as k:
        assert k.execute("%load_ext nbchat").status == "ok"
        run = k.execute(check.replace("WAIT", str(warm_up == "1")))
    expected = "['duckdb', 'openai']" if warm_up == "1" else "[]"
    assert run.stdout.strip() == expected


def test_after_a_kernel_restart_a_rerun_cell_continues_its_conversation(
    server: FakeOpenAIServer, env: dict[str, str]
) -> None:
    with running_kernel(env) as k:
        assert k.execute("%load_ext nbchat").status == "ok"
        assert k.execute("%%chat\nMy name is Ada.", cell_id="c-1").status == "ok"
        assert k.execute("%%chat\nWhat is my name?", cell_id="c-2").status == "ok"
    with running_kernel(env) as k:  # the kernel restarted; the store file is the same
        assert k.execute("%load_ext nbchat").status == "ok"
        again = k.execute("%%chat\nWhat is my name, again?", cell_id="c-2")
        fresh = k.execute("%%chat\nAnd now?", cell_id="c-3")
    assert again.status == fresh.status == "ok"
    assert _contents(server, 2) == ["My name is Ada.", "Noted.", "What is my name, again?"]
    html = again.displays()[-1]["data"]["text/html"]
    assert "Continuing session" in html and "kernel restarted" in html
    # The next cell follows that conversation too.
    assert _contents(server, 3)[:3] == ["My name is Ada.", "Noted.", "What is my name, again?"]
