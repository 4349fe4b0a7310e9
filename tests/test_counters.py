"""The counters kept on write (m007, ``_store/_tally.py``) against the rows they count.

A random store is written event by event — messages, marks (compaction, supersede),
requests with and without tokens and prices, turns, replays of earlier events, sessions
created with history, ``end_unfinished_turns`` — and then ``sessions()`` (which reads the
counters) must equal the full aggregation over every row that it replaced, and the
per-day table must equal a GROUP BY of the requests.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import nbchat
from nbchat._events import MessageAdded, MessagesMarked, TurnFinished, TurnStarted, UsageEvent
from nbchat._store import Store
from nbchat._store._recount import fill_counters
from nbchat._types import Message, RequestUsage, TurnResult, Usage, new_id

# What sessions() computed before the counters: every message, request and turn, per call.
FULL_SESSIONS = """
    WITH m AS (
        SELECT session_id, count(*) FILTER (WHERE state = 'active') AS messages,
               max(created_at) AS last_message_at
        FROM messages GROUP BY session_id
    ), r AS (
        SELECT session_id, count(*) AS requests,
               sum(prompt_tokens)::BIGINT AS prompt_tokens,
               sum(completion_tokens)::BIGINT AS completion_tokens,
               CASE WHEN count(*) FILTER (WHERE cost_usd IS NULL) > 0
                         AND count(*) FILTER (WHERE cost_usd IS NOT NULL AND error IS NULL) = 0
                    THEN NULL ELSE sum(cost_usd) END AS cost_usd,
               count(*) FILTER (WHERE cost_usd IS NULL) AS unknown_cost_requests,
               max(created_at) AS last_request_at
        FROM requests GROUP BY session_id
    ), superseded AS (
        SELECT turn_id FROM messages WHERE role = 'user' AND turn_id IS NOT NULL
        GROUP BY turn_id HAVING bool_and(state = 'superseded')
    ), t AS (
        SELECT turns.session_id, count(*) FILTER (WHERE x.turn_id IS NULL) AS turns,
               count(x.turn_id) AS superseded_turns
        FROM turns LEFT JOIN superseded x ON x.turn_id = turns.id
        GROUP BY turns.session_id
    )
    SELECT s.id, s.title, s.model, s.created_at,
           greatest(s.created_at, m.last_message_at, r.last_request_at) AS last_active,
           coalesce(t.turns, 0) AS turns, coalesce(t.superseded_turns, 0) AS superseded_turns,
           coalesce(m.messages, 0) AS messages,
           coalesce(r.requests, 0) AS requests,
           CASE WHEN r.requests IS NULL THEN 0 ELSE r.prompt_tokens END AS prompt_tokens,
           CASE WHEN r.requests IS NULL THEN 0 ELSE r.completion_tokens END
               AS completion_tokens,
           CASE WHEN r.requests IS NULL THEN 0.0 ELSE r.cost_usd END AS cost_usd,
           coalesce(r.unknown_cost_requests, 0) AS unknown_cost_requests,
           s.system_prompt, s.parent_id, s.notebook, s.metadata
    FROM sessions s
    LEFT JOIN m ON m.session_id = s.id
    LEFT JOIN r ON r.session_id = s.id
    LEFT JOIN t ON t.session_id = s.id
    ORDER BY s.created_at, s.id
"""

BY_DAY = """
    SELECT (created_at AT TIME ZONE 'UTC')::DATE AS day, session_id,
           coalesce(model, '') AS model, count(*) AS requests,
           coalesce(sum(prompt_tokens), 0)::BIGINT AS prompt_tokens,
           count(prompt_tokens) AS prompt_reported,
           coalesce(sum(completion_tokens), 0)::BIGINT AS completion_tokens,
           coalesce(sum(cached_tokens), 0)::BIGINT AS cached_tokens,
           coalesce(sum(cost_usd), 0.0) AS cost_usd, count(cost_usd) AS costed,
           count(*) FILTER (WHERE cost_usd IS NOT NULL AND error IS NULL) AS answered_costed
    FROM requests GROUP BY ALL ORDER BY ALL
