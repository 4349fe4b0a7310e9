"""The event vocabulary every consumer reads: what a turn emits, in the order it happens.

A session's loop emits these; the cell, the panel and the store consume them. The stored
kinds (``_StoredEvent``, with their time) are written by the store sink; the rest are
for the screen only. ``EventAdapter`` reads and writes any of them as JSON, by ``kind``.
Nothing here does I/O.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from ._types import (
    CostSource,
    ImagePart,
    Message,
    MessageState,
    RequestUsage,
    ToolCallRecord,
    TurnResult,
    _Model,
    new_id,
    utcnow,
)


class _Event(_Model):
    session_id: str = ""
    turn_id: str = ""


class _StoredEvent(_Event):
    # When it happened: its rows are stored with this time, however late they are written.
    at: datetime = Field(default_factory=utcnow)


class TurnStarted(_StoredEvent):
    """A turn began: the user's text is about to be sent."""

    kind: Literal["turn_started"] = "turn_started"
    text: str
    cell_id: str | None = None
    attachments: list[ImagePart] | None = None  # the images sent with the text


class _RoundEvent(_Event):
    round: int = 0  # which request of the turn it came from (0, 1, ... as tools run)


class TextDelta(_RoundEvent):
    """A piece of the assistant's reply text."""

    kind: Literal["text_delta"] = "text_delta"
    text: str


class ReasoningDelta(_RoundEvent):
    """A piece of the model's reasoning text (servers that stream it)."""

    kind: Literal["reasoning_delta"] = "reasoning_delta"
    text: str


class _CallEvent(_RoundEvent):
    index: int  # the call's place among the request's tool calls
    call_id: str


class ToolCallStarted(_CallEvent):
    """The model began a tool call; its arguments follow as ``ToolCallDelta`` events."""

    kind: Literal["tool_call_started"] = "tool_call_started"
    name: str


class ToolCallDelta(_CallEvent):
    """A fragment of a streamed tool call's JSON arguments."""

    kind: Literal["tool_call_delta"] = "tool_call_delta"
    arguments_delta: str


class ToolResult(_StoredEvent):
    """A tool finished (or failed); ``call.result`` is what the model will see."""

    kind: Literal["tool_result"] = "tool_result"
    call: ToolCallRecord


class MessageAdded(_StoredEvent):
    """A message is complete and part of the conversation (store writes it now)."""

    kind: Literal["message"] = "message"
    message: Message


class MessagesMarked(_StoredEvent):
    """Stored messages changed state (superseded by a cell re-run, or compacted)."""

    kind: Literal["messages_marked"] = "messages_marked"
    message_ids: list[str]
    state: MessageState


class UsageEvent(_StoredEvent):
    """One model request finished (or failed): its usage, cost and timing."""

    kind: Literal["usage"] = "usage"
    request_id: str = Field(default_factory=new_id)
    round: int = 0
    model: str
    provider: str | None = None
    usage: RequestUsage | None = None
    cost_usd: float | None = None
    # Where cost_usd came from; None when the cost is unknown.
    cost_source: CostSource | None = None
    ttft_ms: float | None = None  # to the first token, reasoning included
    first_text_ms: float | None = None  # to the first token of the answer itself
    duration_ms: float = 0.0
    finish_reason: str | None = None
    error: str | None = None
    purpose: Literal["chat", "summary"] = "chat"
    # What the budget check estimated before sending (chat requests), beside the actual.
    estimated_prompt_tokens: int | None = None
    estimated_cost_usd: float | None = None
    # The server reported far fewer prompt tokens than were sent: it may have cut them.
    suspected_truncation: bool = False
    # HTTP attempts the request took (the openai client retries a 429, a 5xx or a lost
    # connection by itself): 1 when the first was answered; None when not counted.
    attempts: int | None = None
    # What the attempts before the last got, in order: "HTTP 429, no answer"; None if none.
    retried_after: str | None = None


class CompactionEvent(_StoredEvent):
    """The history was compacted (or an attempt failed: ``error`` says why)."""

    kind: Literal["compaction"] = "compaction"
    compaction_id: str = Field(default_factory=new_id)
    strategy: str
    from_seq: int | None = None
    to_seq: int | None = None
    summary: str | None = None
    tokens_before: int | None = None
    tokens_after: int | None = None
    model: str | None = None
    cost_usd: float | None = None
    error: str | None = None


class LimitReached(_Event):
    """A limit stopped the turn (max rounds or a budget)."""

    kind: Literal["limit_reached"] = "limit_reached"
    limit: str
    message: str


class ErrorEvent(_Event):
    """Something went wrong; ``message`` is written for the user."""

    kind: Literal["error"] = "error"
    message: str
    error_kind: str = "error"
    status_code: int | None = None


class Notice(_Event):
    """Something the user should know that is not an error (e.g. cost unknown)."""

    kind: Literal["notice"] = "notice"
    message: str


class TurnFinished(_StoredEvent):
    """The turn ended; ``result`` is the same object ``send()`` returns."""

    kind: Literal["turn_finished"] = "turn_finished"
    result: TurnResult


Event = Annotated[
    TurnStarted
    | TextDelta
    | ReasoningDelta
    | ToolCallStarted
    | ToolCallDelta
    | ToolResult
    | MessageAdded
    | MessagesMarked
    | UsageEvent
    | CompactionEvent
    | LimitReached
    | ErrorEvent
    | Notice
    | TurnFinished,
    Field(discriminator="kind"),
]

EventAdapter: TypeAdapter[Event] = TypeAdapter(Event)
