"""The DataFrame API over a store filled through ``Store.handle`` with real events."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from nbchat import StoreError
from nbchat._analysis import compactions, costs, sessions, sql, tool_calls, transcript, turns, usage
from nbchat._events import (
    CompactionEvent,
    MessageAdded,
    MessagesMarked,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
)
from nbchat._export import export_session, import_session
from nbchat._session import Session
from nbchat._store import Store
from nbchat._types import Message, RequestUsage, ToolCall, ToolCallRecord, TurnResult, Usage
from nbchat.testing import FakeOpenAIServer

UTC_TS = "datetime64[us, UTC]"
STR = pd.Series(["x"]).dtype  # the dtype this pandas gives text


def add(store: Store, sid: str, role: str, content: str | None, seq: int, **kw: Any) -> Message:
    message = Message(role=role, content=content, seq=seq, turn_id=kw.pop("turn_id", "t"), **kw)  # type: ignore[arg-type]
    store.handle(MessageAdded(session_id=sid, turn_id=message.turn_id or "", message=message))
    return message


def request(store: Store, sid: str, model: str, cost: float | None, **tokens: int | None) -> None:
    store.handle(
        UsageEvent(
            session_id=sid,
            turn_id="t",
            model=model,
            provider="openai" if model.startswith("gpt") else None,
            usage=RequestUsage(**tokens) if tokens else None,
            cost_usd=cost,
            duration_ms=10.0,
            finish_reason="stop",
        )
    )


@pytest.fixture
def store(store_db: str) -> Any:
    """Two sessions: a with a tool call, a compaction and mixed known/unknown costs; b empty."""
    s = Store.open(store_db)
    s.create_session(session_id="a", model="gpt-4o-mini", system_prompt="Be terse.", title="A")
    s.handle(TurnStarted(session_id="a", turn_id="t", text="weather?", cell_id="c1"))
    add(s, "a", "system", "Be terse.", 0)
    old = add(s, "a", "user", "old question", 1)
    add(s, "a", "user", "weather?", 2)
    call = ToolCall(id="call_1", name="weather", arguments='{"city": "Paris"}')
    add(s, "a", "assistant", None, 3, tool_calls=[call])
    request(s, "a", "gpt-4o-mini", 0.002, prompt_tokens=100, completion_tokens=10, cached_tokens=0)
    record = ToolCallRecord(
        call_id="call_1", name="weather", arguments='{"city": "Paris"}', result='{"t": 21}'
    )
    s.handle(ToolResult(session_id="a", turn_id="t", call=record))
    add(s, "a", "tool", '{"t": 21}', 4, tool_call_id="call_1", name="weather")
    add(s, "a", "assistant", "21 degrees.", 5)
    request(s, "a", "gpt-4o-mini", 0.001, prompt_tokens=120, completion_tokens=5)
    request(s, "a", "mystery-model", None, prompt_tokens=50, completion_tokens=5)
    request(s, "a", "mystery-model", None)  # the server reported no usage at all
    s.handle(MessagesMarked(session_id="a", message_ids=[old.id], state="superseded"))
    s.handle(
        CompactionEvent(session_id="a", strategy="summary", from_seq=1, to_seq=2, tokens_before=900)
    )
    usage_total = Usage(requests=4, prompt_tokens=270, completion_tokens=20, cost_usd=None)
    result = TurnResult(session_id="a", turn_id="t", status="completed", usage=usage_total)
    s.handle(TurnFinished(session_id="a", turn_id="t", result=result))
    s.create_session(session_id="b", model="m2", system_prompt=None)
    yield s
    s.close()


# --------------------------------------------------------------------------- frames


def test_sessions_columns_dtypes_and_totals(store: Store) -> None:
    df = sessions(store)
    assert list(df.columns) == [
        "id",
        "title",
        "model",
        "created_at",
        "last_active",
        "turns",
        "superseded_turns",
        "messages",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
        "unknown_cost_requests",
        "system_prompt",
        "parent_id",
        "notebook",
        "metadata",
    ]
    assert list(df["id"]) == ["a", "b"]  # oldest first
    assert str(df["created_at"].dtype) == UTC_TS and str(df["last_active"].dtype) == UTC_TS
    assert str(df["requests"].dtype) == "Int64" and df["cost_usd"].dtype == "float64"
    a, b = df.iloc[0], df.iloc[1]
    assert (a["turns"], a["messages"], a["requests"]) == (1, 5, 4)
    assert (a["prompt_tokens"], a["completion_tokens"]) == (270, 20)
    assert a["cost_usd"] == pytest.approx(0.003)
    assert a["unknown_cost_requests"] == 2
    assert a["last_active"] > a["created_at"]
    assert a["metadata"] == {}
    # A session without requests cost nothing (not unknown).
    assert (b["requests"], b["cost_usd"], b["unknown_cost_requests"]) == (0, 0.0, 0)


def test_transcript_shows_the_live_context_by_default(store: Store) -> None:
    df = transcript("a", db=store)
    assert list(df.columns) == [
        "seq",
        "role",
        "content",
        "reasoning",
        "name",
        "tool_calls",
        "tool_call_id",
        "status",
        "state",
        "turn_id",
        "round",
        "cell_id",
        "created_at",
        "id",
        "attachments",
    ]
    assert list(df["seq"]) == [0, 2, 3, 4, 5]
    assert list(df["role"]) == ["system", "user", "assistant", "tool", "assistant"]
    assert df["tool_calls"][2] == [
        {"id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'}
    ]
    assert df["tool_calls"][0] is None
    assert pd.isna(df["content"][2])
    assert str(df["seq"].dtype) == "Int64" and str(df["created_at"].dtype) == UTC_TS
    assert df["content"].dtype == STR
    everything = transcript("a", db=store, include_superseded=True)
    assert list(everything["seq"]) == [0, 1, 2, 3, 4, 5]
    assert everything.set_index("seq")["state"][1] == "superseded"


def test_transcript_of_an_unknown_session_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError, match="No session zzz"):
        transcript("zzz", db=store)


def test_usage_has_one_row_per_request_with_unknowns_kept(store: Store) -> None:
    df = usage(store)
    assert list(df.columns) == [
        "created_at",
        "session_id",
        "turn_id",
        "round",
        "model",
        "provider",
        "purpose",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cache_write_tokens",
        "total_tokens",
        "cost_usd",
        "cost_source",
        "ttft_ms",
        "first_text_ms",
        "duration_ms",
        "finish_reason",
        "error",
        "estimated_prompt_tokens",
        "estimated_cost_usd",
        "suspected_truncation",
        "attempts",
        "retried_after",
        "id",
    ]
    assert len(df) == 4 and df["created_at"].is_monotonic_increasing
    assert list(df["model"]) == ["gpt-4o-mini", "gpt-4o-mini", "mystery-model", "mystery-model"]
    assert str(df["prompt_tokens"].dtype) == "Int64"
    assert list(df["total_tokens"][:3]) == [110, 125, 55]
    assert df["total_tokens"].isna().tolist() == [False, False, False, True]
    assert df["cost_usd"].dtype == "float64"
    assert math.isnan(df["cost_usd"][2]) and df["cost_usd"][0] == pytest.approx(0.002)
    assert usage(store, session_id="b").empty


def test_tool_calls_frame(store: Store) -> None:
    df = tool_calls(store)
    assert list(df.columns) == [
        "created_at",
        "session_id",
        "turn_id",
        "round",
        "call_id",
        "name",
        "arguments",
        "result",
        "is_error",
        "error_kind",
        "duration_ms",
        "id",
    ]
    assert df[["name", "arguments", "result"]].values.tolist() == [
        ["weather", '{"city": "Paris"}', '{"t": 21}']
    ]
    assert str(df["is_error"].dtype) == "boolean" and not df["is_error"][0]


def test_compactions_and_turns_frames(store: Store) -> None:
    df = compactions(store, session_id="a")
    assert list(df.columns) == [
        "created_at",
        "session_id",
        "turn_id",
        "strategy",
        "from_seq",
        "to_seq",
        "tokens_before",
        "tokens_after",
        "model",
        "cost_usd",
        "summary",
        "error",
        "id",
    ]
    assert (df["from_seq"][0], df["to_seq"][0], df["tokens_before"][0]) == (1, 2, 900)
    assert pd.isna(df["tokens_after"][0]) and math.isnan(df["cost_usd"][0])
    t = turns(store)
    assert list(t[["status", "user_text", "cell_id", "requests"]].iloc[0]) == [
        "completed",
        "weather?",
        "c1",
        4,
    ]
    assert math.isnan(t["cost_usd"][0])  # one request's price was unknown
    assert str(t["finished_at"].dtype) == UTC_TS


@pytest.mark.parametrize("by", ["model", "day", "session"])
def test_costs_never_count_unknown_prices_as_zero(store: Store, by: str) -> None:
    df = costs(by=by, db=store)  # type: ignore[arg-type]
    tail = [
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_usd",
        "unknown_cost_requests",
        "cost_sources",
    ]
    keys = {
        "model": ["model", "provider"],
        "day": ["day"],
        "session": ["session_id", "title", "first_request_at"],
    }
    assert list(df.columns) == keys[by] + tail
    assert df["cost_usd"].dtype == "float64" and str(df["requests"].dtype) == "Int64"
    assert df["requests"].sum() == 4 and df["unknown_cost_requests"].sum() == 2
    assert df["cost_usd"].sum() == pytest.approx(0.003)


def test_costs_say_where_each_groups_known_costs_came_from(store_db: str) -> None:
    s = Store.open(store_db)
    s.create_session(session_id="c", model="m", system_prompt=None)

    def priced(model: str, source: Any, cost: float | None = 0.001) -> None:
        # model_construct: a label no CostSource names, as a newer nbchat might write:
        # shown as it is, not dropped
        event = UsageEvent.model_construct(
            session_id="c", turn_id="t", model=model, cost_usd=cost, cost_source=source
        )
        s.handle(event)

    priced("m", "server")
    priced("m", "genai-prices")
    priced("m", "server")
    priced("m", None, None)  # unknown price: no source
    priced("n", "registered")
    priced("o", None, None)
    priced("p", "estimated-by-a-newer-nbchat")
    try:
        by_model = costs(by="model", db=s).set_index("model")["cost_sources"].to_dict()
        newer = "estimated-by-a-newer-nbchat"
        assert by_model == {"m": "genai-prices, server", "n": "registered", "o": "", "p": newer}
        [day] = costs(by="day", db=s)["cost_sources"]
        assert day == f"{newer}, genai-prices, registered, server"
    finally:
        s.close()


def test_costs_by_model_sorts_by_cost_and_keeps_unknown_visible(store: Store) -> None:
    df = costs(db=store)
    assert list(df["model"]) == ["gpt-4o-mini", "mystery-model"]
    known, unknown = df.iloc[0], df.iloc[1]
    assert (known["requests"], known["unknown_cost_requests"]) == (2, 0)
    assert known["prompt_tokens"] == 220 and known["cost_usd"] == pytest.approx(0.003)
    assert (unknown["requests"], unknown["unknown_cost_requests"]) == (2, 2)
    assert math.isnan(unknown["cost_usd"])  # NaN, not 0.0
    assert unknown["prompt_tokens"] == 50  # the sum of the counts that were reported


def test_costs_by_day_is_a_utc_calendar_day(store: Store) -> None:
    df = costs(by="day", db=store)
    stamps = usage(db=store)["created_at"]
    days = sorted(set(pd.to_datetime(stamps, utc=True).dt.date))
    assert list(df["day"]) == days and len(days) == 1  # (the day the fixture wrote them)
    assert type(df["day"].iloc[0]) is date


def test_costs_rejects_unknown_grouping(store: Store) -> None:
    with pytest.raises(ValueError, match="model"):
        costs(by="week", db=store)  # type: ignore[arg-type]


def test_empty_store_gives_empty_frames_with_columns(store_db: str) -> None:
    Store.open(store_db).close()  # made (and migrated) with nothing in it
    df = usage(store_db)
    assert df.empty and "cost_usd" in df.columns
    assert str(df["created_at"].dtype) == UTC_TS and str(df["prompt_tokens"].dtype) == "Int64"
    assert sessions(str(store_db)).empty and costs(db=store_db).empty


def test_a_store_file_that_is_not_there_is_refused_and_not_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped path (trial 5: %%chat_sql --db /nonexistent/dir/x.duckdb made the folder
    and an 800 KB store; sessions(db=typo) showed an empty frame) is an error naming it,
    and nothing is created; an import or a copy may start a new store."""
    import nbchat

    typo = tmp_path / "no" / "such" / "store.duckdb"
    for read in (
        lambda: sessions(str(typo)),
        lambda: sql("SELECT 1", db=str(typo)),
        lambda: nbchat.transcript("x", db=str(typo)),
        lambda: costs(db=typo),
    ):
        with pytest.raises(
            StoreError, match=r"No store at .*store\.duckdb: the file does not exist"
        ):
            read()
    assert not (tmp_path / "no").exists()
    fresh = str(tmp_path / "imported.duckdb")
    new_id = nbchat.import_session('[{"role": "user", "content": "hi"}]', db=fresh)
    assert sessions(fresh)["id"].tolist() == [new_id]


