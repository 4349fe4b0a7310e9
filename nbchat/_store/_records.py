"""What the store hands back: a stored session, as a model any backend fills."""

from __future__ import annotations

import json
from collections.abc import Sequence
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

    @classmethod
    def of_row(cls, head: Sequence[Any], *, messages: list[Message], max_seq: int) -> StoredSession:
        """From a ``sessions`` row read as (id, model, system_prompt, title, parent_id,
        notebook, created_at as a datetime, metadata as JSON text)."""
        names = ("id", "model", "system_prompt", "title", "parent_id", "notebook")
        *settings, created_at, metadata = head
        return cls(
            **dict(zip(names, settings, strict=True)),
            created_at=created_at,
            metadata=json.loads(metadata) if metadata else {},
            messages=messages,
            max_seq=int(max_seq),
        )

    def pending_tool_calls(self) -> list[ToolCall]:
        """Tool calls of the last assistant message that have no result yet (pending)."""
        return pending_tool_calls(self.messages)
