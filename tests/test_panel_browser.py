"""The chat panel in a real browser (JupyterLab, Notebook 7, Voila) via headless chromium.

The server runs in a subprocess on 127.0.0.1 with a private config; its kernel reaches
the fake model server of this test process through NBCHAT_BASE_URL and writes to a
DuckDB file in tmp_path. The test types like a user: Shift+Enter for a new line,
Enter to send, then clicks Stop while a slow reply streams. Screenshots go to
test-artifacts/ (the README's docs/panel.png is panel-jupyterlab-cell.png).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ports import free_port

from nbchat.testing import FakeOpenAIServer

sys.path.insert(0, str(Path(__file__).parent))
from test_view import TRICKY

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TOKEN = "nbchat-browser-test"
WAIT_MS = 60_000  # generous: CI machines are slow to start a kernel

NOTEBOOK_CODE = '''\
import nbchat


@nbchat.tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


nbchat.panel(tools=[add, nbchat.python_tool()], system="You are a helpful assistant.")'''

KERNEL_IDLE = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const session = panel && panel.sessionContext && panel.sessionContext.session;
    return session && session.kernel && session.kernel.status === "idle";
}"""

STORY = " ".join(
    f"Once upon a time, in notebook cell number {i}, a data frame dreamed of plots."
    for i in range(60)
)


LONG_URL = "https://docs.example.test/" + "very-long-path-segment/" * 20 + "page.html"
LONG_REPLY = (
    f"It is documented at {LONG_URL} on the project's site. The end of the sentence.\n\n"
    "It costs $5 a month; the area is $\\pi r^2$.\n\n"
    "```python\nprint('" + "x" * 300 + "')\n```"
)
PY_CODE = "numbers = [10, 12, 20]\nsum(numbers)"
WIDTHS = """(bubble) => {
    const content = bubble.querySelector(
        '.widget-html-content, .widget-htmlmath-content') || bubble;
    const paragraph = content.querySelector('p');
    const pre = content.querySelector('pre');
    return {
        bubble_scroll: content.scrollWidth, bubble_client: content.clientWidth,
        bubble_right: bubble.getBoundingClientRect().right,
        paragraph_right: paragraph.getBoundingClientRect().right,
        pre_scroll: pre.scrollWidth, pre_client: pre.clientWidth,
        pre_right: pre.getBoundingClientRect().right,
    };
}"""


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    return None


@dataclass
class Served:
    """A notebook showing a panel, served over HTTP on 127.0.0.1."""

    host: str  # "jupyterlab" or "voila"
    url: str  # the page a user opens
    db: Path  # the store the kernel writes


