"""The pieces a turn is shown as, each drawn on its own: text, notices, tool blocks, images.

``TextPart`` is one round's reply (or thinking) text as safe HTML or Markdown; while the
turn is live a huge text shows only its tail and finished blocks are rendered once.
``ToolBlock`` is one tool call as a ``<details>`` block (arguments, result, state,
approval); ``NoticePart`` a line from nbchat itself; ``thumbnails_html`` the images
attached or returned. ``_render.TurnView`` puts them in order and adds the status line
and footer.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ._markup import PRE, clip, escape, highlight, pretty_json, safe_markdown, to_html
from ._types import ImagePart, TextBuffer

__all__ = [
    "BLOCK_CHARS",
    "LIVE_TAIL",
    "NoticePart",
    "Part",
    "Source",
    "TextPart",
    "ToolBlock",
    "thumbnails_html",
]


LIVE_TAIL = 20_000  # characters of a streaming text shown live; all of it at the end
BLOCK_CHARS = 2_000  # characters of a tool's arguments or result shown in its block
BLOCK_MIN = 2_000  # characters a live text grows by before a finished block is kept
_FENCE = re.compile(r"^ {0,3}(?:`{3,}|~{3,})", re.M)
# "notice": a line about the turn (the store, the budget, a cut reply), shown with the
# others under the reply; the rest stay where they happened: "loop" is the loop's own
# line within a stored turn (a correction, where folded history begins).
Source = Literal["notice", "limit", "error", "compaction", "loop"]


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
        return note + safe_markdown(text[cut:])


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
            # The recorded duration already leaves the approval wait out (_tool_threads);
            # taking it off again showed an approved python call as "0 ms" (a trial).
            took = _duration(self.duration_ms)
        if self.approval == "no":  # the user said no, or past max_rounds (live or stored)
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
            label = "error" if self.is_error else "skipped" if self.approval == "no" else "result"
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
    return f"{PRE}<code>{colored if colored is not None else escape(shown)}</code></pre>"


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
