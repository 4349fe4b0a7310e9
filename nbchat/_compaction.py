"""Context compaction: keep a long conversation inside the model's context window.

Before each model request the session asks its ``Compactor`` for the prompt's size in
tokens. The size is a cheap estimate (characters / 4) calibrated against the
``prompt_tokens`` the server reported for the previous request: only what was added
since is estimated. When it passes ``trigger_ratio`` of the context window, a strategy
folds the middle of the history:

- ``SummaryStrategy`` ("summary") has a model write one summary of the middle; the
  summary goes into the live context as one system message right after the system
  prompt, and an earlier summary is folded into the new one.
- ``WindowStrategy`` ("window") drops the oldest exchanges, no model call.

Kept verbatim: the leading system prompt and the last ``keep_last_n`` exchanges (an
exchange starts at a user message, so an assistant message with tool calls and its tool
results always stay together). Any strategy, including a user's own, goes through the
same checks before its result replaces the live context. A strategy that fails leaves
the context as it was and the failure is reported in a ``CompactionEvent``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._client import ModelClient
from ._events import CompactionEvent, UsageEvent
from ._exceptions import ConfigError, ModelAPIError, SummaryError
from ._history import (
    CHARS_PER_TOKEN,
    HistorySplit,
    TokenEstimator,
    exchanges,
    is_system_prompt,
    split_history,
    validate_history,
    window_from_error,
)
from ._summary import SUMMARY_HEADER, Summariser, summary_words
from ._text import counted
from ._types import Message

__all__ = [
    "Compaction",
    "CompactionContext",
    "CompactionOutcome",
    "CompactionStrategy",
    "Compactor",
    "SummaryStrategy",
    "WindowStrategy",
    "resolve_strategy",
]

# A summary longer than this share of what it replaces saves too little: refused.
MAX_SUMMARY_SHARE = 0.8


class _Refused(Exception):
    """A compaction that cannot be made (the message says why); reported, never raised."""


# --------------------------------------------------------------------------- strategies


@dataclass
class Compaction:
    """A strategy's answer: the messages to take out of the live context, and a summary.

    ``fold`` may not contain the system prompt, nor split a tool-call group. With a
    ``summary``, the live summary (if any) is folded too, so at most one stays live.
    """

    fold: list[Message]
    summary: str | None = None


@dataclass
class CompactionContext:
    """What a strategy gets to decide a compaction."""

    messages: list[Message]
    """The live context, oldest first (a new list; leave the messages themselves as they are)."""
    split: HistorySplit
    """The live context cut by the keep-last-``keep_last_n``-exchanges rule."""
    keep_last_n: int
    context_window: int | None
    """The model's context window in tokens, if known."""
    threshold: int | None
    """The estimated prompt size at which compaction starts (window × trigger_ratio)."""
    tokens: int
    """The estimated size of the prompt now, in tokens."""
    forced: bool
    """True when the server refused the prompt as too long: fold as much as allowed."""
    estimate: Callable[[Sequence[Message]], int]
    """Estimated prompt tokens of a list of messages (calibrated like the trigger)."""
    summarise: Callable[[Sequence[Message]], Awaitable[str]]
    """Have the summary model summarise messages; raises ``SummaryError`` on failure."""

    @property
    def target(self) -> int | None:
        """A size worth shrinking to (half the threshold), so compactions stay rare."""
        return None if self.threshold is None else self.threshold // 2


@runtime_checkable
class CompactionStrategy(Protocol):
    """How to compact a history: pass an object like this as ``Session(compaction=...)``.

    ``compact`` is called when the prompt is over the threshold (or the server refused
    it as too long) and returns what to fold, or ``None`` to leave the history as it
    is. Exceptions are reported in a ``CompactionEvent`` and the turn carries on.
    """

    name: str

    async def compact(self, ctx: CompactionContext) -> Compaction | None:
        """Decide what to fold, given the live context and helpers in ``ctx``."""
        ...


class SummaryStrategy:
    """Fold everything between the system prompt and the kept tail into one summary."""

    name = "summary"

    async def compact(self, ctx: CompactionContext) -> Compaction | None:
        """Summarise the live summary and the foldable middle together."""
        middle = ctx.split.middle
        if not middle:
            return None
        prior = [ctx.split.summary] if ctx.split.summary is not None else []
        text = await ctx.summarise([*prior, *middle])
        return Compaction(fold=list(middle), summary=text)


