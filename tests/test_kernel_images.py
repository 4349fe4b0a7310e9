"""Figures in a real ipykernel: ``--attach``, a ``{fig}`` placeholder, and the python tool
showing a plot — the user sees it in the cell, the model gets it as an image part."""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbchat.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from magics_kernel import Kernel, fresh_session, nbchat_kernel

pytestmark = pytest.mark.slow

PLOT = (
    "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
    "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(3, 2))\n"
    "ax.plot([3, 1, 2]);"
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(scope="module")
def kernel(server: FakeOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    with nbchat_kernel(server.url, tmp_path_factory.mktemp("images") / "k.duckdb", PLOT) as k:
        yield k


@pytest.fixture
def fake(server: FakeOpenAIServer, kernel: Kernel) -> FakeOpenAIServer:
    return fresh_session(server, kernel)


def user_content(body: dict[str, Any]) -> Any:
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"]


def pngs(content: Any) -> list[bytes]:
    urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    return [base64.b64decode(u.split(",", 1)[1]) for u in urls]


def test_attach_sends_a_figure_and_shows_its_thumbnail(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("The line dips, then rises.")
    run = kernel.execute("%%chat --attach fig\nWhat does this plot show?")
    assert run.status == "ok", run.reply
    content = user_content(fake.requests[0])
    assert content[0] == {"type": "text", "text": "What does this plot show?"}
    (image,) = pngs(content)
    assert image.startswith(b"\x89PNG")
    html = run.displays()[-1]["data"]["text/html"]
    # The thumbnails come first in the turn (inside the div that wraps its prose).
    assert re.match(
        r'<div class="nbchat-turn"[^>]*><div class="nbchat-images"><img class="nbchat-thumb"', html
    )
    assert "The line dips, then rises." in html


def test_a_figure_placeholder_attaches_the_figure_not_its_repr(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    fake.enqueue("A dip.")
    run = kernel.execute("%%chat\nWhat is wrong with {fig}?")
    assert run.status == "ok", run.reply
    content = user_content(fake.requests[0])
    assert content[0]["text"] == "What is wrong with [image: fig]?"
    assert len(pngs(content)) == 1
    assert "Figure size" not in str(content)  # not the repr


def test_a_bad_attachment_is_one_clear_error(kernel: Kernel, fake: FakeOpenAIServer) -> None:
    run = kernel.execute("%%chat --attach nowhere.png\nlook")
    assert run.status == "error"
    assert "--attach nowhere.png: no such variable in the notebook, and no such file" in str(
        run.reply
    )
    assert kernel.execute("answer = 42").status == "ok"
    run = kernel.execute("%%chat --attach answer\nlook")
    assert "--attach answer: a int is not an image" in str(run.reply)
    assert fake.requests == []


def test_attach_inlines_a_text_file_beside_a_figure(
    kernel: Kernel, fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    """A text file is inlined under its name, as the README says (a trial found it read
    as a file path a second time: "Cannot read the attachment Attached file …")."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello text file\n")
    fake.enqueue("Noted.")
    run = kernel.execute(f"%%chat --attach {notes} --attach fig\nDescribe both.")
    assert run.status == "ok", run.reply
    content = user_content(fake.requests[0])
    text = content[0]["text"]
    assert text.startswith("Describe both.\n\n") and "notes.txt" in text
    assert "hello text file" in text
    assert len(pngs(content)) == 1
    assert "Noted." in run.displays()[-1]["data"]["text/html"]


def test_the_python_tool_shows_the_plot_and_sends_it_to_the_model(
    kernel: Kernel, fake: FakeOpenAIServer
) -> None:
    code = "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 2))\n"
    code += "plt.bar([1, 2], [3, 4])\nplt.show()"
    fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": code}}])
    fake.enqueue("Two bars, the second taller.")
    run = kernel.execute("%%chat --tools python:auto\nPlot two bars and describe them.")
    assert run.status == "ok", run.reply
    # The model: the tool's text result, then the image in a user message after it.
    sent = fake.requests[1]["messages"]
    tool = next(m for m in sent if m["role"] == "tool")
    assert "(Returned [image: display" in tool["content"]
    assert sent[-1]["role"] == "user"
    assert sent[-1]["content"][0]["text"] == "Image returned by `python`:"
    (image,) = pngs(sent[-1]["content"])
    assert image.startswith(b"\x89PNG")
    # The user: the plot inside the tool's block of the cell, and not a second time below.
    displays = run.displays()
    html = displays[-1]["data"]["text/html"]
    assert html.count("<img") == 1 and "Two bars, the second taller." in html
    assert not any("image/png" in d["data"] for d in displays)
