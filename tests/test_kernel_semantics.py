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