@pytest.fixture(params=["jupyterlab", "notebook7", "voila"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, fake: FakeOpenAIServer
) -> Iterator[Served]:
    """JupyterLab, Notebook 7 or Voila serving one notebook that shows a panel."""
    with _serve(request.param, tmp_path, fake, [NOTEBOOK_CODE], "panel.ipynb") as s:
        yield s


@contextmanager
def _serve(
    host: str, tmp_path: Path, fake: FakeOpenAIServer, cells: list[str], name: str
) -> Iterator[Served]:
    """Serve a notebook of ``cells`` with ``host``, its kernel pointed at ``fake``."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    root = tmp_path / "nb"
    root.mkdir()
    notebook = root / name
    notebook.write_text(json.dumps(_notebook(*cells)), encoding="utf-8")
    config = tmp_path / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    # No "news" / update-check notification floating over the notebook.
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    # Start the notebook's kernel without asking which one.
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"autoStartDefaultKernel": true}')
    db = tmp_path / "chats.duckdb"
    env = {
        **os.environ,
        "NBCHAT_BASE_URL": fake.url,
        "NBCHAT_MODEL": "fake-model",
        "NBCHAT_DB": str(db),
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for variable in ("NBCHAT_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(variable, None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if host == "jupyterlab":
        command = [
            *("-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"),
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.extension_manager=readonly",
            "--ServerApp.port_retries=0",  # fail, not serve on a port we do not watch
            "--allow-root",
        ]
        url = f"{base}/lab/tree/{name}?reset&token={TOKEN}"
    elif host == "notebook7":
        command = [
            *("-m", "notebook", "--no-browser", "--ip=127.0.0.1", f"--port={port}"),
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--JupyterNotebookApp.expose_app_in_browser=True",
            "--ServerApp.port_retries=0",
            "--allow-root",
        ]
        url = f"{base}/notebooks/{name}?token={TOKEN}"
    else:
        command = [
            *("-m", "voila", "--no-browser", "--Voila.ip=127.0.0.1", f"--port={port}"),
            "--Voila.port_retries=0",
            str(notebook),
        ]
        url = f"{base}/"
    log_path = tmp_path / f"{host}.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, *command],
            env=env,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for_port(port, server, log_path)
            yield Served(host, url, db)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=5)


# The contrast ratio (WCAG 2) of the first user bubble's text on its background, from
# their computed colours (a canvas turns any CSS colour, color-mix's too, into RGB).
USER_BUBBLE_CONTRAST = """() => {
  const ctx = document.createElement('canvas').getContext('2d');
  const rgb = (css) => {
    ctx.clearRect(0, 0, 1, 1); ctx.fillStyle = css; ctx.fillRect(0, 0, 1, 1);
    return Array.from(ctx.getImageData(0, 0, 1, 1).data.slice(0, 3));
  };
  const channel = (v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
  const lum = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const bubble = document.querySelector('.nbchat-panel .nbchat-user');
  const text = bubble.querySelector('p') || bubble;
  const [a, b] = [lum(rgb(getComputedStyle(text).color)),
                  lum(rgb(getComputedStyle(bubble).backgroundColor))];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


def test_chat_in_the_browser(served: Served, fake: FakeOpenAIServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    fake.models = ["fake-model", "fake-model-large"]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 1000},
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(WAIT_MS)
        try:
            page.goto(served.url)
            # JupyterLab and Notebook 7 share the notebook front end: run the cell there.
            in_notebook_ui = served.host in ("jupyterlab", "notebook7")
            if in_notebook_ui:
                page.wait_for_function(KERNEL_IDLE)
                # Not awaited: the command's promise settles only when the cell has run.
                page.evaluate(
                    """() => {
                        const commands = window.jupyterapp.commands;
                        if (commands.hasCommand('application:toggle-left-area')) {
                            commands.execute('application:toggle-left-area');  // wider
                        }
                        commands.execute('notebook:run-all-cells');
                    }"""
                )
            box = page.locator(".nbchat-panel textarea.nbchat-textarea")
            expect(box).to_be_visible()
            if in_notebook_ui:
                # Typing only once the cell has finished: JupyterLab moves the focus to the
                # notebook when a run ends, and keys would then be notebook shortcuts.
                expect(page.locator(".jp-InputPrompt").first).to_contain_text("[1]")
                page.wait_for_function(KERNEL_IDLE)
            picker = page.locator(".nbchat-panel select")
            expect(picker.locator("option")).to_have_count(2)  # from /v1/models

            # 1. Shift+Enter adds a line, Enter sends; a tool call and a streamed reply.
            fake.enqueue(tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 3}}])
            fake.enqueue(
                "The tool says **2 + 3 = 5**.\n\n```python\nadd(2, 3)  # -> 5.0\n```",
                chunk_size=4,
                delay=0.02,
            )
            box.click()
            page.keyboard.type("What is 2 + 3?")
            page.keyboard.press("Shift+Enter")
            page.keyboard.type("Use the add tool, please.")
            expect(box).to_have_value("What is 2 + 3?\nUse the add tool, please.")
            page.keyboard.press("Enter")
            answer = page.locator(".nbchat-assistant").nth(0)
            expect(answer).to_contain_text("2 + 3 = 5")
            expect(answer.locator("strong")).to_have_text("2 + 3 = 5")
            expect(box).to_have_value("")
            sent = fake.requests[0]["messages"][-1]
            assert sent == {"role": "user", "content": "What is 2 + 3?\nUse the add tool, please."}
            status = page.locator(".nbchat-status")
            expect(status).to_contain_text("idle")
            tool = answer.locator("details")
            expect(tool.locator("summary")).to_contain_text("add")
            tool.locator("summary").click()  # the block opens: arguments and result
            expect(tool).to_contain_text('"a": 2')
            expect(tool).to_contain_text("5.0")
            tool.locator("summary").click()  # closed again, so the screenshot shows it all
            if served.host == "jupyterlab":  # the user's bubble reads in both themes
                for theme, light in (("JupyterLab Dark", "false"), ("JupyterLab Light", "true")):
                    page.evaluate(
                        "t => window.jupyterapp.commands.execute('apputils:change-theme', "
                        "{theme: t})",
                        theme,
                    )
                    page.wait_for_function(
                        f"() => document.body.dataset.jpThemeLight === '{light}'"
                    )
                    # The theme's stylesheet loads after the flag flips: read until it
                    # reads well, or 10 s have passed (then the last reading fails).
                    deadline = time.monotonic() + 10
                    contrast = page.evaluate(USER_BUBBLE_CONTRAST)
                    while contrast < 4.5 and time.monotonic() < deadline:
                        page.wait_for_timeout(100)
                        contrast = page.evaluate(USER_BUBBLE_CONTRAST)
                    assert contrast >= 4.5, (theme, contrast)  # WCAG AA for body text

            # 2. A slow reply: it streams in, Stop interrupts it, the partial text stays.
            fake.enqueue(STORY, chunk_size=6, delay=0.1)
            box.click()
            page.keyboard.type("Tell me a long story.")
            page.keyboard.press("Enter")
            story = page.locator(".nbchat-assistant").nth(1)
            expect(story).to_contain_text("notebook cell number 1,")
            expect(status).to_contain_text("writing")
            # Enter while it streams: nothing is sent, the text stays, the status says why.
            box.click()
            page.keyboard.type("And then?")
            page.keyboard.press("Enter")
            expect(status).to_contain_text("Still answering")
            expect(box).to_have_value("And then?")
            box.fill("")
            page.get_by_role("button", name="Stop").click()
            expect(story).to_contain_text("Interrupted")
            expect(status).to_contain_text("stopped")
            shown = story.inner_text()
            expect(status).to_contain_text("tokens")
            assert "tokens unknown" not in status.inner_text()  # the count stays after Stop

            # 3. A long URL wraps; a long code line scrolls inside its block only.
            fake.enqueue(LONG_REPLY, chunk_size=40)
            box.click()
            page.keyboard.type("Where is it documented?")
            page.keyboard.press("Enter")
            long_reply = page.locator(".nbchat-assistant").nth(2)
            expect(long_reply).to_contain_text("The end of the sentence.")
            # Math typeset as in the notebook (Voila has MathJax too); the price left alone.
            expect(long_reply.locator("mjx-container")).to_have_count(1)
            expect(long_reply).to_contain_text("It costs $5 a month")
            widths = long_reply.evaluate(WIDTHS)
            assert widths["bubble_scroll"] <= widths["bubble_client"] + 1, widths
            assert widths["paragraph_right"] <= widths["bubble_right"] + 1, widths
            assert widths["pre_scroll"] > widths["pre_client"], widths  # scrolls inside
            assert widths["pre_right"] <= widths["bubble_right"] + 1, widths

            # 4. The python tool asks with Run / Skip buttons, then runs on Run.
            fake.enqueue(tool_calls=[{"name": "python", "arguments": {"code": PY_CODE}}])
            fake.enqueue("The total is **42**.")
            box.click()
            page.keyboard.type("Add up the numbers with Python.")
            page.keyboard.press("Enter")
            run_button = page.locator(".nbchat-approval").get_by_role("button", name="Run")
            expect(run_button).to_be_visible()
            expect(
                page.locator(".nbchat-approval").get_by_role("button", name="Skip")
            ).to_be_visible()
            expect(status).to_contain_text("waiting for you")
            page.locator(".nbchat-panel").screenshot(
                path=str(ARTIFACTS / f"panel-{served.host}.png")
            )
            page.screenshot(path=str(ARTIFACTS / f"panel-{served.host}-page.png"))
            if served.host == "jupyterlab":  # the code cell and its panel: docs/panel.png
                cell = page.locator(".jp-Notebook .jp-Cell").first
                cell.screenshot(path=str(ARTIFACTS / "panel-jupyterlab-cell.png"))
            run_button.click()
            computed = page.locator(".nbchat-assistant").nth(3)
            expect(computed.locator("strong")).to_have_text("42")
            expect(page.locator(".nbchat-approval")).to_have_count(0)
            tool_message = fake.requests[-1]["messages"][-1]
            assert tool_message["role"] == "tool" and tool_message["content"] == "result:\n42"

            # 5. After a kernel restart the panel says so, instead of looking idle.
            if in_notebook_ui:
                page.evaluate(
                    "() => window.jupyterapp.shell.currentWidget.sessionContext"
                    ".session.kernel.restart()"
                )
                expect(status).to_contain_text("kernel restarted")
                expect(box).to_be_disabled()

            partial = _wait_for_interrupted_reply(served.db)
            assert 0 < len(partial) < len(STORY) and STORY.startswith(partial)
            assert partial[:40] in shown
        except BaseException:
            # What the page looked like when it failed, beside the other artifacts.
            page.screenshot(path=str(ARTIFACTS / f"panel-{served.host}-failure.png"))
            raise
        finally:
            context.close()