def test_sql_on_an_in_memory_store_is_read_only_too() -> None:
    with Store.open(":memory:") as s:
        s.create_session(session_id="m", model=None, system_prompt=None)
        assert sql("SELECT id FROM sessions", db=s)["id"].tolist() == ["m"]
        with pytest.raises(StoreError, match="read-only"):
            sql("DELETE FROM sessions", db=s)
        assert s.has_session("m")


def test_default_store_is_used_without_db(isolated_env: Path) -> None:
    with Store.open() as s:
        s.create_session(session_id="d", model=None, system_prompt=None)
    assert list(sessions()["id"]) == ["d"]
    assert sql("SELECT count(*) AS n FROM sessions")["n"][0] == 1


# --------------------------------------------------------------------------- sql


def test_sql_runs_parameterised_selects(store: Store) -> None:
    df = sql(
        "SELECT model, count(*) AS n, sum(cost_usd) AS cost FROM requests"
        " WHERE session_id = ? GROUP BY model ORDER BY model",
        ["a"],
        db=store,
    )
    assert df["model"].tolist() == ["gpt-4o-mini", "mystery-model"]
    assert str(df["n"].dtype) == "Int64" and df["n"].tolist() == [2, 2]
    assert math.isnan(df["cost"][1])
    named = sql(
        "SELECT count(*) AS n FROM requests WHERE model = $m", {"m": "mystery-model"}, store
    )
    assert named["n"].tolist() == [2]
    ts = sql("SELECT created_at FROM sessions", db=store)
    assert str(ts["created_at"].dtype) == UTC_TS


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO sessions (id, created_at) VALUES ('x', now())",
        "DROP TABLE messages",
        "UPDATE requests SET cost_usd = 0",
        "DELETE FROM messages",
        "ATTACH '/tmp/other.duckdb' AS other",
        "SET threads = 1",
        "CHECKPOINT",
        "COPY messages TO '/tmp/out.csv'",
        "SELECT 1; DROP TABLE messages",
    ],
)
def test_sql_cannot_modify_the_store(store: Store, query: str) -> None:
    with pytest.raises(StoreError, match=r"read-only|exactly one statement"):
        sql(query, db=store)
    assert sql("SELECT count(*) AS n FROM messages", db=store)["n"][0] == 6
    assert sql("SELECT count(*) AS n FROM sessions", db=store)["n"][0] == 2


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("INSERT INTO sessions (id, created_at) VALUES ('x', now())", "an INSERT statement"),
        ("UPDATE requests SET cost_usd = 0", "an UPDATE statement"),
        ("ATTACH '/tmp/other.duckdb' AS other", "an ATTACH statement"),
        ("DELETE FROM messages", "a DELETE statement"),
        # DuckDB calls these LOAD and CALL; the message says what the user wrote.
        ("INSTALL httpfs", "an INSTALL statement"),
        ("  -- a note\ncheckpoint", "a CHECKPOINT statement"),
    ],
)
def test_sql_error_message_names_the_statement_kind(store: Store, query: str, named: str) -> None:
    with pytest.raises(StoreError) as refused:
        sql(query, db=store)
    assert str(refused.value) == f"sql() is read-only: it runs SELECT queries, and this is {named}."


