"""What a turn looks like to a person: one model and one layout for cells and the panel.

``TurnView`` folds a turn's events — or a stored turn's messages (``history_views``) —
into *parts* in the order they happened: the text of round 1, its thinking, its tool
blocks, the text of round 2, … then the turn's notices together, a status line and a
footer (model, tokens, cost, time). A notice never splits a text run: it can arrive
at any moment (the store's, from its writer's thread), mid-sentence. ``html()`` lays
the parts out; the cell output, the panel and a stored conversation all show that one
layout. ``markdown()`` is the same layout with
the text as (safe) Markdown, for frontends that prefer Markdown. Model text goes
through ``_markup``, so raw HTML in it is shown as text and images as links.

The parts themselves (text, tool blocks, notices, thumbnails) are drawn by
``_render_parts``; when an update is worth sending is ``_throttle``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from ._context import without_format_instruction
from ._events import (
    CompactionEvent,
    ErrorEvent,
    Event,
    LimitReached,
    Notice,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
)
from ._markup import clip, escape, protect_dollars
from ._render_parts import NoticePart, Part, Source, TextPart, ToolBlock, thumbnails_html
from ._tool_results import DECLINED, NOT_RUN
from ._types import SUMMARY_HEADER, ImagePart, Message, TextBuffer, TurnResult
from ._usage_footer import KnownUsage, format_footer, lower_bound_footer

__all__ = [
    "INTERRUPTED_EMPTY",
    "STATUS_LABELS",
    "TurnView",
    "badge_html",
    "history_views",
    "interrupted_label",
    "kept_text",
]


STATUS_LABELS = {
    "interrupted": "⏹ Interrupted — the partial reply above was kept.",
    "max_rounds": "⚠ Stopped at the tool-call limit (max_rounds); the answer is best-effort.",
    "budget_exceeded": "⚠ Budget reached",
    "error": "⚠ Error",
    "rejected": "⚠ Rejected by a guardrail",
}
FAILED = ("error", "budget_exceeded", "rejected")  # statuses a cell ends with an error line
NO_REPLY = "⚠ No reply was stored for this message."
# An interrupted turn that had no answer text yet: "the partial reply" would be made up.
INTERRUPTED_EMPTY = "⏹ Interrupted before any reply text arrived."


def interrupted_label(has_text: bool) -> str:
    """What an interrupted turn's badge says: a partial reply was kept, or there was none."""
    return STATUS_LABELS["interrupted"] if has_text else INTERRUPTED_EMPTY


def kept_text(result: TurnResult) -> bool:
    """Whether an (interrupted) turn kept any answer text, in any of its rounds."""
    return bool(result.text) or any(m.role == "assistant" and m.content for m in result.messages)


# Set apart from the answer (a trial found the open block looked just like it): inline,
# because a cell's output carries no stylesheet; the theme's colours where there is one.
THINKING_STYLE = (
    "color: var(--jp-content-font-color2, #666);"
    " border-left: 3px solid var(--jp-border-color2, #ccc); padding-left: 8px"
)


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
                if call.error_kind in (DECLINED, NOT_RUN):
                    block.approval = "no"  # shown as skipped
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
        # The text goes on in its run though notices arrived since (they show after it).
        last = next((p for p in reversed(self.parts) if not isinstance(p, NoticePart)), None)
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
            elif part.source != "notice":
                out.append(_notice_html(part.message))
        # Under the reply, not in its flow: the reply above does not move when one arrives.
        out.extend(
            _notice_html(p.message)
            for p in self.parts
            if isinstance(p, NoticePart) and p.source == "notice"
        )
        out.extend(badge_html(b) for b in self.badges)
        if self.result is not None:
            label = self.status_line(show_failure)
            if label:
                out.append(badge_html(label))
            out.append(f'<p class="nbchat-footer"><small>{_line_html(self.footer())}</small></p>')
        return [p for p in out if p]

    def status_line(self, show_failure: bool = True) -> str | None:
        """The line saying how the turn ended, if it did not simply complete."""
        result = self.result
        if result is None or result.status == "completed":
            return None
        if result.status in (*FAILED, "interrupted") and not show_failure:
            return None  # the cell ends with the same message as an error line
        if result.status == "max_rounds" and any(
            isinstance(p, NoticePart) and p.source == "limit" for p in self.parts
        ):
            return None  # the limit's own notice already says it
        if result.status == "interrupted":
            return interrupted_label(kept_text(result) or bool(self.text))
        label = STATUS_LABELS.get(result.status, result.status)
        if result.error:
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


