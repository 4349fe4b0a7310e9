"""Budgets and guardrails: the checks the loop makes before each request and around text.

Budgets are checked *before* a request, from what is already spent, so a turn never
starts a request it cannot afford. Spending that cannot be known (a model with no
price, a server that reports no usage) is never counted as zero: the check says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from ._exceptions import GuardrailRejected
from ._text import money
from ._types import Usage

if TYPE_CHECKING:
    from ._store import Store

__all__ = [
    "BudgetCheck",
    "Budgets",
    "GuardrailRejected",
    "Projection",
    "apply_guardrails",
    "stored_usage",
]

Guardrail = Callable[[str], "str | None"]


class BudgetCheck(BaseModel):
    """The outcome of a budget check: a limit that stops the turn, notices, or neither.

    ``notices`` name each limit that cannot be checked, one per limit, so a caller can
    say each once however the others change.
    """

    limit: str | None = None
    message: str | None = None
    notices: list[str] = []


class Budgets(BaseModel):
    """Spending limits of a session (per session and per turn, in USD and tokens)."""

    model_config = ConfigDict(frozen=True)

    budget_usd: float | None = None
    turn_budget_usd: float | None = None
    max_tokens_total: int | None = None
    turn_max_tokens: int | None = None

    def check(
        self, session: Usage, turn: Usage, next_request: Projection | None = None
    ) -> BudgetCheck:
        """Whether one more request is allowed, given what the session and turn spent.

        With ``next_request`` (what the request about to be sent is estimated to cost),
        a request that would take the spend past a USD limit is refused before it is
        sent, not after it overspent.
        """
        notices: list[str] = []
        for name, scope, spent, limit in self._set_limits("usd", session, turn):
            if spent.cost_usd is None:
                notices.append(
                    f"The {scope} budget of {money(limit)} cannot be checked: the cost "
                    "of some requests is unknown (no price for this model; "
                    "nbchat.register_price() sets one)."
                )
            elif spent.cost_usd >= limit:
                detail = f"{money(spent.cost_usd)} spent of {money(limit)}"
                return _stop(name, scope, detail, notices)
            elif (
                next_request is not None
                and next_request.cost_usd is not None
                and spent.cost_usd + next_request.cost_usd > limit
            ):
                detail = (
                    f"{money(spent.cost_usd)} spent of {money(limit)}; the next "
                    f"request would cost about {money(next_request.cost_usd)} "
                    f"({next_request.describe()})"
                )
                return _stop(name, scope, detail, notices, before=True)
        for name, scope, spent, limit in self._set_limits("tokens", session, turn):
            if spent.total_tokens is None:
                notices.append(
                    f"The {scope} token limit of {limit} cannot be checked: the server "
                    "did not report usage for some requests."
                )
            elif spent.total_tokens >= limit:
                detail = f"{spent.total_tokens} of {limit} tokens used"
                return _stop(name, scope, detail, notices)
        return BudgetCheck(notices=notices)

    def _set_limits(
        self, unit: Literal["usd", "tokens"], session: Usage, turn: Usage
    ) -> Iterator[tuple[str, str, Usage, float]]:
        """Each ``unit`` limit that is set, the session's first: name, scope, its spend, limit."""
        if unit == "usd":
            limits = (("budget_usd", self.budget_usd), ("turn_budget_usd", self.turn_budget_usd))
        else:
            limits = (
                ("max_tokens_total", self.max_tokens_total),
                ("turn_max_tokens", self.turn_max_tokens),
            )
        for (name, limit), scope, spent in zip(
            limits, ("session", "turn"), (session, turn), strict=True
        ):
            if limit is not None:
                yield name, scope, spent, limit


def _stop(
    name: str, scope: str, detail: str, notices: list[str], *, before: bool = False
) -> BudgetCheck:
    verb = "would cross" if before else "is reached"
    return BudgetCheck(
        limit=name,
        message=f"Stopped before the next request: the {scope} limit {name} {verb} ({detail}).",
        notices=notices,
    )


class Projection(BaseModel):
    """What the request about to be sent is estimated to use and cost.

    ``prompt_tokens`` is the calibrated estimate of the prompt; ``reply_cap`` the
    ``max_tokens`` the request sets (0 when it sets none: the reply is then not
    counted in advance). ``cost_usd`` is ``None`` when the model's price is unknown.
    """

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    reply_cap: int = 0
    cost_usd: float | None = None

    def describe(self) -> str:
        """The estimate's parts, for a message."""
        prompt = f"~{self.prompt_tokens:,} prompt tokens"
        return f"{prompt} + a {self.reply_cap:,}-token reply cap" if self.reply_cap else prompt


def apply_guardrails(text: str, guardrails: Sequence[Guardrail]) -> str:
    """Run ``text`` through each guardrail in order; each may rewrite it or reject it.

    A guardrail returns the new text, or ``None`` to leave it unchanged, or raises
    ``GuardrailRejected``. Any other exception is a bug in the guardrail and propagates.
    """
    for guard in guardrails:
        result = guard(text)
        if result is not None:
            if not isinstance(result, str):
                raise TypeError(
                    f"guardrail {getattr(guard, '__name__', guard)!r} returned "
                    f"{type(result).__name__}; return a str, None, or raise GuardrailRejected"
                )
            text = result
    return text


def stored_usage(store: Store, session_id: str) -> Usage:
    """What a stored session already spent (every request, summaries included).

    A reopened session's budget counts from here, not from zero. A total is ``None``
    when any request's figure is unknown, as in ``Usage``.
    """
    return store.session_usage(session_id)
