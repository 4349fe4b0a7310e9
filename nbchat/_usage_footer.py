"""A turn's footer line: model, tokens, cost, time — and what is known of a partly
unknown turn, as a lower bound.

A turn's ``Usage`` is ``None`` as soon as one request in it is unknown (an interrupted
request usually is), so its footer would say "tokens unknown · cost unknown" although
the rounds before were counted. ``KnownUsage`` sums the known requests from the turn's
``usage`` events (``TurnView`` keeps one), and ``lower_bound_footer`` shows them with
``≥`` and how many requests are missing; a turn with nothing known still says
unknown, and a fully known turn reads as ``format_footer`` writes it.

A request the server refused with an HTTP error before answering, or whose connection
was never made, is stored as 0 tokens and $0 (so budgets can go on counting), but a
footer of "0 tokens · $0.00" would read as a request that was answered for free. A turn
whose every request failed begins with "request failed", then says what is true of it:
"no tokens, no cost" when none reached the model, and "tokens unknown · cost unknown"
(or the known part) when the server dropped one it had taken, which may have been billed.
A turn where only some failed (a tool round answered, the next request refused) begins
with how many: "1 of 2 requests failed".

The openai client retries a 429, a 5xx or a lost connection by itself; a request that
got through only so says it before the time ("retried once after HTTP 429"), since the
wait was spent there and the server may have counted the refused attempts against a
rate limit; so does one that got through and then failed (a stream cut after two 500s).
A turn none of whose requests reached the model says only that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._events import UsageEvent
from ._text import counted, money
from ._types import TurnResult

__all__ = ["KnownUsage", "format_footer", "lower_bound_footer"]


def format_footer(
    model: str, result: TurnResult | None, seconds: float, notes: tuple[str, ...] = ()
) -> str:
    """``model · 1,234 tokens (1,000 in / 234 out) · $0.0012 · 2.3 s``, with ``notes``
    before the time."""
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
        parts.append("cost unknown" if u.cost_usd is None else money(u.cost_usd))
    parts.extend(notes)
    parts.append(f"{seconds:.1f} s")
    return " · ".join(parts)


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
    refused: int = 0  # requests refused (or never sent) before anything was generated
    failed: int = 0  # requests that ended with an error, refused or not
    # What the retried attempts of the turn's requests got, in order.
    retried_after: list[str] = field(default_factory=list)

    def add(self, event: UsageEvent) -> None:
        """Count one request's known figures."""
        u = event.usage
        if event.error is not None:
            self.failed += 1
        if event.retried_after:
            self.retried_after.extend(event.retried_after.split(", "))
        if (
            event.error is not None
            and u is not None
            and not (u.prompt_tokens or u.completion_tokens)
        ):
            self.refused += 1
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
    a fully known turn, read as ``format_footer`` writes them. A turn whose every
    request failed says so first, then what is true of its usage: none at all when no
    request reached the model (refused, or never connected), else what is known; one
    where some failed says how many.
    """
    u = result.usage
    head = [model] if model else []
    if u.requests and known.failed >= u.requests:
        head.append("request failed" if u.requests == 1 else f"{u.requests} requests failed")
        if known.refused >= u.requests:  # none answered: nothing generated, nothing to pay
            return " · ".join([*head, "no tokens, no cost", f"{seconds:.1f} s"])
    elif known.failed:  # the rounds before the failing one were answered and counted
        head.append(f"{known.failed} of {u.requests} requests failed")
    notes = _retried(known.retried_after)
    tokens_exact = u.prompt_tokens is not None and u.completion_tokens is not None
    cost_exact = u.cost_usd is not None
    if tokens_exact and cost_exact:
        return " · ".join([*head, format_footer("", result, seconds, notes)])
    parts = head
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
    parts.extend(notes)
    parts.append(f"{seconds:.1f} s")
    return " · ".join(parts)


def _retried(causes: list[str]) -> tuple[str, ...]:
    """``retried once after HTTP 429``, ``retried 2 times after HTTP 429, HTTP 503``."""
    if not causes:
        return ()
    times = "once" if len(causes) == 1 else counted(len(causes), "time")
    return (f"retried {times} after {', '.join(dict.fromkeys(causes))}",)


def _missing(missing: int, requests: int) -> str:
    noun = "request" if requests == 1 else "requests"
    return f"{missing} of {requests} {noun} unknown"
