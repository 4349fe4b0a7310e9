"""The tool counters kept on write (m010), the dashboard's kept latency sample, and the
notice a long migration gives first.

Random tool results — errors, unknown and odd durations, replays that change a call's
duration or error — are written through the store; the counters must equal a refill
from the rows, and ``tool_stats`` must count calls and errors exactly and give each
tool's median duration within half a bin of the rows' median.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from nbchat import _analysis
from nbchat._events import ToolResult
from nbchat._store import Store
from nbchat._store._counter_migrations import OLD_DECLINED
from nbchat._store._migrations import migrate
from nbchat._store._pg_sql import PgMigrationConnection
from nbchat._store._recount import BINS_PER_DOUBLING, NO_DURATION, duration_bin, fill_counters
from nbchat._types import ToolCallRecord, new_id

EXACT = """
    SELECT name AS tool, count(*) AS calls, count(*) FILTER (WHERE is_error) AS errors,
           median(duration_ms) FILTER (WHERE isfinite(duration_ms)) AS median_ms
    FROM tool_calls GROUP BY name ORDER BY name
"""
HALF_A_BIN = 2 ** (0.5 / BINS_PER_DOUBLING) - 1  # ~2.2%


def _counters(store: Store) -> pd.DataFrame:
    return store.sql("SELECT * FROM _tool_counts WHERE calls <> 0 ORDER BY ALL")


@pytest.mark.parametrize("seed", range(3))
def test_tool_counters_are_what_the_calls_sum_to(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with Store.open(tmp_path / "tools.duckdb") as store:
        sid = new_id()
        store.create_session(session_id=sid, model="m", system_prompt=None, messages=[])
        calls: list[ToolCallRecord] = []
        for _ in range(150):
            if calls and rng.random() < 0.2:  # a replay: another duration, maybe an error
                old = rng.choice(calls)
                call = old.model_copy(
                    update={"duration_ms": rng.uniform(0, 500), "is_error": rng.random() < 0.5}
                )
            else:
                duration = rng.choice(
                    [rng.uniform(0, 2000), rng.lognormvariate(3, 1), 0.0, 1e-9, math.nan]
                )
                call = ToolCallRecord(
                    call_id="call_0", name=rng.choice(["read", "write", "flaky"]),
                    arguments="{}", result="ok", is_error=rng.random() < 0.15,
                    duration_ms=duration,
                )  # fmt: skip
                calls.append(call)
            events = [ToolResult(session_id=sid, call=call)]
            if rng.random() < 0.2:
                store.write_many(events)
            else:
                store.write(events[0])
        kept = _counters(store)
        stats = store.frame("tool_stats")
        exact = store.sql(EXACT)
        with store._connection() as con:  # type: ignore[attr-defined]
            fill_counters(con)
        pd.testing.assert_frame_equal(kept, _counters(store))
    shown = stats.sort_values("tool").reset_index(drop=True)
    assert shown[["tool", "calls", "errors"]].equals(exact[["tool", "calls", "errors"]])
    for ours, rows in zip(shown["median_ms"], exact["median_ms"], strict=True):
        if rows >= 1:  # under a millisecond the bins' floor (1/64 ms) decides
            assert abs(ours / rows - 1) <= HALF_A_BIN + 1e-9


def test_a_duration_s_bin_holds_it() -> None:
    for ms in (0.02, 1.0, 3.7, 250.0, 1e6):
        low = 2 ** (duration_bin(ms) / BINS_PER_DOUBLING)
        assert low <= ms < low * 2 ** (1 / BINS_PER_DOUBLING) * (1 + 1e-12)
    assert duration_bin(None) == duration_bin(math.nan) == duration_bin(math.inf) == NO_DURATION
    assert duration_bin(0.0) == duration_bin(-5.0) == duration_bin(1 / 64)


def test_a_kept_latency_sample_is_drawn_again_past_one_percent_more_requests() -> None:
    before = {"a": 1000, "b": 300_000}
    assert _analysis.nearly_the_same(before, {"a": 1010, "b": 302_000})
    assert not _analysis.nearly_the_same(before, {"a": 1011, "b": 300_000})
    assert not _analysis.nearly_the_same(before, {"a": 1000, "b": 300_000, "c": 1})
    assert not _analysis.nearly_the_same(before, {"b": 300_000})


def test_the_latency_sample_is_compared_with_the_requests_it_was_drawn_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kept sample keeps the counts it was drawn at: many small steps add up."""
    reads: list[str] = []

    class FakeStore:
        def __init__(self, requests: int) -> None:
            self.requests = requests

        def __enter__(self) -> FakeStore:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def frame(self, name: str, **params: Any) -> pd.DataFrame:
            reads.append(name)
            if name == "spend_by_day_model":
                return pd.DataFrame({"day": [1], "model": ["m"], "requests": [self.requests]})
            return pd.DataFrame({"n": [len(reads)]})

    monkeypatch.setattr(_analysis, "LATENCY_SAMPLE_ABOVE", 10)
    seen = None
    for requests in range(1000, 1031, 3):  # 0.3% more each time
        monkeypatch.setattr(_analysis, "open_store", lambda db, n=requests: FakeStore(n))
        seen = _analysis.overview(db="x", previous=seen)
    drawn = [name for name in reads if name.startswith("latency")]
    assert len(drawn) == 3  # at 1000, 1012 and 1024 (not after every request)


