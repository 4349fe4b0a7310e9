"""The panel's status line: the states it names, what moves them, and the line itself.

``next_state`` says which state an event of the panel's own turn moves the line to
("thinking" while reasoning text streams, "writing" once the answer's text does,
"running tool", ...), ``end_state`` where the turn leaves it; ``status_html`` draws
the line: a dot coloured by state, the state and its detail, then the model, tokens,
cost and time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ._events import MessageAdded, ReasoningDelta, TextDelta, ToolCallStarted, ToolResult
from ._markup import clip, escape, money, protect_dollars
from ._text import counted
from ._types import Message, TurnResult, Usage

__all__ = [
    "PanelState",
    "end_state",
    "next_state",
    "reply_fact",
    "status_html",
    "stopped_detail",
    "usage_facts",
]

PanelState = Literal[
    "idle",
    "busy",
    "queued",
    "waiting",
    "thinking",
    "writing",
    "running tool",
    "waiting for you",
    "error",
]


def next_state(event: Any, state: PanelState) -> tuple[PanelState, str | None] | None:
    """The state and detail (``None``: the detail stays) that ``event`` moves the line to
    from ``state``; ``None`` when it stays as it is."""
    match event:
        case ReasoningDelta():
            return None if state == "thinking" else ("thinking", None)
        case TextDelta():
            return None if state == "writing" else ("writing", None)
        case ToolCallStarted(name=name):
            return "writing", f"calling {name}"
        case MessageAdded(message=Message(role="assistant", tool_calls=calls)) if calls:
            # The tool may already be asking (it starts before this event is shown).
            if state == "waiting for you":
                return None
            return "running tool", ", ".join(c.name for c in calls)
        case ToolResult():
            return "waiting", ""
    return None


def end_state(result: TurnResult | None, failure: str | None) -> tuple[PanelState, str]:
    """The state and detail a turn of the panel's leaves the line in when it ends."""
    if failure is not None:
        return "error", failure
    if result is None or result.status == "completed":
        return "idle", ""
    if result.status == "interrupted":
        return "idle", "stopped"
    return "error", result.error or result.status


def usage_facts(usage: Usage, *, busy: bool = False, priced: bool = True) -> list[str]:
    """A session's tokens and cost so far, saying only what is known.

    ``≥`` the tokens the server reported when the total is unknown (a stopped reply's
    usage is missing), and ``≥`` the totals while a reply runs (its own request is not
    counted until the server reports it). A cost partly unknown is the known part and
    how many requests are not in it ("$0.0021 + 1 request unknown", as ``%chat cost``
    says). Nothing is said of tokens before any request was counted, and "cost unknown"
    stands for a cost that cannot be known (``priced``: whether the current model has a
    price at all) — never a made-up 0. The first fact says it is the session's: beside
    a stopped turn's footer of "$0.00", a bare "cost unknown" (of turns before it) read
    as a contradiction (a trial).
    """
    bound = "≥ " if busy else ""
    facts = []
    if usage.total_tokens is not None:
        if usage.requests:
            facts.append(f"{bound}{usage.total_tokens:,} tokens")
    elif usage.known_tokens:
        facts.append(f"≥ {usage.known_tokens:,} tokens")
    else:
        facts.append("tokens unknown")
    unknown = usage.requests_without_cost
    if usage.cost_usd is None and 0 < unknown < usage.requests:
        facts.append(f"{money(usage.known_cost_usd)} + {counted(unknown, 'request')} unknown")
    elif usage.cost_usd is None or not (usage.requests or priced):
        facts.append("cost unknown")
    elif usage.requests:
        facts.append(f"{bound}{money(usage.cost_usd)}")
    if facts:
        facts[0] = f"session: {facts[0]}"
    return facts


def reply_fact(tokens: int) -> str:
    """The running reply's size while it streams, estimated (the server counts it only
    at the end, and a stopped reply's count may never come)."""
    return f"this reply: ~{tokens:,} tokens so far"


def stopped_detail(tokens: int) -> str:
    """What the line says of a stopped reply the server never counted."""
    return f"stopped after ~{tokens:,} tokens (estimated: the server sent no count)"


def status_html(state: PanelState, detail: str, facts: Sequence[str]) -> str:
    """The status line: the state (its dot coloured), its detail, then ``facts``."""
    kind = "idle" if state == "idle" else "error" if state == "error" else "busy"
    said = f" — {escape(clip(detail, 300))}" if detail else ""
    return protect_dollars(
        f'<span class="nbchat-state-{kind}"><span class="nbchat-dot">●</span> '
        f"<b>{escape(state)}</b>{said}</span> · " + " · ".join(escape(p) for p in facts)
    )
