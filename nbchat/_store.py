"""The DuckDB store: one consumer of the session's event stream, shared by many kernels.

``Store.handle()`` turns each event that completes something (a message, a request,
a tool call, a compaction, a turn) into a row, committed before it returns; stream
deltas are ignored. How the file is shared with other processes — held only while
in use, handed over to waiting processes — lives in ``_lease.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ._config import default_db_path
from ._exceptions import StoreError
from ._lease import Lease, LeaseOptions, acquire_lease, default_lock_timeout, release_lease
from ._types import (
    CompactionEvent,
    Event,
    Message,
    MessageAdded,
    MessagesMarked,
    RequestUsage,
    ToolCall,
    ToolCallsAdapter,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
    utcnow,
)

__all__ = ["QueryResult", "Store", "StoredSession"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Columns of `sessions` a caller may change after creation.
_SESSION_FIELDS = frozenset(
    {"title", "model", "system_prompt", "parent_id", "notebook", "metadata"}
)


def _utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (a naive one is taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _from_epoch_us(value: int | None) -> datetime | None:
    # Timestamps are read as epoch microseconds: DuckDB's own TIMESTAMPTZ -> datetime
    # conversion needs pytz, which nbchat does not depend on.
    return None if value is None else _EPOCH + timedelta(microseconds=value)


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
        """Tool calls of the last assistant message that have no result yet.

        Non-empty means the process died between storing the assistant's tool calls
        and storing their results: the session is *pending* (SPEC §2.5).
        """
        for index in range(len(self.messages) - 1, -1, -1):
            message = self.messages[index]
            if message.role == "assistant" and message.tool_calls:
                answered = {
                    later.tool_call_id
                    for later in self.messages[index + 1 :]
                    if later.role == "tool"
                }
                return [call for call in message.tool_calls if call.id not in answered]
            if message.role in ("assistant", "user"):
                return []
        return []


@dataclass(frozen=True)
class QueryResult:
    """Rows of a query as numpy columns (masked where NULL), with DuckDB's type names."""

    columns: list[str]
    types: list[str]
    data: dict[str, Any]