def test_a_long_migration_says_so_on_stderr_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbchat._store import _migrations

    monkeypatch.setattr(_migrations, "_NOTICE_AFTER_S", 0.01)  # 20k calls: ~0.07 s
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        migrate(con, stop_after="m009_session_summaries")
        con.execute(
            "INSERT INTO tool_calls (id, session_id, name, is_error, duration_ms, created_at)"
            " SELECT 'c' || i, 's', 't', false, i % 100, now() FROM range(20000) r(i)"
        )
    capsys.readouterr()
    with duckdb.connect(str(path)) as con:
        assert migrate(con, stop_after="m010_dashboard_counts") == ["m010_dashboard_counts"]
    err = capsys.readouterr().err
    assert "m010_dashboard_counts" in err and "20,000 rows" in err and len(err.splitlines()) == 1
    with duckdb.connect(str(path)) as con:
        migrate(con, stop_after="m010_dashboard_counts")  # nothing left to do: nothing said
    assert capsys.readouterr().err == ""


def test_a_small_store_migrates_without_a_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with duckdb.connect(str(tmp_path / "small.duckdb")) as con:
        migrate(con)
    assert capsys.readouterr().err == ""


# What the python tool stored for a call the user declined before "declined" existed.
_OLD_DECLINE = (
    '{"ok": false, "error_kind": "tool_error", "message": "PermissionError: the user '
    'declined to run this code; do not retry it"}'
)
_FAILED = '{"ok": false, "error_kind": "tool_error", "message": "ZeroDivisionError: boom"}'


def test_m011_counts_declines_stored_the_old_way_as_newer_code_does(store_db: str) -> None:
    # A new-user trial: calls declined before "declined" existed still showed as tool
    # errors in the dashboard's counts, where newer code counts a decline as no error.
    assert OLD_DECLINED.strip("%") in _OLD_DECLINE
    old_rows = [
        ("c1", "python", _OLD_DECLINE, True, "tool_error"),
        ("c2", "python", _FAILED, True, "tool_error"),  # a real failure stays one
        ("c3", "python", "4", False, None),
    ]
    inserts = [
        (
            "INSERT INTO tool_calls (id, session_id, call_id, name, result, is_error,"
            " error_kind, duration_ms, created_at) VALUES (?, 's', ?, ?, ?, ?, ?, 5.0, now())",
            [call_id, call_id, name, result, failed, kind],
        )
        for call_id, name, result, failed, kind in old_rows
    ] + [
        (
            "INSERT INTO messages (id, session_id, seq, role, content, tool_call_id, name,"
            " status, state, created_at) VALUES (?, 's', ?, 'tool', ?, ?, 'python', ?,"
            " 'active', now())",
            [f"m{seq}", seq, result, call_id, "error" if failed else "ok"],
        )
        for seq, (call_id, _, result, failed, _) in enumerate(old_rows)
    ]
    if store_db.startswith("postgresql"):
        import psycopg

        with psycopg.connect(store_db, autocommit=True) as raw:
            con: Any = PgMigrationConnection(raw)
            migrate(con, stop_after="m010_dashboard_counts")
            for sql, params in inserts:
                con.execute(sql, params)
    else:
        with duckdb.connect(store_db) as con:
            migrate(con, stop_after="m010_dashboard_counts")
            for sql, params in inserts:
                con.execute(sql, params)
            fill_counters(con)  # as the old code's tally had them: two errors
            assert con.execute("SELECT sum(errors) FROM _tool_counts").fetchall() == [(2,)]

    with Store.open(store_db) as store:  # m011 runs
        calls = _analysis.tool_calls(store).set_index("call_id")
        assert list(calls.loc[["c1", "c2", "c3"], "is_error"]) == [False, True, False]
        assert calls.loc["c1", "error_kind"] == "declined"
        assert calls.loc["c1", "result"] == _OLD_DECLINE  # what the model was told stays
        stats = store.frame("tool_stats", since=None, until=None)
        assert (int(stats["calls"].sum()), int(stats["errors"].sum())) == (3, 1)
        statuses = store.sql("SELECT tool_call_id, status FROM messages ORDER BY seq")
        assert list(statuses["status"]) == ["declined", "error", "ok"]