class WindowStrategy:
    """Drop the oldest exchanges (no model call) until the prompt is small enough."""

    name = "window"

    async def compact(self, ctx: CompactionContext) -> Compaction | None:
        """Drop whole exchanges, oldest first, down to ``ctx.target`` (all when forced)."""
        middle = ctx.split.middle
        if not middle:
            return None
        target = ctx.target
        if ctx.forced or target is None:
            return Compaction(fold=list(middle))
        dropped: list[Message] = []
        for group in exchanges(middle):
            dropped.extend(group)
            gone = {m.id for m in dropped}
            if ctx.estimate([m for m in ctx.messages if m.id not in gone]) <= target:
                break
        return Compaction(fold=dropped)


def resolve_strategy(value: Any) -> CompactionStrategy | None:
    """``"summary"``, ``"window"``, ``None`` (off) or a ``CompactionStrategy`` object."""
    if value is None or value is False:
        return None
    if value == "summary":
        return SummaryStrategy()
    if value == "window":
        return WindowStrategy()
    if isinstance(value, CompactionStrategy):
        return value
    raise ConfigError(
        f"compaction={value!r}: use 'summary', 'window', None, or an object with a "
        "`name` and an async `compact(ctx)` method (see nbchat.CompactionStrategy)."
    )


# --------------------------------------------------------------------------- the engine


@dataclass
class CompactionOutcome:
    """What one compaction attempt did; the session applies it and emits its events."""

    event: CompactionEvent
    requests: list[UsageEvent] = field(default_factory=list)
    """Summariser requests made (with usage and cost), to count and record."""
    messages: list[Message] | None = None
    """The new live context, or ``None`` when nothing changed."""
    folded: list[Message] = field(default_factory=list)
    summary: Message | None = None
    """The new summary message (not yet numbered), already placed in ``messages``."""


class Compactor:
    """Decides when to compact a session's history and runs its strategy safely."""

    def __init__(
        self,
        strategy: CompactionStrategy,
        *,
        context_window: int | None = None,
        trigger_ratio: float = 0.8,
        keep_last_n: int = 4,
        summary_model: str | None = None,
    ) -> None:
        if not 0 < trigger_ratio <= 1:
            raise ConfigError(f"trigger_ratio={trigger_ratio!r}: use a number in (0, 1].")
        if keep_last_n < 1:
            raise ConfigError(f"keep_last_n={keep_last_n!r}: keep at least 1 exchange.")
        if context_window is not None and context_window <= 0:
            raise ConfigError(f"context_window={context_window!r}: use a positive token count.")
        self.strategy = strategy
        self.context_window = context_window
        self.trigger_ratio = trigger_ratio
        self.keep_last_n = keep_last_n
        self.summary_model = summary_model
        self.estimator = TokenEstimator()
        self._learned: dict[str, int] = {}
        self._paused_at: str | None = None

    def window(self, model: str, base_url: str) -> int | None:
        """The context window used for ``model``: configured, learned, or genai-prices'."""
        if self.context_window is not None:
            return self.context_window
        if model in self._learned:
            return self._learned[model]
        from ._pricing import context_window

        return context_window(model, base_url)

    async def maybe_compact(
        self,
        messages: list[Message],
        *,
        client: ModelClient,
        extra_chars: int = 0,
        session_id: str = "",
        turn_id: str = "",
        round: int = 0,
        overflow: ModelAPIError | None = None,
    ) -> CompactionOutcome | None:
        """Compact if the prompt is over the threshold, or if ``overflow`` says it must be.

        Returns ``None`` when nothing was attempted.
        """
        settings = client.settings
        if overflow is not None:
            learned = window_from_error(overflow)
            if learned:
                self._learned[settings.model] = learned
        window = self.window(settings.model, settings.base_url)
        if window is None:  # vLLM, llama.cpp, OpenRouter say theirs (asked once, cached)
            window = await client.context_window()
        tokens = self.estimator.estimate(messages, extra_chars)
        threshold = int(window * self.trigger_ratio) if window else None
        forced = overflow is not None
        last_user = next((m.id for m in reversed(messages) if m.role == "user"), None)
        if not forced and (threshold is None or tokens < threshold or self._paused_at == last_user):
            return None
        split = split_history(messages, self.keep_last_n)
        if forced and not split.middle:
            split = split_history(messages, 1)
        requests: list[UsageEvent] = []
        summariser = Summariser(
            client,
            self.summary_model,
            sink=requests,
            words=summary_words(window),
            # The summariser's own prompt must fit too: at most half the window.
            max_chars=int(window * CHARS_PER_TOKEN / 2) if window else 200_000,
            stamp=(session_id, turn_id, round),
        )

        def estimate(some: Sequence[Message]) -> int:
            return self.estimator.estimate(some, extra_chars)

        ctx = CompactionContext(
            messages=list(messages),
            split=split,
            keep_last_n=self.keep_last_n,
            context_window=window,
            threshold=threshold,
            tokens=tokens,
            forced=forced,
            estimate=estimate,
            summarise=summariser,
        )
        event = CompactionEvent(
            session_id=session_id,
            turn_id=turn_id,
            strategy=getattr(self.strategy, "name", type(self.strategy).__name__),
            tokens_before=tokens,
        )
        try:
            plan = await self.strategy.compact(ctx)
            if plan is None or not plan.fold:
                if not forced:
                    return None
                raise _Refused(
                    "nothing can be folded: the last exchange alone is too long "
                    "for the context window"
                )
            summary = _summary_message(plan, turn_id, round)
            new, folded = _apply(messages, plan, split, summary)
            tokens_after = estimate(new)
            if summary is not None:
                _check_shrinks(summary, folded, tokens, tokens_after, forced=forced)
        except Exception as exc:
            # Retrying on every request would pay for a failing summariser again and
            # again: wait for the next user message (a forced compaction still runs).
            self._paused_at = last_user
            ours = isinstance(exc, SummaryError | _Refused)
            event.error = str(exc) if ours else f"{type(exc).__name__}: {exc}"
            _add_costs(event, requests)
            return CompactionOutcome(event=event, requests=requests)
        self._paused_at = None
        seqs = [m.seq for m in folded if m.status != "summary"]
        event.from_seq, event.to_seq = (min(seqs), max(seqs)) if seqs else (None, None)
        event.summary = plan.summary
        event.tokens_after = tokens_after
        _add_costs(event, requests)
        return CompactionOutcome(
            event=event, requests=requests, messages=new, folded=folded, summary=summary
        )