"""
COUNTED_BY_DAY = """
    SELECT day, session_id, model, requests, prompt_tokens, prompt_reported,
           completion_tokens, cached_tokens, cost_usd, costed, answered_costed
    FROM _usage_by_day WHERE requests <> 0 ORDER BY ALL
"""


def full_sessions(store: Store) -> pd.DataFrame:
    frame = store.sql(FULL_SESSIONS)
    frame["metadata"] = frame["metadata"].map(lambda v: None if pd.isna(v) else json.loads(v))
    return frame


def assert_same(counted: pd.DataFrame, full: pd.DataFrame) -> None:
    assert list(counted.columns) == list(full.columns)
    assert list(counted.dtypes) == list(full.dtypes)
    exact = [c for c in counted.columns if c != "cost_usd"]
    pd.testing.assert_frame_equal(counted[exact], full[exact])
    # Sums of floats in another order (and differences on replays): equal, not bit-equal.
    pd.testing.assert_series_equal(counted["cost_usd"], full["cost_usd"], rtol=1e-9, atol=1e-12)


class RandomStore:
    """Writes a plausible but random history of several sessions, replays included."""

    def __init__(self, store: Store, seed: int) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.written: list[Any] = []
        self.messages: dict[str, list[Message]] = {}
        self.turns: dict[str, list[str]] = {}

    def write(self, event: Any) -> None:
        self.store.write(event)
        self.written.append(event)

    def session(self) -> str:
        sid = new_id()
        history = []
        if self.rng.random() < 0.3:  # a session created with history (a fork, an import)
            turn = new_id()
            history = [
                Message(role="user", content="q", seq=0, turn_id=turn),
                Message(role="assistant", content="a", seq=1, turn_id=turn),
            ]
        self.store.create_session(
            session_id=sid, model="m", system_prompt=None, messages=history,
            metadata={"n": self.rng.randint(0, 9)},
        )  # fmt: skip
        self.messages[sid] = list(history)
        self.turns[sid] = []
        return sid

    def turn(self, sid: str) -> None:
        rng = self.rng
        turn = new_id()
        self.turns[sid].append(turn)
        if rng.random() < 0.9:
            self.write(TurnStarted(session_id=sid, turn_id=turn, text="question"))
        seq = len(self.messages[sid])
        users = 2 if rng.random() < 0.2 else 1  # a typed answer's correction is a user message
        for i in range(users + rng.randint(0, 3)):
            role = "user" if i < users else rng.choice(["assistant", "tool", "assistant"])
            state = "superseded" if rng.random() < 0.05 else "active"  # a rejected reply
            message = Message(role=role, content="x", seq=seq, turn_id=turn, state=state)
            seq += 1
            self.messages[sid].append(message)
            self.write(MessageAdded(session_id=sid, message=message))
        for _ in range(rng.randint(0, 3)):
            tokens = None if rng.random() < 0.15 else rng.randint(1, 5000)
            self.write(
                UsageEvent(
                    session_id=sid,
                    turn_id=turn,
                    model=rng.choice(["a", "b", "c"]),
                    usage=None
                    if rng.random() < 0.1
                    else RequestUsage(
                        prompt_tokens=tokens,
                        completion_tokens=None if rng.random() < 0.1 else rng.randint(1, 900),
                        cached_tokens=rng.choice([None, 0, 10]),
                    ),
                    cost_usd=None if rng.random() < 0.3 else rng.choice([0.0, 0.001, 0.37]),
                    error="HTTP 500" if rng.random() < 0.15 else None,
                )
            )
        if rng.random() < 0.8:
            result = TurnResult(
                session_id=sid, turn_id=turn, status="completed", usage=Usage(requests=1)
            )
            self.write(TurnFinished(session_id=sid, turn_id=turn, result=result))

    def mark(self, sid: str, state: str) -> None:
        live = [m for m in self.messages[sid] if m.state == "active"]
        if not live:
            return
        start = self.rng.randrange(len(live))
        chosen = live[start:] if state == "superseded" else live[: start + 1]
        for m in chosen:
            m.state = state  # type: ignore[assignment]
        self.write(MessagesMarked(session_id=sid, message_ids=[m.id for m in chosen], state=state))

    def run(self, steps: int) -> None:
        rng = self.rng
        sessions = [self.session() for _ in range(4)]
        for _ in range(steps):
            roll = rng.random()
            sid = rng.choice(sessions)
            if roll < 0.55:
                self.turn(sid)
            elif roll < 0.65:
                self.mark(sid, "compacted")
            elif roll < 0.75:
                self.mark(sid, "superseded")
            elif roll < 0.9 and self.written:  # a replay: an earlier event written again
                self.store.write(rng.choice(self.written))
            elif roll < 0.95:
                sessions.append(self.session())
            elif roll < 0.975:  # settings changed: the session's row, not an event's
                self.store.update_session(
                    sid, title=f"t{rng.randint(0, 9)}", metadata={"tags": [rng.choice("xyz")]}
                )
            else:
                self.store.end_unfinished_turns(sid, status="interrupted", error="gone")


@pytest.mark.parametrize("seed", range(6))
def test_sessions_from_the_counters_equal_the_full_aggregation(tmp_path: Path, seed: int) -> None:
    with Store.open(tmp_path / "random.duckdb") as store:
        RandomStore(store, seed).run(160)
        counted = nbchat.sessions(db=store)
        full = full_sessions(store)
        assert len(counted) >= 4
        assert counted["superseded_turns"].sum() > 0 or seed  # the cases are reached
        assert_same(counted, full)
        by_day = store.sql(COUNTED_BY_DAY)
        expected = store.sql(BY_DAY)
        pd.testing.assert_frame_equal(
            by_day.drop(columns="cost_usd"), expected.drop(columns="cost_usd")
        )
        pd.testing.assert_series_equal(by_day["cost_usd"], expected["cost_usd"], atol=1e-12)


def test_replaying_every_event_again_changes_no_counter(tmp_path: Path) -> None:
    with Store.open(tmp_path / "replay.duckdb") as store:
        history = RandomStore(store, 99)
        history.run(80)
        before = nbchat.sessions(db=store)
        for event in history.written:  # a recovery file imported twice, in order
            store.write(event)
        after = nbchat.sessions(db=store)
        # A replayed request row is stamped when it is written again: only that moves.
        assert (after["last_active"] >= before["last_active"]).all()
        assert_same(after.drop(columns="last_active"), before.drop(columns="last_active"))
        assert_same(after, full_sessions(store))


def copy_rows(con: Any, table: str) -> None:
    """``table``'s rows from the attached ``src`` store, in the columns this older schema
    has (later migrations add columns at the end)."""
    columns = [
        row[0]
        for row in con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_name = ? "
            "ORDER BY ordinal_position",
            [table],
        ).fetchall()
    ]
    listed = ", ".join(columns)
    con.execute(f"INSERT INTO {table} ({listed}) SELECT {listed} FROM src.{table}")


def test_the_migration_fills_the_counters_of_an_older_store(tmp_path: Path) -> None:
    import duckdb

    from nbchat._store._migrations import migrate

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, stop_after="m006_attachments")
    con.close()
    with Store.open(tmp_path / "source.duckdb") as source:
        RandomStore(source, 7).run(60)
        expected = nbchat.sessions(db=source)
    # The same rows, copied into a store that has no counters yet.
    con = duckdb.connect(str(path))
    con.execute(f"ATTACH '{tmp_path / 'source.duckdb'}' AS src (READ_ONLY)")
    for table in ("sessions", "messages", "requests", "turns"):
        copy_rows(con, table)
    con.execute("DETACH src")
    con.close()
    with Store.open(path) as store:  # m007 runs here
        assert_same(nbchat.sessions(db=store), expected)


COUNTED = ("_session_counts", "_turn_counts", "_usage_by_day_model", "_tool_counts")


def assert_same_counters(kept: pd.DataFrame, again: pd.DataFrame) -> None:
    if "messages_version" in kept:  # a random number, new with every refill
        assert kept["messages_version"].notna().all() and again["messages_version"].notna().all()
        kept, again = kept.drop(columns="messages_version"), again.drop(columns="messages_version")
    if "cost_usd" not in kept:
        pd.testing.assert_frame_equal(kept, again)
        return
    pd.testing.assert_frame_equal(kept.drop(columns="cost_usd"), again.drop(columns="cost_usd"))
    pd.testing.assert_series_equal(kept["cost_usd"], again["cost_usd"], atol=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_fill_counters_recomputes_what_writes_kept(tmp_path: Path, seed: int) -> None:
    with Store.open(tmp_path / "fill.duckdb") as store:
        RandomStore(store, seed).run(80)
        assert_refill_agrees(store)


def assert_refill_agrees(store: Store) -> None:
    """The counters recomputed from every row are the ones the store has."""
    kept = {t: store.sql(f"SELECT * FROM {t} ORDER BY ALL") for t in COUNTED}
    with store._connection() as con:  # type: ignore[attr-defined]
        fill_counters(con)
    for table, frame in kept.items():
        assert_same_counters(frame, store.sql(f"SELECT * FROM {table} ORDER BY ALL"))


# What transcript() read before m008: the session's messages, with no bound on their times.
ALL_MESSAGES = """
    SELECT seq, role, content, reasoning, name, tool_calls, tool_call_id, status, state,
           turn_id, round, cell_id, created_at, id, attachments
    FROM messages WHERE session_id = ? ORDER BY seq, created_at
