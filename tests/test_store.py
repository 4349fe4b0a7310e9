"""The DuckDB store, driven by the events the session loop emits (real files in tmp_path)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from nbchat import StoreError
from nbchat._events import (
    CompactionEvent,
    MessageAdded,
    MessagesMarked,
    Notice,
    TextDelta,
    ToolCallDelta,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
)
from nbchat._store import Store
from nbchat._store._migrations import MIGRATIONS, migrate
from nbchat._types import Message, RequestUsage, ToolCall, ToolCallRecord, TurnResult, Usage, new_id

TZ = "TIMESTAMP WITH TIME ZONE"

# The whole schema of a fresh store. A new migration must update this on purpose.
_REQUEST_SUMS = {
    "requests": "BIGINT",
    "prompt_tokens": "BIGINT",
    "prompt_reported": "BIGINT",
    "completion_tokens": "BIGINT",
    "completion_reported": "BIGINT",
    "cost_usd": "DOUBLE",
    "costed": "BIGINT",
    "answered_costed": "BIGINT",
}
EXPECTED_SCHEMA: dict[str, dict[str, str]] = {
    "_migrations": {"name": "VARCHAR", "applied_at": TZ},
    "_session_counts": {
        "session_id": "VARCHAR",
        "messages": "BIGINT",
        "last_message_at": TZ,
        **_REQUEST_SUMS,
        "last_request_at": TZ,
        "turns": "BIGINT",
        "first_message_at": TZ,
        "title": "VARCHAR",
        "model": "VARCHAR",
        "created_at": TZ,
        "system_prompt": "VARCHAR",
        "parent_id": "VARCHAR",
        "notebook": "VARCHAR",
        "metadata": "JSON",
        "superseded_turns": "BIGINT",
        "messages_version": "BIGINT",
    },
    "_turn_counts": {
        "turn_id": "VARCHAR",
        "user_messages": "BIGINT",
        "superseded_user_messages": "BIGINT",
        "session_id": "VARCHAR",
        "turn_rows": "BIGINT",
    },
    "_usage_by_day": {
        "day": "DATE",
        "session_id": "VARCHAR",
        "model": "VARCHAR",
        **_REQUEST_SUMS,
        "cached_tokens": "BIGINT",
    },
    "_usage_by_day_model": {  # m010
        "day": "DATE",
        "model": "VARCHAR",
        **_REQUEST_SUMS,
        "cached_tokens": "BIGINT",
    },
    "_tool_counts": {  # m010
        "day": "DATE",
        "tool": "VARCHAR",
        "bin": "INTEGER",
        "calls": "BIGINT",
        "errors": "BIGINT",
    },
    "compactions": {
        "id": "VARCHAR",
        "session_id": "VARCHAR",
        "from_seq": "INTEGER",
        "to_seq": "INTEGER",
        "summary": "VARCHAR",
        "tokens_before": "BIGINT",
        "tokens_after": "BIGINT",
        "model": "VARCHAR",
        "cost_usd": "DOUBLE",
        "created_at": TZ,
        "turn_id": "VARCHAR",
        "strategy": "VARCHAR",
        "error": "VARCHAR",
        "username": "VARCHAR",
        "hostname": "VARCHAR",
    },
    "messages": {
        "id": "VARCHAR",
        "session_id": "VARCHAR",
        "seq": "INTEGER",
        "role": "VARCHAR",
        "content": "VARCHAR",
        "name": "VARCHAR",
        "tool_calls": "JSON",
        "tool_call_id": "VARCHAR",
        "turn_id": "VARCHAR",
        "round": "INTEGER",
        "cell_id": "VARCHAR",
        "status": "VARCHAR",
        "state": "VARCHAR",
        "created_at": TZ,
        "reasoning": "VARCHAR",
        "username": "VARCHAR",
        "hostname": "VARCHAR",
        "attachments": "JSON",
    },
    "attachments": {
        "sha256": "VARCHAR",
        "mime": "VARCHAR",
        "size": "BIGINT",
        "width": "INTEGER",
        "height": "INTEGER",
        "data": "BLOB",
        "url": "VARCHAR",
        "created_at": TZ,
    },
    "requests": {
        "id": "VARCHAR",
        "session_id": "VARCHAR",
        "turn_id": "VARCHAR",
        "round": "INTEGER",
        "model": "VARCHAR",
        "provider": "VARCHAR",
        "prompt_tokens": "BIGINT",
        "completion_tokens": "BIGINT",
        "cached_tokens": "BIGINT",
        "reasoning_tokens": "BIGINT",
        "cost_usd": "DOUBLE",
        "ttft_ms": "DOUBLE",
        "duration_ms": "DOUBLE",
        "finish_reason": "VARCHAR",
        "error": "VARCHAR",
        "created_at": TZ,
        "purpose": "VARCHAR",
        "estimated_prompt_tokens": "BIGINT",
        "estimated_cost_usd": "DOUBLE",
        "cost_source": "VARCHAR",
        "cache_write_tokens": "BIGINT",
        "suspected_truncation": "BOOLEAN",
        "first_text_ms": "DOUBLE",
        "attempts": "INTEGER",
        "retried_after": "VARCHAR",
        "username": "VARCHAR",
        "hostname": "VARCHAR",
    },
    "sessions": {
        "id": "VARCHAR",
        "title": "VARCHAR",
        "created_at": TZ,
        "model": "VARCHAR",
        "system_prompt": "VARCHAR",
        "parent_id": "VARCHAR",
        "notebook": "VARCHAR",
        "metadata": "JSON",
        "username": "VARCHAR",
        "hostname": "VARCHAR",
    },
    "tool_calls": {
        "id": "VARCHAR",
        "session_id": "VARCHAR",
        "turn_id": "VARCHAR",
        "call_id": "VARCHAR",
        "name": "VARCHAR",
        "arguments": "VARCHAR",
        "result": "VARCHAR",
        "is_error": "BOOLEAN",
        "duration_ms": "DOUBLE",
        "created_at": TZ,
        "round": "INTEGER",
        "error_kind": "VARCHAR",
        "username": "VARCHAR",
        "hostname": "VARCHAR",
    },
    "turns": {
        "id": "VARCHAR",
        "session_id": "VARCHAR",
        "cell_id": "VARCHAR",
        "user_text": "VARCHAR",
        "status": "VARCHAR",
        "rounds": "INTEGER",
        "requests": "INTEGER",
        "prompt_tokens": "BIGINT",
        "completion_tokens": "BIGINT",
        "cost_usd": "DOUBLE",
        "error": "VARCHAR",
        "duration_ms": "DOUBLE",
        "started_at": TZ,
        "finished_at": TZ,
        "username": "VARCHAR",
        "hostname": "VARCHAR",
    },
}


def schema_of(con: Any) -> dict[str, dict[str, str]]:
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
    ).fetchall()
    out: dict[str, dict[str, str]] = {}
    for table, column, kind in rows:
        out.setdefault(table, {})[column] = kind
    return out


def rows(store: Store, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    return store._fetchall(sql, params or [])


@pytest.fixture
def store(store_db: str) -> Any:
    s = Store.open(store_db)
    s.create_session(session_id="s1", model="gpt-4o-mini", system_prompt="Be terse.")
    yield s
    s.close()


def msg(role: str, seq: int, content: str | None = "x", **kw: Any) -> MessageAdded:
    message = Message(role=role, content=content, seq=seq, turn_id="t1", **kw)  # type: ignore[arg-type]
    return MessageAdded(session_id="s1", turn_id="t1", message=message)


# --------------------------------------------------------------------------- schema


def test_fresh_store_has_exactly_the_expected_columns(db_path: Path) -> None:
    Store.open(db_path).close()
    with duckdb.connect(str(db_path)) as con:
        assert schema_of(con) == EXPECTED_SCHEMA
        recorded = con.execute("SELECT name FROM _migrations ORDER BY applied_at").fetchall()
    assert [name for (name,) in recorded] == [name for name, _ in MIGRATIONS]


def test_memory_store_has_the_same_schema() -> None:
    with Store.open(":memory:") as s, s._connection() as con:
        assert schema_of(con) == EXPECTED_SCHEMA


def test_upgrade_from_the_first_migration_keeps_data(db_path: Path) -> None:
    with duckdb.connect(str(db_path)) as con:
        assert migrate(con, stop_after="m001_initial") == ["m001_initial"]
        assert "turns" not in schema_of(con)
        con.execute(
            "INSERT INTO sessions (id, created_at, model, metadata)"
            " VALUES ('old', now(), 'm', '{}')"
        )
        con.execute(
            "INSERT INTO requests (id, session_id, model, cost_usd, created_at)"
            " VALUES ('r1', 'old', 'm', 0.5, now())"
        )

    with Store.open(db_path) as s:
        with s._connection() as con:
            assert schema_of(con) == EXPECTED_SCHEMA
            names = [n for (n,) in con.execute("SELECT name FROM _migrations").fetchall()]
        assert sorted(names) == sorted(name for name, _ in MIGRATIONS)
        # Rows written before the upgrade get the new column's default.
        assert rows(s, "SELECT id, cost_usd, purpose FROM requests") == [("r1", 0.5, "chat")]
        assert s.load_session("old").model == "m"


def test_upgrade_from_a_v2_store_adds_the_request_estimates(db_path: Path) -> None:
    with duckdb.connect(str(db_path)) as con:
        assert migrate(con, stop_after="m002_turns_and_details") == [
            "m001_initial",
            "m002_turns_and_details",
        ]
        assert "estimated_cost_usd" not in schema_of(con)["requests"]
        con.execute(
            "INSERT INTO sessions (id, created_at, model, metadata) VALUES ('v2', now(), 'm', '{}')"
        )
        con.execute(
            "INSERT INTO requests (id, session_id, model, prompt_tokens, cost_usd, created_at)"
            " VALUES ('r1', 'v2', 'm', 10, 0.5, now())"
        )

    with Store.open(db_path) as s:
        with s._connection() as con:
            assert schema_of(con) == EXPECTED_SCHEMA
        assert rows(
            s, "SELECT id, prompt_tokens, estimated_prompt_tokens, estimated_cost_usd FROM requests"
        ) == [("r1", 10, None, None)]
        s.write(
            UsageEvent(
                session_id="v2",
                request_id="r2",
                model="m",
                usage=RequestUsage(prompt_tokens=12, completion_tokens=3),
                estimated_prompt_tokens=11,
                estimated_cost_usd=0.25,
            )
        )
        assert rows(
            s, "SELECT estimated_prompt_tokens, estimated_cost_usd FROM requests WHERE id = 'r2'"
        ) == [(11, 0.25)]


def test_reopening_applies_no_migration_twice(db_path: Path) -> None:
    Store.open(db_path).close()
    with duckdb.connect(str(db_path)) as con:
        assert migrate(con) == []
        assert con.execute("SELECT count(*) FROM _migrations").fetchone() == (len(MIGRATIONS),)


# --------------------------------------------------------------------------- paths


def test_a_directory_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory") as info:
        Store.open(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_a_path_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "plain.txt"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="Cannot create the folder") as info:
        Store.open(blocker / "chats.duckdb")
    assert str(blocker) in str(info.value)


def test_an_unwritable_location_is_refused() -> None:
    # /proc refuses new entries even to root, so this holds in CI containers too.
    with pytest.raises(StoreError, match="/proc/nbchat-test"):
        Store.open("/proc/nbchat-test/chats.duckdb")


def test_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "broken.duckdb"
    bad.write_bytes(b"this is not a database" * 500)
    with pytest.raises(StoreError, match="not a DuckDB database") as info:
        Store.open(bad)
    assert str(bad) in str(info.value)


def test_an_empty_path_is_refused() -> None:
    with pytest.raises(StoreError, match="empty"):
        Store.open("")


def test_default_path_comes_from_nbchat_db(isolated_env: Path) -> None:
    with Store.open() as s:
        assert s.path == str(isolated_env.resolve())
    assert isolated_env.exists()


def test_parent_folders_are_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "chats.duckdb"
    with Store.open(target) as s:
        assert s.path == str(target)
    assert target.exists()


# --------------------------------------------------------------------------- sessions


def test_load_session_returns_active_messages_in_order(store: Store) -> None:
    call = ToolCall(id="c1", name="lookup", arguments='{"q": 1}')
    store.handle(msg("system", 0, "Be terse."))
    store.handle(msg("user", 1, "hi"))
    store.handle(msg("assistant", 3, None, tool_calls=[call]))  # written out of order
    store.handle(msg("tool", 4, '{"ok": true}', tool_call_id="c1", name="lookup"))
    store.handle(msg("assistant", 2, "old", state="superseded"))

    loaded = store.load_session("s1")
    assert [m.seq for m in loaded.messages] == [0, 1, 3, 4]
    assert [m.role for m in loaded.messages] == ["system", "user", "assistant", "tool"]
    assert loaded.messages[2].tool_calls == [call]
    assert loaded.messages[3].tool_call_id == "c1"
    assert loaded.max_seq == 4  # counts superseded messages too
    assert loaded.model == "gpt-4o-mini" and loaded.system_prompt == "Be terse."
    assert loaded.created_at.tzinfo is not None
    assert loaded.created_at.utcoffset() == timedelta(0)
    assert all(m.created_at.utcoffset() == timedelta(0) for m in loaded.messages)
    assert loaded.pending_tool_calls() == []


def test_a_query_after_load_session_is_served(store: Store) -> None:
    # DuckDB 2 keeps a result read with fetchone() open on the connection, and refused the
    # next DataFrame read on it: export_session(format="nbchat") reads a session, then
    # its turns.
    store.handle(msg("user", 1, "hi"))
    store.load_session("s1")
    assert store.frame("turns", session_id="s1").empty


def test_message_fields_survive_a_round_trip(store: Store) -> None:
    when = datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
    original = Message(
        role="assistant",
        content="partial",
        seq=7,
        turn_id="t9",
        round=2,
        cell_id="cell-3",
        status="interrupted",
        created_at=when,
    )
    store.handle(MessageAdded(session_id="s1", turn_id="t9", message=original))
    (loaded,) = store.load_session("s1").messages
    assert loaded == original


def test_pending_tool_calls_are_those_without_results(store: Store) -> None:
    calls = [ToolCall(id="a", name="f"), ToolCall(id="b", name="g")]
    store.handle(msg("user", 0, "go"))
    store.handle(msg("assistant", 1, None, tool_calls=calls))
    store.handle(msg("tool", 2, "done", tool_call_id="a"))
    assert [c.id for c in store.load_session("s1").pending_tool_calls()] == ["b"]


def test_unknown_session_names_id_and_path(store: Store) -> None:
    with pytest.raises(StoreError, match="No session nope in") as info:
        store.load_session("nope")
    assert store.path in str(info.value)


def test_duplicate_session_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError, match=r"already exists in .* \(session s1\)"):
        store.create_session(session_id="s1", model=None, system_prompt=None)


def test_session_settings_and_metadata(store: Store) -> None:
    store.create_session(
        session_id="s2",
        model=None,
        system_prompt=None,
        title="Plots",
        parent_id="s1",
        notebook="analysis.ipynb",
        metadata={"k": [1, 2]},
    )
    store.update_session("s2", title="Better plots", metadata={"k": 3})
    loaded = store.load_session("s2")
    assert (loaded.title, loaded.parent_id, loaded.notebook) == (
        "Better plots",
        "s1",
        "analysis.ipynb",
    )
    assert loaded.metadata == {"k": 3}
    assert store.has_session("s2") and not store.has_session("s3")
    assert store.latest_session_id() == "s2"
    assert store.latest_session_id(notebook="analysis.ipynb") == "s2"
    assert store.latest_session_id(notebook="other.ipynb") is None
    with pytest.raises(StoreError, match="no field"):
        store.update_session("s2", api_key="sk-nope")


# --------------------------------------------------------------------------- events


def test_messages_marked_changes_state(store: Store) -> None:
    first, second = msg("user", 0), msg("assistant", 1)
    store.handle(first)
    store.handle(second)
    store.handle(MessagesMarked(session_id="s1", message_ids=[first.message.id], state="compacted"))
    states = rows(store, "SELECT seq, state FROM messages ORDER BY seq")
    assert states == [(0, "compacted"), (1, "active")]
    assert [m.seq for m in store.load_session("s1").messages] == [1]


def test_replayed_message_replaces_its_row(store: Store) -> None:
    event = msg("assistant", 0, "first")
    store.handle(event)
    event.message.content = "second"
    store.handle(event)
    assert rows(store, "SELECT content FROM messages") == [("second",)]


def test_usage_event_becomes_a_request_row(store: Store) -> None:
    store.handle(
        UsageEvent(
            session_id="s1",
            turn_id="t1",
            request_id="r1",
            round=1,
            model="gpt-4o-mini",
            provider="openai",
            usage=RequestUsage(
                prompt_tokens=100, completion_tokens=20, cached_tokens=50, reasoning_tokens=5
            ),
            cost_usd=0.25,
            ttft_ms=12.5,
            duration_ms=80.0,
            finish_reason="stop",
        )
    )
    store.handle(
        UsageEvent(session_id="s1", turn_id="t1", request_id="r2", model="m", error="HTTP 500")
    )
    got = rows(
        store,
        "SELECT id, turn_id, round, model, provider, prompt_tokens, completion_tokens,"
        " cached_tokens, reasoning_tokens, cost_usd, ttft_ms, duration_ms, finish_reason,"
        " error, purpose FROM requests ORDER BY id",
    )
    assert got == [
        (
            "r1",
            "t1",
            1,
            "gpt-4o-mini",
            "openai",
            100,
            20,
            50,
            5,
            0.25,
            12.5,
            80.0,
            "stop",
            None,
            "chat",
        ),
        (
            "r2",
            "t1",
            0,
            "m",
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            0.0,
            None,
            "HTTP 500",
            "chat",
        ),
    ]


def test_tool_result_becomes_a_tool_call_row(store: Store) -> None:
    record = ToolCallRecord(
        call_id="call_0",
        name="lookup",
        arguments='{"q": "not closed',  # malformed arguments are stored as sent
        result='{"ok": false}',
        is_error=True,
        error_kind="invalid_arguments",
        duration_ms=3.5,
        turn_id="t1",
        round=0,
    )
    store.handle(ToolResult(session_id="s1", turn_id="t1", call=record))
    # The same call id in another session is a different row (another record).
    other = record.model_copy(update={"turn_id": "t7", "id": new_id()})
    store.handle(ToolResult(session_id="s2", turn_id="t7", call=other))
    got = rows(
        store,
        "SELECT session_id, turn_id, round, call_id, name, arguments, result, is_error,"
        " error_kind, duration_ms FROM tool_calls ORDER BY session_id",
    )
    assert got == [
        (
            "s1",
            "t1",
            0,
            "call_0",
            "lookup",
            '{"q": "not closed',
            '{"ok": false}',
            True,
            "invalid_arguments",
            3.5,
        ),
        (
            "s2",
            "t7",
            0,
            "call_0",
            "lookup",
            '{"q": "not closed',
            '{"ok": false}',
            True,
            "invalid_arguments",
            3.5,
        ),
    ]


def test_a_reused_call_id_never_overwrites_another_row(store: Store) -> None:
    # Some servers number calls per round ("call_0" again in round 1) or repeat ids.
    first = ToolCallRecord(call_id="call_0", name="a", arguments="{}", result="1", turn_id="t")
    second = ToolCallRecord(call_id="call_0", name="b", arguments="{}", result="2", turn_id="t")
    for record in (first, second, first):  # the last one is a replay of the first
        store.handle(ToolResult(session_id="s", turn_id="t", call=record))
    got = rows(store, "SELECT id, name, result FROM tool_calls ORDER BY name")
    assert got == [(first.id, "a", "1"), (second.id, "b", "2")]


def test_compactions_and_failed_attempts_are_recorded(store: Store) -> None:
    store.handle(
        CompactionEvent(
            session_id="s1",
            turn_id="t1",
            compaction_id="k1",
            strategy="summary",
            from_seq=1,
            to_seq=9,
            summary="They talked about plots.",
            tokens_before=9000,
            tokens_after=1200,
            model="gpt-4o-mini",
            cost_usd=0.001,
        )
    )
    store.handle(
        CompactionEvent(session_id="s1", compaction_id="k2", strategy="summary", error="HTTP 500")
    )
    got = rows(
        store,
        "SELECT id, turn_id, strategy, from_seq, to_seq, summary, tokens_before, tokens_after,"
        " model, cost_usd, error FROM compactions ORDER BY id",
    )
    assert got == [
        (
            "k1",
            "t1",
            "summary",
            1,
            9,
            "They talked about plots.",
            9000,
            1200,
            "gpt-4o-mini",
            0.001,
            None,
        ),
        ("k2", None, "summary", None, None, None, None, None, None, None, "HTTP 500"),
    ]


def turn_result(**kw: Any) -> TurnResult:
    usage = Usage(requests=2, prompt_tokens=30, completion_tokens=8, cost_usd=None)
    fields: dict[str, Any] = {
        "session_id": "s1",
        "turn_id": "t1",
        "status": "completed",
        "usage": usage,
        "rounds": 2,
        "duration_ms": 1500.0,
    }
    return TurnResult(**{**fields, **kw})


def test_turn_rows_follow_started_and_finished(store: Store) -> None:
    store.handle(TurnStarted(session_id="s1", turn_id="t1", text="plot it", cell_id="c7"))
    got = rows(store, "SELECT id, cell_id, user_text, status, finished_at FROM turns")
    assert got == [("t1", "c7", "plot it", "running", None)]

    store.handle(TurnFinished(session_id="s1", turn_id="t1", result=turn_result()))
    got = rows(
        store,
        "SELECT status, rounds, requests, prompt_tokens, completion_tokens, cost_usd,"
        " user_text, finished_at >= started_at FROM turns",
    )
    assert got == [("completed", 2, 2, 30, 8, None, "plot it", True)]

    # resume() starts the same turn again: the original start is kept.
    store.handle(TurnStarted(session_id="s1", turn_id="t1", text=""))
    assert rows(store, "SELECT user_text, status FROM turns") == [("plot it", "completed")]


def test_turn_finished_without_a_start_still_gets_a_row(store: Store) -> None:
    result = turn_result(turn_id="t2", status="error", error="boom")
    store.handle(TurnFinished(session_id="s1", turn_id="t2", result=result))
    got = rows(store, "SELECT id, status, error, started_at < finished_at FROM turns")
    assert got == [("t2", "error", "boom", True)]


def test_stream_deltas_and_notices_write_nothing(store: Store) -> None:
    before = store.stats()
    for event in (
        TextDelta(session_id="s1", text="hel"),
        ToolCallDelta(session_id="s1", index=0, call_id="c", arguments_delta="{"),
        Notice(session_id="s1", message="cost unknown"),
    ):
        store.handle(event)
    counts = rows(
        store,
        "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM requests)"
        " + (SELECT count(*) FROM turns) + (SELECT count(*) FROM tool_calls)",
    )
    assert counts == [(0,)]
    assert store.stats()["opens"] == before["opens"]


# --------------------------------------------------------------------------- lifecycle


def test_handles_in_one_process_share_the_connection(db_path: Path) -> None:
    a = Store.open(db_path)
    b = Store.open(str(db_path))
    a.create_session(session_id="shared", model=None, system_prompt=None)
    assert b.load_session("shared").id == "shared"
    assert a._lease is b._lease
    a.close()
    assert b.has_session("shared")  # b still works after a closed
    b.close()
    with pytest.raises(StoreError, match="closed"):
        b.has_session("shared")


def test_idle_connection_is_released_after_linger(db_path: Path) -> None:
    with Store.open(db_path, linger=0.05) as s:
        s.create_session(session_id="x", model=None, system_prompt=None)
        deadline = time.monotonic() + 5
        while s.stats()["open"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not s.stats()["open"]
        # The file is free: a plain DuckDB connection (another tool) can open it.
        with duckdb.connect(str(db_path)) as con:
            assert con.execute("SELECT count(*) FROM sessions").fetchone() == (1,)
        # and the store reopens on demand.
        assert s.has_session("x")
        assert s.stats()["opens"] == 2


def test_memory_stores_are_private(tmp_path: Path) -> None:
    a, b = Store.open(":memory:"), Store.open(":memory:")
    a.create_session(session_id="only-a", model=None, system_prompt=None)
    assert a.has_session("only-a") and not b.has_session("only-a")
    assert a.path == ":memory:"
    a.close()
    b.close()


def test_metadata_is_json(store: Store) -> None:
    store.create_session(session_id="m", model=None, system_prompt=None, metadata={"a": "é"})
    (raw,) = rows(store, "SELECT metadata FROM sessions WHERE id = 'm'")[0]
    assert json.loads(raw) == {"a": "é"}
