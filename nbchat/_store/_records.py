"""What the store hands back: a stored session, as a model any backend fills."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .._types import Message, ToolCall
from . import pending_tool_calls

__all__ = ["StoredSession"]


class StoredSession(BaseModel):
    """A session as the store has it: its settings and its live (active) messages."""

    model_config = ConfigDict(extra="forbid")

    id: str
    model: str | None = None
    system_prompt: str | None = None
    title: str | None = None
    parent_id: str | None = None
    notebook: str | None = None
    created_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    messages: list[Message] = Field(default_factory=list)
    max_seq: int = -1

    def pending_tool_calls(self) -> list[ToolCall]:
        """Tool calls of the last assistant message that have no result yet (pending)."""
        return pending_tool_calls(self.messages)
