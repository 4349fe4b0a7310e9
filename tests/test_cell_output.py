"""What a ``%%chat`` cell outputs, through a real ipykernel (issue 11, items 1-4 and 7).

The kernel talks to the fake server of this process; hostile replies come from it.
Outputs are checked the way a frontend gets them: the IOPub messages of the cell,
with display updates applied in order.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbchat._render import THINKING_STYLE
from nbchat.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
sys.path.insert(0, str(Path(__file__).parent))
from magics_kernel import Execution, Kernel, fresh_session, nbchat_kernel
from test_view import HOSTILE, _jupyter_like, assert_inert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(scope="module")
def kernel(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with nbchat_kernel(server.url, tmp_path_factory.mktemp("cells") / "cells.duckdb", LOOKUP) as k:
        yield k


@pytest.fixture
def fake(server: FakeOpenAIServer, kernel: Kernel) -> FakeOpenAIServer:
    return fresh_session(server, kernel)


LOOKUP = '''
import time
def lookup(key: str) -> str:
    """Look a value up."""
    time.sleep(1.5)  # several of the running time's 0.5 s ticks, even on a loaded machine
    return {"a": "1", "b": "2"}[key]
'''


def final(run: Execution) -> dict[str, Any]:
    (display,) = run.displays()
    return display


def snapshots(run: Execution) -> list[dict[str, str]]:
    """Every state of the turn's display, in the order the frontend showed them."""
    return [
        m["content"]["data"]
        for _, m in run.messages
        if m["header"]["msg_type"] in ("display_data", "update_display_data")
    ]


