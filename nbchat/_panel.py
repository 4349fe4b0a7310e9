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

A panel on a session that cells also use shows their turns as they happen (it listens
to the session's events), and a Send while such a turn runs waits for it ("queued").
The python tool's ``ask`` mode asks with Run / Skip buttons under the turn.

Its parts: the input box is a small anywidget with the panel's styles
(``_panel_input``), the bubbles and the Run / Skip row are ``_panel_transcript``'s, the
model picker ``_panel_models``', the status line ``_panel_status``', and where each
part sits ``_panel_layout``'s. This module runs the turns and keeps the state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ._events import (
    Event,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
)
from ._exceptions import NbchatError
from ._panel_input import ChatInput
from ._panel_layout import arrange
from ._panel_models import FIRST_LIST_WAIT, NO_MODEL, ModelPicker
from ._panel_status import (
    PanelState,
    end_state,
    next_state,
    reply_fact,
    status_html,
    stopped_detail,
    usage_facts,
)
from ._panel_transcript import (
    MATH,
    QUEUED,
    TYPING,
    ApprovalRow,
    history_html,
    markdown_to_html,
    message_bubble,
    turn_html,
    user_html,
)
from ._pricing import price_request
from ._pytool import asking
from ._render import TurnView
from ._runner import submit
from ._session import Session
from ._throttle import Throttle
from ._types import RequestUsage, TurnResult

__all__ = ["ChatInput", "ChatPanel", "panel"]

logger = logging.getLogger("nbchat")

