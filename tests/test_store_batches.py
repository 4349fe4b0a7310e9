"""The writer's batches: several events in one transaction leave the same rows as the
same events written one by one (ids, counters and all), and a refused row in a batch is
skipped alone.

The events come from real turns (a tool round, a failing tool, compactions, a cell
re-run marking messages) against the fake server, collected with the store off, then
written into two fresh files: one event at a time, and in batches of several sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from nbchat import Session, tool
from nbchat._events import Event, MessageAdded, MessagesMarked, UsageEvent
from nbchat._exceptions import UnstorableRow
from nbchat._store import Store
from nbchat._store._rows import STORED_KINDS
from nbchat._store._sink import StoreSink
from nbchat._types import Message, RequestUsage
from nbchat.testing import FakeOpenAIServer

CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@tool
def lookup(word: str) -> str:
    """Look a word up."""
    if word == "boom":
        raise ValueError("no such word")
    return f"{word}: a word"


def turns_events(fake: FakeOpenAIServer) -> tuple[str, list[Event]]:
    """The stored events of a few real turns, with the store off."""
    events: list[Event] = []
    session = Session(
        model="test-model",
        base_url=fake.url,
        api_key="sk-test",
        db=False,
        system="sys",
        tools=[lookup],
        compaction="window",
        context_window=2000,
        max_retries=0,
        on_event=events.append,
    )
    fake.enqueue(tool_calls=[{"name": "lookup", "arguments": {"word": "cat"}}])
    fake.enqueue("A cat is an animal.")
    assert session.send("what is a cat?").status == "completed"
    fake.enqueue(
        tool_calls=[
            {"name": "lookup", "arguments": {"word": "boom"}},
            {"name": "lookup", "arguments": {"word": "dog"}},
        ]
    )
    fake.enqueue("One failed.")
    assert session.send("and boom, dog?").status == "completed"
    for i in range(12):  # enough history for the window strategy to drop some
        fake.enqueue(f"answer {i} " + "a" * 300)
        assert session.send(f"question {i} " + "q" * 300).status == "completed"
    stored = [event for event in events if event.kind in STORED_KINDS]
    # A cell re-run: the first turn's messages superseded.
    first = [e.message.id for e in stored if isinstance(e, MessageAdded)][:3]
    stored.append(MessagesMarked(session_id=session.id, message_ids=first, state="superseded"))
    assert {e.kind for e in stored} >= {"message", "usage", "tool_result", "compaction"}
    return session.id, stored


def everything(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a closed store file, sorted; but the migrations' log
    (when the file was made) and the sessions' ``messages_version`` (a random number
    each write sets; ``test_counters`` checks that it changes)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [
            name
            for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()
            if name != "_migrations"
        ]
        return {
            table: sorted(
                con.execute(f'SELECT {columns(table)} FROM "{table}"').fetchall(), key=repr
            )
            for table in tables
        }
    finally:
        con.close()


def columns(table: str) -> str:
    return "* EXCLUDE (messages_version)" if table == "_session_counts" else "*"


def written(path: Path, session_id: str, events: Sequence[Event], batch: int) -> dict[str, Any]:
    store = Store.open(path)
    try:
        store.create_session(
            session_id=session_id, model="test-model", system_prompt="sys", created_at=CREATED
        )
        for start in range(0, len(events), batch):
            chunk = events[start : start + batch]
            if batch == 1:
                store.write(chunk[0])
            else:
                store.write_many(chunk)
    finally:
        store.close()
    return everything(path)


@pytest.mark.parametrize("batch", [2, 5, 32, 1000])
def test_a_batch_leaves_the_rows_one_by_one_writes_leave(
    fake: FakeOpenAIServer, tmp_path: Path, batch: int
) -> None:
    session_id, events = turns_events(fake)
    singly = written(tmp_path / "singly.duckdb", session_id, events, 1)
    batched = written(tmp_path / f"batch{batch}.duckdb", session_id, events, batch)
    assert singly.keys() == batched.keys()
    assert sum(len(rows) for rows in singly.values()) > 50
    for table, rows in singly.items():
        assert batched[table] == rows, table
    con = duckdb.connect(str(tmp_path / f"batch{batch}.duckdb"), read_only=True)
    try:  # the version a kept transcript is checked against is set by a batch too
        assert con.execute("SELECT messages_version FROM _session_counts").fetchall()[0][0]
    finally:
        con.close()


def test_a_batch_written_twice_changes_nothing(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    # A journal replay can hand the writer events the file has: rows by id, counters exact.
    session_id, events = turns_events(fake)
    once = written(tmp_path / "once.duckdb", session_id, events, 1)
    store = Store.open(tmp_path / "once.duckdb")
    try:
        store.write_many(events)
    finally:
        store.close()
    assert everything(tmp_path / "once.duckdb") == once


def test_a_refused_row_fails_its_whole_batch(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.duckdb")
    try:
        store.create_session(session_id="s", model="m", system_prompt=None)
        with pytest.raises(UnstorableRow, match="requests"):
            store.write_many([message(0), huge_usage(), message(1)])
        assert store.sql("SELECT count(*) AS n FROM messages")["n"][0] == 0
    finally:
        store.close()


def test_a_refused_row_in_a_backlog_is_skipped_alone(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.duckdb")
    store.create_session(session_id="s", model="m", system_prompt=None)
    notices: list[str] = []
    sink = StoreSink(store, notify=lambda notice: notices.append(str(notice)))
    try:
        # The writer cannot take the queue while the test holds its condition (an RLock,
        # so handle() on this thread still can): the six arrive as one backlog.
        with sink._cond:
            for event in (message(0), message(1), huge_usage(), message(2), message(3)):
                sink.handle(event)
        assert sink.flush(30) is True
        rows = store.sql("SELECT content FROM messages ORDER BY seq")
        assert list(rows["content"]) == ["m0", "m1", "m2", "m3"]
        assert len(store.sql("SELECT id FROM requests")) == 0
        (told,) = [n for n in notices if "skipped" in n]
        assert "requests row was skipped" in told
    finally:
        sink.close()
        store.close()


def message(seq: int) -> MessageAdded:
    return MessageAdded(session_id="s", message=Message(role="user", content=f"m{seq}", seq=seq))


def huge_usage() -> UsageEvent:
    usage = RequestUsage(prompt_tokens=2**64, completion_tokens=1)
    return UsageEvent(session_id="s", model="m", usage=usage)
