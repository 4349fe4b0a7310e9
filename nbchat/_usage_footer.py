"""The turn footer when a request's usage is unknown: what is known, as a lower bound.

A turn's ``Usage`` is ``None`` as soon as one request in it is unknown (an interrupted
request usually is), so its footer would say "tokens unknown · cost unknown" although
the rounds before were counted. ``FooterView`` sums the known requests from the turn's
``usage`` events and shows them with ``≥`` and how many requests are missing; a turn
with nothing known still says unknown, and a fully known turn reads as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._render import TurnView, format_footer
from ._text import money
from ._types import Event, TurnResult, UsageEvent

__all__ = ["FooterView", "KnownUsage", "lower_bound_footer"]


@dataclass
class KnownUsage:
    """The sums over a turn's requests whose tokens (cost) are known, and their counts.

    The turn's own ``Usage.requests`` says how many there were: an interrupted request
    may end the turn before its ``usage`` event reaches a front end.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    with_tokens: int = 0  # requests whose token counts are known
    with_cost: int = 0  # requests whose cost is known

    def add(self, event: UsageEvent) -> None:
        """Count one request's known figures."""
        u = event.usage
        if u is not None and u.prompt_tokens is not None and u.completion_tokens is not None:
            self.with_tokens += 1
            self.prompt_tokens += u.prompt_tokens
            self.completion_tokens += u.completion_tokens
        if event.cost_usd is not None:
            self.with_cost += 1
            self.cost_usd += event.cost_usd


def lower_bound_footer(model: str, result: TurnResult, known: KnownUsage, seconds: float) -> str:
    """``model · ≥ 1,234 tokens (1,000 in / 234 out) · ≥ $0.0012 (1 of 2 requests unknown)``.

    Then the time. Only what the turn's own sum leaves unknown is bounded; the rest, and
    a fully known turn, read as ``format_footer`` writes them.
    """
    u = result.usage
    tokens_exact = u.prompt_tokens is not None and u.completion_tokens is not None
    cost_exact = u.cost_usd is not None
    if tokens_exact and cost_exact:
        return format_footer(model, result, seconds)
    parts = [model] if model else []
    known_tokens, known_cost = min(known.with_tokens, u.requests), min(known.with_cost, u.requests)
    if tokens_exact:
        total = (u.prompt_tokens or 0) + (u.completion_tokens or 0)
        parts.append(f"{total:,} tokens ({u.prompt_tokens:,} in / {u.completion_tokens:,} out)")
    elif known_tokens:
        total = known.prompt_tokens + known.completion_tokens
        parts.append(
            f"≥ {total:,} tokens ({known.prompt_tokens:,} in / {known.completion_tokens:,} out)"
        )
    else:
        parts.append("tokens unknown")
    if cost_exact:
        parts.append(money(u.cost_usd or 0.0))
    elif known_cost:
        parts.append(f"≥ {money(known.cost_usd)}")
    else:
        parts.append("cost unknown")
    missing = u.requests - min(known_cost, known_tokens if not tokens_exact else u.requests)
    if (not tokens_exact and known_tokens) or (not cost_exact and known_cost):
        parts[-1] += f" ({_missing(missing, u.requests)})"
    parts.append(f"{seconds:.1f} s")
    return " · ".join(parts)


def _missing(missing: int, requests: int) -> str:
    noun = "request" if requests == 1 else "requests"
    return f"{missing} of {requests} {noun} unknown"


class FooterView(TurnView):
    """A ``TurnView`` whose footer shows the known part of a partly unknown usage."""

    def __init__(self, model: str = "") -> None:
        super().__init__(model)
        self.known = KnownUsage()

    def handle(self, event: Event) -> bool:
        """Fold one event in (a ``usage`` event is counted); return whether the view changed."""
        if isinstance(event, UsageEvent):
            self.known.add(event)
        return super().handle(event)

    def footer(self) -> str:
        """One line: model, tokens, cost (known parts marked ``≥``), time."""
        if self.result is None:
            return super().footer()
        return lower_bound_footer(
            self.model, self.result, self.known, self.result.duration_ms / 1000
        )
