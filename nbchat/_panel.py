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

The input box is a small anywidget: ipywidgets' ``Textarea`` cannot tell Enter from
Shift+Enter (both just change the value), and ``Text`` has no newlines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, cast

import anywidget
import ipywidgets as widgets
import mistune
import traitlets

from ._exceptions import NbchatError
from ._render import STATUS_LABELS, Throttle, ToolBlock, TurnView
from ._runner import submit
from ._session import Session
from ._types import (
    Message,
    MessageAdded,
    TextDelta,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnResult,
    TurnStarted,
)

__all__ = ["ChatInput", "ChatPanel", "markdown_to_html", "panel"]

logger = logging.getLogger("nbchat")

State = str  # "idle" | "waiting" | "streaming" | "running tool" | "error"
TICK_SECONDS = 0.5  # how often the elapsed time in the status line moves while busy

_INPUT_ESM = """
function render({ model, el }) {
  const box = document.createElement("textarea");
  box.className = "nbchat-textarea";
  box.rows = 2;
  const sync = () => {
    box.placeholder = model.get("placeholder");
    box.disabled = model.get("disabled");
    if (box.value !== model.get("value")) box.value = model.get("value");
  };
  const push = () => { model.set("value", box.value); model.save_changes(); };
  box.addEventListener("input", push);
  // Keys typed here are not notebook shortcuts (JupyterLab and Notebook 7 run the cell on
  // Shift+Enter anywhere in a notebook). Lumino skips shortcuts for elements marked with
  // this attribute; Notebook 7 sees the key before the box does, so stopping it is not
  // enough there. Stopping it too keeps other hosts out of the way.
  box.setAttribute("data-lm-suppress-shortcuts", "true");
  box.addEventListener("keypress", (event) => event.stopPropagation());
  box.addEventListener("keydown", (event) => {
    event.stopPropagation();
    // Shift+Enter is left to the browser, which inserts a newline.
    if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
    event.preventDefault();
    if (model.get("busy") || !box.value.trim()) return;  // keep the text for later
    const text = box.value;
    box.value = "";
    push();
    model.send({ type: "submit", text });
  });
  for (const name of ["value", "placeholder", "disabled"]) model.on(`change:${name}`, sync);
  sync();
  el.classList.add("nbchat-input");
  el.appendChild(box);
  return () => {
    for (const name of ["value", "placeholder", "disabled"]) model.off(`change:${name}`, sync);
  };
}
export default { render };
"""