def _wait_for_interrupted_reply(db: Path, timeout: float = 30.0) -> str:
    """The content of the interrupted assistant message, once the kernel has stored it."""
    import nbchat

    deadline = time.monotonic() + timeout
    while True:
        (session_id,) = nbchat.sessions(db=str(db))["id"]
        messages = nbchat.transcript(session_id, db=str(db))
        interrupted = messages[messages["status"] == "interrupted"]
        if len(interrupted):
            assert list(interrupted["role"]) == ["assistant"]
            return str(interrupted["content"].iloc[0])
        if time.monotonic() > deadline:
            raise AssertionError(f"no interrupted reply stored:\n{messages}")
        time.sleep(0.2)


def _wait_for_port(port: int, server: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")


def _notebook(*cells: str) -> dict[str, Any]:
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "panel-cell" if i == 0 else f"cell-{i}",
                "metadata": {},
                "outputs": [],
                "source": code,
            }
            for i, code in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


# --------------------------------------------------------------------------- %%chat cells

# The tools run until the test has seen the turn while they run, and lets them go by
# creating release-lookup beside the notebook (at most 30 s: a test that never does).
LOOKUP_CELL = '''%load_ext nbchat
import os
import time


def lookup(key: str) -> str:
    """Look a value up."""
    deadline = time.monotonic() + 30
    while not os.path.exists("release-lookup") and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"a": "1", "b": "2"}[key]'''
