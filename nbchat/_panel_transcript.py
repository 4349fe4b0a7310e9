"""What the panel's transcript shows: message bubbles, stored conversations, Run / Skip.

A bubble is an HTML widget of safe HTML (``markdown_to_html``: raw HTML escaped, images
as links), or an ``HTMLMath`` widget when it holds TeX, typeset where the page has
MathJax. The user's bubble shows thumbnails of what they attached above their text; a
stored conversation becomes bubbles laid out like live turns (``history_html``). The
python tool's ``ask`` mode puts an ``ApprovalRow`` under the turn.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

import ipywidgets as widgets

from ._markup import to_html
from ._render import TurnView, badge_html, history_views
from ._render_parts import thumbnails_html
from ._types import ImagePart, Message

__all__ = [
    "MATH",
    "QUEUED",
    "TYPING",
    "ApprovalRow",
    "history_html",
    "markdown_to_html",
    "message_bubble",
    "turn_html",
    "user_html",
]

MATH = 'class="nbchat-math"'
TYPING = '<p class="nbchat-typing">…</p>'
QUEUED = '<p class="nbchat-typing">queued: another turn on this session runs first…</p>'


def markdown_to_html(text: str, *, hard_wrap: bool = False) -> str:
    """Markdown to HTML that is safe to show: raw HTML is escaped, images become links.

    ``hard_wrap=True`` turns every newline into a line break.
    """
    return to_html(text, hard_wrap=hard_wrap)


def message_bubble(role: str, content: str) -> widgets.HTML:
    """One message of the transcript, as a widget styled for ``role``."""
    # HTMLMath typesets TeX where the page has MathJax (JupyterLab, Notebook 7), the
    # way the notebook does; elsewhere the TeX stays as written.
    kind = widgets.HTMLMath if MATH in content else widgets.HTML
    shown = kind(content)
    shown.add_class("nbchat-msg")
    shown.add_class(f"nbchat-{role}")
    return shown


def turn_html(view: TurnView, *, live: bool = False, failure: str | None = None) -> str:
    """A turn's bubble: its layout and the failure that ended it, or "…" while nothing
    of it has arrived."""
    shown = view.html(live=live)
    if failure is not None:
        shown += "\n" + badge_html(f"⚠ {failure}")
    elif not view.parts and view.result is None:
        shown = TYPING
    return shown


def history_html(
    history: Iterable[Message], outcomes: Mapping[str, tuple[str, str | None]] | None = None
) -> list[tuple[str, str]]:
    """A stored conversation as (role, HTML) bubbles, laid out like live turns
    (``outcomes``: how each turn ended, ``Session.turn_outcomes()``)."""
    bubbles: list[tuple[str, str]] = []
    for view in history_views(history, outcomes):
        if view.user_text is not None:
            bubbles.append(("user", user_html(view.user_text, view.user_images)))
        view.show_user_images = False
        if view.parts or view.badges:
            bubbles.append(("assistant", view.html()))
    return bubbles


def user_html(text: str, images: Sequence[ImagePart]) -> str:
    """The user's bubble: thumbnails of what they attached above their text."""
    return thumbnails_html(images) + markdown_to_html(text, hard_wrap=True)


class ApprovalRow(widgets.HBox):  # type: ignore[misc]
    """ "Run the code above?" with Run / Skip buttons; ``wait()`` returns the choice."""

    def __init__(self) -> None:
        self._decided, self._answer = threading.Event(), False
        run = widgets.Button(description="Run", button_style="warning", icon="play")
        skip = widgets.Button(description="Skip", icon="forward")
        run.on_click(lambda _: self._choose(True))
        skip.on_click(lambda _: self._choose(False))
        super().__init__([widgets.HTML("<b>Run the code above?</b>"), run, skip])
        self.add_class("nbchat-approval")

    def _choose(self, yes: bool) -> None:
        self._answer = yes
        self._decided.set()

    def wait(self) -> bool:
        """Block until Run (``True``) or Skip (``False``) is clicked."""
        # Waiting in steps: Stop cancels the turn, which interrupts this thread
        # (KeyboardInterrupt between bytecodes), and a blocked wait() would not see it.
        while not self._decided.wait(0.1):
            pass
        return self._answer