"""

MESSAGE_TIMES = """
    SELECT c.session_id, c.first_message_at, c.last_message_at,
           min(m.created_at) AS first, max(m.created_at) AS last
    FROM _session_counts c JOIN messages m USING (session_id)
    GROUP BY ALL
"""


@pytest.mark.parametrize("seed", range(3))
def test_the_counted_message_times_bound_every_message_of_a_session(
    tmp_path: Path, seed: int
) -> None:
    with Store.open(tmp_path / "times.duckdb") as store:
        history = RandomStore(store, seed)
        history.run(120)
        for event in history.written[::3]:  # replays: rows written again, some later
            store.write(event)
        times = store.sql(MESSAGE_TIMES)
        assert len(times) >= 4
        assert (times["first_message_at"] <= times["first"]).all()
        assert (times["last_message_at"] >= times["last"]).all()
        for sid in times["session_id"]:
            shown = nbchat.transcript(
                sid, db=store, include_compacted=True, include_superseded=True
            )
            expected = store.sql(ALL_MESSAGES, [sid])
            for column in ("tool_calls", "attachments"):  # parsed by transcript()
                expected[column] = [
                    json.loads(t) if isinstance(t, str) else None for t in expected[column]
                ]
            pd.testing.assert_frame_equal(shown, expected)


def copied_at(path: Path, source: Path, migration: str) -> None:
    """A store at ``path`` migrated up to ``migration`` only, holding ``source``'s rows
    and the counters that migration's code kept for them."""
    import duckdb

    from nbchat._store._migrations import migrate

    con = duckdb.connect(str(path))
    try:
        migrate(con, stop_after=migration)
        con.execute(f"ATTACH '{source}' AS src (READ_ONLY)")
        for table in ("sessions", "messages", "requests", "turns"):
            copy_rows(con, table)
        con.execute("DETACH src")
        fill_counters(con)
    finally:
        con.close()