# The Markdown rendition, rendered by JupyterLab's own Markdown renderer (marked) in a
# live, trusted output: the cases that try to pass raw HTML off as code.
MARKDOWN_CELL = f"""from nbchat._markup import safe_markdown

tricky = {[t.replace("alert(", "window.nbchatPwned=(") for t in TRICKY]!r}
display({{"text/markdown": "\\n\\n---\\n\\n".join(map(safe_markdown, tricky))}}, raw=True)"""
CELLS = [
    LOOKUP_CELL,
    "%%chat --tools lookup\nLook up a and b, then tell me what the plan costs.",
    "%%chat\nSay hello.",
    MARKDOWN_CELL,
    "%%chat\nShow the wide table.",
]
ROUND_2 = (
    "Both values found: **1** and **2**. The plan costs $5 per month and $20 per year, "
    "and a circle's area is $\\pi r^2$.\n\n```python\nprint(lookup('a') + lookup('b'))\n```"
)
HOSTILE_JS = (
    'Hello! <img src=x onerror="window.nbchatPwned = 1"> '
    '<iframe srcdoc="<script>parent.nbchatPwned = 2</script>"></iframe>\n\n'
    '<details open ontoggle="window.nbchatPwned = 3"><summary>more</summary>hidden</details>'
    "\n\n![pixel](http://127.0.0.1:9/leak.png)"
)
WIDE_REPLY = (
    f"It is documented at {LONG_URL} on the project's site.\n\n"
    + "| "
    + " | ".join(f"column_number_{i}" for i in range(14))
    + " |\n|"
    + "---|" * 14
    + "\n| "
    + " | ".join(f"value_{i}_of_the_row" for i in range(14))
    + " |\n\n```python\nprint('"
    + "y" * 300
    + "')\n```"
)
# Prose wraps inside the output; the code block and the table scroll in their own box.
OUTPUT_WIDTHS = """(output) => {
    const box = (el) => ({scroll: el.scrollWidth, client: el.clientWidth,
                          right: el.getBoundingClientRect().right});
    return {output: box(output), paragraph: box(output.querySelector('p')),
            pre: box(output.querySelector('pre')), table: box(output.querySelector('table'))};
}"""
OUTPUT_TAGS = """() => {
    const count = (selector) => document.querySelectorAll(selector).length;
    return {
        pwned: window.nbchatPwned === undefined ? null : window.nbchatPwned,
        img: count('.jp-OutputArea img'), iframe: count('.jp-OutputArea iframe'),
        script: count('.jp-OutputArea script'),
        details: Array.from(document.querySelectorAll('.jp-Cell')).map(
            (cell) => cell.querySelectorAll('.jp-OutputArea details').length),
    };
}"""


