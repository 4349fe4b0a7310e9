"""Which events become which rows: the one mapping of the event stream (and of a new
session, a message) to the store's rows, and of a ``messages`` row back to a Message.

``rows_of(event)`` gives an event's rows (``_WRITERS``: kind -> table and writer), as
``Insert`` and ``Update`` values a backend applies in its own SQL (its upsert, its list
syntax); ``STORED_KINDS`` derives from it, and the sink (``_sink.py``) queues only those.
Every inserted row of an attributed table carries who wrote it (``attributed``). Values a
backend can never take are its to tell apart (``UnstorableRow``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from .._config import whoami
from .._events import (
    CompactionEvent,
    Event,
    MessageAdded,
    MessagesMarked,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
)
from .._types import ImagePart, Message, RequestUsage, ToolCallsAdapter, utcnow
from ._migrations import ATTRIBUTED_TABLES

__all__ = [
    "ATTRIBUTION_COLUMNS",
    "MESSAGE_COLUMNS",
    "STORED_KINDS",
    "Insert",
    "RowWrite",
    "Update",
    "attachment_rows",
    "attributed",
    "message_from_row",
    "message_row",
    "rows_of",
    "session_row",
    "session_title",
    "with_image_bytes",
]


@dataclass(frozen=True)
class Insert:
    """One row of ``table``; a row with the same id is replaced (a replayed event), or
    kept as it is when ``keep``."""

    table: str
    columns: tuple[str, ...]
    values: list[Any]
    keep: bool = False


@dataclass(frozen=True)
class Update:
    """Set ``values`` on the rows of ``table`` whose ``key`` column is one of ``keys``.

    ``only_if_null`` limits it to rows where that column is NULL; ``otherwise`` is
    inserted when no row matched.
    """

    table: str
    values: dict[str, Any]
    key: str
    keys: list[Any]
    only_if_null: str | None = None
    otherwise: Insert | None = None


RowWrite = Insert | Update


def rows_of(event: Event) -> tuple[str, list[RowWrite]] | None:
    """The table ``event`` is stored in and the rows it writes; ``None`` if it is not stored.

    Every inserted row carries who wrote it (``attributed``).
    """
    entry = _WRITERS.get(event.kind)
    if entry is None:
        return None
    table, writer = entry
    return table, [_attribute(write) for write in writer(event)]


def _attribute(write: RowWrite) -> RowWrite:
    if isinstance(write, Insert):
        return attributed(write) if write.table in ATTRIBUTED_TABLES else write
    if write.otherwise is not None:
        return replace(write, otherwise=attributed(write.otherwise))
    return write


ATTRIBUTION_COLUMNS = ("username", "hostname")


def attributed(row: Insert) -> Insert:
    """``row`` with the user and host of this process (``_config.whoami``) added."""
    return Insert(
        row.table,
        (*row.columns, *ATTRIBUTION_COLUMNS),
        [*row.values, *_who(os.environ.get("JUPYTERHUB_USER"))],
        row.keep,
    )


@lru_cache(maxsize=4)
def _who(hub_user: str | None) -> tuple[str | None, str]:
    # Keyed by JUPYTERHUB_USER so a changed environment is seen; the rest never changes.
    return whoami()


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# The columns of the rows ``_row`` builds from an event's (or record's) attributes.

_TOOL_CALL_COLUMNS = (
    "id", "session_id", "turn_id", "round", "call_id", "name", "arguments", "result",
    "is_error", "error_kind", "duration_ms", "created_at",
)  # fmt: skip
_COMPACTION_COLUMNS = (
    "id", "session_id", "turn_id", "strategy", "from_seq", "to_seq", "summary",
    "tokens_before", "tokens_after", "model", "cost_usd", "error", "created_at",
)  # fmt: skip
_TURN_OUTCOME = (
    "status", "rounds", "requests", "prompt_tokens", "completion_tokens", "cost_usd",
    "error", "duration_ms", "finished_at",
)  # fmt: skip


# The one mapping between a Message and its ``messages`` row (writes and loads use it).
MESSAGE_COLUMNS = (
    "id", "session_id", "seq", "role", "content", "reasoning", "name", "tool_calls",
    "tool_call_id", "turn_id", "round", "cell_id", "status", "state", "created_at",
    "attachments",
)  # fmt: skip
_ATTACHMENT_COLUMNS = (
    "sha256", "mime", "size", "width", "height", "data", "url", "created_at",
)  # fmt: skip


def message_row(session_id: str, message: Message) -> Insert:
    """The ``messages`` row of one message (a replayed one replaces it)."""
    tool_calls = (
        ToolCallsAdapter.dump_json(message.tool_calls).decode() if message.tool_calls else None
    )
    images = message.attachments
    row = {
        **message.model_dump(
            include=set(MESSAGE_COLUMNS) - {"tool_calls", "created_at", "attachments"}
        ),
        "session_id": session_id,
        "tool_calls": tool_calls,
        "created_at": utc(message.created_at),
        "attachments": json.dumps([image.ref() for image in images]) if images else None,
    }
    return Insert("messages", MESSAGE_COLUMNS, [row[c] for c in MESSAGE_COLUMNS])


def attachment_rows(message: Message) -> list[Insert]:
    """The ``attachments`` rows of a message's images; an image stored before is kept."""
    rows: list[Insert] = []
    for image in message.attachments or []:
        values = [
            image.sha256, image.mime, image.size, image.width, image.height, image.data,
            image.url, utc(message.created_at),
        ]  # fmt: skip
        rows.append(Insert("attachments", _ATTACHMENT_COLUMNS, values, keep=True))
    return rows


