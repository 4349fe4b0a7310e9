"""One stored session, two processes: one runs a turn at a time, the other catches up.

The second process is a real child Python running a real ``Session`` against the same
fake server and DuckDB file (a second kernel after ``%chat use ID``, as a new-user trial
ran it: the two numbered their messages from the same ``seq``, and the history
interleaved).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nbchat import Session, SessionInUseError, transcript
from nbchat.testing import FakeOpenAIServer

_CHILD = textwrap.dedent(
    """
    import sys
    from nbchat import Session
    url, db, session_id, text = sys.argv[1:5]
    s = Session(session_id=session_id, model="m", base_url=url, api_key="k", db=db)
    print("opened", flush=True)
    result = s.send(text)
    print(result.status, flush=True)
    """
)


def _child(fake: FakeOpenAIServer, db: Path, session_id: str, text: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, fake.url, str(db), session_id, text],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_request(fake: FakeOpenAIServer, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(fake.requests) < count:
        assert time.monotonic() < deadline, "the child never sent its request"
        time.sleep(0.02)


def _session(fake: FakeOpenAIServer, db: Path, session_id: str | None = None) -> Session:
    return Session(session_id=session_id, model="m", base_url=fake.url, api_key="k", db=db)


@pytest.mark.slow
def test_a_turn_is_refused_while_another_process_runs_one_and_loses_nothing(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    fake.enqueue("Noted.")
    mine = _session(fake, db_path)
    mine.send("My name is Ada.")
    fake.enqueue("a long reply " * 20, delay=0.1, chunk_size=8)  # ~4 s of streaming
    child = _child(fake, db_path, mine.id, "What is my name?")
    try:
        _wait_for_request(fake, 2)  # its turn is running: the session is held
        with pytest.raises(SessionInUseError, match="running a turn in another process"):
            mine.send("Written while the other streams.")
        # Reopened meanwhile (a third kernel's %chat use): its running turn is not closed
        # as one a dead process left.
        _session(fake, db_path, mine.id)
    finally:
        out, err = child.communicate(timeout=60)
    assert out.split() == ["opened", "completed"], err
    fake.enqueue("You are Ada.")
    result = mine.send("And now?")
    assert result.status == "completed"
    # The turn went on from the other process's reply, which it loaded first.
    sent = [m["content"] for m in fake.requests[-1]["messages"]]
    assert sent == [
        "My name is Ada.",
        "Noted.",
        "What is my name?",
        "a long reply " * 20,
        "And now?",
    ]
    rows = transcript(mine.id, db=db_path)
    assert list(rows["seq"]) == sorted(set(rows["seq"]))  # one number each, in order
    assert list(rows["role"]) == ["user", "assistant"] * 3
    turns = mine.store.query("SELECT status FROM turns ORDER BY started_at").data  # type: ignore[union-attr]
    assert list(turns["status"]) == ["completed"] * 3


@pytest.mark.slow
def test_a_session_continued_elsewhere_is_loaded_again_before_the_next_turn(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    fake.enqueue("first reply")
    mine = _session(fake, db_path)
    mine.send("first")
    fake.enqueue("their reply")
    child = _child(fake, db_path, mine.id, "theirs")
    out, err = child.communicate(timeout=60)
    assert out.split() == ["opened", "completed"], err

    fake.enqueue("mine again")
    events: list[str] = []
    mine.send("mine", on_event=lambda e: events.append(getattr(e, "message", "")))
    assert [m["content"] for m in fake.requests[-1]["messages"]] == [
        "first",
        "first reply",
        "theirs",
        "their reply",
        "mine",
    ]
    assert any("continued in another process" in text for text in events)
    assert [m.content for m in _session(fake, db_path, mine.id).history] == [
        "first",
        "first reply",
        "theirs",
        "their reply",
        "mine",
        "mine again",
    ]


def test_two_session_objects_of_one_id_take_turns_and_see_each_other(
    fake: FakeOpenAIServer, db_path: Path
) -> None:
    fake.enqueue("one")
    first = _session(fake, db_path)
    first.send("a")
    second = _session(fake, db_path, first.id)
    fake.enqueue("two")
    second.send("b")
    fake.enqueue("three")
    first.send("c")  # loads b and two first
    assert [m["content"] for m in fake.requests[-1]["messages"]] == ["a", "one", "b", "two", "c"]


def test_an_in_memory_session_takes_no_hold(fake: FakeOpenAIServer) -> None:
    fake.enqueue("fine")
    s = Session(model="m", base_url=fake.url, api_key="k", db=":memory:")
    assert s.send("hi").status == "completed"
