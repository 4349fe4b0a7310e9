"""The notebook as context in a real ipykernel: cell references, %chat fix, --format code."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbchat.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from magics_kernel import (
    Execution,
    Kernel,
    fresh_session,
    kernel_env,
    nbchat_kernel,
    running_kernel,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(scope="module")
def kernel(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with nbchat_kernel(server.url, tmp_path_factory.mktemp("context") / "k.duckdb") as k:
        yield k


@pytest.fixture
def fake(server: FakeOpenAIServer, kernel: Kernel) -> FakeOpenAIServer:
    return fresh_session(server, kernel)


def next_inputs(run: Execution) -> list[dict[str, Any]]:
    """The ``set_next_input`` payloads of an execute reply (what JupyterLab turns into a cell)."""
    return [p for p in run.reply.get("payload", []) if p.get("source") == "set_next_input"]


def user_text(body: dict[str, Any]) -> str:
    return str([m for m in body["messages"] if m["role"] == "user"][-1]["content"])


FIX = (
    "`totals` is a dict, so it has no `.items` call missing — the loop divides by zero.\n\n"
    "```python\nrates = {k: v / max(n, 1) for k, v in totals.items()}\n```"
)


def test_chat_fix_sends_the_failing_cell_and_offers_the_corrected_code(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    assert kernel.execute("totals = {'a': 3}\nn = 0").status == "ok"
    failed = kernel.execute("rates = {k: v / n for k, v in totals.items()}")
    assert failed.status == "error"
    fake.enqueue(FIX, chunk_size=5)
    run = kernel.execute("%chat fix")
    assert run.status == "ok", run.reply

    sent = user_text(fake.requests[0])
    assert "```python\nrates = {k: v / n for k, v in totals.items()}\n```" in sent
    assert "Traceback (most recent call last):" in sent
    assert "ZeroDivisionError: division by zero" in sent
    assert ", line 1, in <dictcomp>" in sent or ", line 1, in <module>" in sent
    assert "Cell In[" in sent and "ipykernel" not in sent  # IPython's own frames are dropped
    (offer,) = next_inputs(run)
    assert offer == {
        "source": "set_next_input",
        "text": "rates = {k: v / max(n, 1) for k, v in totals.items()}",
        "replace": False,
    }
    assert run.displays()[-1]["data"]["text/plain"] == FIX  # the explanation was shown
    assert kernel.execute("rates").status == "error"  # offered, not run


def test_fix_cell_adds_instructions_and_refers_to_the_last_error(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    assert kernel.execute("import json\njson.loads('{bad')").status == "error"
    fake.enqueue("```python\njson.loads('{\"bad\": 1}')\n```")
    run = kernel.execute("%%chat --fix --out fixed\nKeep the json module.")
    assert run.status == "ok", run.reply
    sent = user_text(fake.requests[0])
    assert "json.decoder.JSONDecodeError" in sent and sent.endswith("Keep the json module.")
    assert next_inputs(run)[0]["text"] == "json.loads('{\"bad\": 1}')"
    assert kernel.execute("print(fixed)").stdout == "json.loads('{\"bad\": 1}')\n"


def test_in_out_err_and_underscore_references(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    defined = kernel.execute("import pandas as pd\ndf = pd.DataFrame({'x': range(12)})\ndf")
    assert defined.status == "ok"
    count = defined.reply["execution_count"]
    failed = kernel.execute("df['y']")
    assert failed.status == "error"
    bad = failed.reply["execution_count"]
    fake.enqueue("ok", repeat=2)
    cell = f"%%chat\nSource: {{In[{count}]}}\nResult: {{Out[{count}]}}\nError: {{Err[{bad}]}}"
    assert kernel.execute(cell).status == "ok"
    sent = user_text(fake.requests[0])
    assert "Source: import pandas as pd\ndf = pd.DataFrame({'x': range(12)})\ndf" in sent
    assert "Result: DataFrame: 12 rows × 1 columns" in sent and "… 2 more rows" in sent
    assert "Error: Traceback (most recent call last):" in sent and "KeyError: 'y'" in sent

    assert kernel.execute("21 * 2").status == "ok"
    run = kernel.execute("%%chat\nThe answer {_}; last error {Err}; unknown {Out[9999]}")
    assert run.status == "ok"
    sent = user_text(fake.requests[1])
    assert sent.startswith("The answer 42; last error Traceback")
    assert "KeyError: 'y'" in sent and sent.endswith("unknown {Out[9999]}")
    warning = "".join(
        m["content"]["text"] for m in run.of_type("stream") if m["content"]["name"] == "stderr"
    )
    assert warning.count("\n") == 1 and "{Out[9999]} matched no variable, cell or error" in warning


def test_format_code_puts_every_block_in_a_new_cell(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    fake.enqueue("Two steps:\n```python\na = 1\n```\nand\n```python\nb = a + 1\n```")
    run = kernel.execute("%%chat --format code\nSet a and b.")
    assert run.status == "ok"
    assert user_text(fake.requests[0]).endswith("in one fenced code block.")
    assert [p["text"] for p in next_inputs(run)] == ["a = 1\n\nb = a + 1"]
    shown = run.displays()[-1]["data"]["text/plain"]
    assert shown.startswith("Two steps:")  # the reply is still shown, and stored
    # The instruction was nbchat's, not the user's: history shows what they wrote (a
    # trial saw it in the panel's bubbles), though the store keeps what was sent.
    (history,) = kernel.execute("%chat history").of_type("execute_result")
    history = history["content"]["data"]["text/html"]
    assert "Set a and b." in history and "fenced code block" not in history
    panel = kernel.execute(
        "import nbchat\n"
        "_session = %chat session\n"
        "_board = nbchat.panel(_session)\n"
        "print(repr([w.value for w in _board.messages.children][:1]))"
    )
    assert panel.status == "ok", panel.reply
    (user_bubble,) = ast.literal_eval(panel.stdout)
    assert "Set a and b." in user_bubble and "fenced code block" not in user_bubble


def test_readme_context_cells_run_as_written(tmp_path: Path) -> None:
    """The README's "Your notebook as context" cells, in order, in a fresh kernel."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (section,) = re.findall(r"^## Your notebook as context.*?(?=^## )", readme, flags=re.S | re.M)
    cells = re.findall(r"^```ipython\n(.*?)^```", section, flags=re.S | re.M)
    assert len(cells) == 9
    with FakeOpenAIServer() as server:
        fixed = 'sales.groupby(sales["day"].dt.isocalendar().week)["revenue"].sum()'
        server.enqueue(f"There is no `week` column; derive it.\n\n```python\n{fixed}\n```")
        server.enqueue("Day 90 had the highest revenue; the cell grouped by a missing column.")
        server.enqueue('{"direction": "up", "weekly_change": 7.0}')
        server.enqueue("```python\nsales.resample('W', on='day')['revenue'].sum().plot()\n```")
        server.enqueue('[{"day": "2026-01-01", "revenue": 0}]')
        env = kernel_env(server.url, str(tmp_path / "readme.duckdb"))
        with running_kernel(env) as kernel:
            assert kernel.execute("%load_ext nbchat").status == "ok"
            runs = [
                kernel.execute(cell, cell_id=f"readme-context-{i}") for i, cell in enumerate(cells)
            ]
            statuses = [run.status for run in runs]
            assert statuses == ["ok", "error", *["ok"] * 7], [r.reply for r in runs]
            assert runs[1].reply["execution_count"] == 3  # the In[3] the README refers to
            for run in runs:
                assert not [m for m in run.of_type("stream") if m["content"]["name"] == "stderr"]
            assert next_inputs(runs[2])[0]["text"] == fixed
            assert next_inputs(runs[6])[0]["text"].startswith("sales.resample")
            check = kernel.execute("print(repr(trend), weeks)")
            assert check.stdout == (
                "Trend(direction='up', weekly_change=7.0) [{'day': '2026-01-01', 'revenue': 0}]\n"
            )
        requests = server.requests
        assert len(requests) == 5
        context = user_text(requests[1])
        assert "### `sales` (DataFrame)\n\nDataFrame: 90 rows × 2 columns" in context
        assert 'Cell sales.groupby("week")' in context and "KeyError: 'week'" in context
        assert requests[2]["response_format"]["json_schema"]["name"] == "Trend"
        assert requests[4]["model"] == "gpt-4o-mini"