def test_m008_fills_the_first_message_times_of_a_store_with_counters(tmp_path: Path) -> None:
    with Store.open(tmp_path / "source.duckdb") as source:
        RandomStore(source, 5).run(60)
    path = tmp_path / "m007.duckdb"
    copied_at(path, tmp_path / "source.duckdb", "m007_counters")  # no first times yet
    with Store.open(path) as store:  # m008 runs here
        times = store.sql(MESSAGE_TIMES)
        assert len(times) >= 4
        assert times["first_message_at"].equals(times["first"])
        assert times["last_message_at"].equals(times["last"])


def test_m009_copies_each_session_into_its_counters_and_counts_superseded_turns(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path / "source.duckdb") as source:
        RandomStore(source, 11).run(120)
        expected = nbchat.sessions(db=source)
        assert expected["superseded_turns"].sum() > 0
    path = tmp_path / "m008.duckdb"
    # The counters as m008 kept them: no copies, no superseded turns.
    copied_at(path, tmp_path / "source.duckdb", "m008_first_message_times")
    with Store.open(path) as store:  # m009 runs here
        assert_same(nbchat.sessions(db=store), expected)
        assert_refill_agrees(store)


# Another process writes to the store: a message, a mark of an existing one, a replay.
OTHER_PROCESS = """
import sys
from nbchat._store import Store
from nbchat._types import Message
from nbchat._events import MessageAdded, MessagesMarked
path, sid, marked = sys.argv[1:4]
with Store.open(path) as store:
    store.write(MessageAdded(session_id=sid, message=Message(role="user", content="new", seq=90)))
    store.write(MessagesMarked(session_id=sid, message_ids=[marked], state="compacted"))
"""