def session_row(
    *,
    session_id: str,
    model: str | None,
    system_prompt: str | None,
    title: str | None,
    parent_id: str | None,
    notebook: str | None,
    metadata: dict[str, Any] | None,
    created_at: datetime | None,
) -> Insert:
    """The ``sessions`` row of a new session (``metadata`` as JSON text), attributed."""
    row = {
        "id": session_id,
        "title": title,
        "created_at": utc(created_at or utcnow()),
        "model": model,
        "system_prompt": system_prompt,
        "parent_id": parent_id,
        "notebook": notebook,
        "metadata": json.dumps(metadata or {}),
    }
    return attributed(Insert("sessions", tuple(row), list(row.values()), keep=True))


def with_image_bytes(message: Message, found: dict[str, bytes]) -> Message:
    """``message`` with the stored bytes of its images put back (``found``: by sha256)."""
    if message.attachments:
        message.attachments = [
            i.model_copy(update={"data": found.get(i.sha256)}) if i.url is None else i
            for i in message.attachments
        ]
    return message


def message_from_row(row: dict[str, Any]) -> Message:
    """The Message of a ``messages`` row (``created_at`` an aware datetime).

    Its images come without their bytes (``data`` None); ``Store.load_session`` adds them.
    """
    fields = {k: v for k, v in row.items() if k != "session_id"}
    calls = fields.pop("tool_calls")
    refs = fields.pop("attachments", None)
    return Message(
        **fields,
        tool_calls=ToolCallsAdapter.validate_json(calls) if calls else None,
        attachments=[ImagePart(**ref) for ref in json.loads(refs)] if refs else None,
    )


# ------------------------------------------------------------------ writers
# Each gives one event's rows.


def _write_message(event: MessageAdded) -> list[RowWrite]:
    return [message_row(event.session_id, event.message), *attachment_rows(event.message)]


def _write_marked(event: MessagesMarked) -> list[RowWrite]:
    if not event.message_ids:
        return []
    return [Update("messages", {"state": event.state}, "id", list(event.message_ids))]


