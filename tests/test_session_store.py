"""The session and the store together: a locked store file never costs the user a turn."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import nbchat
from nbchat import Session
from nbchat.testing import FakeOpenAIServer

CHILD = Path(__file__).parent / "helpers" / "store_child.py"


@pytest.mark.slow
def test_a_locked_store_file_loses_nothing(
    fake: FakeOpenAIServer, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCHAT_DB_LOCK_TIMEOUT", "0.3")
    fake.enqueue("first answer")
    fake.enqueue("second answer")
    fake.enqueue("third answer")
    s = Session(model="m", base_url=fake.url, api_key="k", db=db_path, max_retries=0)
    s.send("one")
    time.sleep(1.0)  # the store lets the file go 0.5 s after its last write

    ready = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, str(CHILD), "hold", str(db_path), "2.5", str(ready)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert holder.poll() is None, "the holder process died"
            assert time.monotonic() < deadline, "the holder never took the file"
            time.sleep(0.05)
        events: list[Any] = []
        r = s.send("two", on_event=events.append)
        assert r.status == "completed" and r.text == "second answer"
        notices = [e.message for e in events if e.kind == "notice"]
        assert len(notices) == 1 and "Not saved yet" in notices[0]
    finally:
        holder.communicate(timeout=30)

    s.send("three")  # the file is free again: the backlog is written first, in order
    rows = nbchat.transcript(s.id, db=db_path)
    assert list(rows["content"]) == [
        "one",
        "first answer",
        "two",
        "second answer",
        "three",
        "third answer",
    ]
    assert len(nbchat.usage(db=db_path, session_id=s.id)) == 3
