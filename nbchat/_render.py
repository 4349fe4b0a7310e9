"""What a turn looks like to a person, shared by the cell renderer and the panel.

``TurnView`` folds a turn's events into what is shown: the reply text, one compact
block per tool call, notices, and a footer line (model, tokens, cost, time).
``Throttle`` decides when a view is worth re-sending. Both front ends use the two, so a
reply looks and paces the same in a cell and in the panel.

Pacing: Jupyter's server drops IOPub messages past ~1,000/s and every update re-sends
the whole text, so updates are at most ``max_per_second`` (15) and, as the reply grows,
only after it grew by a fraction of what was already shown. The bytes sent over a
whole reply then stay within a constant factor of its final length, however long it is
and however fast tokens arrive. The final update always carries the exact full text.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._types import (
    CompactionEvent,
    ErrorEvent,
    Event,
    LimitReached,
    Notice,
    TextBuffer,
    TextDelta,
    ToolCallDelta,
    ToolCallStarted,
    ToolResult,
    TurnFinished,
    TurnResult,
)

__all__ = ["Throttle", "ToolBlock", "TurnView", "format_footer"]

STATUS_LABELS = {
    "interrupted": "⏹ Interrupted — the partial reply above was kept.",
    "max_rounds": "⚠ Stopped at the tool-call limit (max_rounds); the answer is best-effort.",
    "budget_exceeded": "⚠ Budget reached",
    "error": "⚠ Error",
    "rejected": "⚠ Rejected by a guardrail",
}


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


@dataclass
class ToolBlock:
    """One tool call as shown: arguments stream in, then the result arrives."""

    call_id: str
    name: str
    arguments: list[str] = field(default_factory=list)
    result: str | None = None
    is_error: bool = False
    duration_ms: float | None = None

    def html(self, max_chars: int = 600) -> str:
        """A collapsed ``<details>`` block: name and state in the summary line."""
        args = "".join(self.arguments)
        with_spaces = _pretty_json(args)
        took = "" if self.duration_ms is None else f"{self.duration_ms:.0f} ms"
        if self.result is None:
            state = "running…"
        elif self.is_error:
            state = " · ".join(p for p in ("error", took) if p)
        else:
            state = took or "done"  # a block rebuilt from history has no duration
        icon = "⚠" if self.is_error else "🔧"
        body = f"<b>arguments</b><pre>{html.escape(_clip(with_spaces, max_chars))}</pre>"
        if self.result is not None:
            label = "error" if self.is_error else "result"
            body += f"<b>{label}</b><pre>{html.escape(_clip(self.result, max_chars))}</pre>"
        return (
            f"<details><summary>{icon} <code>{html.escape(self.name)}</code> "
            f"<small>({html.escape(state)})</small></summary>{body}</details>"
        )


class TurnView:
    """The visible state of one turn, updated event by event."""

    def __init__(self, model: str = "") -> None:
        self.model = model
        self.text_buffer = TextBuffer()
        self.size = 0
        self.tools: dict[str, ToolBlock] = {}
        self.notices: list[str] = []
        self.result: TurnResult | None = None
        self.started = time.monotonic()

    @property
    def text(self) -> str:
        """The reply text so far (every round's text, in order)."""
        return self.text_buffer.text()

    def handle(self, event: Event) -> bool:
        """Fold one event in; return whether anything visible changed."""
        match event:
            case TextDelta(text=text):
                self.text_buffer.append(text)
                self.size += len(text)
            case ToolCallStarted(call_id=call_id, name=name):
                self.tools[call_id] = ToolBlock(call_id, name)
                self.size += 1
            case ToolCallDelta(call_id=call_id, arguments_delta=fragment):
                if call_id in self.tools:
                    self.tools[call_id].arguments.append(fragment)
                    self.size += len(fragment)
            case ToolResult(call=call):
                block = self.tools.setdefault(call.call_id, ToolBlock(call.call_id, call.name))
                block.arguments = [call.arguments]
                block.result, block.is_error = call.result, call.is_error
                block.duration_ms = call.duration_ms
                self.size += 1
            case Notice(message=message) | LimitReached(message=message):
                self.notices.append(message)
                self.size += 1
            case ErrorEvent(message=message):
                # The turn's result repeats a turn-ending error; show it once, there.
                self.notices.append(message)
                self.size += 1
            case CompactionEvent():
                self.notices.append(_compaction_line(event))
                self.size += 1
            case TurnFinished(result=result):
                self.result = result
                if result.error and result.error in self.notices:
                    self.notices.remove(result.error)
                self.size += 1
            case _:
                return False
        return True

    def markdown(self) -> str:
        """The whole turn as Markdown (tool blocks and notices as inline HTML)."""
        parts = [self.text]
        if self.tools:
            parts.append("\n".join(b.html() for b in self.tools.values()))
        parts.extend(f"> {html.escape(n)}" for n in self.notices)
        if self.result is not None:
            label = STATUS_LABELS.get(self.result.status)
            if label and not (self.result.error and label.startswith("⚠")):
                parts.append(f"**{label}**")
            elif label:
                parts.append(f"**{label}:** {html.escape(self.result.error or '')}")
            parts.append(f"<small>{html.escape(self.footer())}</small>")
        return "\n\n".join(p for p in parts if p)

    def footer(self) -> str:
        """One line: model, tokens, cost (or "cost unknown"), time."""
        if self.result is None:
            return format_footer(self.model, None, time.monotonic() - self.started)
        return format_footer(self.model, self.result, self.result.duration_ms / 1000)


def format_footer(model: str, result: TurnResult | None, seconds: float) -> str:
    """``model · 1,234 tokens (1,000 in / 234 out) · $0.0012 · 2.3 s``."""
    parts = [model] if model else []
    if result is not None:
        u = result.usage
        if u.prompt_tokens is None or u.completion_tokens is None:
            parts.append("tokens unknown")
        else:
            parts.append(
                f"{u.prompt_tokens + u.completion_tokens:,} tokens "
                f"({u.prompt_tokens:,} in / {u.completion_tokens:,} out)"
            )
        parts.append("cost unknown" if u.cost_usd is None else f"${u.cost_usd:.4f}")
    parts.append(f"{seconds:.1f} s")
    return " · ".join(parts)


def _compaction_line(event: CompactionEvent) -> str:
    if event.error:
        return f"Context compaction failed ({event.error}); continuing uncompacted."
    return (
        f"Context compacted ({event.strategy}): "
        f"~{event.tokens_before} → ~{event.tokens_after} tokens."
    )


def _pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=1, ensure_ascii=False)
    except ValueError:
        return text


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"… [{len(text) - max_chars} more characters]"