def test_sql_refuses_a_select_that_changes_data_by_saying_so(store: Store) -> None:
    query = "WITH gone AS (DELETE FROM messages RETURNING id) SELECT count(*) FROM gone"
    with pytest.raises(StoreError) as refused:
        sql(query, db=store)
    assert str(refused.value) == (
        "sql() is read-only: it runs SELECT queries, and this one tries to change data "
        "(a DELETE inside it)."
    )
    with pytest.raises(StoreError, match="DuckDB runs this query as several"):
        sql("SELECT * FROM (PIVOT requests ON model USING count(*))", db=store)
    # The words alone, in names or text, are not a change.
    assert sql("SELECT 'delete' AS \"update\"", db=store)["update"].tolist() == ["delete"]
    assert sql("SELECT count(*) AS n FROM messages", db=store)["n"][0] == 6


def test_sql_names_the_stores_tables_for_an_unknown_one(store: Store) -> None:
    with pytest.raises(StoreError) as refused:
        sql("SELECT * FROM pg_constraintz", db=store)  # DuckDB would suggest pg_constraint
    assert 'pg_constraint"' not in str(refused.value)
    assert str(refused.value) == (
        "sql(): the store has no table pg_constraintz; its tables are "
        "sessions, messages, requests, tool_calls, compactions, turns, attachments."
    )
    with pytest.raises(StoreError, match='Did you mean "sessions"'):  # one of ours: kept
        sql("SELECT * FROM sesions", db=store)


