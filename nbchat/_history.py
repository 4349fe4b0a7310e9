"""The shape of a conversation's history, as compaction and the loop read it.

The prompt's size in tokens is estimated (characters / 4, calibrated by the
``TokenEstimator`` against what the server reported); a history splits into its system
prompt, a foldable middle and the kept tail of whole exchanges (an exchange starts at a
user message, so tool calls and their results stay together); ``validate_history``
says what would make a history unsendable; an error says whether the prompt overflowed
the context window, and which window it named.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter, eq
from typing import Any

from ._exceptions import ModelAPIError
from ._types import Message

__all__ = [
    "CHARS_PER_TOKEN",
    "HistorySplit",
    "TokenEstimator",
    "exchanges",
    "is_context_overflow",
    "is_system_prompt",
    "live_order",
    "message_chars",
    "split_history",
    "validate_history",
    "window_from_error",
]

CHARS_PER_TOKEN = 4.0
_WINDOW_FROM_MESSAGE = re.compile(r"maximum context length is (\d+)")


# --------------------------------------------------------------------------- estimating

_id = attrgetter("id")


def message_chars(message: Message) -> int:
    """Characters of a message as it goes over the wire (compact JSON, plus a comma).

    Images count as their tokens (``ImagePart.tokens``) in characters, not as base64.
    """
    images = message.attachments
    if images:
        message = message.model_copy(update={"attachments": None})
    wire = message.to_openai()
    chars = len(json.dumps(wire, ensure_ascii=False, separators=(",", ":"))) + 1
    if images:
        chars += int(sum(part.tokens() for part in images) * CHARS_PER_TOKEN)
    return chars


class TokenEstimator:
    """Estimates a prompt's tokens without a tokenizer, calibrated on the server's counts.

    ``observe`` records the ``prompt_tokens`` the server reported for a prompt. An
    estimate is then that count plus the characters / 4 heuristic of what was added
    since, scaled by ``ratio``: server tokens per heuristic token, learned from how the
    server's count grew between two requests (so fixed costs — tool definitions, the
    chat template — do not skew it). A history that is not an extension of the observed
    one (after a compaction, a cell re-run) is estimated along the same line.
    """

    # Growth below this many heuristic tokens says more about per-message overhead
    # than about the tokenizer: the ratio is not updated from it.
    MIN_GROWTH = 64.0

    def __init__(self) -> None:
        self.ratio = 1.0
        self._anchor_ids: list[str] = []
        self._anchor_tokens: int | None = None
        self._anchor_raw = 0.0
        self._anchor_extra = 0
        # Each message's characters once measured, by id, with the content and calls they
        # were measured on (a guardrail may replace them): a long history is not
        # serialised again on every request.
        self._sizes: dict[str, tuple[Any, Any, int]] = {}

    @staticmethod
    def heuristic(messages: Sequence[Message], extra_chars: int = 0) -> float:
        """The uncalibrated estimate: characters / 4 (``extra_chars``: tool definitions)."""
        return (sum(message_chars(m) for m in messages) + extra_chars) / CHARS_PER_TOKEN

    def _heuristic(self, messages: Sequence[Message], extra_chars: int = 0) -> float:
        """``heuristic``, each message measured once."""
        sizes = self._sizes
        total = extra_chars
        for m in messages:
            known = sizes.get(m.id)
            if known is None or known[0] is not m.content or known[1] is not m.tool_calls:
                known = sizes[m.id] = (m.content, m.tool_calls, message_chars(m))
            total += known[2]
        return total / CHARS_PER_TOKEN

    def _extends_anchor(self, messages: Sequence[Message]) -> bool:
        n = len(self._anchor_ids)
        return len(messages) >= n and all(map(eq, self._anchor_ids, map(_id, messages)))

    def text_tokens(self, chars: int) -> int:
        """Estimated tokens of ``chars`` characters of generated text: characters / 4,
        scaled by ``ratio`` (for a reply the server has not counted yet)."""
        return math.ceil(self.ratio * chars / CHARS_PER_TOKEN)

    def estimate(self, messages: Sequence[Message], extra_chars: int = 0) -> int:
        """Estimated prompt tokens of ``messages`` (plus ``extra_chars`` of tool specs)."""
        if self._anchor_tokens is None:
            return math.ceil(self.ratio * self._heuristic(messages, extra_chars))
        if self._extends_anchor(messages):  # the usual case: estimate only what is new
            added = self._heuristic(messages[len(self._anchor_ids) :], extra_chars)
            added -= self._anchor_extra / CHARS_PER_TOKEN
        else:
            added = self._heuristic(messages, extra_chars) - self._anchor_raw
        return max(0, self._anchor_tokens + math.ceil(self.ratio * added))

    def observe(
        self, messages: Sequence[Message], extra_chars: int, prompt_tokens: int | None
    ) -> None:
        """Remember the server's ``prompt_tokens`` for a request that sent ``messages``."""
        if not prompt_tokens or prompt_tokens <= 0:
            return
        extends = self._anchor_tokens is not None and self._extends_anchor(messages)
        if extends:
            assert self._anchor_tokens is not None
            n = len(self._anchor_ids)
            added = self._heuristic(messages[n:], extra_chars)
            grown = added - self._anchor_extra / CHARS_PER_TOKEN
            if grown >= self.MIN_GROWTH:
                # Clamped: one odd report must not make every later estimate absurd.
                learned = (prompt_tokens - self._anchor_tokens) / grown
                self.ratio = min(4.0, max(0.25, learned))
            # Only what was added is measured: a long history is not walked again.
            self._anchor_ids += map(_id, messages[n:])
            self._anchor_raw += grown
        else:
            self._anchor_ids = list(map(_id, messages))
            self._anchor_raw = self._heuristic(messages, extra_chars)
        sizes = self._sizes
        if not extends or len(sizes) > 2 * len(self._anchor_ids) + 64:
            live = self._anchor_ids  # let go of what left the history (or was never in it)
            self._sizes = {i: sizes[i] for i in live if i in sizes}
        self._anchor_tokens = prompt_tokens
        self._anchor_extra = extra_chars