def test_a_kept_transcript_is_read_again_after_any_write_of_its_messages(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """transcript() keeps the rows it read (``_kept.KeptRows``) while the session's
    ``messages_version`` says they are the stored ones: this process's writes update
    them; writes from another process, marks, replays and a refill of the counters read
    them again."""
    import subprocess
    import sys

    import nbchat._store._duckdb as duckdb_store

    path = tmp_path / "kept.duckdb"
    reads: list[str] = []
    real = duckdb_store._frame_rows

    def counted(con: Any, sql: Any, params: Any) -> Any:
        if sql is duckdb_store.parsed(duckdb_store.QUERIES["transcript"].sql):
            reads.append(params[0])  # a transcript read from the file
        return real(con, sql, params)

    monkeypatch.setattr(duckdb_store, "_frame_rows", counted)

    def shown(sid: str, **flags: bool) -> pd.DataFrame:
        frame = nbchat.transcript(sid, db=store, **flags)
        expected = store.sql(ALL_MESSAGES, [sid])
        if not flags:
            expected = expected[expected["state"] == "active"].reset_index(drop=True)
        for column in ("tool_calls", "attachments"):
            expected[column] = [
                json.loads(t) if isinstance(t, str) else None for t in expected[column]
            ]
        pd.testing.assert_frame_equal(frame, expected)
        return frame

    store = Store.open(path)
    history = RandomStore(store, 21)
    history.run(40)
    sid = next(iter(history.messages))
    everything = {"include_compacted": True, "include_superseded": True}
    shown(sid), shown(sid, **everything)
    before = len(reads)
    first = shown(sid)
    first.loc[0, "content"] = "changed by the user"  # the kept rows are not the frame's
    first.loc[0, "seq"] = 99
    shown(sid), shown(sid, **everything)
    assert len(reads) == before  # nothing written: the kept rows, checked by their version

    written = []
    for event in history.written:  # a replay of this session's events, by this process:
        if getattr(event, "session_id", None) == sid and isinstance(event, MessageAdded):
            before = len(reads)
            store.write(event)
            shown(sid)  # the kept rows, brought up to date by the write (``_kept.py``)
            assert len(reads) == before
            written.append(event)
    assert written
    live = shown(sid)
    store.close()  # let another process have the file

    marked = str(live["id"].iloc[-1])
    other = subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS, str(path), sid, marked],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr
    store = Store.open(path)
    try:
        after = shown(sid)
        assert "new" in set(after["content"]) and marked not in set(after["id"])
        shown(sid, **everything)
        with store._connection() as con:  # type: ignore[attr-defined]
            fill_counters(con)  # new versions for every session: read again
        before = len(reads)
        shown(sid)
        assert len(reads) == before + 1
    finally:
        store.close()
