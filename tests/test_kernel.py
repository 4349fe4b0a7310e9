"""%%chat through a real ipykernel, driven like JupyterLab (cell ids), against the fake server."""

from __future__ import annotations

import html
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbchat.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from magics_kernel import Execution, Kernel, fresh_session, nbchat_kernel, stored_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel") / "kernel.duckdb"


@pytest.fixture(scope="module")
def kernel(server: FakeOpenAIServer, store: Path) -> Iterator[Kernel]:
    with nbchat_kernel(server.url, store) as k:
        yield k


@pytest.fixture
def fake(server: FakeOpenAIServer, kernel: Kernel) -> FakeOpenAIServer:
    """The module's server, emptied, and a fresh current session in the kernel."""
    return fresh_session(server, kernel)


def final(run: Execution) -> dict[str, Any]:
    (display,) = run.displays()
    return display


def test_streamed_cell_ends_with_the_exact_text(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    reply = "# Plan\n\n- load `sales.csv`\n- plot **revenue** by month ✓"
    fake.enqueue(reply, chunk_size=3, delay=0.01)
    run = kernel.execute("%%chat\nMake a plan.", cell_id="cell-1")
    assert run.status == "ok", run.reply
    assert len(run.of_type("display_data")) == 1
    assert len(run.of_type("update_display_data")) >= 1
    shown = final(run)
    assert shown["data"]["text/plain"] == reply
    assert shown["data"]["text/markdown"].startswith(reply)
    assert shown["metadata"]["nbchat"]["status"] == "completed"
    assert "fake-model" in shown["metadata"]["nbchat"]["footer"]


def test_rerunning_a_cell_forks_the_conversation(
    kernel: Kernel, fake: FakeOpenAIServer, store: Path
) -> None:
    for text in ("A1", "A2", "A1 again"):
        fake.enqueue(text)
    first = kernel.execute("%%chat\nQ1", cell_id="cell-a")
    assert kernel.execute("%%chat\nQ2", cell_id="cell-b").status == "ok"
    rerun = kernel.execute("%%chat\nQ1, edited", cell_id="cell-a")
    assert first.status == rerun.status == "ok"
    assert fake.requests[2]["messages"] == [{"role": "user", "content": "Q1, edited"}]

    session_id = final(rerun)["metadata"]["nbchat"]["session_id"]
    assert final(first)["metadata"]["nbchat"]["session_id"] == session_id
    rows = stored_rows(session_id, store, 6, include_superseded=True)
    stored = list(zip(rows["content"], rows["state"], rows["cell_id"], strict=True))
    assert stored == [
        ("Q1", "superseded", "cell-a"),
        ("A1", "superseded", "cell-a"),
        ("Q2", "superseded", "cell-b"),
        ("A2", "superseded", "cell-b"),
        ("Q1, edited", "active", "cell-a"),
        ("A1 again", "active", "cell-a"),
    ]


def test_without_a_cell_id_a_rerun_appends(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    fake.enqueue("one")
    fake.enqueue("two")
    assert kernel.execute("%%chat\nsame").status == "ok"
    assert kernel.execute("%%chat\nsame").status == "ok"
    assert [m["content"] for m in fake.requests[1]["messages"]] == ["same", "one", "same"]


def test_interrupt_mid_stream_keeps_the_partial_reply(
    kernel: Kernel, fake: FakeOpenAIServer, store: Path
) -> None:
    fake.enqueue("word " * 400, chunk_size=5, delay=0.02)
    updates: list[dict[str, Any]] = []

    def interrupt_after_some_text(message: dict[str, Any]) -> None:
        if message["header"]["msg_type"] == "update_display_data":
            updates.append(message)
            if len(updates) == 2:
                kernel.interrupt()

    run = kernel.execute(
        "%%chat --out partial\nTalk for a long time.",
        cell_id="cell-int",
        on_message=interrupt_after_some_text,
    )
    assert run.status == "error"
    assert run.reply["ename"] == "TurnInterrupted"
    (error,) = run.of_type("error")
    assert len(error["content"]["traceback"]) == 1  # one line, no stack
    shown = final(run)
    partial = shown["data"]["text/plain"]
    assert 0 < len(partial) < len("word " * 400)
    assert ("word " * 400).startswith(partial)
    assert shown["metadata"]["nbchat"]["status"] == "interrupted"
    # Said once, by the error line (the display has no badge repeating it).
    assert "Interrupted" not in shown["data"]["text/markdown"]
    assert "TurnInterrupted" in error["content"]["traceback"][0]
    assert "partial reply above was kept" in error["content"]["traceback"][0]

    check = kernel.execute(f"print(partial == {partial!r})")
    assert check.stdout == "True\n"
    session_id = shown["metadata"]["nbchat"]["session_id"]
    rows = stored_rows(session_id, store, 2)
    assert list(rows["status"]) == ["ok", "interrupted"]
    assert rows["content"].iloc[-1] == partial

    fake.enqueue("Still here.")
    after = kernel.execute("%%chat\nAre you there?", cell_id="cell-next")
    assert after.status == "ok"
    assert final(after)["data"]["text/plain"] == "Still here."


def test_display_updates_are_coalesced(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    chunks = [f"t{i} " for i in range(5000)]
    fake.enqueue(chunks=chunks)
    run = kernel.execute("%%chat\nStream fast.", cell_id="cell-fast")
    assert run.status == "ok"
    times = [t for t, m in run.messages if m["header"]["msg_type"] == "update_display_data"]
    start = next(t for t, m in run.messages if m["header"]["msg_type"] == "display_data")
    seconds = max(times[-1] - start, 1e-3)
    assert len(times) <= 15 * seconds + 2, (len(times), seconds)
    assert final(run)["data"]["text/plain"] == "".join(chunks)


def test_text_that_arrived_before_a_stall_is_shown_during_it(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    # A trial saw only "⏳ model…" for the whole of a 15 s stall: the throttle held the
    # last chunks back and was asked again only when the next chunk came.
    reply = "Alpha beta gamma delta epsilon zeta eta theta iota kappa."
    fake.enqueue(reply, chunk_size=6, stall_after=6, stall_seconds=3)
    run = kernel.execute("%%chat\nStall, then go on.", cell_id="cell-stall")
    assert run.status == "ok", run.reply
    shown = [
        m["content"]["data"]["text/plain"]
        for _, m in run.messages
        if m["header"]["msg_type"] in ("display_data", "update_display_data")
    ]
    assert reply[:30] in shown  # the five text chunks before the stall, on their own
    assert shown[-1] == reply


def test_python_tool_asks_through_the_input_box(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    assert kernel.execute("import pandas as pd\ndf = pd.DataFrame({'x': [1, 2, 3]})").status == "ok"
    code = "summary = int(df['x'].sum())\nsummary"
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": code}}])
    fake.enqueue("The sum is 6.")
    answered: list[float] = []

    def answer(prompt: str) -> str:
        answered.append(time.monotonic())
        return "y"

    run = kernel.execute(
        "%%chat --tools python\nWhat is the sum of x?", cell_id="cell-py", stdin=answer
    )
    assert run.status == "ok", run.reply
    assert run.input_requests == ["Run it? [y/N] "]
    # The question shows in the tool's block (issue 11), and the input box right under
    # it: the turn goes on in a second display, sent after the answer, so the reply and
    # footer come below the box, not above it.
    first, then = run.displays()
    assert "summary" in first["data"]["text/markdown"] and "6" in first["data"]["text/html"]
    assert "The sum is 6." not in first["data"]["text/markdown"]
    assert "The sum is 6." in then["data"]["text/markdown"]
    assert then["metadata"]["nbchat"]["status"] == "completed"
    assert "tokens" in then["metadata"]["nbchat"]["footer"] and not first["metadata"]
    (started_after,) = [t for t, m in run.messages if m["header"]["msg_type"] == "display_data"][1:]
    assert started_after > answered[0]
    asking = [
        m["content"]["data"]["text/markdown"]
        for m in run.of_type("update_display_data")
        if "waiting for your approval" in m["content"]["data"]["text/markdown"]
    ]
    assert asking and code in html.unescape(re.sub(r"<[^>]+>", "", asking[0]))
    tool_message = fake.requests[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"] == "result:\n6"
    assert kernel.execute("print(summary)").stdout == "6\n"


def test_python_tool_without_an_input_box_refuses(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": "touched = True"}}])
    fake.enqueue("I could not run it.")
    run = kernel.execute("%%chat --tools python\nRun something.", cell_id="cell-nostdin")
    assert run.status == "ok", run.reply
    tool_message = fake.requests[1]["messages"][-1]
    assert "cannot ask the user for approval" in tool_message["content"]
    assert kernel.execute("print('touched' in dir())").stdout == "False\n"


def test_no_model_is_one_line_in_the_kernel(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    run = kernel.execute("%chat config model=none\nimport os\nos.environ.pop('NBCHAT_MODEL')")
    assert run.status == "ok"
    try:
        failed = kernel.execute("%%chat\nhi", cell_id="cell-nomodel")
        assert failed.status == "error" and failed.reply["ename"] == "ConfigError"
        (error,) = failed.of_type("error")
        (line,) = error["content"]["traceback"]
        assert "No model configured" in line
    finally:
        kernel.execute("os.environ['NBCHAT_MODEL'] = 'fake-model'")


def test_chat_export_shows_markdown_and_a_file_round_trips_through_import(
    kernel: Kernel, fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    fake.enqueue("An answer with <img src=x onerror=alert(1)> in it.")
    assert kernel.execute("%%chat\nExport me.", cell_id="cell-export").status == "ok"
    shown = kernel.execute("%chat export")
    (result,) = shown.of_type("execute_result")
    markdown = result["content"]["data"]["text/markdown"]
    assert markdown.startswith("# Export me.") and "&lt;img src=x" in markdown
    path = tmp_path / "exported.json"
    wrote = kernel.execute(f"%chat export {path}")
    assert wrote.status == "ok" and path.exists()
    fake.enqueue("Continued.")
    assert kernel.execute(f"%chat import {path}").status == "ok"
    assert kernel.execute("%%chat\nGo on.", cell_id="cell-imported").status == "ok"
    sent = [m["content"] for m in fake.requests[-1]["messages"]]
    assert sent[-3:] == [
        "Export me.",
        "An answer with <img src=x onerror=alert(1)> in it.",
        "Go on.",
    ]
    refused = kernel.execute(f"%chat export {path}")
    assert refused.status == "error" and "exists already" in refused.reply["evalue"]
