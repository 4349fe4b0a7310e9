"""The transcripts a process keeps (``_store/_kept.py``) against reads from the file.

Random writes — new messages, replays of stored ones with another state or text,
marks (compaction, supersede), requests, batches of several events in one transaction,
and now and then a write by another process — are interleaved with ``transcript()``
calls with random flags; each call must return exactly what the same query returns
read from the file, and a read right after this process's write must not read the
session from the file.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import nbchat
import nbchat._store._duckdb as duckdb_store
from nbchat._events import MessageAdded, MessagesMarked, UsageEvent
from nbchat._store import Store
from nbchat._types import Message, RequestUsage, new_id, utcnow

FROM_THE_FILE = """
    SELECT seq, role, content, reasoning, name, tool_calls, tool_call_id, status, state,
           turn_id, round, cell_id, created_at, id, attachments
    FROM messages WHERE session_id = ? ORDER BY seq, created_at
"""

# Another process writes a message and marks one, while this one holds kept rows.
OTHER_PROCESS = """
import sys
from nbchat._store import Store
from nbchat._types import Message
from nbchat._events import MessageAdded, MessagesMarked
path, sid, seq, marked = sys.argv[1:5]
with Store.open(path) as store:
    message = Message(role="assistant", content="from elsewhere", seq=int(seq))
    store.write(MessageAdded(session_id=sid, message=message))
    store.write(MessagesMarked(session_id=sid, message_ids=[marked], state="superseded"))
"""


def _expected(store: Store, sid: str, flags: dict[str, bool]) -> pd.DataFrame:
    frame = store.sql(FROM_THE_FILE, [sid])
    shown = {"active"}
    if flags.get("include_compacted"):
        shown.add("compacted")
    if flags.get("include_superseded"):
        shown.add("superseded")
    frame = frame[frame["state"].isin(shown)].reset_index(drop=True)
    for column in ("tool_calls", "attachments"):
        values = [json.loads(t) if isinstance(t, str) else None for t in frame[column]]
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return frame


class _History:
    """Random writes to a few sessions through one store, remembering what it wrote."""

    def __init__(self, store: Store, path: Path, seed: int) -> None:
        self.store, self.path = store, path
        self.rng = random.Random(seed)
        self.messages: dict[str, list[Message]] = {}
        for _ in range(3):
            sid = new_id()
            store.create_session(session_id=sid, model="m", system_prompt=None, messages=[])
            self.messages[sid] = []

    def _message(self, sid: str) -> Message:
        rng = self.rng
        seq = len(self.messages[sid])
        role = rng.choice(["user", "assistant", "tool"])
        message = Message(
            role=role,
            content=rng.choice(["x", "a longer reply", None]) if role != "user" else "q",
            seq=seq,
            turn_id=rng.choice([None, "t1", "t2"]),
            state="superseded" if rng.random() < 0.1 else "active",
            created_at=utcnow(),
        )
        self.messages[sid].append(message)
        return message

    def event(self) -> Any:
        rng = self.rng
        sid = rng.choice(list(self.messages))
        stored = self.messages[sid]
        pick = rng.random()
        if pick < 0.45 or not stored:
            return MessageAdded(session_id=sid, message=self._message(sid))
        if pick < 0.6:  # a replay, with another text or state
            old = rng.choice(stored)
            again = old.model_copy(
                update={
                    "content": rng.choice([old.content, "edited"]),
                    "state": rng.choice(["active", "compacted", "superseded"]),
                }
            )
            stored[stored.index(old)] = again
            return MessageAdded(session_id=sid, message=again)
        if pick < 0.85:  # a mark: compaction or a cell re-run
            ids = [m.id for m in rng.sample(stored, rng.randint(1, min(3, len(stored))))]
            if rng.random() < 0.2:
                ids.append(new_id())  # an id never stored: nothing to mark
            state = rng.choice(["compacted", "superseded", "active"])
            return MessagesMarked(session_id=sid, message_ids=ids, state=state)
        usage = RequestUsage(prompt_tokens=10, completion_tokens=2)
        return UsageEvent(session_id=sid, model="m", usage=usage, cost_usd=0.001)

    def write(self) -> None:
        if self.rng.random() < 0.25:  # a backlog: several events in one transaction
            self.store.write_many([self.event() for _ in range(self.rng.randint(2, 5))])
        else:
            self.store.write(self.event())

    def other_process(self) -> None:
        """A write from another process: the kept rows are stale, read again."""
        sid = self.rng.choice(list(self.messages))
        stored = self.messages[sid]
        marked = stored[0].id if stored else new_id()
        seq = str(len(stored) + 1000)
        done = subprocess.run(
            [sys.executable, "-c", OTHER_PROCESS, str(self.path), sid, seq, marked],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The session ids of the transcripts read from the file (not from kept rows)."""
    found: list[str] = []
    real = duckdb_store._frame_rows

    def counted(con: Any, sql: Any, params: Any) -> Any:
        if sql is duckdb_store.parsed(duckdb_store.QUERIES["transcript"].sql):
            found.append(params[0])
        return real(con, sql, params)

    monkeypatch.setattr(duckdb_store, "_frame_rows", counted)
    return found


