"""``nbchat.dashboard()`` in JupyterLab, Notebook 7 and Voila in headless chromium: it
renders, a click on a session shows its transcript, a picked date redraws it.

The store is filled here by real sessions against the fake server, then the front end (a
subprocess, private config; test_panel_browser.py's harness) runs a notebook whose one
cell is ``nbchat.dashboard()`` on that file. The browser may only reach 127.0.0.1: every
other request is refused and the test fails if one was made, so the widgets' JavaScript
must come from the local server (Voila included), never a CDN. The screenshot
test-artifacts/dashboard-jupyterlab.png is the README's docs/dashboard.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_panel_browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    KERNEL_IDLE,
    WAIT_MS,
    _serve,
)
from test_plot import fill_store, prices

from nbchat.testing import FakeOpenAIServer

pytestmark = pytest.mark.browser

NOTEBOOK_CODE = "import nbchat\n\nnbchat.dashboard()"
LOCAL = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:", "about:")
# Voila's lab template links Font Awesome's stylesheets on jsdelivr besides the copy its
# own bundle carries (the icons draw from that one): refused here, and allowed, no more.
VOILA_TEMPLATE_CDN = {
    "https://cdn.jsdelivr.net/npm/@fortawesome/fontawesome-free@%5E5/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/@fortawesome/fontawesome-free@%5E5/css/v4-shims.min.css",
}


@pytest.mark.parametrize("host", ["jupyterlab", "notebook7", "voila"])
def test_dashboard_in_the_browser(host: str, tmp_path: Path, fake: FakeOpenAIServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    db = tmp_path / "chats.duckdb"  # the file _serve points the kernel's NBCHAT_DB at
    with prices():
        filled = fill_store(str(db), fake)
    expect.set_options(timeout=WAIT_MS)
    ARTIFACTS.mkdir(exist_ok=True)
    refused: list[str] = []

    def local_only(route: Any) -> None:
        url = route.request.url
        if url.startswith(LOCAL):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    with (
        _serve(host, tmp_path, fake, [NOTEBOOK_CODE], "dashboard.ipynb") as served,
        sync_playwright() as pw,
    ):
        assert served.db == db
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1300, "height": 1400},
        )
        context.route("**/*", local_only)
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(WAIT_MS)
        try:
            page.goto(served.url)
            in_notebook_ui = host in ("jupyterlab", "notebook7")
            if in_notebook_ui:  # Voila runs the notebook itself
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
            expect(board).to_contain_text("5 requests in 3 sessions, $0.00634 known cost")
            expect(board.locator("img")).to_have_count(3)
            for i in range(3):  # the PNG charts loaded, have a size, and fit in the board
                image = board.locator("img").nth(i)
                expect(image).to_be_visible()
                assert image.evaluate("i => i.naturalWidth") > 0
                box, frame = image.bounding_box(), board.bounding_box()
                assert box is not None and frame is not None
                assert box["x"] + box["width"] <= frame["x"] + frame["width"] + 1, (box, frame)
                # ...and keep their shape (a trial saw "Cost by day" squashed sideways).
                natural, shown = image.evaluate(
                    "i => [i.naturalWidth / i.naturalHeight, i.clientWidth / i.clientHeight]"
                )
                assert abs(shown - natural) <= 0.02 * natural, (i, natural, shown)
                # ...and are never blown up past their size: a narrower chart stretched to
                # the half row had larger text than its neighbour.
                assert image.evaluate("i => i.clientWidth <= i.naturalWidth + 1"), i
            if in_notebook_ui:
                expect(page.locator(".jp-InputPrompt").first).to_contain_text("[1]")
                page.wait_for_function(KERNEL_IDLE)

            # A click on a session shows its transcript below.
            board.get_by_role("button", name="Cheap tools").click()
            expect(board).to_contain_text(f"Session {filled.cheap}")
            expect(board).to_contain_text("ValueError: odd")
            expect(board.locator(".nbchat-dash-assistant").last).to_contain_text("done")
            board.screenshot(path=str(ARTIFACTS / f"dashboard-{host}.png"))

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
            outside = set(refused) - (VOILA_TEMPLATE_CDN if host == "voila" else set())
            assert not outside, f"the page asked for something not on 127.0.0.1: {refused}"
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / f"dashboard-{host}-failure.png"))
            raise
        finally:
            context.close()
