"""``nbchat.dashboard()`` in JupyterLab in headless chromium: it renders, a click on a
session shows its transcript, a picked date redraws it.

The store is filled here by real sessions against the fake server, then JupyterLab (a
subprocess, private config) runs a notebook whose one cell is ``nbchat.dashboard()`` on
that file. The server harness is test_panel_browser.py's. The screenshot
test-artifacts/dashboard-jupyterlab.png is the README's docs/dashboard.png.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_panel_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    KERNEL_IDLE,
    TOKEN,
    WAIT_MS,
    _browser_missing,
    _free_port,
    _notebook,
    _wait_for_port,
)
from test_plot import fill_store, prices

from nbchat.testing import FakeOpenAIServer

pytestmark = pytest.mark.browser

NOTEBOOK_CODE = "import nbchat\n\nnbchat.dashboard()"


def test_dashboard_in_jupyterlab(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    db = tmp_path / "chats.duckdb"
    with prices():
        filled = fill_store(str(db), fake)
    root = tmp_path / "nb"
    root.mkdir()
    (root / "dashboard.ipynb").write_text(json.dumps(_notebook(NOTEBOOK_CODE)), encoding="utf-8")
    config = tmp_path / "jupyter-config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"autoStartDefaultKernel": true}')
    env = {
        **os.environ,
        "NBCHAT_DB": str(db),
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    port = _free_port()
    command = [
        *("-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"),
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.extension_manager=readonly",
        "--allow-root",
    ]
    url = f"http://127.0.0.1:{port}/lab/tree/dashboard.ipynb?reset&token={TOKEN}"
    log_path = tmp_path / "jupyterlab.log"
    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=WAIT_MS)
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
            with sync_playwright() as pw:
                context = pw.chromium.launch_persistent_context(
                    user_data_dir=str(tmp_path / "chromium-profile"),
                    executable_path=CHROMIUM,
                    headless=True,
                    args=CHROMIUM_ARGS,
                    viewport={"width": 1300, "height": 1400},
                )
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(WAIT_MS)
                try:
                    page.goto(url)
                    page.wait_for_function(KERNEL_IDLE)
                    page.evaluate(
                        """() => {
                            const commands = window.jupyterapp.commands;
                            if (commands.hasCommand('application:toggle-left-area')) {
                                commands.execute('application:toggle-left-area');
                            }
                            commands.execute('notebook:run-all-cells');
                        }"""
                    )
                    board = page.locator(".nbchat-dashboard")
                    expect(board).to_contain_text("5 requests in 3 sessions, $0.0063 known cost")
                    expect(board.locator("img")).to_have_count(3)
                    for i in range(3):  # the PNG charts loaded and have a size
                        expect(board.locator("img").nth(i)).to_be_visible()
                        assert board.locator("img").nth(i).evaluate("i => i.naturalWidth") > 0
                    expect(page.locator(".jp-InputPrompt").first).to_contain_text("[1]")
                    page.wait_for_function(KERNEL_IDLE)

                    # A click on a session shows its transcript below.
                    board.get_by_role("button", name="Cheap tools").click()
                    expect(board).to_contain_text(f"Session {filled.cheap}")
                    expect(board).to_contain_text("ValueError: odd")
                    expect(board.locator(".nbchat-dash-assistant").last).to_contain_text("done")
                    board.screenshot(path=str(ARTIFACTS / "dashboard-jupyterlab.png"))

                    # A picked date redraws: nothing happened tomorrow.
                    since = board.locator("input[type=date]").first
                    since.fill("2999-01-01")
                    since.dispatch_event("change")
                    expect(board).to_contain_text("0 requests in 0 sessions")
                    expect(board).to_contain_text("no sessions in this range")
                    since.fill("")
                    since.dispatch_event("change")
                    board.get_by_role("button", name="Refresh").click()
                    expect(board).to_contain_text("5 requests in 3 sessions")
                except BaseException:
                    page.screenshot(path=str(ARTIFACTS / "dashboard-jupyterlab-failure.png"))
                    raise
                finally:
                    context.close()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=5)