def test_a_hostile_reply_reaches_no_output_as_live_html(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    fake.enqueue(HOSTILE, chunk_size=5)
    run = kernel.execute("%%chat\nSay hello.", cell_id="hostile")
    assert run.status == "ok", run.reply
    states = snapshots(run)
    assert len(states) >= 2
    for data in states:
        assert_inert(data["text/html"])
        assert "<details" not in data["text/html"]
        rendered = _jupyter_like(data["text/markdown"])  # Markdown with raw HTML live
        assert_inert(rendered)
        assert "<details" not in rendered
    shown = final(run)["data"]
    assert shown["text/plain"] == HOSTILE
    assert "&lt;iframe srcdoc=" in shown["text/html"]
    assert 'href="http://evil.test/p.png?d=secret"' in shown["text/html"]


def test_prices_stay_prices_and_math_stays_math(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    fake.enqueue("It costs $5 per month and $20 per month; $x^2$ is math.")
    run = kernel.execute("%%chat\nPrices?", cell_id="prices")
    assert run.status == "ok", run.reply
    html_text = final(run)["data"]["text/html"]
    usd = '<span class="nbchat-usd">$</span>'
    assert f"{usd}5 per month and {usd}20 per month" in html_text
    assert '<span class="nbchat-math">$x^2$</span>' in html_text


def test_the_live_cell_shows_tools_as_they_run_in_order(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    fake.enqueue(
        "Let me look that up.",
        tool_calls=[
            {"name": "lookup", "arguments": {"key": "a"}},
            {"name": "lookup", "arguments": {"key": "b"}},
        ],
    )
    fake.enqueue("Both values found: 1 and 2.", chunk_size=3, delay=0.01)
    run = kernel.execute("%%chat --tools lookup\nLook up a and b.", cell_id="order")
    assert run.status == "ok", run.reply
    states = [d["text/html"] for d in snapshots(run)]
    running = [s for s in states if "running…" in s]
    assert running, "the tool blocks show while the tools run"
    assert "Let me look that up." in running[0]  # round 1's text is not held back
    seconds = [float(t) for s in running for t in re.findall(r"running… (\d+\.\d) s", s)]
    assert max(seconds) >= 0.4, seconds  # the time moves while the tools run
    assert running[0].index("Let me look that up.") < running[0].index("<details>")
    end = states[-1]
    blocks = [i for i in range(len(end)) if end.startswith("<details>", i)]
    assert len(blocks) == 2
    assert end.index("Let me look that up.") < blocks[0] < blocks[1] < end.index("Both values")
    assert "up.Both" not in final(run)["data"]["text/markdown"]


def test_python_ask_asks_in_the_tool_block_and_times_only_the_run(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    code = "answer = 6 * 7\nanswer"
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": code}}])
    fake.enqueue("It is 42.")

    def slow_yes(prompt: str) -> str:
        time.sleep(1.5)  # the user reads the code first
        return "y"

    run = kernel.execute("%%chat --tools python\nCompute.", cell_id="ask", stdin=slow_yes)
    assert run.status == "ok", run.reply
    assert run.input_requests == ["Run it? [y/N] "]
    # No display of its own for the question; the turn goes on under the input box.
    asked_in, then = run.displays()
    assert "It is 42." in then["data"]["text/markdown"] and then["metadata"]["nbchat"]
    states = [d["text/html"] for d in snapshots(run)]
    asking = [s for s in states if "waiting for your approval" in s]
    assert asking and "answer = 6 * 7\nanswer" in re.sub(r"<[^>]+>", "", asking[0])
    assert "<details open>" in asking[0]
    end = asked_in["data"]["text/html"]
    summary = end[end.index("<code>python</code>") :].split("</summary>")[0]
    assert " ms)" in summary, summary  # well under the 1.5 s spent waiting
    assert kernel.execute("print(answer)").stdout == "42\n"
    # The stored duration leaves the wait out too.
    stored = kernel.execute("import nbchat; print(nbchat.tool_calls()['duration_ms'].iloc[-1])")
    assert float(stored.stdout) < 1000, stored.stdout


def test_an_error_is_shown_once(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    fake.enqueue_error(400, "the model fell over")
    run = kernel.execute("%%chat\nhi", cell_id="fails")
    assert run.status == "error" and run.reply["ename"] == "TurnFailed"
    (error,) = run.of_type("error")
    (line,) = error["content"]["traceback"]
    assert "the model fell over" in line
    shown = final(run)["data"]
    assert "the model fell over" not in shown["text/html"] + shown["text/markdown"]
    assert "fell over" not in run.stdout


def test_max_rounds_zero_without_tool_calls_warns_nothing(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    """No tool round was cut short, so there is no limit to warn about (it used to say so
    twice)."""
    fake.enqueue("No tools needed.")
    run = kernel.execute("%%chat --max-rounds 0\nhi", cell_id="rounds0")
    assert run.status == "ok", run.reply
    shown = final(run)["data"]["text/html"]
    assert "No tools needed." in shown
    assert shown.count("rounds of tool calls") + shown.count("tool-call limit") == 0


def test_reasoning_is_a_collapsed_thinking_block(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    fake.enqueue("Four.", reasoning="Two plus two is four.", chunk_size=2, delay=0.01)
    run = kernel.execute("%%chat\n2+2?", cell_id="think")
    assert run.status == "ok", run.reply
    assert any(f'{THINKING_STYLE}" open>' in d["text/html"] for d in snapshots(run))
    end = final(run)["data"]["text/html"]
    assert (
        f'<details class="nbchat-thinking" style="{THINKING_STYLE}"><summary>💭 Thinking</summary>'
        in end
    )
    assert end.index("Two plus two") < end.index("Four.")


def test_a_huge_reply_keeps_live_updates_small(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    paragraph = "lorem ipsum dolor " * 20 + "\n\n"
    reply = paragraph * (176_000 // len(paragraph))
    fake.enqueue(reply, chunk_size=400)
    run = kernel.execute("%%chat\nWrite a lot.", cell_id="huge")
    assert run.status == "ok", run.reply
    states = snapshots(run)
    assert all(len(d["text/html"]) < 60_000 for d in states[:-1])
    assert final(run)["data"]["text/plain"] == reply


def result_text(run: Execution) -> str:
    (result,) = run.of_type("execute_result")
    return str(result["content"]["data"]["text/plain"])


def test_small_subcommands_say_what_they_do(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    assert "%%chat_sql" in result_text(kernel.execute("%chat help"))
    assert kernel.execute("%chat tools lookup,python:auto").status == "ok"
    tools = result_text(kernel.execute("%chat tools"))
    assert "python (auto: runs code without asking)" in tools and "lookup" in tools
    assert kernel.execute("%chat tools none").status == "ok"
    fake.enqueue("hello")
    assert kernel.execute("%%chat\nhi", cell_id="before-resume").status == "ok"
    resume = kernel.execute("%chat resume")
    assert resume.status == "ok"
    nothing = "Nothing to resume: the current session has no pending tool calls."
    assert result_text(resume) == nothing


def test_chat_history_shows_the_conversation_escaped(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    fake.enqueue('It costs $5 and $20 <img src=x onerror="alert(1)"> ![x](http://e/x.png)')
    assert kernel.execute("%%chat\nprice?", cell_id="hist").status == "ok"
    run = kernel.execute("%chat history")
    (shown,) = run.of_type("execute_result")
    html = shown["content"]["data"]["text/html"]
    assert "<img" not in html and "&lt;img" in html
    assert "$5" not in html.replace('<span class="nbchat-usd">$</span>5', "")
    assert "price?" in html
