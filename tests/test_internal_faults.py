"""A fault inside nbchat itself (a bug) still ends the turn: failed, stored, said in one line.

A new user's trial hit one (a key wrapped twice made redaction raise TypeError): the
cell showed a long traceback and the turn stayed "running" in the store, its request
with neither a cost nor an error. These tests put a fault in nbchat's own code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

import nbchat
from nbchat import _client, _turn
from nbchat.testing import FakeOpenAIServer

KEY = "sk-test-internal-0123456789"


def _boom(*args: Any, **kwargs: Any) -> None:
    raise TypeError(f"object of type 'Secret' has no len() near {KEY}")


def _session(fake: FakeOpenAIServer, db: Path) -> nbchat.Session:
    return nbchat.Session(model="gpt-4o-mini", base_url=fake.url, api_key=KEY, db=str(db))


def _stored(session: nbchat.Session, db: Path) -> tuple[Any, Any]:
    turns = nbchat.turns(session_id=session.id, db=str(db))
    usage = nbchat.usage(session_id=session.id, db=str(db))
    return turns, usage


def test_a_fault_while_reading_the_reply_fails_the_turn_and_its_request(
    fake: FakeOpenAIServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(_client.RoundFolder, "_mark_first_token", _boom)
    db = tmp_path / "s.duckdb"
    session = _session(fake, db)
    fake.enqueue("hello there")
    with caplog.at_level(logging.ERROR, logger="nbchat"):
        result = session.send("hi")
    assert result.status == "error"
    assert result.error is not None and "bug in nbchat" in result.error
    assert "TypeError" in result.error and KEY not in result.error
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback" in logged and "_boom" in logged and KEY not in logged
    turns, usage = _stored(session, db)
    assert turns.status.tolist() == ["error"]
    assert len(usage) == 1 and "bug in nbchat" in usage.error.iloc[0]
    monkeypatch.undo()  # the session carries on once the fault is gone
    fake.enqueue("fine now")
    assert session.send("again").text == "fine now"


def test_a_fault_between_requests_still_ends_the_turn_stored_as_failed(
    fake: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_turn.TurnLoop, "_take_reply", _boom)
    db = tmp_path / "s.duckdb"
    session = _session(fake, db)
    fake.enqueue("hello there")
    seen: list[str] = []
    result = session.send("hi", on_event=lambda e: seen.append(e.kind))
    assert result.status == "error" and result.error is not None
    assert "running the turn" in result.error and KEY not in result.error
    assert seen[-2:] == ["error", "turn_finished"]
    turns, usage = _stored(session, db)
    assert turns.status.tolist() == ["error"]
    assert usage.error.isna().all()  # the request itself went well
