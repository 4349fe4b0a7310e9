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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nbchat.testing import FakeOpenAIServer

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


nbchat.panel(tools=[add], system="You are a helpful assistant.")'''

KERNEL_IDLE = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const session = panel && panel.sessionContext && panel.sessionContext.session;
    return session && session.kernel && session.kernel.status === "idle";
}"""

STORY = " ".join(
    f"Once upon a time, in notebook cell number {i}, a data frame dreamed of plots."
    for i in range(60)
)


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
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    host: str = request.param
    root = tmp_path / "nb"
    root.mkdir()
    notebook = root / "panel.ipynb"
    notebook.write_text(json.dumps(_notebook(NOTEBOOK_CODE)), encoding="utf-8")
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
    for name in ("NBCHAT_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env.pop(name, None)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    if host == "jupyterlab":
        command = [
            *("-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"),
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.extension_manager=readonly",
            "--allow-root",
        ]
        url = f"{base}/lab/tree/panel.ipynb?reset&token={TOKEN}"
    elif host == "notebook7":
        command = [
            *("-m", "notebook", "--no-browser", "--ip=127.0.0.1", f"--port={port}"),
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--JupyterNotebookApp.expose_app_in_browser=True",
            "--allow-root",
        ]
        url = f"{base}/notebooks/panel.ipynb?token={TOKEN}"
    else:
        command = [
            *("-m", "voila", "--no-browser", "--Voila.ip=127.0.0.1", f"--port={port}"),
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

            # 2. A slow reply: it streams in, Stop interrupts it, the partial text stays.
            fake.enqueue(STORY, chunk_size=6, delay=0.1)
            box.click()
            page.keyboard.type("Tell me a long story.")
            page.keyboard.press("Enter")
            story = page.locator(".nbchat-assistant").nth(1)
            expect(story).to_contain_text("notebook cell number 1,")
            expect(status).to_contain_text("streaming")
            page.get_by_role("button", name="Stop").click()
            expect(story).to_contain_text("Interrupted")
            expect(status).to_contain_text("stopped")
            shown = story.inner_text()
            page.locator(".nbchat-panel").screenshot(
                path=str(ARTIFACTS / f"panel-{served.host}.png")
            )
            page.screenshot(path=str(ARTIFACTS / f"panel-{served.host}-page.png"))
            if served.host == "jupyterlab":  # the code cell and its panel: docs/panel.png
                cell = page.locator(".jp-Notebook .jp-Cell").first
                cell.screenshot(path=str(ARTIFACTS / "panel-jupyterlab-cell.png"))

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


def _notebook(code: str) -> dict[str, Any]:
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "panel-cell",
                "metadata": {},
                "outputs": [],
                "source": code,
            }
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