def _write_usage(event: UsageEvent) -> list[RowWrite]:
    usage = event.usage or RequestUsage()
    row = {
        "id": event.request_id,
        "session_id": event.session_id,
        "turn_id": event.turn_id or None,
        "round": event.round,
        "model": event.model,
        "provider": event.provider,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cost_usd": event.cost_usd,
        "cost_source": event.cost_source,
        "ttft_ms": event.ttft_ms,
        "first_text_ms": event.first_text_ms,
        "duration_ms": event.duration_ms,
        "finish_reason": event.finish_reason,
        "error": event.error,
        "purpose": event.purpose,
        "estimated_prompt_tokens": event.estimated_prompt_tokens,
        "estimated_cost_usd": event.estimated_cost_usd,
        "suspected_truncation": event.suspected_truncation,
        "attempts": event.attempts,
        "retried_after": event.retried_after,
        "created_at": utc(event.at),
    }
    return [Insert("requests", tuple(row), list(row.values()))]


def _row(table: str, columns: tuple[str, ...], source: Any, **given: Any) -> Insert:
    """A row of ``columns``: each the attribute of ``source`` by that name, unless given."""
    values = [given[c] if c in given else getattr(source, c) for c in columns]
    return Insert(table, columns, values)


def _write_tool_result(event: ToolResult) -> list[RowWrite]:
    call = event.call
    # The row is keyed by the record's own id: the model's call id is not unique
    # (fakes and some servers reuse "call_0", even within one turn).
    row = _row(
        "tool_calls",
        _TOOL_CALL_COLUMNS,
        call,
        session_id=event.session_id,
        turn_id=call.turn_id or event.turn_id or None,
        created_at=utc(event.at),
    )
    return [row]


def _write_compaction(event: CompactionEvent) -> list[RowWrite]:
    row = _row(
        "compactions",
        _COMPACTION_COLUMNS,
        event,
        id=event.compaction_id,
        turn_id=event.turn_id or None,
        created_at=utc(event.at),
    )
    return [row]


def _write_turn_started(event: TurnStarted) -> list[RowWrite]:
    writes: list[RowWrite] = [
        Insert(
            "turns",
            ("id", "session_id", "cell_id", "user_text", "status", "started_at"),
            [event.turn_id, event.session_id, event.cell_id, event.text, "running", utc(event.at)],
            keep=True,  # resume() continues a stored turn under the same id
        )
    ]
    title = session_title(event.text)
    if title:  # a session without a title is named after its first message
        writes.append(
            Update("sessions", {"title": title}, "id", [event.session_id], only_if_null="title")
        )
    return writes


TITLE_CHARS = 60


def session_title(text: str | None) -> str | None:
    """A session's title from its first user message: one line, at most ``TITLE_CHARS``."""
    words = " ".join((text or "").split())
    if len(words) <= TITLE_CHARS:
        return words or None
    return words[: TITLE_CHARS - 1].rstrip() + "…"


def _write_turn_finished(event: TurnFinished) -> list[RowWrite]:
    result = event.result
    now = utc(event.at)
    turn_id = result.turn_id or event.turn_id
    outcome = [
        result.status,
        result.rounds,
        result.usage.requests,
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
        result.usage.cost_usd,
        result.error,
        result.duration_ms,
        now,
    ]
    # The start of this turn may never have been stored (an older loop, a replay).
    whole = Insert(
        "turns",
        ("id", "session_id", *_TURN_OUTCOME, "started_at"),
        [
            turn_id,
            result.session_id or event.session_id,
            *outcome,
            now - timedelta(milliseconds=result.duration_ms),
        ],
    )
    values = dict(zip(_TURN_OUTCOME, outcome, strict=True))
    return [Update("turns", values, "id", [turn_id], otherwise=whole)]


# The one list of what is stored: event kind -> (table, writer). The sink derives the
# kinds it queues from it; every other kind (deltas, notices) writes nothing.
_WRITERS: dict[str, tuple[str, Callable[[Any], list[RowWrite]]]] = {
    "message": ("messages", _write_message),
    "messages_marked": ("messages", _write_marked),
    "usage": ("requests", _write_usage),
    "tool_result": ("tool_calls", _write_tool_result),
    "compaction": ("compactions", _write_compaction),
    "turn_started": ("turns", _write_turn_started),
    "turn_finished": ("turns", _write_turn_finished),
}
STORED_KINDS: frozenset[str] = frozenset(_WRITERS)