def _summary_message(plan: Compaction, turn_id: str, round: int) -> Message | None:
    if plan.summary is None:
        return None
    return Message(
        role="system",
        content=SUMMARY_HEADER + plan.summary,
        status="summary",
        turn_id=turn_id or None,
        round=round,
    )


def _apply(
    messages: list[Message], plan: Compaction, split: HistorySplit, summary: Message | None
) -> tuple[list[Message], list[Message]]:
    """The new live context and the messages folded out of it; raises if unsafe."""
    fold_ids = {m.id for m in plan.fold}
    if summary is not None and split.summary is not None:
        fold_ids.add(split.summary.id)  # at most one summary stays live
    if split.head and split.head[0].id in fold_ids:
        raise _Refused("a compaction may not fold the system prompt")
    unknown = fold_ids - {m.id for m in messages}
    if unknown:
        raise _Refused(f"{counted(len(unknown), 'message')} to fold not in the live context")
    kept = [m for m in messages if m.id not in fold_ids]
    if summary is not None:
        at = 1 if kept and is_system_prompt(kept[0]) else 0
        kept.insert(at, summary)
    problem = validate_history(kept)
    if problem:
        raise _Refused(f"the compacted history would be invalid: {problem}")
    if not any(m.role == "user" for m in kept):
        raise _Refused("a compaction may not fold the last user message")
    return kept, [m for m in messages if m.id in fold_ids]


def _check_shrinks(
    summary: Message, folded: list[Message], before: int, after: int, *, forced: bool
) -> None:
    """Refuse a summary that saves too little to be worth it (it would be redone soon)."""
    if after >= before:
        raise _Refused("the summary is not shorter than what it would replace")
    if forced:
        return  # the prompt does not fit at all: any saving may be enough
    written, replaced = TokenEstimator.heuristic([summary]), TokenEstimator.heuristic(folded)
    if written > MAX_SUMMARY_SHARE * replaced:
        raise _Refused(
            f"the summary (~{written:.0f} tokens) is not much shorter than the "
            f"~{replaced:.0f} tokens it would replace"
        )


def _add_costs(event: CompactionEvent, requests: list[UsageEvent]) -> None:
    if not requests:
        event.cost_usd = 0.0
        return
    event.model = requests[-1].model
    costs = [r.cost_usd for r in requests]
    event.cost_usd = None if any(c is None for c in costs) else sum(c or 0.0 for c in costs)