def test_sql_reports_bad_queries_clearly(store: Store) -> None:
    with pytest.raises(StoreError, match="parse"):
        sql("SELEC nothing", db=store)
    with pytest.raises(StoreError, match="no_such_table"):
        sql("SELECT * FROM no_such_table", db=store)
    # The store still works after a failed query.
    assert len(sql("SELECT * FROM sessions", db=store)) == 2


# --------------------------------------------------------------------------- export/import


def test_export_openai_then_import_round_trips(store: Store) -> None:
    exported = export_session("a", db=store)
    messages = json.loads(exported)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"][0]["function"] == {
        "name": "weather",
        "arguments": '{"city": "Paris"}',
    }
    new_id = import_session(exported, db=store, title="Copy")
    assert new_id != "a"
    assert json.loads(export_session(new_id, db=store)) == messages
    loaded = store.load_session(new_id)
    assert loaded.title == "Copy" and loaded.system_prompt == "Be terse."
    assert [m.seq for m in loaded.messages] == [0, 1, 2, 3, 4]
    assert loaded.metadata == {"imported": True}
    # A list of dicts works too, and content parts are joined.
    text_parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parts = [{"role": "user", "content": text_parts}]
    other = import_session(parts, db=store)
    assert store.load_session(other).messages[0].content == "ab"