# What Enter (or submit()) says while the panel's own reply streams; the text stays put.
STILL_ANSWERING = "Still answering — press ■ Stop, or send when it ends."
TICK_SECONDS = 0.5  # how often the elapsed time in the status line moves while busy


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
        # Characters the running turn streamed (reply, reasoning, tool arguments), and
        # those since the last request the server counted: the reply's estimated size.
        self._streamed_chars = 0
        self._uncounted_chars = 0
        self._live: tuple[TurnView, widgets.HTML] | None = None  # this panel's turn
        self._mirror: tuple[TurnView, widgets.HTML, Throttle] | None = None  # a cell's turn

        self.model_picker = ModelPicker(
            self._current_model(), lock=self._lock, on_pick=self._on_pick
        )
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
        header, buttons = [self.model_picker, self.new_button], [self.send_button, self.stop_button]
        super().__init__(arrange(header, self.messages, self.input, buttons, self.status_line))
        self.add_class("nbchat-panel")
        if session is not None:
            self._show_history(session)
            self._watch(session)
            self.model_picker.load(session, wait=FIRST_LIST_WAIT)
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
                self._set_detail(STILL_ANSWERING)
                return _done(None)
            session = self._ensure_session()
            if session is None:
                return _done(None)
            self._busy, self._stop_requested = True, False
            self._turn_started = time.monotonic()
            self._streamed_chars = self._uncounted_chars = 0
            if from_box:
                self.input.value = ""
            self._append("user", markdown_to_html(text, hard_wrap=True))
            bubble = self._append("assistant", TYPING)
            self._set_busy_controls(True)
            if self._mirror is not None:  # a cell's turn on this session runs first
                bubble.value = QUEUED
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
            self._last_seconds = None  # "last reply 10.6 s" was the old chat's
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
                    self._measure(event)
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
        row = ApprovalRow()
        with self._lock:
            if block is not None:
                block.approval = "waiting"
            self.messages.children = (*self.messages.children, row)
            self._show_turn(bubble, view, live=True)
            self._set_state("waiting for you", "Run or Skip the code")
        asked = time.monotonic()
        try:
            yes = row.wait()
            with self._lock:
                if block is not None:
                    block.waited_ms = (time.monotonic() - asked) * 1000
                    block.approval = "yes" if yes else "no"
                self._show_turn(bubble, view, live=True)
                self._set_state("running tool" if yes else "waiting", "")
        finally:  # also when Stop interrupts this thread
            self._drop_approval()
        return yes

    def _drop_approval(self) -> None:
        with self._lock:
            rows = [c for c in self.messages.children if "nbchat-approval" in c._dom_classes]
            if rows:
                self.messages.children = tuple(c for c in self.messages.children if c not in rows)
        for row in rows:
            row.close()

    def _measure(self, event: Any) -> None:
        """Count what the panel's turn streams, for its estimated size (``reply_fact``)."""
        match event:
            case TextDelta(text=text) | ReasoningDelta(text=text):
                grown = len(text)
            case ToolCallDelta(arguments_delta=text):
                grown = len(text)
            case UsageEvent(usage=RequestUsage(total_tokens=int())):
                self._uncounted_chars = 0  # the server counted the request
                return
            case _:
                return
        self._streamed_chars += grown
        self._uncounted_chars += grown

    def _follow(self, event: Any) -> None:
        """Move the status line's state along with the turn."""
        moved = next_state(event, self.state)
        if moved is not None:
            self._set_state(*moved)

    def _finish(self, result: TurnResult | None, failure: str | None) -> None:
        with self._lock:
            if self._turn_started is not None:
                self._last_seconds = time.monotonic() - self._turn_started
            self._busy, self._turn_started = False, None
            self._set_busy_controls(False)
            state, detail = end_state(result, failure)
            if result is not None and result.status == "interrupted" and self._uncounted_chars:
                detail = stopped_detail(self._estimated(self._uncounted_chars))
            self._set_state(state, detail)

    def _estimated(self, chars: int) -> int:
        session = self.session
        return 0 if session is None else session.estimator.text_tokens(chars)

    def _show_turn(
        self,
        bubble: widgets.HTML,
        view: TurnView,
        *,
        live: bool = False,
        failure: str | None = None,
    ) -> None:
        shown = turn_html(view, live=live, failure=failure)
        with self._lock:
            if not live and MATH in shown and not isinstance(bubble, widgets.HTMLMath):
                # Typeset once the text is complete (not on every streamed update).
                math = message_bubble("assistant", shown)
                self.messages.children = tuple(
                    math if c is bubble else c for c in self.messages.children
                )
                bubble.close()
            else:
                bubble.value = shown

    # ------------------------------------------------------------------ transcript

    def _append(self, role: str, content: str) -> widgets.HTML:
        shown = message_bubble(role, content)
        with self._lock:
            self.messages.children = (*self.messages.children, shown)
        return shown

    def _show_history(self, session: Session) -> None:
        for role, content in history_html(session.history, session.turn_outcomes()):
            self._append(role, content)

    def _watch(self, session: Session) -> None:
        """Show turns that other front ends (``%%chat`` cells) run on ``session`` too."""

        def on_event(event: Event) -> None:
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
                self._append("user", user_html(event.text, event.attachments or []))
                bubble = self._append("assistant", TYPING)
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
        picked = self.model_picker.picked
        if picked is not None:
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
            self._show_history(self.session)
        self._watch(self.session)
        self.model_picker.load(self.session)
        return self.session

    def _current_model(self) -> str:
        if self.session is not None:
            return self.session.model
        return str(self._options.get("model") or NO_MODEL)

    def _on_pick(self, name: str) -> None:
        if self.session is not None and name != self.session.model:
            self.session.set_model(name)
            self._render_status()

    def _on_input_msg(self, widget: Any, content: Any, buffers: Any) -> None:
        if not isinstance(content, dict):
            return
        if content.get("type") == "busy":  # Enter while a reply streams: the box kept it
            with self._lock:
                if self._busy:
                    self._set_detail(STILL_ANSWERING)
            return
        if content.get("type") != "submit":
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
            facts = [self._current_model()]
            if self.session is not None:
                if self._busy and self._streamed_chars:
                    facts.append(reply_fact(self._estimated(self._streamed_chars)))
                facts += usage_facts(
                    self.session.usage, busy=self._busy, priced=_priced(self.session)
                )
            if self._turn_started is not None:
                facts.append(f"{time.monotonic() - self._turn_started:.1f} s")
            elif self._last_seconds is not None:
                facts.append(f"last reply {self._last_seconds:.1f} s")
            self.status_line.value = status_html(self.state, self._detail, facts)


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


# Set in the task of a turn this panel runs, so its session's events are told apart
# from those of turns that cells run on the same session.
_own_turn: contextvars.ContextVar[ChatPanel | None] = contextvars.ContextVar(
    "nbchat_panel_turn", default=None
)


def _priced(session: Session) -> bool:
    """Whether a request of the session's current model can be priced at all."""
    probe = RequestUsage(prompt_tokens=1, completion_tokens=1)
    return price_request(session.model, session.client.settings.base_url, probe)[0] is not None


def _done(value: TurnResult | None) -> concurrent.futures.Future[TurnResult | None]:
    future: concurrent.futures.Future[TurnResult | None] = concurrent.futures.Future()
    future.set_result(value)
    return future
