"""The chat panel: an ipywidgets front end on the same session loop as the magics.

``panel()`` builds a ``ChatPanel``: a transcript (one HTML widget per message, Markdown
rendered in Python), an input box where Enter sends and Shift+Enter starts a new line,
Send / Stop / New chat, a model picker and a status line.

Threading: a turn runs as a task on nbchat's background event loop (``_runner``), never
inside a button callback, so the kernel's main thread stays free to receive the next
comm message — that is what lets Stop work while a reply streams. Widget traits are then
written from two threads (callbacks on the kernel thread, the turn on the loop thread);
ipykernel sends comm messages from any thread through its IOPub thread, and a per-panel
lock keeps the two writers from interleaving on one widget.

The input box is a small anywidget (``_panel_input``). A panel on a session that cells
also use shows their turns as they happen (it listens to the session's events), and a
Send while such a turn runs waits for it ("queued"). The python tool's ``ask`` mode
asks with Run / Skip buttons under the turn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import ipywidgets as widgets

from ._exceptions import NbchatError
from ._markup import clip, escape, money, protect_dollars, to_html
from ._panel_input import ChatInput
from ._pytool import asking
from ._render import Throttle, TurnView, history_views, thumbnails_html
from ._runner import submit
from ._session import Session
from ._types import (
    Event,
    ImagePart,
    Message,
    MessageAdded,
    TextDelta,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnResult,
    TurnStarted,
    UsageEvent,
)

__all__ = ["ChatInput", "ChatPanel", "markdown_to_html", "panel"]

logger = logging.getLogger("nbchat")

PanelState = Literal[
    "idle", "busy", "queued", "waiting", "streaming", "running tool", "waiting for you", "error"
]
TICK_SECONDS = 0.5  # how often the elapsed time in the status line moves while busy


def markdown_to_html(text: str, *, hard_wrap: bool = False) -> str:
    """Markdown to HTML that is safe to show: raw HTML is escaped, images become links.

    ``hard_wrap=True`` turns every newline into a line break.
    """
    return to_html(text, hard_wrap=hard_wrap)


class ChatPanel(widgets.VBox):  # type: ignore[misc]
    """The chat panel widget; build it with ``nbchat.panel()``.

    ``submit(text)`` / ``stop()`` / ``new_chat()`` do what the buttons do, so scripts and
    tests can drive a panel. ``session`` is the conversation shown (``None`` when it
    could not be created; the status line then says why and Send tries again).
    """

    def __init__(
        self, session: Session | None, options: dict[str, Any], *, reopen: str | None = None
    ) -> None:
        self.session = session
        self.state: PanelState = "idle"
        self.last_error: BaseException | None = None  # an unexpected failure, for debugging
        self._options = dict(options)  # for "New chat": over what the last session had
        self._template = session  # "New chat" starts a session set up like this one
        self._unwatch: Callable[[], None] = lambda: None
        self._reopen = reopen  # a stored session to open on Send, if opening it failed
        self._lock = threading.RLock()
        self._busy = False
        self._stop_requested = False
        self._future: concurrent.futures.Future[TurnResult | None] | None = None
        self._turn_started: float | None = None
        self._last_seconds: float | None = None
        self._detail = ""
        self._quiet_picker = False
        # Tokens the server reported, summed; the session's own total becomes unknown
        # once a stopped reply's usage is missing, but the count so far still holds.
        self._known_tokens = 0 if session is None else session.usage.total_tokens or 0
        self._live: tuple[TurnView, widgets.HTML] | None = None  # this panel's turn
        self._mirror: tuple[TurnView, widgets.HTML, Throttle] | None = None  # a cell's turn

        self.model_picker = widgets.Dropdown(
            options=[self._current_model()], value=self._current_model(), description="Model"
        )
        self.model_picker.layout.width = "auto"
        self.model_picker.observe(self._on_pick, names="value")
        self.new_button = widgets.Button(description="New chat", icon="plus")
        self.new_button.on_click(lambda _: self.new_chat())
        self.send_button = widgets.Button(
            description="Send", button_style="primary", icon="paper-plane"
        )
        self.send_button.on_click(lambda _: self.submit())
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True)
        self.stop_button.on_click(lambda _: self.stop())
        self.input = ChatInput(placeholder="Message (Enter sends, Shift+Enter: new line)")
        self.input.on_msg(self._on_input_msg)
        self.messages = widgets.VBox()
        self.status_line = widgets.HTML()

        title = widgets.HTML("<b>nbchat</b>")
        header = widgets.HBox([title, self.model_picker, self.new_button])
        scroll = widgets.Box([self.messages])
        buttons = widgets.VBox([self.send_button, self.stop_button])
        row = widgets.HBox([self.input, buttons])
        for w, cls in [
            (title, "nbchat-title"),
            (header, "nbchat-header"),
            (scroll, "nbchat-scroll"),
            (self.messages, "nbchat-messages"),
            (buttons, "nbchat-buttons"),
            (row, "nbchat-row"),
            (self.status_line, "nbchat-status"),
        ]:
            w.add_class(cls)
        super().__init__([header, scroll, row, self.status_line])
        self.add_class("nbchat-panel")
        if session is not None:
            self._show_history(session.history)
            self._watch(session)
            self._load_models(session)
        self._render_status()

    # ------------------------------------------------------------------ public surface

    @property
    def busy(self) -> bool:
        """Whether a turn is running."""
        return self._busy

    def submit(self, text: str | None = None) -> concurrent.futures.Future[TurnResult | None]:
        """Send ``text`` (default: the input box's text) and stream the reply in.

        Returns at once with a future of the turn's result; it is ``None`` when nothing
        was sent (empty text, a turn still running, or no session could be made).
        """
        from_box = text is None
        text = self.input.value if text is None else text
        if not text.strip():
            return _done(None)
        with self._lock:
            if self._busy:
                self._set_detail("A reply is still streaming: Stop it or wait.")
                return _done(None)
            session = self._ensure_session()
            if session is None:
                return _done(None)
            self._busy, self._stop_requested = True, False
            self._turn_started = time.monotonic()
            if from_box:
                self.input.value = ""
            self._append("user", markdown_to_html(text, hard_wrap=True))
            bubble = self._append("assistant", _TYPING)
            self._set_busy_controls(True)
            if self._mirror is not None:  # a cell's turn on this session runs first
                bubble.value = _QUEUED
                self._set_state("queued", "another turn on this session is running")
            else:
                self._set_state("waiting", "")
            future = submit(self._run(session, text, bubble))
            self._future = future
        return future

    def stop(self) -> None:
        """Stop the running turn; the partial reply is kept, marked interrupted."""
        with self._lock:
            if not self._busy:
                return
            self._stop_requested = True
            self.stop_button.disabled = True
            self._set_detail("stopping…")
        if self.session is not None:
            self.session.cancel()

    def new_chat(self) -> bool:
        """Start a new conversation (same options, the picked model); False while busy."""
        with self._lock:
            if self._busy:
                self._set_detail("Stop the running reply before starting a new chat.")
                return False
            self.messages.children = ()
            self._template = self.session or self._template
            self.session, self._reopen = None, None
            session = self._ensure_session()
            if session is not None:
                self._set_state("idle", "New chat started.")
            return session is not None

    def wait(self, timeout: float | None = None) -> TurnResult | None:
        """Block until the running turn (if any) has finished; returns its result."""
        future = self._future
        return None if future is None else future.result(timeout)

    def close(self) -> None:
        """Stop a running turn, then close the widget."""
        if hasattr(self, "_lock"):  # ipywidgets may close a half-built widget
            self.stop()
            self._unwatch()
        super().close()

    # ------------------------------------------------------------------ the turn

    async def _run(self, session: Session, text: str, bubble: widgets.HTML) -> TurnResult | None:
        """Stream one turn into ``bubble`` (on the background loop)."""
        _own_turn.set(self)  # this task's events are this panel's, not a cell's
        view = TurnView(session.model)
        throttle = Throttle()
        result: TurnResult | None = None
        failure: str | None = None
        ticker = asyncio.ensure_future(self._tick(throttle))
        self._live = (view, bubble)
        try:
            if self._mirror is not None:  # queued behind a cell's turn on this session
                while self._mirror is not None and not self._stop_requested:
                    await asyncio.sleep(0.05)
                if self._stop_requested:
                    failure = "Stopped before it was sent."
                    return None
                self._set_state("waiting", "")
            with asking(self._ask):  # python:ask tools show Run / Skip
                async for event in session.stream(text):
                    if isinstance(event, TurnStarted) and self._stop_requested:
                        session.cancel()  # Stop was clicked before the turn could start
                    self._follow(event)
                    if isinstance(event, TurnFinished):
                        result = event.result
                    soon = isinstance(event, ToolCallStarted | ToolResult)
                    if view.handle(event) and (soon or throttle.due(view.size)):
                        self._show_turn(bubble, view, live=True)
                        throttle.mark(view.size)
        except NbchatError as exc:
            failure = str(exc)
        except Exception as exc:  # the panel must stay usable whatever went wrong
            # Shown in the panel; the traceback is kept for whoever debugs it (printing it
            # from this thread would land in whichever cell ran last).
            self.last_error = exc
            logger.debug("nbchat panel: the turn failed", exc_info=True)
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            ticker.cancel()
            self._live = None
            self._drop_approval()  # a question the turn no longer waits for
            self._show_turn(bubble, view, failure=failure)  # always the exact, complete text
            self._finish(result, failure)
        return result

    async def _tick(self, throttle: Throttle) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self._render_status()
            live = self._live
            if live is None:
                continue
            view, bubble = live
            # "running… 2.1 s" moves; text the throttle held back shows though a stream
            # paused (no event comes to show it).
            if any(b.result is None for b in view.tools.values()) or throttle.due(view.size):
                self._show_turn(bubble, view, live=True)
                throttle.mark(view.size)

    def _ask(self, code: str) -> bool:
        """Run / Skip buttons under the turn; blocks the python tool's thread until a click."""
        live = self._live
        if live is None:
            return False
        view, bubble = live
        block = view.approval_block(code)
        decided, answer = threading.Event(), [False]

        def choose(yes: bool) -> None:
            answer[0] = yes
            decided.set()

        run = widgets.Button(description="Run", button_style="warning", icon="play")
        skip = widgets.Button(description="Skip", icon="forward")
        run.on_click(lambda _: choose(True))
        skip.on_click(lambda _: choose(False))
        row = widgets.HBox([widgets.HTML("<b>Run the code above?</b>"), run, skip])
        row.add_class("nbchat-approval")
        with self._lock:
            if block is not None:
                block.approval = "waiting"
            self.messages.children = (*self.messages.children, row)
            self._show_turn(bubble, view, live=True)
            self._set_state("waiting for you", "Run or Skip the code")
        asked = time.monotonic()
        try:
            # Waiting in steps: Stop cancels the turn, which interrupts this thread
            # (KeyboardInterrupt between bytecodes), and a blocked wait() would not see it.
            while not decided.wait(0.1):
                pass
            with self._lock:
                if block is not None:
                    block.waited_ms = (time.monotonic() - asked) * 1000
                    block.approval = "yes" if answer[0] else "no"
                self._show_turn(bubble, view, live=True)
                self._set_state("running tool" if answer[0] else "waiting", "")
        finally:  # also when Stop interrupts this thread
            self._drop_approval()
        return answer[0]

    def _drop_approval(self) -> None:
        with self._lock:
            rows = [c for c in self.messages.children if "nbchat-approval" in c._dom_classes]
            if rows:
                self.messages.children = tuple(c for c in self.messages.children if c not in rows)
        for row in rows:
            row.close()

    def _follow(self, event: Any) -> None:
        """Move the status line's state along with the turn."""
        match event:
            case TextDelta():
                if self.state != "streaming":
                    self._set_state("streaming")
            case ToolCallStarted(name=name):
                self._set_state("streaming", f"calling {name}")
            case MessageAdded(message=Message(role="assistant", tool_calls=calls)) if calls:
                # The tool may already be asking (it starts before this event is shown).
                if self.state != "waiting for you":
                    self._set_state("running tool", ", ".join(c.name for c in calls))
            case ToolResult():
                self._set_state("waiting", "")

    def _finish(self, result: TurnResult | None, failure: str | None) -> None:
        with self._lock:
            if self._turn_started is not None:
                self._last_seconds = time.monotonic() - self._turn_started
            self._busy, self._turn_started = False, None
            self._set_busy_controls(False)
            if failure is not None:
                self._set_state("error", failure)
            elif result is None or result.status == "completed":
                self._set_state("idle", "")
            elif result.status == "interrupted":
                self._set_state("idle", "stopped")
            else:
                self._set_state("error", result.error or result.status)

    def _show_turn(
        self,
        bubble: widgets.HTML,
        view: TurnView,
        *,
        live: bool = False,
        failure: str | None = None,
    ) -> None:
        shown = view.html(live=live)
        if failure is not None:
            shown += "\n" + _badge(f"⚠ {failure}")
        elif not view.parts and view.result is None:
            shown = _TYPING
        with self._lock:
            if not live and _MATH in shown and not isinstance(bubble, widgets.HTMLMath):
                # Typeset once the text is complete (not on every streamed update).
                math = self._bubble("assistant", shown)
                self.messages.children = tuple(
                    math if c is bubble else c for c in self.messages.children
                )
                bubble.close()
            else:
                bubble.value = shown

    # ------------------------------------------------------------------ transcript

    def _append(self, role: str, content: str) -> widgets.HTML:
        bubble = self._bubble(role, content)
        with self._lock:
            self.messages.children = (*self.messages.children, bubble)
        return bubble

    def _bubble(self, role: str, content: str) -> widgets.HTML:
        # HTMLMath typesets TeX where the page has MathJax (JupyterLab, Notebook 7), the
        # way the notebook does; elsewhere the TeX stays as written.
        kind = widgets.HTMLMath if _MATH in content else widgets.HTML
        bubble = kind(content)
        bubble.add_class("nbchat-msg")
        bubble.add_class(f"nbchat-{role}")
        return bubble

    def _show_history(self, history: Iterable[Message]) -> None:
        for role, content in history_html(history):
            self._append(role, content)

    def _watch(self, session: Session) -> None:
        """Show turns that other front ends (``%%chat`` cells) run on ``session`` too."""

        def on_event(event: Event) -> None:
            if isinstance(event, UsageEvent) and event.usage and event.usage.total_tokens:
                self._known_tokens += event.usage.total_tokens
            if _own_turn.get() is not self:
                self._follow_other(event)

        self._unwatch()  # the previous session's turns are no longer shown here
        self._unwatch = session.listen(on_event)

    def _follow_other(self, event: Event) -> None:
        """One event of a turn this panel did not start, shown as it happens."""
        if self.session is None or event.session_id != self.session.id:
            return
        with self._lock:
            if isinstance(event, TurnStarted):
                self._append("user", _user_html(event.text, event.attachments or []))
                bubble = self._append("assistant", _TYPING)
                view = TurnView(self.session.model)
                view.show_user_images = False  # they are in the user's bubble
                self._mirror = (view, bubble, Throttle())
                if not self._busy:
                    self._set_state("busy", "a turn from a notebook cell")
                return
            if self._mirror is None:
                return
            view, bubble, throttle = self._mirror
            end = isinstance(event, TurnFinished)
            if view.handle(event) and (end or throttle.due(view.size)):
                self._show_turn(bubble, view, live=not end)
                throttle.mark(view.size)
            if end:
                self._mirror = None
                if not self._busy:
                    self._set_state("idle", "")

    # ------------------------------------------------------------------ session, models

    def _ensure_session(self) -> Session | None:
        if self.session is not None:
            return self.session
        options = dict(self._options)
        picked = self.model_picker.value
        if picked and picked != _NO_MODEL:
            options["model"] = picked
        try:
            if self._reopen is None and self._template is not None:
                # Everything the last session had (compaction, guardrails, request
                # params, the key...), with the panel's own options over it.
                self.session = self._template.new(**options)
            else:
                self.session = Session(session_id=self._reopen, **options)
        except NbchatError as exc:
            self._set_state("error", str(exc))
            return None
        if self._reopen is not None:
            self._reopen = None
            self._show_history(self.session.history)
        self._known_tokens = self.session.usage.total_tokens or 0
        self._watch(self.session)
        self._load_models(self.session)
        return self.session

    def _current_model(self) -> str:
        if self.session is not None:
            return self.session.model
        return str(self._options.get("model") or _NO_MODEL)

    def _load_models(self, session: Session) -> None:
        async def load() -> None:
            try:
                models = await session.client.list_models()
            except Exception:  # the configured model stays the only choice
                logger.debug("nbchat panel: could not list the server's models", exc_info=True)
                return
            self._set_models(models, session.model)

        submit(load())

    def _set_models(self, models: list[str], current: str) -> None:
        with self._lock:
            self._quiet_picker = True
            try:
                self.model_picker.options = sorted({*models, current})
                self.model_picker.value = current
            finally:
                self._quiet_picker = False

    def _on_pick(self, change: dict[str, Any]) -> None:
        name = change["new"]
        if self._quiet_picker or not name or name == _NO_MODEL:
            return
        if self.session is not None and name != self.session.model:
            self.session.set_model(name)
            self._render_status()

    def _on_input_msg(self, widget: Any, content: Any, buffers: Any) -> None:
        if not isinstance(content, dict) or content.get("type") != "submit":
            return
        text = str(content.get("text", ""))
        future = self.submit(text)
        # Not sent (busy, or no session): the box was cleared, so give the text back.
        if future.done() and future.result() is None and not self.input.value:
            self.input.value = text

    # ------------------------------------------------------------------ status line

    def _set_busy_controls(self, busy: bool) -> None:
        with self._lock:
            self.input.busy = busy
            self.send_button.disabled = busy
            self.stop_button.disabled = not busy
            self.new_button.disabled = busy
            self.model_picker.disabled = busy

    def _set_state(self, state: PanelState, detail: str | None = None) -> None:
        with self._lock:
            self.state = state
            if detail is not None:
                self._detail = detail
            self._render_status()

    def _set_detail(self, detail: str) -> None:
        with self._lock:
            self._detail = detail
            self._render_status()

    def _render_status(self) -> None:
        with self._lock:
            parts = [self._current_model()]
            if self.session is not None:
                u = self.session.usage
                if u.total_tokens is not None:
                    parts.append(f"{u.total_tokens:,} tokens")
                elif self._known_tokens:
                    parts.append(f"≥ {self._known_tokens:,} tokens")
                else:
                    parts.append("tokens unknown")
                parts.append("cost unknown" if u.cost_usd is None else money(u.cost_usd))
            if self._turn_started is not None:
                parts.append(f"{time.monotonic() - self._turn_started:.1f} s")
            elif self._last_seconds is not None:
                parts.append(f"last reply {self._last_seconds:.1f} s")
            kind = "idle" if self.state == "idle" else "error" if self.state == "error" else "busy"
            detail = f" — {escape(clip(self._detail, 300))}" if self._detail else ""
            self.status_line.value = protect_dollars(
                f'<span class="nbchat-state-{kind}"><span class="nbchat-dot">●</span> '
                f"<b>{escape(self.state)}</b>{detail}</span> · "
                + " · ".join(escape(p) for p in parts)
            )


def panel(session: Session | str | None = None, **session_options: Any) -> ChatPanel:
    """A chat panel for a new session, a ``Session``, or a stored session's id.

    ``session_options`` are ``Session``'s keyword arguments (model, system, tools, db,
    ...), used for the new session and for "New chat". A stored session shows its
    history first. If the session cannot be made (no model or key configured), the
    panel still appears, says why, and tries again on Send.
    """
    if isinstance(session, Session):
        return ChatPanel(session, session_options)
    try:
        made = Session(session_id=session, **session_options)
    except NbchatError as exc:
        chat = ChatPanel(None, session_options, reopen=session)
        chat._set_state("error", str(exc))
        return chat
    return ChatPanel(made, session_options)


def history_html(history: Iterable[Message]) -> list[tuple[str, str]]:
    """A stored conversation as (role, HTML) bubbles, laid out like live turns."""
    bubbles: list[tuple[str, str]] = []
    for view in history_views(history):
        if view.user_text is not None:
            bubbles.append(("user", _user_html(view.user_text, view.user_images)))
        view.show_user_images = False
        if view.parts or view.badges:
            bubbles.append(("assistant", view.html()))
    return bubbles


def _user_html(text: str, images: Sequence[ImagePart]) -> str:
    """The user's bubble: thumbnails of what they attached above their text."""
    return thumbnails_html(images) + markdown_to_html(text, hard_wrap=True)


_NO_MODEL = "(no model)"
_MATH = 'class="nbchat-math"'
_TYPING = '<p class="nbchat-typing">…</p>'
_QUEUED = '<p class="nbchat-typing">queued: another turn on this session runs first…</p>'
# Set in the task of a turn this panel runs, so its session's events are told apart
# from those of turns that cells run on the same session.
_own_turn: contextvars.ContextVar[ChatPanel | None] = contextvars.ContextVar(
    "nbchat_panel_turn", default=None
)


def _badge(text: str) -> str:
    return f'<p class="nbchat-badge"><b>{protect_dollars(escape(text))}</b></p>'


def _done(value: TurnResult | None) -> concurrent.futures.Future[TurnResult | None]:
    future: concurrent.futures.Future[TurnResult | None] = concurrent.futures.Future()
    future.set_result(value)
    return future