def test_an_imported_session_belongs_to_the_notebook_importing_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial's imported session had an empty notebook column in sessions()."""
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/me/analysis.ipynb")
    copied = import_session(export_session("a", db=store), db=store)
    named = import_session('[{"role": "user", "content": "hi"}]', db=store, notebook="x.ipynb")
    found = sessions(db=store).set_index("id")["notebook"]
    assert (found[copied], found[named]) == ("/home/me/analysis.ipynb", "x.ipynb")


def test_an_imported_session_keeps_its_turns_their_rounds_and_its_source(
    store_db: str, fake: FakeOpenAIServer
) -> None:
    # A new-user trial: an imported session had no turns (sessions() said 0, and the
    # first turn sent after the import was its turn 1) and no link to where it came from.
    def ping() -> str:
        """Ping."""
        return "pong"

    fake.enqueue("a1")
    fake.enqueue(tool_calls=[{"name": "ping"}], repeat=2)  # the second: past max_rounds
    source = Session("m", base_url=fake.url, db=store_db, tools=[ping], max_rounds=1)
    source.send("q1")
    assert source.send("q2").status == "max_rounds"

    def shape(session_id: str) -> list[tuple[str, int | None, int | None]]:
        """Each message's role, turn (numbered from 0) and round."""
        frame = transcript(session_id, db=store_db)
        number = {t: i for i, t in enumerate(dict.fromkeys(frame["turn_id"].dropna()))}
        return [
            (m.role, number.get(m.turn_id), None if pd.isna(m.round) else int(m.round))
            for m in frame.itertuples()
        ]

    assert [n for _, n, _ in shape(source.id)] == [0, 0, 1, 1, 1, 1, 1]
    for format, statuses, parent in (
        ("openai", ["completed", "completed"], None),  # no room for them in the format
        ("nbchat", ["completed", "max_rounds"], source.id),
    ):
        copy = import_session(export_session(source.id, format, db=store_db), db=store_db)
        assert shape(copy) == shape(source.id)
        copied = turns(store_db, copy)
        assert list(copied["status"]) == statuses
        assert list(copied["user_text"]) == ["q1", "q2"]
        assert list(copied["rounds"]) == list(turns(store_db, source.id)["rounds"])
        row = sessions(store_db).set_index("id").loc[copy]
        assert row["turns"] == 2
        assert (None if pd.isna(row["parent_id"]) else row["parent_id"]) == parent
        fake.enqueue("a3")
        Session("m", base_url=fake.url, db=store_db, session_id=copy).send("q3")
        assert sessions(store_db).set_index("id").loc[copy, "turns"] == 3  # its third


def test_an_import_of_a_pending_session_leaves_its_turn_running(store_db: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    data = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}]
    copy = import_session(data, db=store_db)
    assert list(turns(store_db, copy)["status"]) == ["running"]  # resume() or abort_pending()
    with pytest.raises(StoreError, match="turn 0: its start must be a later message index"):
        import_session({"messages": data, "turns": [{"start": "1"}]}, db=store_db)


def test_export_markdown(store: Store) -> None:
    md = export_session("a", format="markdown", db=store)
    assert md.startswith("# A\n")
    assert "## User\n\nweather?" in md
    assert "**Tool call** `weather` (`call_1`)" in md
    assert '```json\n{\n  "city": "Paris"\n}\n```' in md
    assert "## Tool result: `weather` (`call_1`)" in md
    assert "## Assistant\n\n21 degrees." in md


def test_markdown_export_shows_no_live_html_from_a_title_or_a_models_ids(store_db: str) -> None:
    """The title is the user's first words and call ids are the model's: in a heading or
    inline code they must not leave raw HTML behind (a trial found ``# <img onerror=…>``)."""
    hostile = '<img src="x" onerror="alert(1)">'
    call_id = f"c` {hostile} `"
    call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "ok"},
    ]
    with Store.open(store_db) as s:
        sid = import_session(messages, db=s, title=f"{hostile}\n\n# hello")
        md = export_session(sid, format="markdown", db=s)
    assert md.splitlines()[0] == '# &lt;img src="x" onerror="alert(1)"> # hello'
    spans = f"`` {call_id} ``"  # longer fences than the id's own backticks, padded
    assert f"**Tool call** `f` ({spans})" in md and f"## Tool result: `tool` ({spans})" in md
    assert "<img" not in md.replace(spans, "")  # only inside its code spans


def test_reasoning_is_exported_and_imported_back(store_db: str) -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add <b>two</b> and two."},
    ]
    with Store.open(store_db) as s:
        sid = import_session(messages, db=s)
        wire = json.loads(export_session(sid, db=s))
        md = export_session(sid, format="markdown", db=s)
        again = transcript(import_session(wire, db=s), db=s)
    assert wire[1]["reasoning_content"] == "Add <b>two</b> and two."
    assert "reasoning_content" not in wire[0]
    assert "<summary>Thinking</summary>\n\nAdd &lt;b>two&lt;/b> and two.\n\n</details>" in md
    assert pd.isna(again["reasoning"][0]) and again["reasoning"][1] == "Add <b>two</b> and two."
    with pytest.raises(StoreError, match="reasoning_content must be text"):
        import_session([{**messages[1], "reasoning_content": 3}], db=store_db)


