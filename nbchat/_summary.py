"""The summariser: one request that folds part of a conversation into a summary.

Used by the "summary" compaction strategy (and offered to custom strategies as
``ctx.summarise``). The transcript is shown to the summary model as plain text, each
message clipped, so one huge tool result cannot crowd out the rest and the request
itself fits the context window. Every request, failed or not, becomes a ``UsageEvent``
with ``purpose="summary"``: its tokens and cost are stored and count toward budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._assembler import ReplyAssembler
from ._client import ModelClient
from ._events import UsageEvent
from ._exceptions import ModelAPIError, SummaryError
from ._types import SUMMARY_HEADER, Message

__all__ = ["SUMMARY_HEADER", "Summariser", "SummaryError", "render_transcript", "summary_words"]

SUMMARY_INSTRUCTIONS = """\
You condense the earlier part of a conversation between a user and an AI assistant \
that can call tools, so that the assistant can carry on without the original messages.
Keep: what the user asked for, their preferences and constraints; facts, numbers, \
names, file paths and code that were established; which tools were called, why, and \
what they returned (including errors); decisions made and questions still open; what \
the assistant was about to do next.
If the transcript begins with an earlier summary, merge it into yours: yours replaces it.
Write in the language of the conversation, as short paragraphs or bullet points, in at \
most {words} words. Do not address the user and do not call tools. Reply with the \
summary only."""
# Per-message clip when a transcript is shown to the summariser: one huge tool result
# must not crowd out everything else.
_CLIP_MESSAGE = 2000
_CLIP_TOOL_RESULT = 1000
_CLIP_ARGUMENTS = 300


def summary_words(window: int | None) -> int:
    """How long a summary may be: about a tenth of the context window, in words."""
    # 0.75 words per token; bounded so tiny windows still get a useful summary.
    return 600 if window is None else max(100, min(1500, int(window * 0.075)))


class Summariser:
    """Asks the summary model for a summary; each request is kept as a ``UsageEvent``.

    Calling it with messages returns the summary text or raises ``SummaryError``.
    """

    def __init__(
        self,
        client: ModelClient,
        model: str | None,
        *,
        sink: list[UsageEvent],
        words: int,
        max_chars: int,
        stamp: tuple[str, str, int],
    ) -> None:
        if model is not None and model != client.model:
            client = client.for_model(model)  # same endpoint, key, wire API and timeouts
        self.client = client
        self.sink = sink
        self.words = words
        self.max_chars = max_chars
        self.session_id, self.turn_id, self.round = stamp

    async def __call__(self, messages: Sequence[Message]) -> str:
        """The summary of ``messages`` (an earlier summary among them is merged in)."""
        prompt = [
            {"role": "system", "content": SUMMARY_INSTRUCTIONS.format(words=self.words)},
            {
                "role": "user",
                "content": "Transcript to summarise:\n\n"
                + render_transcript(messages, self.max_chars),
            },
        ]
        assembler = ReplyAssembler(self.session_id, self.turn_id, self.round)
        error: ModelAPIError | None = None
        try:
            async for _ in self.client.astream(prompt, assembler, stream=False):
                pass
        except ModelAPIError as exc:
            error = exc
        finally:
            self.sink.append(self.client.usage_event(assembler, error, purpose="summary"))
        if error is not None:
            raise SummaryError(f"the summary model failed: {error}") from error
        text = assembler.text.strip()
        if not text:
            raise SummaryError("the summary model returned an empty summary")
        return text


def render_transcript(messages: Sequence[Message], max_chars: int) -> str:
    """Messages as plain text for the summariser, clipped to about ``max_chars``.

    Each message is clipped on its own; if the whole is still too long, the oldest
    messages after an earlier summary are left out (the newest matter most next).
    """
    parts: list[str] = []
    for m in messages:
        if m.status == "summary":
            parts.append("[earlier summary]\n" + (m.content or "").removeprefix(SUMMARY_HEADER))
            continue
        if m.role == "tool":
            head = f"[tool result{' from ' + m.name if m.name else ''}]"
            body = _clip(m.content or "", _CLIP_TOOL_RESULT)
        else:
            head = f"[{m.role}]"
            body = _clip(m.content or "", _CLIP_MESSAGE)
            for call in m.tool_calls or []:
                body += f"\n(calls tool {call.name} with {_clip(call.arguments, _CLIP_ARGUMENTS)})"
        for image in m.attachments or []:  # the summary keeps a mention, not the image
            body += f"\n{image.label}"
        parts.append(f"{head}\n{body.strip()}")
    keep_first = 1 if messages and messages[0].status == "summary" else 0
    total = sum(len(p) + 2 for p in parts)
    dropped = 0
    while total > max_chars and len(parts) - keep_first > 1:
        total -= len(parts.pop(keep_first)) + 2
        dropped += 1
    if dropped:
        parts.insert(keep_first, f"[… {dropped} older messages left out …]")
    return "\n\n".join(parts)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f" … [{len(text) - limit} more characters]"
