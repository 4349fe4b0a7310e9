"""A fault inside the loop (a bug: nbchat's, or a hook's or guardrail's) still ends the turn.

A new user's trial hit one (a key wrapped twice made redaction raise TypeError): the
turn stayed "running" in the store, its request with neither a cost nor an error. Now
the turn and the request are stored as failed, with the key redacted, and the exception
is raised with its traceback, so the bug is seen. These tests put a fault in nbchat's
own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import nbchat
from nbchat import _assembler, _turn
from nbchat.testing import FakeOpenAIServer

KEY = "sk-test-internal-0123456789"


def _boom(*args: Any, **kwargs: Any) -> None:
    raise TypeError(f"object of type 'Secret' has no len() near {KEY}")


def _session(fake: FakeOpenAIServer, db: Path, **kwargs: Any) -> nbchat.Session:
    return nbchat.Session(model="gpt-4o-mini", base_url=fake.url, api_key=KEY, db=str(db), **kwargs)


def _failed_turn(fake: FakeOpenAIServer, db: Path, **send: Any) -> tuple[Any, Any, Any]:
    """One turn that must raise the fault: the session, and its stored turns and usage."""
    session = _session(fake, db)
    fake.enqueue("hello there")
    with pytest.raises(TypeError, match="has no len"):
        session.send("hi", **send)
    turns = nbchat.turns(session_id=session.id, db=str(db))
    usage = nbchat.usage(session_id=session.id, db=str(db))
    return session, turns, usage


def test_a_fault_while_reading_the_reply_is_raised_and_stored_as_failed(
    fake: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_assembler.ReplyAssembler, "_mark_first_token", _boom)
    session, turns, usage = _failed_turn(fake, tmp_path / "s.duckdb")
    assert turns.status.tolist() == ["error"]
    assert "TypeError" in turns.error.iloc[0] and KEY not in turns.error.iloc[0]
    assert len(usage) == 1 and "TypeError" in usage.error.iloc[0]
    assert KEY not in usage.error.iloc[0]
    monkeypatch.undo()  # the session carries on once the fault is gone
    fake.enqueue("fine now")
    assert session.send("again").text == "fine now"


def test_a_fault_between_requests_is_raised_and_the_turn_stored_as_failed(
    fake: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_turn.TurnLoop, "_take_reply", _boom)
    seen: list[str] = []
    _, turns, usage = _failed_turn(
        fake, tmp_path / "s.duckdb", on_event=lambda e: seen.append(e.kind)
    )
    assert seen[-2:] == ["error", "turn_finished"]
    assert turns.status.tolist() == ["error"] and KEY not in turns.error.iloc[0]
    assert usage.error.isna().all()  # the request itself went well


def test_a_hook_that_raises_is_raised_and_the_turn_stored_as_failed(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    def hook(event: Any) -> None:
        if event.kind == "text_delta":
            raise ValueError("my hook broke")

    db = tmp_path / "s.duckdb"
    session = _session(fake, db, on_event=hook)
    fake.enqueue("hello there")
    with pytest.raises(ValueError, match="my hook broke"):
        session.send("hi")
    turns = nbchat.turns(session_id=session.id, db=str(db))
    assert turns.status.tolist() == ["error"]
    assert turns.error.iloc[0] == "ValueError: my hook broke"