def test_markdown_fences_survive_backticks_in_content(store_db: str) -> None:
    with Store.open(store_db) as s:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "```py\nx\n```"},
        ]
        sid = import_session(messages, db=s)
        md = export_session(sid, format="markdown", db=s)
    assert "````\n```py\nx\n```\n````" in md


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "non-empty list"),
        ('[{"role": "wizard", "content": "x"}]', "role must be one of"),
        ('[{"role": "user"}]', "message 0: a user message needs content"),
        ('[{"role": "user", "content": "q"}, {"role": "system", "content": null}]', "message 1"),
        (
            '[{"role": "tool", "tool_call_id": "c9", "content": "x"}]',
            "answers no earlier tool call",
        ),
        ('[{"role": "user", "content": [{"type": "image_url"}]}]', "an image_url part needs a url"),
        ('[{"role": "assistant", "tool_calls": [{"type": "function"}]}]', "an id and a name"),
    ],
)
def test_import_rejects_malformed_data(store_db: str, data: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        import_session(data, db=store_db)
    if "://" in store_db:
        assert sessions(store_db).empty  # nothing half-imported
    else:
        assert not Path(store_db).exists()  # refused before the store was opened


def test_export_rejects_unknown_format(store: Store) -> None:
    with pytest.raises(ValueError, match="markdown"):
        export_session("a", format="html", db=store)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- honest figures


def _failed_request(store: Store, sid: str, model: str) -> None:
    """A request the server refused before any token: it costs 0, it is not unknown."""
    store.handle(
        UsageEvent(
            session_id=sid,
            turn_id="t",
            model=model,
            usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
            cost_usd=0.0,
            error="The model server answered HTTP 404: no such model",
        )
    )


def test_a_group_with_no_known_cost_is_nan_never_zero(store_db: str) -> None:
    s = Store.open(store_db)
    s.create_session(session_id="u", model="unpriced", system_prompt=None)
    s.create_session(session_id="r", model="gone", system_prompt=None)
    s.create_session(session_id="idle", model="m", system_prompt=None)
    for _ in range(3):
        _failed_request(s, "u", "unpriced")
    for _ in range(5):
        request(s, "u", "unpriced", None, prompt_tokens=10, completion_tokens=2)
    _failed_request(s, "r", "gone")
    by_model = costs(by="model", db=s).set_index("model")
    assert math.isnan(by_model.loc["unpriced", "cost_usd"])
    assert by_model.loc["unpriced", "unknown_cost_requests"] == 5
    assert by_model.loc["gone", "cost_usd"] == 0.0  # never answered: cost nothing
    assert by_model.loc["gone", "unknown_cost_requests"] == 0
    by_session = sessions(db=s).set_index("id")
    assert math.isnan(by_session.loc["u", "cost_usd"])
    assert by_session.loc["r", "cost_usd"] == 0.0
    assert by_session.loc["idle", "cost_usd"] == 0.0  # no request at all
    assert math.isnan(costs(by="session", db=s).set_index("session_id").loc["u", "cost_usd"])
    s.close()


def test_superseded_turns_are_shown_as_such_and_not_counted_live(store_db: str) -> None:
    s = Store.open(store_db)
    s.create_session(session_id="a", model="m", system_prompt=None)
    for turn in ("t1", "t2"):
        s.handle(TurnStarted(session_id="a", turn_id=turn, text="q", cell_id="c"))
        add(s, "a", "user", f"question {turn}", 1 if turn == "t1" else 3, turn_id=turn)
        result = TurnResult(session_id="a", turn_id=turn, status="completed")
        s.handle(TurnFinished(session_id="a", turn_id=turn, result=result))
    first = transcript("a", db=s)["id"].iloc[0]
    s.handle(MessagesMarked(session_id="a", message_ids=[first], state="superseded"))
    frame = turns(db=s, session_id="a").set_index("id")
    assert list(frame["state"]) == ["superseded", "active"]
    assert list(frame["status"]) == ["completed", "completed"]
    row = sessions(db=s).set_index("id").loc["a"]
    assert (row["turns"], row["superseded_turns"]) == (1, 1)
    s.close()


def test_reprice_costs_stored_requests_at_todays_prices(store_db: str) -> None:
    from nbchat import reprice
    from nbchat._pricing import forget_price, register_price

    s = Store.open(store_db)
    s.create_session(session_id="a", model="house-model", system_prompt=None)
    request(s, "a", "house-model", None, prompt_tokens=1000, completion_tokens=500)
    request(s, "a", "house-model", None)  # no usage reported: still unknown
    request(s, "a", "gpt-4o-mini", 0.5, prompt_tokens=10, completion_tokens=1)
    register_price("house-model", input_per_mtok=2.0, output_per_mtok=4.0)
    try:
        frame = reprice(model="house-model", db=s)
    finally:
        forget_price("house-model")
    assert list(frame["stored_cost_usd"].isna()) == [True, True]
    assert frame["cost_usd"].iloc[0] == pytest.approx((1000 * 2.0 + 500 * 4.0) / 1e6)
    assert math.isnan(frame["cost_usd"].iloc[1])
    assert frame.columns.get_loc("cost_usd") + 1 == frame.columns.get_loc("stored_cost_usd")
    # The store is unchanged.
    assert usage(db=s)["cost_usd"].isna().sum() == 2
    s.close()


def test_costs_by_tag_notebook_and_user(
    store_db: str, fake: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbchat
    from nbchat._pricing import forget_price, register_price

    monkeypatch.setenv("JUPYTERHUB_USER", "ada")
    register_price("tagged-model", input_per_mtok=1000, output_per_mtok=1000)
    db = Store.open(store_db)
    try:
        usage = {"prompt_tokens": 10, "completion_tokens": 10}  # $0.02 each
        for tags, notebook in ((["x", "y"], "a.ipynb"), (["x"], "b.ipynb"), (None, None)):
            s = nbchat.Session(
                model="tagged-model", base_url=fake.url, api_key="k", db=db, tags=tags,
                notebook=notebook,
            )  # fmt: skip
            fake.enqueue("ok", usage=usage)
            s.send("hi")
        s.tag("late")
        assert s.tags == ["late"]
        by_tag = costs(by="tag", db=db).set_index("tag")
        assert by_tag["requests"].to_dict() == {"x": 2, "y": 1, "late": 1}
        assert by_tag.loc["x", "cost_usd"] == pytest.approx(0.04)
        by_nb = costs(by="notebook", db=db).set_index("notebook")["requests"].to_dict()
        assert by_nb == {"a.ipynb": 1, "b.ipynb": 1, "(no notebook)": 1}
        by_user = costs(by="user", db=db)
        assert list(by_user["user"]) == ["ada"] and by_user["requests"][0] == 3
        meta = sessions(db=db)["metadata"].iloc[0]
        assert meta["user"] == "ada" and meta["host"] and meta["tags"] == ["x", "y"]
    finally:
        forget_price("tagged-model")
        db.close()


def test_untagged_sessions_count_as_untagged(store_db: str, fake: Any) -> None:
    import nbchat

    db = Store.open(store_db)
    s = nbchat.Session(model="m", base_url=fake.url, api_key="k", db=db)
    fake.enqueue("ok")
    s.send("hi")
    assert list(costs(by="tag", db=db)["tag"]) == ["(untagged)"]
    db.close()


def test_search_ranks_messages_by_the_words_they_contain(store_db: str, fake: Any) -> None:
    import nbchat

    db = Store.open(store_db)
    s = nbchat.Session(model="m", base_url=fake.url, api_key="k", db=db)
    fake.enqueue("A window function computes over a window of rows; window functions rock.")
    s.send("What is a window function?")
    fake.enqueue("Use GROUP BY for that.")
    s.send("And aggregates?")
    found = nbchat.search("Window FUNCTION", db=db)
    assert list(found["role"]) == ["assistant", "user"]  # both words; more occurrences first
    assert found["matched"].tolist() == [2, 2]
    assert "**window**" in found["snippet"][0] and "**function**" in found["snippet"][0]
    assert found["session_id"].unique().tolist() == [s.id]
    assert nbchat.search("group", db=db)["content"].tolist() == ["Use GROUP BY for that."]
    assert nbchat.search("nowhere", db=db).empty
    with pytest.raises(ValueError):
        nbchat.search("   ", db=db)
    db.close()


def test_a_snippet_leaves_code_fences_out_and_keeps_the_code() -> None:
    import re

    from nbchat._analysis import snippet_pieces

    # A trial: %chat search showed "``` python df.groupby(...) ```" in its snippets.
    content = "Try this:\n\n```python\ndf.groupby('week')\n```\n\n~~~\nmore\n~~~\nDone."
    pieces = snippet_pieces(content, re.compile("groupby"))
    assert pieces == [("Try this: df.", False), ("groupby", True), ("('week') more Done.", False)]


def test_sql_gives_each_kind_of_column_its_dtype_with_nulls_kept(store: Store) -> None:
    df = sql(
        "SELECT * FROM (VALUES"
        " (1::TINYINT, 2.5::DECIMAL(4, 2), 10::HUGEINT, true, DATE '2026-01-31',"
        "  TIMESTAMP '2026-01-31 12:00:00', TIMESTAMPTZ '2026-01-31 12:00:00+00', 'x', [1, 2]),"
        " (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
        ") t(i, d, h, b, day, naive, aware, s, l)",
        db=store,
    )
    dtypes = {name: str(dtype) for name, dtype in df.dtypes.items()}
    assert dtypes == {
        "i": "Int64", "d": "float64", "h": "float64", "b": "boolean", "day": "object",
        "naive": "datetime64[us]", "aware": UTC_TS, "s": str(STR), "l": "object",
    }  # fmt: skip
    first, second = df.iloc[0], df.iloc[1]
    assert (first["i"], first["d"], first["h"], bool(first["b"])) == (1, 2.5, 10.0, True)
    assert first["day"] == date(2026, 1, 31) and first["s"] == "x"
    assert first["aware"] == pd.Timestamp("2026-01-31 12:00", tz="UTC")
    assert first["naive"] == pd.Timestamp("2026-01-31 12:00") and list(first["l"]) == [1, 2]
    assert second["i"] is pd.NA and second["b"] is pd.NA and second["day"] is None
    assert pd.isna(second["d"]) and pd.isna(second["naive"]) and pd.isna(second["aware"])
    assert pd.isna(second["s"]) and second["l"] is None
    empty = sql("SELECT 1::BIGINT AS n, now() AS t WHERE false", db=store)
    assert list(empty.columns) == ["n", "t"] and empty.empty
    assert str(empty["n"].dtype) == "Int64" and str(empty["t"].dtype) == UTC_TS


def test_frames_from_arrow_and_from_numpy_are_the_same(store: Store, monkeypatch: Any) -> None:
    """With pyarrow, rows of plain types are fetched as Arrow; without, as numpy: the
    frames must not tell the two apart (dtypes, NULLs, parsed JSON)."""
    import nbchat._store._duckdb as duckdb_store

    every_type = (
        "SELECT * FROM (VALUES"
        " (1::TINYINT, 7::UINTEGER, 2.5::DECIMAL(4, 2), 10::HUGEINT, 1.5::FLOAT, true,"
        "  DATE '2026-01-31', TIMESTAMP '2026-01-31 12:00:00',"
        "  TIMESTAMPTZ '2026-01-31 12:00:00+00',"
        "  TIMESTAMP_NS '2026-01-31 12:00:00.123456789', 'x', '{\"a\": 1}'::JSON,"
        "  '8c1f3e0a-2b4d-4e5f-9a6b-7c8d9e0f1a2b'::UUID),"
        " (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
        ") t(i, u, d, h, f, b, day, naive, aware, ns, s, j, id)"
    )

    def frames() -> list[pd.DataFrame]:
        return [
            sessions(db=store),
            transcript("a", db=store, include_compacted=True, include_superseded=True),
            usage(db=store),
            turns(db=store),
            costs(by="day", db=store),
            sql(every_type, db=store),
            sql("SELECT * FROM requests WHERE false", db=store),
        ]

    assert duckdb_store.arrow_readable(["VARCHAR", "BIGINT", "TIMESTAMP WITH TIME ZONE"])
    from_arrow = frames()
    monkeypatch.setattr(duckdb_store, "arrow_readable", lambda types: False)
    from_numpy = frames()
    for arrow, numpy in zip(from_arrow, from_numpy, strict=True):
        pd.testing.assert_frame_equal(arrow, numpy)
    assert from_arrow[1]["tool_calls"].map(lambda v: isinstance(v, list | type(None))).all()


def test_sessions_come_oldest_first_then_by_id_from_arrow_and_from_numpy(
    store_db: str, monkeypatch: Any
) -> None:
    """sessions() orders its rows after the fetch (its SQL has no ORDER BY): by creation
    time, ties by id, whatever order they were written in and however they were fetched."""
    import nbchat._store._duckdb as duckdb_store

    early, late = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    with Store.open(store_db) as store:
        for sid, at in [("z", late), ("b", late), ("m", early), ("a", late)]:
            store.create_session(session_id=sid, model="gpt-4o", system_prompt=None, created_at=at)
        assert list(sessions(db=store)["id"]) == ["m", "a", "b", "z"]
        monkeypatch.setattr(duckdb_store, "arrow_readable", lambda types: False)
        assert list(sessions(db=store)["id"]) == ["m", "a", "b", "z"]


@pytest.mark.parametrize("read", [turns, usage, tool_calls, compactions, sessions])
def test_a_session_id_passed_as_the_store_is_refused_and_makes_no_file(
    read: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """turns(s.id) reads as "this session's turns": it named a new, empty store file."""
    monkeypatch.chdir(tmp_path)
    session_id = uuid.uuid4().hex  # what a session's id is
    with pytest.raises(ValueError, match=f"pass session_id='{session_id}'"):
        read(session_id)
    assert list(tmp_path.iterdir()) == []
