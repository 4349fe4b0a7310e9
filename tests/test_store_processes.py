"""Several processes, one store file: waiting, handing over, crashes (real child processes)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from file_holder import FileHolder

from nbchat import Session, SessionPendingError, StoreError
from nbchat._events import MessageAdded
from nbchat._store import Store
from nbchat._types import Message
from nbchat.testing import FakeOpenAIServer

CHILD = Path(__file__).parent / "helpers" / "store_child.py"


def store_ids(db_path: Path) -> list[str]:
    with Store.open(db_path) as store:
        return [str(sid) for (sid,) in store._fetchall("SELECT id FROM sessions")]


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def report(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture
def holder(db_path: Path, tmp_path: Path) -> Iterator[Any]:
    """Start a child that holds the store file until the test lets it go."""
    holders: list[FileHolder] = []

    def start() -> FileHolder:
        held = FileHolder(db_path, tmp_path / f"ready-{len(holders)}")
        holders.append(held)
        return held

    yield start
    for held in holders:
        held.kill()


# --------------------------------------------------------------------------- waiting


def test_a_lock_never_freed_ends_in_a_clear_store_error(db_path: Path, holder: Any) -> None:
    proc = holder()
    started = time.monotonic()
    with pytest.raises(StoreError, match="stayed locked by another process") as info:
        Store.open(db_path, lock_timeout=1.0)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 5.0
    assert f"PID {proc.pid}" in str(info.value) and str(db_path) in str(info.value)


def test_a_write_waits_for_the_file_then_gives_up(db_path: Path, holder: Any) -> None:
    store = Store.open(db_path, lock_timeout=0.5, linger=0.01)
    store.create_session(session_id="s", model=None, system_prompt=None)
    while store.stats()["open"]:
        time.sleep(0.01)
    holder()
    with pytest.raises(StoreError, match="stayed locked"):
        store.handle(MessageAdded(session_id="s", message=Message(role="user", content="x")))
    assert store.stats()["waits"] == 1
    store.close()


def test_retries_succeed_once_the_other_process_lets_go(db_path: Path, holder: Any) -> None:
    holder().let_go_in(1.5)
    started = time.monotonic()
    with Store.open(db_path, lock_timeout=20) as store:
        waited = time.monotonic() - started
        store.create_session(session_id="after", model=None, system_prompt=None)
        assert store.stats()["waits"] == 1
    assert 0.5 < waited < 15


def test_a_busy_writer_hands_the_file_over(db_path: Path, tmp_path: Path) -> None:
    Store.open(db_path).close()  # create the schema before the race starts
    ready = tmp_path / "writing"
    writer = spawn("busy-writer", str(db_path), "4", "busy", str(ready))
    wait_for(ready, writer)  # the writer now holds the file and writes back to back
    slowest = 0.0
    with Store.open(db_path, lock_timeout=10) as store:
        store.create_session(session_id="polite", model=None, system_prompt=None)
        for seq in range(10):
            started = time.perf_counter()
            message = Message(role="user", content=f"mine {seq}", seq=seq)
            store.handle(MessageAdded(session_id="polite", message=message))
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.05)  # idle like a kernel between events: the writer gets it back
    busy = report(writer)
    assert busy["writes"] > 50 and busy["handovers"] >= 1
    # Neither side waits anywhere near the lock timeout: they take turns.
    assert slowest < 3.0 and busy["slowest_s"] < 3.0
    with Store.open(db_path) as store:
        assert len(store.load_session("polite").messages) == 10
        assert len(store.load_session("busy").messages) == busy["writes"]


# --------------------------------------------------------------------------- crashes


def test_writes_survive_a_sigkill(db_path: Path) -> None:
    proc = spawn("write-and-die", str(db_path))
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with Store.open(db_path) as store:
        (message,) = store.load_session("killed").messages
    assert message.content == "written just before SIGKILL"


def start_killed_turn(db_path: Path, fake: FakeOpenAIServer, tmp_path: Path) -> str:
    """A child process whose tool is sleeping gets SIGKILL; returns its session id."""
    fake.enqueue(tool_calls=[{"name": "slow", "arguments": {"seconds": 60}}])
    marker = tmp_path / "tool-started"
    proc = spawn("pending-tool", str(db_path), fake.url, str(marker))
    assert proc.stdout is not None
    session_id = json.loads(proc.stdout.readline())["session_id"]
    wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return str(session_id)


def quick_slow(seconds: float) -> str:
    """Sleep, then say so (the reopening process's version does not sleep)."""
    return f"slept {seconds:g}s (resumed)"


quick_slow.__name__ = "slow"


def reopen(session_id: str, db_path: Path, fake: FakeOpenAIServer) -> Session:
    return Session(
        session_id=session_id,
        db=db_path,
        base_url=fake.url,
        api_key="sk-test",
        tools=[quick_slow],
        max_retries=0,
    )


def test_killed_tool_call_leaves_a_pending_session_that_resumes(
    db_path: Path, fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    session_id = start_killed_turn(db_path, fake, tmp_path)
    session = reopen(session_id, db_path, fake)
    assert [c.name for c in session.pending_tool_calls] == ["slow"]
    with pytest.raises(SessionPendingError, match=r"resume\(\).*abort_pending\(\)"):
        session.send("hello?")

    fake.enqueue("Done: the tool slept.")
    result = session.resume()
    assert result.status == "completed" and result.text == "Done: the tool slept."
    assert [c.result for c in result.tool_calls] == ["slept 60s (resumed)"]
    # The model saw the tool result the resumed run produced.
    assert fake.requests[-1]["messages"][-1]["content"] == "slept 60s (resumed)"
    session.store.close() if session.store else None

    with Store.open(db_path) as store:
        stored = store.load_session(session_id)
    assert [m.role for m in stored.messages] == ["user", "assistant", "tool", "assistant"]
    assert stored.pending_tool_calls() == []


def test_killed_tool_call_can_be_aborted_and_the_chat_continues(
    db_path: Path, fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    session_id = start_killed_turn(db_path, fake, tmp_path)
    session = reopen(session_id, db_path, fake)
    aborted = session.abort_pending()
    assert [m.status for m in aborted] == ["aborted"]
    fake.enqueue("OK, moving on.")
    result = session.send("never mind")
    assert result.status == "completed" and result.text == "OK, moving on."
    roles = [m["role"] for m in fake.requests[-1]["messages"]]
    assert roles == ["user", "assistant", "tool", "user"]
    session.store.close() if session.store else None

    with Store.open(db_path) as store:
        stored = store.load_session(session_id)
    assert [m.status for m in stored.messages if m.role == "tool"] == ["aborted"]
    assert stored.messages[-1].content == "OK, moving on."


def test_reopened_session_continues_the_conversation(db_path: Path, fake: FakeOpenAIServer) -> None:
    first = Session(
        model="test-model", base_url=fake.url, api_key="sk-test", db=db_path, system="Be terse."
    )
    fake.enqueue("Nice to meet you, Ada.")
    first.send("My name is Ada.")
    session_id = first.id
    first.store.close() if first.store else None

    again = Session(session_id=session_id, db=db_path, base_url=fake.url, api_key="sk-test")
    assert again.model == "test-model"
    assert again.messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
    ]
    fake.enqueue("You are Ada.")
    assert again.send("Who am I?").text == "You are Ada."
    assert [m["content"] for m in fake.requests[-1]["messages"]][-2:] == [
        "Nice to meet you, Ada.",
        "Who am I?",
    ]
    again.store.close() if again.store else None
    with Store.open(db_path) as store:
        seqs = [m.seq for m in store.load_session(session_id).messages]
    assert seqs == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_two_writers_and_a_reader_share_one_file(db_path: Path, tmp_path: Path) -> None:
    Store.open(db_path).close()
    stop = tmp_path / "stop-reading"
    reader = spawn("reader", str(db_path), str(stop))
    writers = [spawn("turns", str(db_path), "200", label) for label in ("left", "right")]
    try:
        results = [report(w, timeout=170) for w in writers]
    finally:
        stop.touch()
    read = report(reader)
    for result in results:
        assert result["error_count"] == 0, result["errors"]
    assert read["error_count"] == 0, read["errors"]
    assert read["queries"] > 0

    with Store.open(db_path) as store:
        per_label = store._fetchall(
            "SELECT split_part(s.title, ' ', 1) AS label, count(DISTINCT s.id),"
            " count(t.id), count(t.id) FILTER (WHERE t.status = 'completed')"
            " FROM sessions s JOIN turns t ON t.session_id = s.id GROUP BY label ORDER BY label"
        )
        requests = store._fetchall(
            "SELECT split_part(s.title, ' ', 1) AS label, count(*) FROM requests r"
            " JOIN sessions s ON s.id = r.session_id GROUP BY label ORDER BY label"
        )
        messages = store._fetchall("SELECT count(*) FROM messages")
    assert per_label == [("left", 10, 200, 200), ("right", 10, 200, 200)]
    assert requests == [("left", 200), ("right", 200)]
    assert messages == [(800,)]  # a user and an assistant message per turn
    assert sorted(results[0]["sessions"] + results[1]["sessions"]) == sorted(store_ids(db_path))
    print(  # shown with -s: how the file was shared
        json.dumps({"writers": results, "reader": read}, indent=1)
    )


# --------------------------------------------------------------------------- random kills

SINK_CHILD = Path(__file__).parent / "helpers" / "sink_child.py"


def run_until_killed(db_path: Path, session_id: str, first: int, rng: Any) -> dict[str, Any]:
    """One child runs turns through a StoreSink until a SIGKILL at a random moment.

    Half the kills land right after the barrier before tools (mid tool call).
    """
    proc = subprocess.Popen(
        [sys.executable, str(SINK_CHILD), "turns", str(db_path), session_id, "1000", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FIRST_TURN": str(first)},
    )
    assert proc.stdout is not None
    mid_tool = rng.random() < 0.5
    target = rng.randint(1, 12)  # kill during or after this many turns
    seen: dict[str, list[int]] = {"tools_running": [], "completed": []}
    for line in proc.stdout:
        record = json.loads(line)
        assert "notice" not in record, record
        for key, numbers in seen.items():
            if key in record:
                numbers.append(record[key])
        if len(seen["tools_running"]) >= target and (mid_tool or rng.random() < 0.3):
            if not mid_tool:
                time.sleep(rng.uniform(0, 0.02))  # anywhere in the following events
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return seen


@pytest.mark.slow
def test_random_sigkills_lose_no_completed_turn_and_duplicate_no_row(db_path: Path) -> None:
    rng = random.Random(12)
    Store.open(db_path).close()
    sessions = ["left", "right"]  # two killed kernels at a time share the file
    runs: dict[str, list[dict[str, list[int]]]] = {name: [] for name in sessions}
    for round_number in range(8):
        with ThreadPoolExecutor(len(sessions)) as pool:
            futures = {
                name: pool.submit(
                    run_until_killed,
                    db_path,
                    name,
                    1000 * round_number,
                    random.Random(rng.random()),
                )
                for name in sessions
            }
            for name, future in futures.items():
                runs[name].append(future.result())

    with Store.open(db_path) as store:
        messages = store._fetchall(
            "SELECT session_id, turn_id, role, count(*) FROM messages GROUP BY ALL"
        )
        turns = dict(store._fetchall("SELECT id, status FROM turns"))
        duplicated_seqs = store._fetchall(
            "SELECT session_id, seq FROM messages GROUP BY ALL HAVING count(*) > 1"
        )
        tool_rows = dict(store._fetchall("SELECT turn_id, count(*) FROM tool_calls GROUP BY 1"))
        request_rows = dict(store._fetchall("SELECT turn_id, count(*) FROM requests GROUP BY 1"))
    per_turn: dict[str, dict[str, int]] = {}
    for _session, turn_id, role, count in messages:
        per_turn.setdefault(turn_id, {})[role] = count
    attempted = completed = lost = 0
    for name, session_runs in runs.items():
        for seen in session_runs:
            attempted += len(seen["tools_running"])
            for number in seen["tools_running"]:
                # Durable before the tools ran: the user message and the assistant's call.
                stored = per_turn.get(f"{name}-t{number}", {})
                assert stored.get("user") == 1 and stored.get("assistant", 0) >= 1, number
            for number in seen["completed"]:
                turn_id = f"{name}-t{number}"
                completed += 1
                whole = per_turn.get(turn_id) == {"user": 1, "assistant": 2, "tool": 1}
                whole = whole and turns.get(turn_id) == "completed"
                whole = whole and tool_rows.get(turn_id) == 1 and request_rows.get(turn_id) == 2
                lost += not whole
    assert duplicated_seqs == []
    assert all(count == 1 for count in tool_rows.values())
    assert all(count <= 2 for count in request_rows.values())
    assert completed > 0 and lost == 0
    unfinished = [t for t, status in turns.items() if status != "completed"]
    assert all(turns[t] == "running" for t in unfinished)  # killed turns say so
    print(  # shown with -s: the figures of the report
        json.dumps(
            {"kills": sum(len(r) for r in runs.values()), "turns_attempted": attempted,
             "turns_completed": completed, "completed_turns_lost": lost,
             "killed_mid_turn": len(unfinished)}
        )
    )  # fmt: skip