@pytest.mark.parametrize("seed", [1, 2])
def test_kept_transcripts_are_what_the_file_holds_after_any_writes(
    tmp_path: Path, reads: list[str], seed: int
) -> None:
    path = tmp_path / "kept.duckdb"
    store = Store.open(path)
    try:
        history = _History(store, path, seed)
        rng = history.rng
        hits = 0
        for step in range(120):
            history.write()
            if step in (40, 80):
                store.close()  # let the other process have the file
                history.other_process()
                store = history.store = Store.open(path)
            for _ in range(rng.randint(1, 3)):
                sid = rng.choice(list(history.messages))
                flags = {
                    "include_compacted": rng.random() < 0.4,
                    "include_superseded": rng.random() < 0.3,
                }
                before = len(reads)
                frame = nbchat.transcript(sid, db=store, **flags)
                hits += len(reads) == before
                pd.testing.assert_frame_equal(frame, _expected(store, sid, flags))
        assert hits > 100  # most reads after this process's writes read no rows
    finally:
        store.close()


def test_a_read_right_after_a_write_of_its_session_reads_no_rows(
    tmp_path: Path, reads: list[str]
) -> None:
    with Store.open(tmp_path / "one.duckdb") as store:
        sid = new_id()
        store.create_session(session_id=sid, model="m", system_prompt=None, messages=[])
        first = Message(role="user", content="hello", seq=0)
        store.write(MessageAdded(session_id=sid, message=first))
        assert list(nbchat.transcript(sid, db=store)["content"]) == ["hello"]
        assert len(reads) == 1
        store.write(MessageAdded(session_id=sid, message=Message(role="assistant", seq=1)))
        store.write(MessagesMarked(session_id=sid, message_ids=[first.id], state="compacted"))
        frame = nbchat.transcript(sid, db=store)
        assert list(frame["seq"]) == [1] and len(reads) == 1
        everything = nbchat.transcript(sid, db=store, include_compacted=True)
        assert list(everything["seq"]) == [0, 1] and len(reads) == 2


def test_a_frame_of_kept_rows_is_the_callers_to_change(tmp_path: Path) -> None:
    """Kept rows are handed out as copies: changing a frame, even the lists and dicts
    its JSON columns hold, changes nothing the next read returns."""
    from nbchat._types import ToolCall

    with Store.open(tmp_path / "own.duckdb") as store:
        sid = new_id()
        store.create_session(session_id=sid, model="m", system_prompt=None, messages=[])
        call = ToolCall(id="c1", name="read", arguments="{}")
        asked = Message(role="assistant", content="", seq=0, tool_calls=[call])
        store.write(MessageAdded(session_id=sid, message=asked))
        for _ in range(3):
            frame = nbchat.transcript(sid, db=store)
            assert frame["tool_calls"][0][0]["name"] == "read"
            assert list(frame["content"]) == [""]
            frame["tool_calls"][0][0]["name"] = "changed"
            frame["tool_calls"][0].append({"name": "more"})
            frame.loc[0, "content"] = "changed too"
