"""The session and the store together: a locked store file never costs the user a turn."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from file_holder import FileHolder

import nbchat
from nbchat import Session
from nbchat._store import Store
from nbchat.testing import FakeOpenAIServer

CHILD = Path(__file__).parent / "helpers" / "store_child.py"


@contextlib.contextmanager
def _file_held(db_path: Path, tmp_path: Path) -> Iterator[None]:
    """Another process holds the store file while the block runs, and lets go after it."""
    holder = FileHolder(db_path, tmp_path / "held")
    try:
        yield
        # It returned with the file still held: what was sent is in the journal.
        assert holder.holding()
        holder.let_go()
    finally:
        holder.kill()


def _let_go(s: Session) -> None:
    """Wait until ``s`` has written what it was handed and its store has let the file go
    (0.5 s after its last write, then a checkpoint: longer on a loaded machine)."""
    assert s._sink is not None and s._sink.flush(30)
    deadline = time.monotonic() + 30
    while s.store is not None and s.store.stats().get("open"):
        assert time.monotonic() < deadline, "the store never let the file go"
        time.sleep(0.01)


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
    _let_go(s)

    events: list[Any] = []
    with _file_held(db_path, tmp_path):
        r = s.send("two", on_event=events.append)
        assert r.status == "completed" and r.text == "second answer"
        deadline = time.monotonic() + 30  # held until the writer gives the outage notice
        while not (s._sink is not None and s._sink.unavailable):
            assert time.monotonic() < deadline, "the writer never called the store unavailable"
            time.sleep(0.01)

    # The file is free again: the backlog is written first, in order.
    s.send("three", on_event=events.append)
    notices = [e.message for e in events if e.kind == "notice"]
    assert len([n for n in notices if "Not saved yet" in n]) == 1, notices
    # (a read waits for this process's writes only up to the 0.3 s lock timeout set here)
    assert s._sink is not None and s._sink.flush_quietly(30)
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


@pytest.mark.slow
def test_a_script_that_watches_no_events_is_told_of_an_outage_in_the_log(
    fake: FakeOpenAIServer,
    db_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``send()`` with no ``on_event`` (a script): the store's notices go to the
    ``nbchat`` logger (a warning, on stderr by default), not to an event no one sees."""
    import logging

    monkeypatch.setenv("NBCHAT_DB_LOCK_TIMEOUT", "0.3")
    fake.enqueue("first answer")
    fake.enqueue("second answer")
    s = Session(model="m", base_url=fake.url, api_key="k", db=db_path, max_retries=0)
    s.send("one")
    _let_go(s)
    with _file_held(db_path, tmp_path), caplog.at_level(logging.WARNING, logger="nbchat"):
        assert s.send("two").status == "completed"
        deadline = time.monotonic() + 10
        while not any("Not saved yet" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no warning of the outage"
            time.sleep(0.05)
    told = [r for r in caplog.records if "Not saved yet" in r.getMessage()]
    assert len(told) == 1 and told[0].levelno == logging.WARNING and told[0].name == "nbchat"


# --------------------------------------------------------------------------- with StoreSink
# The session writes through nbchat._store._sink.StoreSink: streaming never waits on the file.


SINK_CHILD = Path(__file__).parent / "helpers" / "sink_child.py"


@pytest.mark.slow
def test_a_reply_streams_whole_while_another_process_holds_the_file(
    fake: FakeOpenAIServer, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NBCHAT_DB_LOCK_TIMEOUT", "60")
    s = Session(model="m", base_url=fake.url, api_key="k", db=db_path, max_retries=0)
    fake.enqueue("ok")
    s.send("warm up")
    _let_go(s)
    fake.enqueue("a long answer, streamed in many small pieces " * 20, chunk_size=3)
    ready, stop, released = (tmp_path / name for name in ("held", "stop", "released"))
    holder = subprocess.Popen(
        [sys.executable, str(SINK_CHILD), "hold-until", str(db_path), str(stop), str(released),
         "10", str(ready)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert holder.poll() is None, "the holder process died"
        assert time.monotonic() < deadline, "the holder never took the file"
        time.sleep(0.02)
    held_at_finish: list[bool] = []

    def watch(event: Any) -> None:
        if event.kind == "turn_finished":  # the whole reply went through...
            held_at_finish.append(not released.exists())  # ...with the file held all along
            stop.touch()

    try:
        r = s.send("tell me", on_event=watch)
        assert r.status == "completed"
        assert held_at_finish == [True]
        # send() returned: the barrier waited for the file and wrote the turn.
        rows = nbchat.transcript(s.id, db=db_path)
        assert list(rows["content"])[-1] == r.text
    finally:
        stop.touch()
        holder.communicate(timeout=30)


@pytest.mark.slow
def test_reopening_a_killed_session_closes_its_running_turn(
    fake: FakeOpenAIServer, store_db: str, tmp_path: Path
) -> None:
    fake.enqueue(tool_calls=[{"name": "slow", "arguments": {"seconds": 60}}])
    marker = tmp_path / "tool-started"
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "pending-tool", str(store_db), fake.url, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    session_id = json.loads(proc.stdout.readline())["session_id"]
    while not marker.exists():
        assert proc.poll() is None
        time.sleep(0.02)
    # The assistant message asking for the tool was durable before the tool ran.
    proc.kill()
    proc.communicate(timeout=30)
    with Store.open(store_db) as store:
        assert store.load_session(session_id).pending_tool_calls()
        assert store._fetchall("SELECT status FROM turns") == [("running",)]
    again = Session(session_id=session_id, db=store_db, base_url=fake.url, api_key="k")
    again.abort_pending()
    assert again.store is not None
    (status,) = again.store._fetchall("SELECT status FROM turns")
    assert status[0] not in (None, "running")
    again.store.close()


def test_every_session_knows_the_notebook_it_runs_in(
    fake: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only %%chat's: a panel's or extract()'s session too (a trial found their spend
    under "(no notebook)"). The frontend names the notebook; an explicit one wins."""
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/ada/t1.ipynb")
    db = tmp_path / "nb.duckdb"
    fake.enqueue("ok")
    plain = nbchat.Session(model="m", base_url=fake.url, api_key="k", db=db)
    named = nbchat.Session(model="m", base_url=fake.url, api_key="k", db=db, notebook="x.ipynb")
    frame = nbchat.sessions(db=db).set_index("id")
    assert frame.loc[plain.id, "notebook"] == "/home/ada/t1.ipynb"
    assert frame.loc[named.id, "notebook"] == "x.ipynb"


def test_a_reopened_session_says_when_it_continues_on_another_endpoint(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    """It goes to this kernel's endpoint (a stored URL never gets this kernel's key on
    its own), but says so: a trial's reopened panel sent to the local model silently."""
    db = tmp_path / "moved.duckdb"
    url = fake.url.replace("/v1", "/v1?api-key=secret")  # a credential in the query: not kept
    first = nbchat.Session(model="m", base_url=url, api_key="k", db=db)
    assert first.metadata["endpoint"] == fake.url
    with pytest.warns(
        UserWarning, match=r"ran on http://127\.0\.0\.1:\d+/v1; it continues on"
    ) as told:
        nbchat.Session(session_id=first.id, base_url=None, api_key="k", db=db)
    # At the user's line (this one), not inside nbchat (it said _session.py, then _magics.py).
    assert [w.filename for w in told] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbchat.Session(session_id=first.id, base_url=fake.url, api_key="k", db=db)
    assert "secret" not in json.dumps(nbchat.sessions(db=db)["metadata"].tolist())


def test_a_warning_given_inside_a_with_block_points_at_the_users_line() -> None:
    """nbchat code that warns from a context manager's body had its warning point at
    contextlib's ``next(self.gen)`` (a trial's spool-replay warning): the standard
    library's frames between nbchat's are passed over too."""
    import os
    import warnings

    from nbchat import _warn

    source = (
        "import contextlib\n"
        "from nbchat._warn import warn_user\n"
        "@contextlib.contextmanager\n"
        "def opened():\n"
        "    warn_user('told')\n"
        "    yield\n"
        "def open_it():\n"
        "    with opened():\n"
        "        pass\n"
    )
    inside = os.path.join(os.path.dirname(_warn.__file__), "_as_if_nbchat.py")
    space: dict[str, object] = {}
    exec(compile(source, inside, "exec"), space)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        space["open_it"]()  # type: ignore[operator]
    assert [w.filename for w in told] == [__file__]


def test_a_session_switched_to_another_model_is_stored_with_it(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    # A trial's `%chat sessions` named the model a session started with, not the one
    # it had moved to; reopened, it went back to the first one too.
    db = tmp_path / "switch.duckdb"
    s = Session(model="first-model", base_url=fake.url, api_key="sk-test", db=str(db))
    fake.enqueue("one")
    s.send("hi")
    s.set_model("second-model")
    fake.enqueue("two")
    s.send("again")
    assert nbchat.sessions(db=str(db)).set_index("id").loc[s.id, "model"] == "second-model"
    reopened = Session(session_id=s.id, base_url=fake.url, api_key="sk-test", db=str(db))
    assert reopened.model == "second-model"
    assert list(nbchat.usage(db=str(db))["model"]) == ["first-model", "second-model"]
    # Reopened with a model of its own (%chat config base_url=... moves it so): the same.
    Session(session_id=s.id, model="third-model", base_url=fake.url, api_key="k", db=str(db))
    assert nbchat.sessions(db=str(db)).set_index("id").loc[s.id, "model"] == "third-model"