# Theme variables with fallbacks, so the panel looks right in JupyterLab (light and
# dark), Notebook 7 and Voila alike.
_PANEL_CSS = """
.nbchat-panel { border: 1px solid var(--jp-border-color2, #ddd); border-radius: 8px;
  padding: 8px; max-width: 920px; background: var(--jp-layout-color0, #fff); }
.nbchat-panel .nbchat-header { align-items: center; gap: 6px; }
.nbchat-panel .nbchat-title { font-weight: 600; margin-right: auto; }
.nbchat-panel .nbchat-scroll { display: flex; flex-direction: column-reverse;
  overflow-y: auto; min-height: 8em; max-height: 30em; margin: 6px 0;
  border-top: 1px solid var(--jp-border-color3, #eee);
  border-bottom: 1px solid var(--jp-border-color3, #eee); }
.nbchat-panel .nbchat-messages { flex-shrink: 0; padding: 4px 2px; }
.nbchat-panel .nbchat-msg { margin: 4px 0; padding: 2px 12px; border-radius: 10px;
  height: auto; overflow-x: auto; }
.nbchat-panel .nbchat-msg .widget-html-content { line-height: 1.45; }
.nbchat-panel .nbchat-msg p { margin: 0.45em 0; }
.nbchat-panel .nbchat-msg pre { background: var(--jp-layout-color2, #f4f4f4);
  padding: 6px 8px; border-radius: 4px; overflow-x: auto; line-height: 1.3; }
.nbchat-panel .nbchat-msg details { margin: 4px 0; font-size: 0.92em; }
.nbchat-panel .nbchat-user { align-self: flex-end; max-width: 85%;
  background: var(--jp-brand-color3, #dbe9f7); }
.nbchat-panel .nbchat-assistant { align-self: stretch;
  background: var(--jp-cell-editor-background, #f7f7f7); }
.nbchat-panel .nbchat-badge { font-weight: 600; margin: 0.45em 0; }
.nbchat-panel .nbchat-notice { border-left: 3px solid var(--jp-warn-color1, #e0a000);
  padding-left: 8px; margin: 0.45em 0; }
.nbchat-panel .nbchat-footer { color: var(--jp-ui-font-color2, #777); font-size: 0.85em; }
.nbchat-panel .nbchat-typing { color: var(--jp-ui-font-color2, #777); }
.nbchat-panel .nbchat-row { align-items: flex-start; gap: 6px; }
.nbchat-panel .nbchat-input { flex: 1 1 auto; }
.nbchat-panel .nbchat-textarea { width: 100%; box-sizing: border-box; resize: vertical;
  font: inherit; padding: 6px 8px; border-radius: 6px;
  border: 1px solid var(--jp-border-color1, #bbb);
  background: var(--jp-layout-color0, #fff); color: var(--jp-ui-font-color0, #000); }
.nbchat-panel .nbchat-buttons { gap: 4px; }
.nbchat-panel .nbchat-status { color: var(--jp-ui-font-color2, #666); font-size: 0.88em; }
.nbchat-panel .nbchat-status .widget-html-content { line-height: 1.6; }
.nbchat-panel .nbchat-dot { font-size: 0.9em; }
.nbchat-panel .nbchat-state-idle .nbchat-dot { color: #3a3; }
.nbchat-panel .nbchat-state-error .nbchat-dot { color: #c33; }
.nbchat-panel .nbchat-state-busy .nbchat-dot { color: #e0a000; }
"""


class _SafeRenderer(mistune.HTMLRenderer):
    """Mistune's HTML renderer with raw HTML escaped and no remote images."""

    def link(self, text: str, url: str, title: str | None = None) -> str:
        # A link must not navigate the notebook page away.
        return (
            f'<a href="{self.safe_url(url)}" target="_blank" rel="noopener noreferrer">{text}</a>'
        )

    def image(self, text: str, url: str, title: str | None = None) -> str:
        # An image would be fetched as soon as a reply streams in, so a prompt-injected
        # reply could leak data in its URL: show a link the user may choose to open.
        return "🖼 " + self.link(text or html.escape(url), url)


_PLUGINS = ["strikethrough", "table", "url"]
_markdown = mistune.create_markdown(renderer=_SafeRenderer(escape=True), plugins=_PLUGINS)
# What a person typed keeps its line breaks (Shift+Enter), as chat boxes do.
_markdown_typed = mistune.create_markdown(
    renderer=_SafeRenderer(escape=True), plugins=_PLUGINS, hard_wrap=True
)
_markdown_lock = threading.Lock()


def markdown_to_html(text: str, *, hard_wrap: bool = False) -> str:
    """Markdown to HTML that is safe to show: raw HTML is escaped, harmful URLs dropped.

    ``hard_wrap=True`` turns every newline into a line break.
    """
    with _markdown_lock:
        return cast(str, (_markdown_typed if hard_wrap else _markdown)(text))