# --------------------------------------------------------------------------- history shape


def is_system_prompt(message: Message) -> bool:
    return message.role == "system" and message.status != "summary"


@dataclass(frozen=True)
class HistorySplit:
    """The live context cut into what compaction keeps and what it may fold."""

    head: list[Message]
    """The leading system prompt (empty without one); never folded."""
    summary: Message | None
    """The live summary of an earlier compaction, folded into the next one."""
    middle: list[Message]
    """What may be folded, oldest first (whole exchanges only)."""
    tail: list[Message]
    """The last ``keep_last_n`` exchanges, kept verbatim."""


def exchanges(messages: Sequence[Message]) -> list[list[Message]]:
    """Cut messages into exchanges: each starts at a user message (the first may not)."""
    groups: list[list[Message]] = []
    for m in messages:
        if m.role == "user" or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return groups


def split_history(messages: Sequence[Message], keep_last_n: int) -> HistorySplit:
    """Split the live context into head, summary, foldable middle and kept tail.

    The tail starts at a user message, so a tool-call group (an assistant message with
    tool calls and the tool results after it) is never cut in two.
    """
    head = [messages[0]] if messages and is_system_prompt(messages[0]) else []
    rest = list(messages[len(head) :])
    summary = next((m for m in rest if m.status == "summary"), None)
    if summary is not None:
        rest.remove(summary)
    starts = [i for i, m in enumerate(rest) if m.role == "user"]
    cut = starts[-keep_last_n] if len(starts) >= keep_last_n else 0
    return HistorySplit(head=head, summary=summary, middle=rest[:cut], tail=rest[cut:])


def validate_history(messages: Sequence[Message]) -> str | None:
    """Why ``messages`` cannot be sent as a chat history, or ``None`` when it can.

    Every assistant message with tool calls must be followed by exactly its tool
    results, and no tool result may appear anywhere else.
    """
    expected: set[str] = set()
    for m in messages:
        if m.role == "tool":
            if m.tool_call_id not in expected:
                return f"tool result {m.tool_call_id!r} has no assistant tool call before it"
            expected.discard(m.tool_call_id)
            continue
        if expected:
            return f"tool call(s) {sorted(expected)} lost their results"
        if m.role == "assistant" and m.tool_calls:
            expected = {c.id for c in m.tool_calls}
    if expected:
        return f"tool call(s) {sorted(expected)} lost their results"
    return None


def live_order(messages: Sequence[Message]) -> list[Message]:
    """Put the live summary right after the system prompt (where compaction placed it).

    A summary's ``seq`` is newer than the messages kept after it, so a session loaded
    from the store in ``seq`` order has it at the wrong place until moved back.
    """
    summaries = [m for m in messages if m.status == "summary"]
    if not summaries:
        return list(messages)
    summary = summaries[-1]
    rest = [m for m in messages if m is not summary]
    at = 1 if rest and is_system_prompt(rest[0]) else 0
    return [*rest[:at], summary, *rest[at:]]


def is_context_overflow(error: ModelAPIError) -> bool:
    """Whether a server error says the prompt is longer than the model's context."""
    body = _error_body(error)
    if "context_length_exceeded" in (error.code, body.get("code")):  # OpenAI, vLLM, ...
        return True
    return body.get("type") == "exceed_context_size_error"  # llama.cpp's server


def window_from_error(error: ModelAPIError) -> int | None:
    """The context window an overflow error states, if it states one."""
    n_ctx = _error_body(error).get("n_ctx")
    if isinstance(n_ctx, int) and n_ctx > 0:
        return n_ctx
    found = _WINDOW_FROM_MESSAGE.search(str(error))
    return int(found.group(1)) if found else None


def _error_body(error: ModelAPIError) -> dict[str, Any]:
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error")
    return inner if isinstance(inner, dict) else body