class Store:
    """A DuckDB file (or ``:memory:``) holding sessions, messages, requests and more.

    Open with ``Store.open(db)``. The session loop feeds it every event through
    ``handle()``; the analysis functions read it. Several processes may share one
    file: each holds it only while it is writing or reading, and waits (bounded by
    ``lock_timeout`` seconds) for the others.
    """

    path: str

    def __init__(self, lease: Lease, *, lock_timeout: float) -> None:
        """Use ``Store.open()``; this wraps an already-open lease."""
        self._lease: Lease | None = lease
        self._lock_timeout = lock_timeout
        self.path = lease.path

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(
        cls,
        db: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float | None = None,
        linger: float = 0.5,
        min_hold: float = 0.1,
        sync_every_write: bool = False,
    ) -> Store:
        """Open (creating and migrating if needed) the store at ``db``.

        ``None`` means ``NBCHAT_DB`` or ``~/.nbchat/nbchat.duckdb``; ``":memory:"`` is
        a private in-memory store that lives as long as this object. ``lock_timeout``
        bounds how long any operation waits for another process (default 15 s, or
        ``NBCHAT_DB_LOCK_TIMEOUT``). ``linger`` is how long the file stays attached
        after the last use, ``min_hold`` how long a busy process keeps it before handing
        it to a waiting one. By default a write reaches the operating system before
        ``handle()`` returns (safe if the process dies) and is flushed to disk when the
        file is let go; ``sync_every_write=True`` flushes every write
        (safe against power loss, slower). ``linger``, ``min_hold`` and
        ``sync_every_write`` are fixed by the first ``open`` of a path in a process.
        """
        raw = default_db_path() if db is None else os.fspath(db)
        if not raw:
            raise StoreError("The store path is empty; pass db= a file path or ':memory:'.")
        options = LeaseOptions(linger=linger, min_hold=min_hold, sync_every_write=sync_every_write)
        timeout = default_lock_timeout() if lock_timeout is None else float(lock_timeout)
        lease = acquire_lease(raw, options, timeout)
        return cls(lease, lock_timeout=timeout)

    def close(self) -> None:
        """Release this handle; the file is closed when no other handle in the process uses it."""
        lease, self._lease = self._lease, None
        if lease is not None:
            release_lease(lease)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._lease is None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r}{', closed' if self.closed else ''})"

    def _connection(self) -> Any:
        if self._lease is None:
            raise StoreError(f"The store {self.path} is closed.")
        return self._lease.connection(self._lock_timeout)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._connection() as con:
            con.execute(_parsed(sql), list(params))

    def _insert(
        self, table: str, columns: Sequence[str], values: Sequence[Any], *, keep: bool = False
    ) -> None:
        """Insert one row; a row with the same id is replaced (a replayed event), or kept.

        A plain INSERT is about three times cheaper in DuckDB than an upsert, so the
        upsert runs only when the plain insert meets an existing id.
        """
        names = ", ".join(columns)
        marks = ", ".join("?" * len(columns))
        # Table and column names are fixed strings of this module, never user text.
        with self._connection() as con:
            try:
                con.execute(
                    _parsed(f"INSERT INTO {table} ({names}) VALUES ({marks})"), list(values)
                )
            except _duckdb().ConstraintException:
                verb = "INSERT OR IGNORE" if keep else "INSERT OR REPLACE"
                con.execute(f"{verb} INTO {table} ({names}) VALUES ({marks})", list(values))

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._connection() as con:
            rows: list[tuple[Any, ...]] = con.execute(sql, list(params)).fetchall()
            return rows

    # ------------------------------------------------------------------ sessions

    def create_session(
        self,
        *,
        session_id: str,
        model: str | None,
        system_prompt: str | None,
        title: str | None = None,
        parent_id: str | None = None,
        notebook: str | None = None,
        metadata: dict[str, Any] | None = None,
        created_at: datetime | None = None,
        messages: Sequence[Message] = (),
    ) -> None:
        """Record a new session (with ``messages``, all in one transaction); ids are unique."""
        row = [
            session_id,
            title,
            _utc(created_at or utcnow()),
            model,
            system_prompt,
            parent_id,
            notebook,
            json.dumps(metadata or {}),
        ]
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(
                    "INSERT INTO sessions (id, title, created_at, model, system_prompt,"
                    " parent_id, notebook, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                for message in messages:
                    con.execute(_INSERT_MESSAGE, _message_params(session_id, message))
                con.execute("COMMIT")
            except _duckdb().ConstraintException as exc:
                con.execute("ROLLBACK")
                raise StoreError(
                    f"A session or message with this id already exists in {self.path}"
                    f" (session {session_id})."
                ) from exc
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def update_session(self, session_id: str, **fields: Any) -> None:
        """Change some of a session's settings (title, model, system_prompt, metadata...)."""
        unknown = set(fields) - _SESSION_FIELDS
        if unknown:
            raise StoreError(f"Sessions have no field {', '.join(sorted(unknown))}.")
        if not fields:
            return
        names = sorted(fields)
        values = [json.dumps(fields[n]) if n == "metadata" else fields[n] for n in names]
        # Column names come from the fixed set above, never from the caller's text.
        assignments = ", ".join(f"{name} = ?" for name in names)
        self._execute(f"UPDATE sessions SET {assignments} WHERE id = ?", [*values, session_id])

    def has_session(self, session_id: str) -> bool:
        """Whether a session with this id is stored."""
        return bool(self._fetchall("SELECT 1 FROM sessions WHERE id = ?", [session_id]))

    def latest_session_id(self, notebook: str | None = None) -> str | None:
        """The most recently created session (in ``notebook``, if given), or ``None``."""
        rows = self._fetchall(
            "SELECT id FROM sessions WHERE ? IS NULL OR notebook = ?"
            " ORDER BY created_at DESC, id DESC LIMIT 1",
            [notebook, notebook],
        )
        return str(rows[0][0]) if rows else None

    def load_session(self, session_id: str) -> StoredSession:
        """The session's settings and active messages in order; ``StoreError`` if unknown."""
        with self._connection() as con:
            head = con.execute(
                "SELECT id, model, system_prompt, title, parent_id, notebook,"
                " epoch_us(created_at), metadata FROM sessions WHERE id = ?",
                [session_id],
            ).fetchall()
            if not head:
                raise StoreError(f"No session {session_id} in {self.path}.")
            rows = con.execute(
                "SELECT role, content, name, tool_calls, tool_call_id, id, seq, turn_id, round,"
                " cell_id, status, state, epoch_us(created_at) FROM messages"
                " WHERE session_id = ? AND state = 'active' ORDER BY seq, created_at",
                [session_id],
            ).fetchall()
            (max_seq,) = con.execute(
                "SELECT coalesce(max(seq), -1) FROM messages WHERE session_id = ?", [session_id]
            ).fetchone()
        sid, model, system_prompt, title, parent_id, notebook, created_us, metadata = head[0]
        return StoredSession(
            id=sid,
            model=model,
            system_prompt=system_prompt,
            title=title,
            parent_id=parent_id,
            notebook=notebook,
            created_at=_from_epoch_us(created_us),
            metadata=json.loads(metadata) if metadata else {},
            messages=[_message_from_row(row) for row in rows],
            max_seq=int(max_seq),
        )

    # ------------------------------------------------------------------ events

    def handle(self, event: Event) -> None:
        """Persist one event of the session loop; deltas and notices are ignored.

        The row is written (and committed) before this returns.
        """
        writer = _WRITERS.get(event.kind)
        if writer is not None:
            writer(self, event)

    def _on_message(self, event: MessageAdded) -> None:
        self._insert("messages", _MESSAGE_COLUMNS, _message_params(event.session_id, event.message))

    def _on_marked(self, event: MessagesMarked) -> None:
        if event.message_ids:
            self._execute(
                "UPDATE messages SET state = ? WHERE list_contains(?, id)",
                [event.state, list(event.message_ids)],
            )

    def _on_usage(self, event: UsageEvent) -> None:
        usage = event.usage or RequestUsage()
        self._insert(
            "requests",
            _REQUEST_COLUMNS,
            [
                event.request_id,
                event.session_id,
                event.turn_id or None,
                event.round,
                event.model,
                event.provider,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens,
                usage.reasoning_tokens,
                event.cost_usd,
                event.ttft_ms,
                event.duration_ms,
                event.finish_reason,
                event.error,
                event.purpose,
                utcnow(),
            ],
        )

    def _on_tool_result(self, event: ToolResult) -> None:
        call = event.call
        turn_id = call.turn_id or event.turn_id or None
        # The model's call id is not unique across sessions (fakes and some servers
        # reuse "call_0"), so the row key adds the session and turn to it.
        self._insert(
            "tool_calls",
            _TOOL_CALL_COLUMNS,
            [
                f"{event.session_id}:{turn_id or ''}:{call.call_id}",
                event.session_id,
                turn_id,
                call.round,
                call.call_id,
                call.name,
                call.arguments,
                call.result,
                call.is_error,
                call.error_kind,
                call.duration_ms,
                utcnow(),
            ],
        )

    def _on_compaction(self, event: CompactionEvent) -> None:
        self._insert(
            "compactions",
            _COMPACTION_COLUMNS,
            [
                event.compaction_id,
                event.session_id,
                event.turn_id or None,
                event.strategy,
                event.from_seq,
                event.to_seq,
                event.summary,
                event.tokens_before,
                event.tokens_after,
                event.model,
                event.cost_usd,
                event.error,
                utcnow(),
            ],
        )

    def _on_turn_started(self, event: TurnStarted) -> None:
        self._insert(
            "turns",
            ("id", "session_id", "cell_id", "user_text", "started_at"),
            [event.turn_id, event.session_id, event.cell_id, event.text, utcnow()],
            keep=True,  # resume() continues a stored turn under the same id
        )

    def _on_turn_finished(self, event: TurnFinished) -> None:
        result = event.result
        now = utcnow()
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
        with self._connection() as con:
            updated = con.execute(
                _parsed(
                    "UPDATE turns SET status = ?, rounds = ?, requests = ?, prompt_tokens = ?,"
                    " completion_tokens = ?, cost_usd = ?, error = ?, duration_ms = ?,"
                    " finished_at = ? WHERE id = ?"
                ),
                [*outcome, turn_id],
            ).fetchone()
            if not updated or not updated[0]:
                # The start of this turn was never stored (an older loop, a replay).
                con.execute(
                    f"INSERT INTO turns ({', '.join(_TURN_COLUMNS)}) VALUES"
                    f" ({', '.join('?' * len(_TURN_COLUMNS))})",
                    [
                        turn_id,
                        result.session_id or event.session_id,
                        *outcome,
                        now - timedelta(milliseconds=result.duration_ms),
                    ],
                )

    # ------------------------------------------------------------------ reading

    def query(self, sql: str, params: Sequence[Any] | None = None) -> QueryResult:
        """Run one query built by nbchat (parameterised) and return its columns."""
        with self._connection() as con:
            cursor = con.execute(sql, list(params or []))
            return _result(cursor)

    def query_read_only(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> QueryResult:
        """Run one user query inside a read-only transaction that is always rolled back.

        ``params`` is a sequence for ``?`` placeholders or a mapping for ``$name`` ones.
        """
        bound = dict(params) if isinstance(params, Mapping) else list(params or [])
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION READ ONLY")
            try:
                cursor = con.execute(sql, bound)
                return _result(cursor)
            finally:
                con.execute("ROLLBACK")

    def stats(self) -> dict[str, Any]:
        """Counters of this process's connection handling (opens, waits), for benchmarks."""
        if self._lease is None:
            return {}
        return self._lease.stats()


def _result(cursor: Any) -> QueryResult:
    description = cursor.description or []
    columns = [str(item[0]) for item in description]
    types = [str(item[1]) for item in description]
    data = cursor.fetchnumpy() if columns else {}
    return QueryResult(columns=columns, types=types, data=dict(data))


def _duckdb() -> Any:
    import duckdb

    return duckdb


@lru_cache(maxsize=64)
def _parsed(sql: str) -> Any:
    """``sql`` parsed once: DuckDB's parser is a large part of a one-row INSERT's cost
    (~30%), and a parsed statement can be executed again and again."""
    return _duckdb().extract_statements(sql)[0]


# Column lists in the order the writers pass values.
_MESSAGE_COLUMNS = (
    "id", "session_id", "seq", "role", "content", "name", "tool_calls", "tool_call_id",
    "turn_id", "round", "cell_id", "status", "state", "created_at",
)  # fmt: skip
_REQUEST_COLUMNS = (
    "id", "session_id", "turn_id", "round", "model", "provider", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "cost_usd", "ttft_ms",
    "duration_ms", "finish_reason", "error", "purpose", "created_at",
)  # fmt: skip
_TOOL_CALL_COLUMNS = (
    "id", "session_id", "turn_id", "round", "call_id", "name", "arguments", "result",
    "is_error", "error_kind", "duration_ms", "created_at",
)  # fmt: skip
_COMPACTION_COLUMNS = (
    "id", "session_id", "turn_id", "strategy", "from_seq", "to_seq", "summary",
    "tokens_before", "tokens_after", "model", "cost_usd", "error", "created_at",
)  # fmt: skip
_TURN_COLUMNS = (
    "id", "session_id", "status", "rounds", "requests", "prompt_tokens", "completion_tokens",
    "cost_usd", "error", "duration_ms", "finished_at", "started_at",
)  # fmt: skip
_INSERT_MESSAGE = (
    f"INSERT OR REPLACE INTO messages ({', '.join(_MESSAGE_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_MESSAGE_COLUMNS))})"
)


def _message_params(session_id: str, message: Message) -> list[Any]:
    tool_calls = (
        ToolCallsAdapter.dump_json(message.tool_calls).decode() if message.tool_calls else None
    )
    return [
        message.id,
        session_id,
        message.seq,
        message.role,
        message.content,
        message.name,
        tool_calls,
        message.tool_call_id,
        message.turn_id,
        message.round,
        message.cell_id,
        message.status,
        message.state,
        _utc(message.created_at),
    ]


def _message_from_row(row: tuple[Any, ...]) -> Message:
    (role, content, name, tool_calls, tool_call_id, mid, seq, turn_id, rnd, cell_id, status,
     state, created_us) = row  # fmt: skip
    return Message(
        role=role,
        content=content,
        name=name,
        tool_calls=ToolCallsAdapter.validate_json(tool_calls) if tool_calls else None,
        tool_call_id=tool_call_id,
        id=mid,
        seq=seq,
        turn_id=turn_id,
        round=rnd,
        cell_id=cell_id,
        status=status,
        state=state,
        created_at=_from_epoch_us(created_us),
    )


_WRITERS: dict[str, Callable[[Store, Any], None]] = {
    "message": Store._on_message,
    "messages_marked": Store._on_marked,
    "usage": Store._on_usage,
    "tool_result": Store._on_tool_result,
    "compaction": Store._on_compaction,
    "turn_started": Store._on_turn_started,
    "turn_finished": Store._on_turn_finished,
}