class ChatInput(anywidget.AnyWidget):
    """A text box where Enter sends (a ``submit`` message) and Shift+Enter adds a line.

    ``value`` follows what is typed; while ``busy`` is true, Enter keeps the text.
    """

    _esm = _INPUT_ESM
    _css = _PANEL_CSS
    value = traitlets.Unicode("").tag(sync=True)
    placeholder = traitlets.Unicode("").tag(sync=True)
    disabled = traitlets.Bool(False).tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)


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
        self.state: State = "idle"
        self.last_error: BaseException | None = None  # an unexpected failure, for debugging
        self._options = dict(options)
        self._reopen = reopen  # a stored session to open on Send, if opening it failed
        self._lock = threading.RLock()
        self._busy = False
        self._stop_requested = False
        self._future: concurrent.futures.Future[TurnResult | None] | None = None
        self._turn_started: float | None = None
        self._last_seconds: float | None = None
        self._detail = ""
        self._quiet_picker = False

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
        super().close()

    # ------------------------------------------------------------------ the turn

    async def _run(self, session: Session, text: str, bubble: widgets.HTML) -> TurnResult | None:
        """Stream one turn into ``bubble`` (on the background loop)."""
        view = TurnView(session.model)
        throttle = Throttle()
        result: TurnResult | None = None
        failure: str | None = None
        ticker = asyncio.ensure_future(self._tick())
        try:
            async for event in session.stream(text):
                if isinstance(event, TurnStarted) and self._stop_requested:
                    session.cancel()  # Stop was clicked before the turn could be cancelled
                self._follow(event)
                if isinstance(event, TurnFinished):
                    result = event.result
                if view.handle(event) and throttle.due(view.size):
                    self._show_turn(bubble, view)
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
            self._show_turn(bubble, view, failure)  # always the exact, complete text
            self._finish(result, failure)
        return result

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self._render_status()

    def _follow(self, event: Any) -> None:
        """Move the status line's state along with the turn."""
        match event:
            case TextDelta():
                if self.state != "streaming":
                    self._set_state("streaming")
            case ToolCallStarted(name=name):
                self._set_state("streaming", f"calling {name}")
            case MessageAdded(message=Message(role="assistant", tool_calls=calls)) if calls:
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

    def _show_turn(self, bubble: widgets.HTML, view: TurnView, failure: str | None = None) -> None:
        parts = [b.html() for b in view.tools.values()]
        if view.text:
            parts.append(markdown_to_html(view.text))
        elif view.result is None and failure is None and not view.tools:
            parts.append(_TYPING)
        parts.extend(_notice(n) for n in view.notices)
        if failure is not None:
            parts.append(_badge(f"⚠ {failure}"))
        if view.result is not None:
            if view.result.status != "completed":
                parts.append(_badge(_status_text(view.result)))
            parts.append(f'<div class="nbchat-footer">{html.escape(view.footer())}</div>')
        with self._lock:
            bubble.value = "\n".join(parts)

    # ------------------------------------------------------------------ transcript

    def _append(self, role: str, content: str) -> widgets.HTML:
        bubble = widgets.HTML(content)
        bubble.add_class("nbchat-msg")
        bubble.add_class(f"nbchat-{role}")
        with self._lock:
            self.messages.children = (*self.messages.children, bubble)
        return bubble

    def _show_history(self, history: Iterable[Message]) -> None:
        for role, content in history_html(history):
            self._append(role, content)

    # ------------------------------------------------------------------ session, models

    def _ensure_session(self) -> Session | None:
        if self.session is not None:
            return self.session
        options = dict(self._options)
        picked = self.model_picker.value
        if picked and picked != _NO_MODEL:
            options["model"] = picked
        try:
            self.session = Session(session_id=self._reopen, **options)
        except NbchatError as exc:
            self._set_state("error", str(exc))
            return None
        if self._reopen is not None:
            self._reopen = None
            self._show_history(self.session.history)
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

    def _set_state(self, state: State, detail: str | None = None) -> None:
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
                tokens = u.total_tokens
                parts.append("tokens unknown" if tokens is None else f"{tokens:,} tokens")
                parts.append("cost unknown" if u.cost_usd is None else f"${u.cost_usd:.4f}")
            if self._turn_started is not None:
                parts.append(f"{time.monotonic() - self._turn_started:.1f} s")
            elif self._last_seconds is not None:
                parts.append(f"last reply {self._last_seconds:.1f} s")
            kind = "idle" if self.state == "idle" else "error" if self.state == "error" else "busy"
            detail = f" — {html.escape(_clip(self._detail, 300))}" if self._detail else ""
            self.status_line.value = (
                f'<span class="nbchat-state-{kind}"><span class="nbchat-dot">●</span> '
                f"<b>{html.escape(self.state)}</b>{detail}</span> · "
                + " · ".join(html.escape(p) for p in parts)
            )


