"""The cell renderer: one turn shown in the output of the cell that runs it.

Three ways to show a turn, picked from what the frontend can do:

- ``live``: a Markdown display that is updated in place (``display_id``) as events
  arrive, paced by ``Throttle``; the last update always carries the exact full text.
- ``final``: one display when the turn ends (``--no-stream``, or under ``%%capture``,
  which would otherwise keep every intermediate update as an output of its own).
- ``text``: a terminal (IPython without rich display): text deltas are written to
  stdout as they arrive, then a footer line.

Each display carries ``text/html`` (what JupyterLab, Notebook 7 and VS Code show: the
turn layout of ``_render``, the same HTML as the panel's) and ``text/markdown`` (the
same layout with the text as safe Markdown, for frontends that prefer it). Model text
in either shows as text, never as live HTML: a trusted output would otherwise run it
again whenever the saved notebook is opened.

Failures a user can fix (no model configured, server down, budget reached, a pending
session) end the cell with one line, not a traceback: IPython prints the lines an
exception's ``_render_traceback_`` returns instead of the stack. That line is the only
place the failure is said; the turn's display does not repeat it. An interrupted turn
ends the same way (``TurnInterrupted``, named as such), its display without a badge.
"""

from __future__ import annotations

import contextvars
import copy
import sys
import threading
import time
import uuid
from html import escape
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._exceptions import TurnFailed, TurnInterrupted, one_line_traceback

if TYPE_CHECKING:  # imported when a turn runs: %load_ext must stay fast (pydantic models)
    from ._events import Event
    from ._render import TurnView
    from ._throttle import Throttle
    from ._types import TurnResult

__all__ = [
    "CellRenderer",
    "RenderMode",
    "TurnFailed",
    "TurnInterrupted",
    "one_line",
    "raise_for",
    "render_mode",
]


RenderMode = Literal["live", "final", "text"]
_E = TypeVar("_E", bound=BaseException)
TICK_SECONDS = 0.5  # how often a running tool's time moves in the cell
_CATCH_UP_S = 0.1  # how often held-back text is looked at while a stream pauses
_ASK_WAIT_S = 2.0  # at most, for the display to show the call that asks to run code


def render_mode(shell: Any, *, stream: bool) -> RenderMode:
    """How a turn can be shown in ``shell`` right now."""
    from IPython.core.displaypub import CapturingDisplayPublisher

    if isinstance(getattr(shell, "display_pub", None), CapturingDisplayPublisher):
        return "final"
    formatter = getattr(shell, "display_formatter", None)
    if formatter is None or "text/markdown" not in formatter.active_types:
        return "text"
    return "live" if stream else "final"


def one_line(exc: _E) -> _E:
    """Make IPython show ``exc`` as one line (its class and message), without a stack.

    The class is named as users can catch it: an nbchat class that is not public (the
    magics' ``MissingKey``) shows as its public base (``ConfigError``)."""
    import nbchat

    public = next(
        (
            k
            for k in type(exc).__mro__
            if not k.__module__.startswith("nbchat") or k.__name__ in nbchat.__all__
        ),
        type(exc),
    )
    kind, message = public.__name__, str(exc)
    exc._render_traceback_ = lambda: one_line_traceback(kind, message)  # type: ignore[attr-defined]
    return exc


def turn_failed(result: TurnResult) -> TurnFailed:
    """The one-line error that ends a cell whose turn did not complete."""
    from ._render import STATUS_LABELS

    label = STATUS_LABELS.get(result.status, result.status).lstrip("⚠ ").rstrip(".")
    if result.status == "error" and result.error:
        # "TurnFailed: Error: The model server answered…" says it failed twice.
        return TurnFailed(result.error, result)
    if result.status == "budget_exceeded":
        # The cell shows the limit's notice already (which limit, what was spent).
        return TurnFailed(f"{label} (the notice above says which limit)", result)
    return TurnFailed(f"{label}: {result.error}" if result.error else label, result)