def badge_html(text: str) -> str:
    """A status line of a turn (interrupted, an error...), in bold."""
    return f'<p class="nbchat-badge"><b>{_line_html(text)}</b></p>'


def _compaction_line(event: CompactionEvent) -> str:
    if event.error:
        return f"Context compaction failed ({event.error}); continuing uncompacted."
    return (
        f"Context compacted ({event.strategy}): "
        f"~{event.tokens_before} → ~{event.tokens_after} tokens."
    )


# Where a compacted conversation's history begins (the summary follows).
FOLDED_NOTE = (
    "⋯ The earlier turns were folded into this summary to save context space "
    "(nbchat.transcript(id, include_compacted=True) has them):"
)


def history_views(
    history: Iterable[Message], outcomes: Mapping[str, tuple[str, str | None]] | None = None
) -> list[TurnView]:
    """A stored conversation as one view per turn (``user_text``: what the user said).

    Assistant and tool messages after a user message form that turn, in stored order.
    ``outcomes`` (turn id → status and error, from the store's turns) marks a turn that
    failed with its error; a turn that stored no reply at all says so either way (a
    failed request stores none: the question stood alone, as if unanswered).
    """
    views: list[TurnView] = []
    asked: list[tuple[str | None, TurnView]] = []  # each user's turn id and its view
    view: TurnView | None = None
    for m in history:
        if m.role == "user" and m.round is not None and view is not None:
            # The loop's own words within a turn, not the user's: the images tools returned
            # (shown in the last block) or the correction of an answer that did not fit.
            blocks = [p for p in view.parts if isinstance(p, ToolBlock)]
            if m.attachments and blocks:
                blocks[-1].images.extend(m.attachments or [])
            elif not m.attachments:
                view.parts.append(NoticePart(f"↻ {m.content or ''}", "loop"))
            continue
        if m.role == "user":
            view = TurnView()
            view.user_text = without_format_instruction(m.content or "")
            view.user_images = list(m.attachments or [])
            views.append(view)
            asked.append((m.turn_id, view))
            continue
        if m.status == "summary":  # what compaction folded: said, and its summary shown
            view = TurnView()
            view.parts.append(NoticePart(FOLDED_NOTE, "loop"))
            summary = TextPart(m.round or 0)
            summary.buffer.append((m.content or "").removeprefix(SUMMARY_HEADER))
            view.parts.append(summary)
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
                view.badges.append(interrupted_label(bool(m.content)))
            elif m.status == "error":
                view.badges.append("⚠ This reply ended with an error.")  # see _mark_outcome
        elif m.tool_call_id:
            block = view._block(m.tool_call_id, m.name or "?")
            skipped = m.status in ("declined", "not_run")
            block.result, block.is_error = m.content or "", m.status != "ok" and not skipped
            if skipped:
                block.approval = "no"
    for turn_id, asked_view in asked:
        _mark_outcome(asked_view, (outcomes or {}).get(turn_id or ""))
    return views


def _mark_outcome(view: TurnView, outcome: tuple[str, str | None] | None) -> None:
    """Say what became of a stored turn that failed, or stored no reply."""
    if outcome is not None and outcome[0] in FAILED:
        status, error = outcome
        said = STATUS_LABELS[status] + (f": {clip(error, 300)}" if error else "")
        generic = "⚠ This reply ended with an error."  # its stored reply's mark: now said
        view.badges = [b for b in view.badges if b not in (generic, said)] + [said]
    elif not view.parts and not view.badges:
        view.badges.append(NO_REPLY)