def panel(session: Session | str | None = None, **session_options: Any) -> ChatPanel:
    """A chat panel for a new session, a ``Session``, or a stored session's id.

    ``session_options`` are ``Session``'s keyword arguments (model, system, tools, db,
    ...), used for the new session and for "New chat". A stored session shows its
    history first. If the session cannot be made (no model or key configured), the
    panel still appears, says why, and tries again on Send.
    """
    if isinstance(session, Session):
        return ChatPanel(session, {**_options_like(session), **session_options})
    try:
        made = Session(session_id=session, **session_options)
    except NbchatError as exc:
        chat = ChatPanel(None, session_options, reopen=session)
        chat._set_state("error", str(exc))
        return chat
    return ChatPanel(made, session_options)


def history_html(history: Iterable[Message]) -> list[tuple[str, str]]:
    """A stored conversation as (role, HTML) bubbles, shown like live turns.

    Consecutive assistant and tool messages form one bubble: tool blocks, then text.
    """
    bubbles: list[tuple[str, str]] = []
    blocks: dict[str, ToolBlock] = {}
    texts: list[str] = []
    badges: list[str] = []

    def flush() -> None:
        if blocks or texts or badges:
            parts = [b.html() for b in blocks.values()]
            parts += [markdown_to_html(t) for t in texts] + badges
            bubbles.append(("assistant", "\n".join(parts)))
        blocks.clear()
        texts.clear()
        badges.clear()

    for m in history:
        if m.role == "user":
            flush()
            bubbles.append(("user", markdown_to_html(m.content or "", hard_wrap=True)))
        elif m.role == "assistant":
            for call in m.tool_calls or []:
                blocks[call.id] = ToolBlock(call.id, call.name, [call.arguments])
            if m.content:
                texts.append(m.content)
            if m.status == "interrupted":
                badges.append(_badge(STATUS_LABELS["interrupted"]))
            elif m.status == "error":
                badges.append(_badge("⚠ This reply ended with an error."))
        elif m.role == "tool" and m.tool_call_id:
            block = blocks.setdefault(m.tool_call_id, ToolBlock(m.tool_call_id, m.name or "?"))
            block.result, block.is_error = m.content or "", m.status != "ok"
    flush()
    return bubbles


def _options_like(session: Session) -> dict[str, Any]:
    """Options that make a new session like ``session`` (for "New chat")."""
    settings = session.client.settings
    b = session.budgets
    return {
        "base_url": settings.base_url,
        "api_key": settings.api_key.get_secret_value(),
        "db": session.store if session.store is not None else False,
        "system": session.system,
        "tools": [session.tools[name] for name in session.tools.names()],
        "max_rounds": session.max_rounds,
        "budget_usd": b.budget_usd,
        "turn_budget_usd": b.turn_budget_usd,
        "max_tokens_total": b.max_tokens_total,
        "turn_max_tokens": b.turn_max_tokens,
    }


_NO_MODEL = "(no model)"
_TYPING = '<p class="nbchat-typing">…</p>'


def _status_text(result: TurnResult) -> str:
    label = STATUS_LABELS.get(result.status, result.status)
    if result.error and result.status != "interrupted":
        return f"{label}: {result.error}"
    return label


def _badge(text: str) -> str:
    return f'<div class="nbchat-badge">{html.escape(text)}</div>'


def _notice(text: str) -> str:
    return f'<div class="nbchat-notice">{html.escape(text)}</div>'


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _done(value: TurnResult | None) -> concurrent.futures.Future[TurnResult | None]:
    future: concurrent.futures.Future[TurnResult | None] = concurrent.futures.Future()
    future.set_result(value)
    return future