def turn_interrupted(result: TurnResult) -> TurnInterrupted:
    """The one red line that ends an interrupted cell, named for what it is.

    It is the only place the cell says so (its display has no "Interrupted" badge), and
    it speaks of a kept partial reply only when some text had arrived.
    """
    from ._render import kept_text

    if kept_text(result):
        return TurnInterrupted(result)  # its message: the partial reply above was kept
    return TurnInterrupted(result, "The turn was interrupted before any reply text arrived.")


def raise_for(result: TurnResult) -> None:
    """End the cell with one line when the turn did not complete, so "Run all" stops."""
    if result.status == "interrupted":
        raise turn_interrupted(result)
    if result.status in ("error", "budget_exceeded", "rejected"):
        raise turn_failed(result)


class CellRenderer:
    """Shows one turn in the current cell; pass it as ``on_event`` to ``Session.send``.

    Call ``finish()`` after the turn: it sends the final, exact display. While the turn
    runs, the python tool asks for approval through ``ask()`` (see ``_pytool``), so
    the question shows in the tool's block. A turn that fails is not labelled as
    failed in the display: the cell ends with that message as its one error line.
    """

    def __init__(self, model: str, mode: RenderMode, *, throttle: Throttle | None = None) -> None:
        from ._render import TurnView
        from ._throttle import Throttle

        self.mode = mode
        self.view = TurnView(model)
        self.throttle = throttle or Throttle()
        self.display_id = uuid.uuid4().hex
        self.shown = False
        # A question answered in the cell ends a display: the input box stays where it
        # was asked, so what the turn shows next goes in a new display under it.
        self._splits: list[tuple[int, str]] = []  # (first part, display id) of each next one
        self._published: dict[str, dict[str, str]] = {}  # what each display shows now
        self._printed_text = False
        self._lock = threading.RLock()  # the approval question comes from a tool thread
        self._seen = threading.Condition(self._lock)  # an event reached the view
        self._done = threading.Event()
        self._ticking = False
        self._catching_up = False

    def __call__(self, event: Event) -> None:
        with self._lock:
            if self.mode == "text":
                self._print(event)
            changed = self.view.handle(event)
            self._seen.notify_all()
            if self.mode != "live" or event.kind == "turn_finished":
                return  # the end is shown by finish(), exactly once
            if not changed and event.kind != "turn_started":
                return
            # A tool block appears as soon as the call starts, and again with its result.
            now = event.kind in ("tool_call_started", "tool_result")
            if event.kind == "tool_call_started" and not self._ticking:
                self._start_ticker()
            if not self.shown:
                self._publish(update=False)
            elif now or self.throttle.due(self.view.size):
                self._publish(update=True)
            elif not self._catching_up:
                self._start_catch_up()  # held back: shown later even if nothing else comes

    def placeholder(self) -> None:
        """Show the turn's "⏳" line now, before anything else of the turn is ready."""
        with self._lock:
            if self.mode == "live" and not self.shown:
                self._publish(update=False)

    def withdraw(self) -> None:
        """Empty the placeholder of a turn that did not start (the cell's error line
        says why)."""
        from IPython.display import display

        with self._lock:
            self._done.set()
            if self.shown:
                empty = {"text/plain": ""}
                display(empty, raw=True, display_id=self.display_id, update=True)  # type: ignore[no-untyped-call]
                self._published[self.display_id] = empty

    def note(self, message: str) -> None:
        """Say ``message`` in the turn (with its other notices, under the reply)."""
        from ._events import Notice

        with self._lock:
            self(Notice(message=message))
            if self._done.is_set() and self.shown and self.mode != "text":
                self._publish(update=True)  # after finish(): no later event would show it

    def mark(self, badge: str) -> None:
        """Add a status line to a finished turn's display (e.g. superseded) and re-show it."""
        with self._lock:
            if badge not in self.view.badges:
                self.view.badges.append(badge)
            if self.shown and self.mode == "live":
                self._publish(update=True)

    def show_answer(self, markdown: str) -> None:
        """Show the finished turn's answer as ``markdown`` (nbchat's own rendering of it:
        ``--format json`` pretty-printed) in place of the reply text, not beside it. A
        terminal already printed the reply as it came: nothing more is printed there."""
        from ._render_parts import TextPart

        with self._lock:
            parts = self.view.parts
            texts = [i for i, p in enumerate(parts) if isinstance(p, TextPart) and not p.thinking]
            if not texts or self.mode == "text":
                return
            old = parts[texts[-1]]
            assert isinstance(old, TextPart)
            shown = TextPart(old.round)
            shown.buffer.append(markdown)
            parts[texts[-1]] = shown
            if self.shown:
                self._publish(update=True)

    def finish(self) -> None:
        """Show the turn as it ended: the full text, tool blocks, status and footer."""
        self._done.set()
        with self._lock:
            if self.mode == "text":
                self._print_footer()
            else:
                self._publish(update=self.shown)

    def _start_catch_up(self) -> None:
        """Show held-back text once the throttle allows, though no event comes to ask.

        The throttle is asked on each event; when a stream pauses (a stalled server, a
        slow tool call being written), what arrived last would wait for the next event.
        """
        self._catching_up = True
        context = contextvars.copy_context()

        def catch_up() -> None:
            while not self._done.wait(_CATCH_UP_S):
                with self._lock:
                    live = self.view.result is None and not self._done.is_set()
                    if live and self.throttle.due(self.view.size):
                        self._publish(update=True)

        threading.Thread(
            target=context.run, args=(catch_up,), name="nbchat-catch-up", daemon=True
        ).start()

    def _start_ticker(self) -> None:
        """While tools run, re-show the turn every ``TICK_SECONDS`` ("running… 2.1 s")."""
        self._ticking = True
        # The thread runs in this cell's context, so its updates go to this cell's output.
        context = contextvars.copy_context()

        def tick() -> None:
            while not self._done.wait(TICK_SECONDS):
                with self._lock:
                    view = self.view
                    if view.result is not None:
                        return
                    running = any(
                        b.result is None and b.approval != "waiting" for b in view.tools.values()
                    )
                    if running:
                        self._publish(update=True)

        threading.Thread(target=context.run, args=(tick,), name="nbchat-tick", daemon=True).start()

    def ask(self, code: str) -> bool:
        """Ask whether to run ``code``: the question shows in its tool block, then input()."""
        from ._pytool import prompt_user

        with self._lock:
            # The tool may ask before this thread has shown the call that runs it (the
            # loop goes on to the tools without waiting for the display): wait a moment.
            deadline = time.monotonic() + _ASK_WAIT_S
            while (block := self.view.approval_block(code)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._done.is_set():
                    break
                self._seen.wait(left)
            if block is not None:
                block.approval = "waiting"
                if self.mode != "text":
                    self._publish(update=self.shown)
        asked = time.monotonic()
        yes = False
        try:
            if block is None or self.mode == "text":
                print(f"The model wants to run this code:\n{code}")
            yes = prompt_user()
            return yes
        finally:  # also when asking failed (no input box): the block stops waiting
            with self._lock:
                if block is not None:
                    block.waited_ms = (time.monotonic() - asked) * 1000
                    block.approval = "yes" if yes else "no"
                    if self.mode != "text":
                        self._publish(update=True)
                        self._splits.append((len(self.view.parts), uuid.uuid4().hex))

    # -------------------------------------------------------------- rich displays

    def bundle(self) -> tuple[dict[str, str], dict[str, Any]]:
        """The MIME bundle and metadata of the (last) display as it stands."""
        return self._bundle(self._views()[-1][1], last=True)

    def _views(self) -> list[tuple[str, TurnView]]:
        """Each display's id and the part of the turn it shows (one, unless it asked)."""
        if not self._splits:
            return [(self.display_id, self.view)]
        starts = [(0, self.display_id), *self._splits]
        shown: list[tuple[str, TurnView]] = []
        for i, (start, display_id) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else None
            part = copy.copy(self.view)
            part.parts = self.view.parts[start:end]
            if end is not None:  # the status and footer go under the last one
                part.result, part.badges = None, []
            if i:
                part.show_user_images = False
            shown.append((display_id, part))
        return shown

    def _bundle(self, view: TurnView, *, last: bool) -> tuple[dict[str, str], dict[str, Any]]:
        live = self.view.result is None
        if not last:  # an earlier display: its text, no "⏳" line, no metadata
            text = _answer_text(view)
            data = {
                "text/html": cell_html(view.html(live=live, show_failure=False)),
                "text/markdown": view.markdown(live=live, show_failure=False),
                "text/plain": text,
            }
            return data, {}
        pending = f"<small>⏳ {escape(view.model)}…</small>" if live else ""
        html_text = "\n".join(p for p in (view.html(live=live, show_failure=False), pending) if p)
        markdown = "\n\n".join(
            p for p in (view.markdown(live=live, show_failure=False), pending) if p
        )
        metadata: dict[str, Any] = {}
        result = view.result
        if result is not None:
            metadata["nbchat"] = {
                "session_id": result.session_id,
                "turn_id": result.turn_id,
                "status": result.status,
                "footer": view.footer(),
            }
        data = {
            "text/html": cell_html(html_text),
            "text/markdown": markdown,
            "text/plain": self.view.text,
        }
        return data, metadata

    def _publish(self, *, update: bool) -> None:
        from IPython.display import display

        views = self._views()
        for i, (display_id, view) in enumerate(views):
            last = i == len(views) - 1
            data, metadata = self._bundle(view, last=last)
            if not last and self._published.get(display_id) == data:
                continue  # an earlier display, unchanged: not sent again
            again = update if i == 0 else display_id in self._published
            display(  # type: ignore[no-untyped-call]
                data, raw=True, metadata=metadata, display_id=display_id, update=again
            )
            self._published[display_id] = data
        self.shown = True
        self.throttle.mark(self.view.size)

    # -------------------------------------------------------------- terminal

    def _print(self, event: Event) -> None:
        from ._events import ErrorEvent, LimitReached, Notice, TextDelta, ToolResult
        from ._tool_results import DECLINED, NOT_RUN

        out = sys.stdout
        if isinstance(event, TextDelta):
            out.write(event.text)
            self._printed_text = True
        elif isinstance(event, ToolResult):
            call = event.call
            state = "error" if call.is_error else f"{call.duration_ms:.0f} ms"
            if call.error_kind in (DECLINED, NOT_RUN):
                state = "skipped"
            out.write(f"\n[tool {call.name}({_short(call.arguments)}) → {state}]\n")
        elif isinstance(event, Notice | LimitReached):
            out.write(f"\n[{event.message}]\n")
        elif isinstance(event, ErrorEvent):
            pass  # the cell ends with it as its error line
        out.flush()

    def _print_footer(self) -> None:
        # An interrupted turn is said by the cell's error line, as in a notebook.
        lines = ["\n" if self._printed_text else ""]
        lines.append(f"[{self.view.footer()}]\n")
        sys.stdout.write("".join(lines))
        sys.stdout.flush()


# Prose wraps (a long unbroken line scrolled the whole output sideways), as in the
# panel (_panel_input). Inline only: a <style> element in a cell's output is what a
# hostile reply's would be (the tests refuse any), and a notebook reopened untrusted
# strips it. Code blocks and tables set the wrapping back and scroll in their own box
# (_markup.PRE).
_WRAP = "overflow-wrap: anywhere; word-break: break-word; min-width: 0; max-width: 100%"


def cell_html(body: str) -> str:
    """A turn's HTML as a cell shows it: its prose wraps inside the output's width."""
    return f'<div class="nbchat-turn" style="{_WRAP}">{body}</div>'


def _answer_text(view: TurnView) -> str:
    from ._render_parts import TextPart

    return "".join(
        p.buffer.text() for p in view.parts if isinstance(p, TextPart) and not p.thinking
    )


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
