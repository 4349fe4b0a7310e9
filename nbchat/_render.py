"""What a turn looks like to a person: one model and one layout for cells and the panel.

``TurnView`` folds a turn's events — or a stored turn's messages (``history_views``) —
into *parts* in the order they happened: the text of round 1, its thinking, its tool
blocks, the text of round 2, notices, … then a status line and a footer (model,
tokens, cost, time). ``html()`` lays the parts out; the cell output, the panel and a
stored conversation all show that one layout. ``markdown()`` is the same layout with
the text as (safe) Markdown, for frontends that prefer Markdown. Model text goes
through ``_markup``, so raw HTML in it is shown as text and images as links.

``Throttle`` decides when a view is worth re-sending. Jupyter's server drops IOPub
messages past ~1,000/s and every update re-sends the whole turn, so updates are at most
``max_per_second`` (15) and, as the reply grows, only after it grew by a fraction of
what was already shown: the bytes sent over a reply stay within a constant factor of
its final length. While a turn is live, a huge reply shows only its tail (the browser
re-renders every update); the final update always carries the exact full text.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from ._markup import (
    clip,
    escape,
    highlight,
    pretty_json,
    protect_dollars,
    safe_markdown,
    to_html,
)
from ._types import (
    CompactionEvent,
    ErrorEvent,
    Event,
    ImagePart,
    LimitReached,
    Message,
    Notice,
    ReasoningDelta,
    TextBuffer,
    TextDelta,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnResult,
    TurnStarted,
    UsageEvent,
)
from ._usage_footer import KnownUsage, format_footer, lower_bound_footer

__all__ = [
    "STATUS_LABELS",
    "Throttle",
    "ToolBlock",
    "TurnView",
    "history_views",
]

STATUS_LABELS = {
    "interrupted": "⏹ Interrupted — the partial reply above was kept.",
    "max_rounds": "⚠ Stopped at the tool-call limit (max_rounds); the answer is best-effort.",
    "budget_exceeded": "⚠ Budget reached",
    "error": "⚠ Error",
    "rejected": "⚠ Rejected by a guardrail",
}
FAILED = ("error", "budget_exceeded", "rejected")  # statuses a cell ends with an error line
LIVE_TAIL = 20_000  # characters of a streaming text shown live; all of it at the end
BLOCK_CHARS = 2_000  # characters of a tool's arguments or result shown in its block


class Throttle:
    """Says when to push another display update.

    An update is due when at least ``1 / max_per_second`` seconds passed since the last
    one *and* the content grew by ``growth`` of what was last shown — or, so a slow
    stream never looks frozen, when ``max_interval`` seconds passed with anything new.
    """

    def __init__(
        self,
        max_per_second: float = 15.0,
        *,
        growth: float = 0.05,
        max_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_interval = 1.0 / max_per_second
        self.growth = growth
        self.max_interval = max_interval
        self.clock = clock
        self.last_at = -1e9
        self.last_size = 0
        self.updates = 0

    def due(self, size: int) -> bool:
        """Whether content of ``size`` characters should be shown now."""
        if size == self.last_size:
            return False
        waited = self.clock() - self.last_at
        if waited < self.min_interval:
            return False
        grown = size - self.last_size >= max(1, self.growth * self.last_size)
        return grown or waited >= self.max_interval

    def mark(self, size: int) -> None:
        """Record that content of ``size`` characters was just shown."""
        self.last_at = self.clock()
        self.last_size = size
        self.updates += 1


# ---------------------------------------------------------------------- parts

Source = Literal["notice", "limit", "error", "compaction"]


@dataclass
class TextPart:
    """Reply text of one round (``thinking``: the model's reasoning text).

    While the turn is live, finished blocks (text up to a blank line outside code) are
    rendered once and kept, so an update renders only the block still growing; and a
    huge text shows only its last ``LIVE_TAIL`` characters. The final rendering is of
    the whole text at once.
    """

    round: int
    thinking: bool = False
    buffer: TextBuffer = field(default_factory=TextBuffer)
    _html: tuple[int, str] | None = None  # (size, html) of the whole text
    _blocks: list[tuple[int, int, str]] = field(default_factory=list)  # (start, end, html)

    def html(self, live: bool) -> str:
        """The text as safe HTML (while ``live``: a bounded, approximate rendering)."""
        size = len(self.buffer)
        if self._html is not None and self._html[0] == size:
            return self._html[1]
        text = self.buffer.text()
        if not live:
            shown = to_html(text)
            self._html = (size, shown)
            return shown
        done = self._blocks[-1][1] if self._blocks else 0
        window = size - LIVE_TAIL
        if done < window:  # text above the window is not shown live: never rendered
            skip = _stable_end(text, done, window)
            if skip > done:
                self._blocks.append((done, skip, ""))
                done = skip
        end = _stable_end(text, done)
        if end - done >= BLOCK_MIN:
            self._blocks.append((done, end, to_html(text[done:end])))
            done = end
        kept = [b for b in self._blocks if b[1] > window]
        # A block still growing past the window (no blank line yet): its tail only.
        growing = max(done, window)
        hidden = kept[0][0] if kept else growing
        note = f"<p><i>… {hidden:,} characters above, shown when the reply is complete …</i></p>"
        return (note if hidden else "") + "".join(b[2] for b in kept) + to_html(text[growing:])

    def markdown(self, live: bool) -> str:
        """The text as safe Markdown (while ``live``, only the tail of a huge text)."""
        text = self.buffer.text()
        cut = 0
        if live and len(text) > LIVE_TAIL:
            cut = _stable_end(text, 0, len(text) - LIVE_TAIL) or len(text) - LIVE_TAIL
        note = (
            f"*… {cut:,} characters above, shown when the reply is complete …*\n\n" if cut else ""
        )
        return note + safe_markdown(text[cut:], dollar="<span>\\$</span>")


# Set apart from the answer (a trial found the open block looked just like it): inline,
# because a cell's output carries no stylesheet; the theme's colours where there is one.
THINKING_STYLE = (
    "color: var(--jp-content-font-color2, #666);"
    " border-left: 3px solid var(--jp-border-color2, #ccc); padding-left: 8px"
)

BLOCK_MIN = 2_000  # characters a live text grows by before a finished block is kept
_FENCE = re.compile(r"^ {0,3}(?:`{3,}|~{3,})", re.M)


def _stable_end(text: str, start: int, before: int | None = None) -> int:
    """The last blank line in ``text[start:before]`` outside a code fence (or ``start``)."""
    fences = [m.start() for m in _FENCE.finditer(text, start)]
    end = len(text) if before is None else before
    while True:
        boundary = text.rfind("\n\n", start, end)
        if boundary < 0:
            return start
        opened = bisect.bisect_left(fences, boundary)
        if opened % 2 == 0:
            return boundary + 2
        end = fences[opened - 1]  # inside a code block: look before it


@dataclass
class NoticePart:
    """A line from nbchat itself: a notice, a limit, an error, a compaction."""

    message: str
    source: Source = "notice"


@dataclass
class ToolBlock:
    """One tool call as shown: arguments stream in, then the result arrives."""

    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    result: str | None = None
    is_error: bool = False
    duration_ms: float | None = None
    started: float | None = None  # monotonic time the call began (live turns only)
    approval: Literal["waiting", "yes", "no"] | None = None
    waited_ms: float = 0.0  # time spent waiting for the user's approval
    images: list[ImagePart] = field(default_factory=list)  # what the tool returned

    @property
    def code(self) -> str | None:
        """The ``code`` argument of a code-running tool, if there is one."""
        try:
            args = json.loads("".join(self.arguments))
        except ValueError:
            return None
        code = args.get("code") if isinstance(args, dict) else None
        return code if isinstance(code, str) else None

    def state(self, now: float | None = None) -> str:
        """``running… 2.1 s``, ``waiting for your approval``, ``120 ms``, ``error · 3 ms``."""
        if self.approval == "waiting":
            return "waiting for your approval"
        if self.result is None:
            if self.started is None or now is None:
                return "running…"
            return f"running… {max(0.0, now - self.started - self.waited_ms / 1000):.1f} s"
        took = ""
        if self.duration_ms is not None:
            took = _duration(max(0.0, self.duration_ms - self.waited_ms))
        if self.approval == "no":
            return "skipped"
        if self.is_error:
            return " · ".join(p for p in ("error", took) if p)
        return took or "done"  # a block rebuilt from history has no duration

    def html(self, now: float | None = None) -> str:
        """A ``<details>`` block: name and state in the summary line; open while asking."""
        icon = "⚠" if self.is_error else "🔧"
        opened = " open" if self.approval == "waiting" else ""
        body = _arguments_html("".join(self.arguments), self.code)
        if self.approval == "waiting":
            body += "<p><b>Run this code?</b> Answer below.</p>"
        if self.result is not None:
            label = "error" if self.is_error else "result"
            body += f"<b>{label}</b>{_result_html(self.result)}"
        if self.images:
            body += thumbnails_html(self.images, height=THUMBNAIL_PX * 2)
        return (
            f"<details{opened}><summary>{icon} <code>{escape(self.name)}"
            f"</code> <small>({escape(self.state(now))})</small></summary>{body}</details>"
        )


Part = TextPart | NoticePart | ToolBlock

THUMBNAIL_PX = 120  # the height of an attachment's thumbnail
_SHOWN = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# Larger images show as their label: every live update of a cell re-sends its HTML.
MAX_THUMBNAIL_BYTES = 512 * 1024


def thumbnails_html(images: Iterable[ImagePart], *, height: int = THUMBNAIL_PX) -> str:
    """Images as a row of thumbnails; one sent by URL, or too large, shows as its label.

    Only bytes nbchat sniffed as PNG/JPEG/GIF/WebP become ``data:`` URLs, so nothing
    else can ride in an ``<img>``; a URL is never loaded (it would leave the notebook).
    """
    shown = []
    for image in images:
        label = escape(image.label)
        if image.data is None or image.size > MAX_THUMBNAIL_BYTES or image.mime not in _SHOWN:
            shown.append(f"<small>🖼 {label}</small>")
            continue
        shown.append(
            f'<img class="nbchat-thumb" src="{escape(image.source())}" alt="{label}" '
            f'title="{label}" style="max-height:{height}px;max-width:100%;margin:2px">'
        )
    return f'<div class="nbchat-images">{" ".join(shown)}</div>' if shown else ""


def _duration(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _pre(text: str, language: str = "") -> str:
    shown = clip(text, BLOCK_CHARS)
    colored = highlight(shown, language) if language else None
    return f"<pre><code>{colored if colored is not None else escape(shown)}</code></pre>"


def _arguments_html(arguments: str, code: str | None) -> str:
    if code is not None:  # the python tool: its code as code, not a JSON string
        return "<b>code</b>" + _pre(code, "python")
    return "<b>arguments</b>" + _pre(pretty_json(arguments))


def _result_html(result: str) -> str:
    try:
        payload = json.loads(result)
    except ValueError:
        return _pre(result)
    if isinstance(payload, dict) and payload.get("ok") is False and "message" in payload:
        # An error payload: its message (often a traceback) with real line breaks.
        kind = escape(str(payload.get("error_kind") or "error").replace("_", " "))
        return f" <small>({kind})</small>" + _pre(str(payload["message"]))
    return _pre(json.dumps(payload, indent=1, ensure_ascii=False))


# ---------------------------------------------------------------------- the view


class TurnView:
    """The visible state of one turn, updated event by event."""

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.parts: list[Part] = []
        self.tools: dict[str, ToolBlock] = {}
        self.size = 0
        self.result: TurnResult | None = None
        self.user_text: str | None = None
        self.user_images: list[ImagePart] = []  # what the user attached
        # Cells show the attachments at the top of the turn; the panel in the user's bubble.
        self.show_user_images = True
        self.badges: list[str] = []  # status lines of a stored turn
        self.started = time.monotonic()
        self.known = KnownUsage()  # the requests whose usage arrived (for the footer)
        self._text = TextBuffer()

    @property
    def text(self) -> str:
        """The reply text so far (every round's text, in order)."""
        return self._text.text()

    @property
    def notices(self) -> list[str]:
        """The notices shown, in order."""
        return [p.message for p in self.parts if isinstance(p, NoticePart)]

    def handle(self, event: Event) -> bool:
        """Fold one event in; return whether anything visible changed."""
        match event:
            case TurnStarted(attachments=images) if images:
                self.user_images = list(images)
                self.size += 1
            case TextDelta(text=text, round=round):
                self._append_text(text, round, thinking=False)
                self._text.append(text)
            case ReasoningDelta(text=text, round=round):
                self._append_text(text, round, thinking=True)
            case ToolCallStarted(call_id=call_id, name=name):
                self._block(call_id, name).started = time.monotonic()
                self.size += 1
            case ToolCallDelta(call_id=call_id, arguments_delta=fragment):
                if call_id in self.tools:
                    self.tools[call_id].arguments.append(fragment)
                    self.size += len(fragment)
            case ToolResult(call=call):
                block = self._block(call.call_id, call.name)
                block.arguments = [call.arguments]
                block.result, block.is_error = call.result, call.is_error
                block.duration_ms = call.duration_ms
                block.images = list(call.images or [])
                self.size += 1
            case Notice(message=message):
                self._notice(message, "notice")
            case LimitReached(message=message):
                self._notice(message, "limit")
            case ErrorEvent(message=message):
                self._notice(message, "error")
            case CompactionEvent():
                self._notice(_compaction_line(event), "compaction")
            case UsageEvent():
                self.known.add(event)
                return False  # counted for the footer, nothing shown yet
            case TurnFinished(result=result):
                self.result = result
                # The status line repeats a turn-ending error; show it once, there.
                self.parts = [
                    p
                    for p in self.parts
                    if not (
                        isinstance(p, NoticePart)
                        and p.source == "error"
                        and p.message == result.error
                    )
                ]
                self.size += 1
            case _:
                return False
        return True

    def _append_text(self, text: str, round: int, *, thinking: bool) -> None:
        last = self.parts[-1] if self.parts else None
        if not (isinstance(last, TextPart) and last.round == round and last.thinking == thinking):
            last = TextPart(round, thinking)
            self.parts.append(last)
        last.buffer.append(text)
        self.size += len(text)

    def _block(self, call_id: str, name: str) -> ToolBlock:
        if call_id not in self.tools:
            self.tools[call_id] = ToolBlock(call_id, name)
            self.parts.append(self.tools[call_id])
        return self.tools[call_id]

    def _notice(self, message: str, source: Source) -> None:
        self.parts.append(NoticePart(message, source))
        self.size += 1

    # -------------------------------------------------------------- approval

    def approval_block(self, code: str) -> ToolBlock | None:
        """The running block whose code is ``code`` (the python tool asking to run it)."""
        for block in self.tools.values():
            if block.result is None and block.approval is None and block.code == code:
                return block
        return None

    # -------------------------------------------------------------- layout

    def html(self, *, live: bool = False, show_failure: bool = True) -> str:
        """The turn as HTML, parts in order; ``live`` while it still runs."""
        return "\n".join(self._layout(lambda p: p.html(live), live, show_failure))

    def markdown(self, *, live: bool = False, show_failure: bool = True) -> str:
        """The same layout with the text as safe Markdown (blocks as inline HTML)."""

        def text(part: TextPart) -> str:
            return part.markdown(live)

        return "\n\n".join(self._layout(text, live, show_failure))

    def _layout(self, text: Callable[[TextPart], str], live: bool, show_failure: bool) -> list[str]:
        now = time.monotonic() if live else None
        answered = any(isinstance(p, TextPart) and not p.thinking for p in self.parts)
        out: list[str] = []
        if self.user_images and self.show_user_images:
            out.append(thumbnails_html(self.user_images))
        for part in self.parts:
            if isinstance(part, TextPart) and part.thinking:
                # Open while the model thinks; closed once the answer starts.
                opened = "" if answered or not live else " open"
                out.append(
                    f'<details class="nbchat-thinking" style="{THINKING_STYLE}"{opened}>'
                    f"<summary>💭 Thinking</summary>\n\n{text(part)}\n\n</details>"
                )
            elif isinstance(part, TextPart):
                out.append(text(part))
            elif isinstance(part, ToolBlock):
                out.append(part.html(now))
            else:
                out.append(_notice_html(part.message))
        out.extend(_badge_html(b) for b in self.badges)
        if self.result is not None:
            label = self.status_line(show_failure)
            if label:
                out.append(_badge_html(label))
            out.append(f'<p class="nbchat-footer"><small>{_line_html(self.footer())}</small></p>')
        return [p for p in out if p]

    def status_line(self, show_failure: bool = True) -> str | None:
        """The line saying how the turn ended, if it did not simply complete."""
        result = self.result
        if result is None or result.status == "completed":
            return None
        if result.status in FAILED and not show_failure:
            return None  # the cell ends with the same message as an error line
        if result.status == "max_rounds" and any(
            isinstance(p, NoticePart) and p.source == "limit" for p in self.parts
        ):
            return None  # the limit's own notice already says it
        label = STATUS_LABELS.get(result.status, result.status)
        if result.error and result.status != "interrupted":
            return f"{label}: {result.error}"
        return label

    def footer(self) -> str:
        """One line: model, tokens, cost (known parts of a partly unknown turn as ``≥``),
        time."""
        if self.result is None:
            return format_footer(self.model, None, time.monotonic() - self.started)
        seconds = self.result.duration_ms / 1000
        return lower_bound_footer(self.model, self.result, self.known, seconds)


def _line_html(text: str) -> str:
    return protect_dollars(escape(text))


def _notice_html(text: str) -> str:
    return f'<blockquote class="nbchat-notice">{_line_html(text)}</blockquote>'


def _badge_html(text: str) -> str:
    return f'<p class="nbchat-badge"><b>{_line_html(text)}</b></p>'


def _compaction_line(event: CompactionEvent) -> str:
    if event.error:
        return f"Context compaction failed ({event.error}); continuing uncompacted."
    return (
        f"Context compacted ({event.strategy}): "
        f"~{event.tokens_before} → ~{event.tokens_after} tokens."
    )


# ---------------------------------------------------------------------- stored turns


def history_views(history: Iterable[Message]) -> list[TurnView]:
    """A stored conversation as one view per turn (``user_text``: what the user said).

    Assistant and tool messages after a user message form that turn, in stored order.
    """
    views: list[TurnView] = []
    view: TurnView | None = None
    for m in history:
        if m.role == "user" and m.round is not None and view is not None:
            # The loop's own words within a turn, not the user's: the images tools returned
            # (shown in the last block) or the correction of an answer that did not fit.
            blocks = [p for p in view.parts if isinstance(p, ToolBlock)]
            if m.attachments and blocks:
                blocks[-1].images.extend(m.attachments or [])
            elif not m.attachments:
                view.parts.append(NoticePart(f"↻ {m.content or ''}", "notice"))
            continue
        if m.role == "user":
            view = TurnView()
            view.user_text = m.content or ""
            view.user_images = list(m.attachments or [])
            views.append(view)
            continue
        if m.role not in ("assistant", "tool"):
            continue
        if view is None:  # a conversation that starts with the assistant
            view = TurnView()
            views.append(view)
        if m.role == "assistant":
            if m.reasoning:  # a closed "Thinking" block, as the live turn ended with
                thought = TextPart(m.round or 0, thinking=True)
                thought.buffer.append(m.reasoning)
                view.parts.append(thought)
            if m.content:
                part = TextPart(m.round or 0)
                part.buffer.append(m.content)
                view.parts.append(part)
                view._text.append(m.content)
            for call in m.tool_calls or []:
                view._block(call.id, call.name).arguments = [call.arguments]
            if m.status == "interrupted":
                view.badges.append(STATUS_LABELS["interrupted"])
            elif m.status == "error":
                view.badges.append("⚠ This reply ended with an error.")
        elif m.tool_call_id:
            block = view._block(m.tool_call_id, m.name or "?")
            block.result, block.is_error = m.content or "", m.status != "ok"
    return views