@contextmanager
def _lab_run_all(
    tmp_path: Path, fake: FakeOpenAIServer, cells: list[str], name: str, failure: str
) -> Iterator[tuple[Served, Any]]:
    """``cells`` as a notebook in JupyterLab with every cell run; yields (served, page).

    A failure inside the block saves ``failure`` (a screenshot name) in test-artifacts/.
    """
    from playwright.sync_api import sync_playwright

    with (
        _serve("jupyterlab", tmp_path, fake, cells, name) as served,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1000, "height": 1100},
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(WAIT_MS)
        try:
            page.goto(served.url)
            page.wait_for_function(KERNEL_IDLE)
            page.evaluate(
                """() => {
                    const commands = window.jupyterapp.commands;
                    commands.execute('application:toggle-left-area');
                    commands.execute('notebook:run-all-cells');
                }"""
            )
            yield served, page
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / failure))
            raise
        finally:
            context.close()


def test_chat_cells_in_jupyterlab(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    """A %%chat turn in order, prices and math, and a hostile reply that runs nothing."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    fake.enqueue(
        "Let me look that up.",
        tool_calls=[
            {"name": "lookup", "arguments": {"key": "a"}},
            {"name": "lookup", "arguments": {"key": "b"}},
        ],
    )
    fake.enqueue(ROUND_2, chunk_size=6, delay=0.02)
    fake.enqueue(HOSTILE_JS)
    fake.enqueue(WIDE_REPLY)
    with _lab_run_all(tmp_path, fake, CELLS, "cells.ipynb", "cell-jupyterlab-failure.png") as (
        served,
        page,
    ):
        cells = page.locator(".jp-Notebook .jp-Cell")
        turn = cells.nth(1).locator(".jp-OutputArea-output")
        # While the tools run, round 1's text and both blocks are already there.
        expect(turn).to_contain_text("running…")
        expect(turn).to_contain_text("Let me look that up.")
        expect(turn.locator("details")).to_have_count(2)
        (tmp_path / "nb" / "release-lookup").touch()  # the tools may finish now
        expect(turn).to_contain_text("fake-model ·")  # the footer: the turn ended
        expect(cells.nth(2).locator(".jp-OutputArea-output")).to_contain_text("fake-model ·")
        expect(cells.nth(3).locator(".jp-RenderedMarkdown")).to_contain_text("list-fence")
        wide = cells.nth(4).locator(".jp-OutputArea-output")
        expect(wide).to_contain_text("fake-model ·")
        page.wait_for_function(KERNEL_IDLE)

        widths = wide.evaluate(OUTPUT_WIDTHS)
        assert widths["output"]["scroll"] <= widths["output"]["client"] + 1, widths
        assert widths["paragraph"]["right"] <= widths["output"]["right"] + 1, widths
        for scrolled in ("pre", "table"):  # wider than the output: each scrolls itself
            assert widths[scrolled]["scroll"] > widths[scrolled]["client"] + 100, widths
            assert widths[scrolled]["right"] <= widths["output"]["right"] + 1, widths
        cells.nth(4).screenshot(path=str(ARTIFACTS / "cell-jupyterlab-wide.png"))

        text = turn.inner_text()
        assert text.index("Let me look that up.") < text.index("lookup") < text.index("Both")
        assert "$5 per month and $20 per year" in text  # prices are not math
        expect(turn.locator("mjx-container").first).to_be_visible()  # the math is
        assert turn.locator("mjx-container").count() == 1
        expect(turn.locator("pre span[style]").first).to_be_visible()  # highlighted
        turn.locator("details").first.locator("summary").click()  # open one block
        expect(turn.locator("details").first).to_contain_text('"key": "a"')
        cells.nth(1).screenshot(path=str(ARTIFACTS / "cell-jupyterlab.png"))

        hostile = cells.nth(2).locator(".jp-OutputArea-output")
        expect(hostile).to_contain_text('<img src=x onerror="window.nbchatPwned = 1">')
        live = page.evaluate(OUTPUT_TAGS)
        assert live["pwned"] is None and live["img"] == live["iframe"] == 0, live
        assert live["details"][2] == live["details"][3] == 0, live  # <details> as text

        # Saved and opened again: outputs of a trusted notebook render unsanitised.
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        saved = tmp_path / "nb" / "cells.ipynb"
        deadline = time.monotonic() + 30
        while "nbchatPwned" not in saved.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "nbchatPwned" in saved.read_text()  # the hostile reply is in the file
        page.goto(served.url.replace("?reset&", "?"))
        reopened = page.locator(".jp-Notebook .jp-Cell").nth(2)
        expect(reopened).to_contain_text("window.nbchatPwned = 1")
        page.wait_for_timeout(1500)  # time for anything that would run to run
        again = page.evaluate(OUTPUT_TAGS)
        assert again["pwned"] is None and again["img"] == again["iframe"] == 0, again
        assert again["script"] == 0 and again["details"][2] == 0, again


# --------------------------------------------------------------------------- images

FIGURE_CELLS = [
    "%load_ext nbchat\nimport matplotlib.pyplot as plt\nimport nbchat\n\n"
    "fig, ax = plt.subplots(figsize=(4, 2.5))\nax.plot([3, 1, 2, 5, 4]);",
    "%%chat\nSay hello.",
    "session = %chat session\nnbchat.panel(session)",
    "%%chat --attach fig\nWhat is wrong with this plot?",
]
THUMBNAILS = """(root) => Array.from(document.querySelectorAll(root + ' img.nbchat-thumb')).map(
    (img) => ({ok: img.complete && img.naturalWidth > 0, alt: img.alt}))"""


def test_an_attached_figure_shows_in_the_cell_and_the_panel(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    """The figure's thumbnail above the reply in the cell, and in the panel's user bubble."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    fake.enqueue("Hello!")
    fake.enqueue("The dip at the third point breaks an otherwise rising line.", chunk_size=8)
    with _lab_run_all(
        tmp_path, fake, FIGURE_CELLS, "figure.ipynb", "figure-jupyterlab-failure.png"
    ) as (_, page):
        cells = page.locator(".jp-Notebook .jp-Cell")
        turn = cells.nth(3).locator(".jp-OutputArea-output")
        expect(turn).to_contain_text("fake-model ·")
        expect(turn.locator("img.nbchat-thumb")).to_be_visible()
        bubble = page.locator(".nbchat-panel .nbchat-user img.nbchat-thumb")
        expect(bubble).to_be_visible()
        expect(page.locator(".nbchat-panel")).to_contain_text("breaks an otherwise")
        in_cell = page.evaluate(THUMBNAILS, ".jp-Notebook .jp-Cell:nth-child(4)")
        in_panel = page.evaluate(THUMBNAILS, ".nbchat-panel")
        assert in_cell and all(i["ok"] for i in in_cell), in_cell  # decoded, not broken
        assert in_panel and all(i["ok"] for i in in_panel), in_panel
        assert in_cell[0]["alt"].startswith("[image: fig, ")
        text = turn.inner_text()
        assert text.index("breaks an otherwise") < text.index("fake-model ·")
        (image,) = [
            p for p in fake.requests[1]["messages"][-1]["content"] if p["type"] == "image_url"
        ]
        assert image["image_url"]["url"].startswith("data:image/png;base64,")
        cells.nth(3).screenshot(path=str(ARTIFACTS / "figure-jupyterlab-cell.png"))
        page.locator(".nbchat-panel").screenshot(
            path=str(ARTIFACTS / "figure-jupyterlab-panel.png")
        )
