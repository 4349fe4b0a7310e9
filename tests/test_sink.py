"""The store sink: a writer thread, so a held store file never holds up the chat.

Driven directly with the events a session emits and a real store file; a real child
process holds the file with a plain DuckDB connection, as another program would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from file_holder import FileHolder, spawn_until_ready

from nbchat._events import MessageAdded, Notice, TextDelta, ToolCallDelta, UsageEvent
from nbchat._store import Store
from nbchat._store._rows import _WRITERS, STORED_KINDS
from nbchat._store._sink import StoreSink
from nbchat._types import Message, RequestUsage

HELPERS = Path(__file__).parent / "helpers"


def message(seq: int, session_id: str = "s", content: str | None = None) -> MessageAdded:
    body = Message(role="user", content=content or f"message {seq}", seq=seq)
    return MessageAdded(session_id=session_id, message=body)


def contents(db: Path | Store, session_id: str = "s") -> list[str | None]:
    if isinstance(db, Store):
        return [m.content for m in db.load_session(session_id).messages]
    with Store.open(db) as store:
        return [m.content for m in store.load_session(session_id).messages]


class Notes:
    """A notify callback that remembers what it was told (from the writer thread)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self.changed = threading.Event()

    def __call__(self, text: str) -> None:
        with self._lock:
            self.messages.append(text)
        self.changed.set()

    def wait_for(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [m for m in self.messages if needle in m]
            if found:
                return found[0]
            self.changed.wait(0.05)
            self.changed.clear()
        raise AssertionError(f"never told {needle!r}; told {self.messages}")


@pytest.fixture
def holder(db_path: Path, tmp_path: Path) -> Iterator[Any]:
    """Start a child that holds the store file until the test lets it go."""
    holders: list[FileHolder] = []

    def start(ready: Path | None = None) -> FileHolder:
        held = FileHolder(db_path, ready or tmp_path / f"held-{len(holders)}")
        holders.append(held)
        return held

    yield start
    for held in holders:
        held.kill()


@pytest.fixture
def free_store(db_path: Path) -> Iterator[Store]:
    """A store file whose lease lets go of the file quickly (so a holder can take it)."""
    store = Store.open(db_path, linger=0.05)
    store.create_session(session_id="s", model="m", system_prompt=None)
    yield store
    store.close()


def wait_released(store: Store) -> None:
    while store.stats()["open"]:
        time.sleep(0.01)


# --------------------------------------------------------------------------- basics


def test_the_stored_kinds_are_the_store_writers() -> None:
    assert set(STORED_KINDS) == set(_WRITERS)
    assert {"message", "usage", "tool_result", "turn_started", "turn_finished"} <= STORED_KINDS
    assert not {"text_delta", "tool_call_delta", "notice", "reasoning_delta"} & STORED_KINDS


def test_stream_deltas_are_not_queued() -> None:
    with Store.open(":memory:") as store:
        sink = StoreSink(store, notify=Notes())
        for event in (
            TextDelta(session_id="s", text="hi"),
            ToolCallDelta(session_id="s", index=0, call_id="c", arguments_delta="{"),
            Notice(session_id="s", message="note"),
        ):
            sink.handle(event)
        assert sink.pending == 0
        assert sink._thread is None  # not even a writer thread was needed
        assert sink.close() == []


def test_events_are_written_in_order_by_the_writer(free_store: Store) -> None:
    notes = Notes()
    sink = StoreSink(free_store, notify=notes)
    for seq in range(50):
        sink.handle(message(seq))
    assert sink.flush(30) is True
    assert sink.pending == 0
    assert contents(free_store) == [f"message {seq}" for seq in range(50)]
    assert notes.messages == []
    assert sink.close() == []


def test_a_closed_store_handle_does_not_stop_the_writer(db_path: Path) -> None:
    store = Store.open(db_path)
    store.create_session(session_id="s", model="m", system_prompt=None)
    sink = StoreSink(store, notify=Notes())
    sink.handle(message(0))
    assert sink.flush(30)
    store.close()  # the caller is done with its handle; the sink still has work
    sink.handle(message(1))
    assert sink.flush(30)
    assert sink.close() == []
    assert contents(db_path) == ["message 0", "message 1"]


# --------------------------------------------------------------------------- a held file


def test_handle_does_not_wait_for_a_file_another_process_holds(
    free_store: Store, holder: Any, db_path: Path
) -> None:
    notes = Notes()
    sink = StoreSink(free_store, notify=notes, patience=0.5)
    sink.handle(message(0))
    assert sink.flush(30)
    wait_released(free_store)
    proc = holder()
    for seq in range(1, 201):  # a whole reply's worth of stored events
        sink.handle(message(seq))
    # Every handle() returned while the other process still holds the file.
    assert proc.holding()
    assert sink.pending == 200

    told = notes.wait_for("Not saved yet")
    assert f"another process (PID {proc.pid}) has held the store {db_path} for 0.5 s" in told
    assert "kept in this process's journal and written once the store is free" in told
    assert sink.unavailable
    assert sink.flush(30) is False  # a barrier does not wait once the user was told
    assert proc.holding()

    proc.let_go()
    notes.wait_for("Saved now")
    assert sink.flush(30) is True
    assert [m for m in notes.messages if "Not saved yet" in m] == [told]  # told once
    assert sink.close() == []
    assert contents(db_path) == [f"message {seq}" for seq in range(201)]


def test_a_barrier_waits_out_a_short_hold(free_store: Store, holder: Any, db_path: Path) -> None:
    notes = Notes()
    sink = StoreSink(free_store, notify=notes, patience=60)
    wait_released(free_store)
    proc = holder()
    sink.handle(message(0))
    assert proc.holding() and sink.pending == 1
    proc.let_go_in(1.0)
    assert sink.flush(60) is True  # within patience: the barrier waits, nobody is told
    assert notes.messages == []
    proc.let_go()
    assert sink.close() == []
    assert contents(db_path) == ["message 0"]


# --------------------------------------------------------------------------- bad rows


def test_an_unstorable_row_is_skipped_and_reported(free_store: Store) -> None:
    notes = Notes()
    sink = StoreSink(free_store, notify=notes)
    huge = UsageEvent(
        session_id="s", model="m", usage=RequestUsage(prompt_tokens=2**64, completion_tokens=1)
    )
    sane = UsageEvent(session_id="s", model="m", usage=RequestUsage(prompt_tokens=5))
    for event in (message(0), huge, message(1), sane):
        sink.handle(event)
    assert sink.flush(30) is True
    assert contents(free_store) == ["message 0", "message 1"]
    (told,) = notes.messages
    assert "requests row was skipped" in told and "INT128" in told
    requests = free_store.query("SELECT id, prompt_tokens FROM requests").data
    assert list(requests["id"]) == [sane.request_id]
    assert list(requests["prompt_tokens"]) == [5]
    assert sink.close() == []


# --------------------------------------------------------------------------- exit


def finish_locked(
    db_path: Path, tmp_path: Path, holder: Any, hold: float | None, wait: float
) -> Any:
    """A child hands a whole turn to its sink while the file is held, then exits (waiting
    ``wait`` s for the file); the holder lets go after ``hold`` s, or when the test says."""
    ready = tmp_path / "child-let-go"
    child = spawn_until_ready(
        HELPERS / "sink_child.py", ["finish-locked", str(db_path), str(wait), str(ready)], ready
    )
    proc = holder(ready=Path(str(ready) + ".held"))
    if hold is not None:
        proc.let_go_in(hold)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert json.loads(out.splitlines()[0]) == {"pending": 9}
    return proc, err


def test_events_queued_at_exit_are_written_once_the_file_frees(
    db_path: Path, tmp_path: Path, holder: Any
) -> None:
    proc, err = finish_locked(db_path, tmp_path, holder, hold=1.0, wait=20)
    assert err == ""  # the exit hook waited for the file and wrote everything
    proc.let_go()
    assert list(tmp_path.glob("*recovery*")) == []
    assert contents(db_path, "exiting") == ["turn 0", None, "ok", "done"]


def test_events_still_locked_at_exit_stay_in_the_journal(
    db_path: Path, tmp_path: Path, holder: Any
) -> None:
    proc, err = finish_locked(db_path, tmp_path, holder, hold=None, wait=0.5)
    (journal,) = (tmp_path / "chats.duckdb.nbchat-journal").glob("*.jsonl")
    assert err.count("\n") == 1 and "still locked at exit" in err
    assert f"9 events were kept in {journal}" in err
    assert list(tmp_path.glob("*recovery*")) == []  # the journal keeps them: no second copy
    proc.let_go()

    with Store.open(db_path) as store:  # replayed quietly: the user was told at exit
        assert store.recovered is not None
        assert "stored 9 events" in store.recovered and journal.name in store.recovered
        check_exiting_turn(store)
    assert not journal.exists()
    with Store.open(db_path) as store:  # replayed once: no warning, no second copy
        assert len(store.load_session("exiting").messages) == 4


def check_exiting_turn(store: Store) -> None:
    """The turn ``finish-locked`` handed over is stored whole, once."""
    assert contents(store, "exiting") == ["turn 0", None, "ok", "done"]
    turns = store.query("SELECT status, user_text FROM turns").data
    assert list(turns["status"]) == ["completed"] and list(turns["user_text"]) == ["turn 0"]
    assert len(store.query("SELECT id FROM requests").data["id"]) == 2
    assert len(store.query("SELECT id FROM tool_calls").data["id"]) == 1


def test_without_a_journal_events_locked_at_exit_go_to_a_recovery_file(
    db_path: Path, tmp_path: Path, holder: Any
) -> None:
    # A file where the journal's folder would be: the journal cannot be made.
    (tmp_path / "chats.duckdb.nbchat-journal").write_text("in the way")
    proc, err = finish_locked(db_path, tmp_path, holder, hold=None, wait=0.5)
    (recovery,) = tmp_path.glob("*.nbchat-recovery-*.jsonl")
    assert err.count("\n") == 1 and "still locked at exit" in err
    assert f"9 events were kept in {recovery}" in err
    proc.let_go()

    with pytest.warns(UserWarning, match=r"stored 9 events .* kept in chats\.duckdb\.nbchat-"):
        store = Store.open(db_path)
    with store:
        assert store.recovered is not None and "stored 9 events" in store.recovered
        check_exiting_turn(store)
    assert not recovery.exists()
    with Store.open(db_path) as store:  # imported once: no warning, no second copy
        assert len(store.load_session("exiting").messages) == 4


def test_importing_a_recovery_file_twice_duplicates_nothing(db_path: Path) -> None:
    store = Store.open(db_path)
    store.create_session(session_id="s", model="m", system_prompt=None)
    saved = Path(store.save_recovery([message(0), message(1)]))
    store.close()
    # The same events in two files, as if a process was killed after importing one.
    twin = saved.with_name(f"{db_path.name}.nbchat-recovery-999999.jsonl")
    twin.write_bytes(saved.read_bytes())
    with pytest.warns(UserWarning, match="stored 4 events") as told:
        store = Store.open(db_path)
    assert [w.filename for w in told] == [__file__]  # not _store/__init__.py's open
    with store:
        assert contents(store) == ["message 0", "message 1"]
    assert list(db_path.parent.glob("*recovery*")) == []


def test_readers_on_the_main_thread_share_the_connection_with_the_writer(
    free_store: Store,
) -> None:
    sink = StoreSink(free_store, notify=Notes())
    seen: list[int] = []
    for seq in range(300):
        sink.handle(message(seq))
        if seq % 10 == 0:  # analysis reads while the writer writes
            count = free_store.query("SELECT count(*) AS n FROM messages").data["n"][0]
            user = free_store.query_read_only("SELECT count(*) AS n FROM messages")
            seen.append(int(count))
            assert int(user.data["n"][0]) >= count
    assert sink.flush(30)
    assert seen == sorted(seen)
    assert contents(free_store) == [f"message {seq}" for seq in range(300)]
    assert sink.close() == []


def test_an_idle_writer_thread_ends_and_comes_back(
    free_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbchat._store import _sink

    monkeypatch.setattr(_sink, "_IDLE_EXIT", 0.05)
    sink = StoreSink(free_store, notify=Notes())
    sink.handle(message(0))
    assert sink.flush(30)
    first = sink._thread
    assert first is not None
    first.join(10)  # idle: it ends by itself
    assert not first.is_alive() and sink._thread is None
    sink.handle(message(1))
    assert sink.flush(30)
    assert contents(free_store) == ["message 0", "message 1"]
    assert sink.close() == []


def test_an_unexpected_error_skips_the_event_instead_of_freezing(
    free_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(event: Any) -> None:
        raise RuntimeError("a bug in a writer")

    monkeypatch.setitem(_WRITERS, "usage", ("requests", broken))
    notes = Notes()
    sink = StoreSink(free_store, notify=notes)
    for event in (message(0), UsageEvent(session_id="s", model="m"), message(1)):
        sink.handle(event)
    assert sink.flush(30) is True
    assert notes.messages == [
        "Not saved: one event (usage) was skipped because writing it failed "
        "(RuntimeError: a bug in a writer)."
    ]
    assert contents(free_store) == ["message 0", "message 1"]
    assert sink.close() == []


# --------------------------------------------------------------------------- the journal


def test_a_barrier_does_not_wait_for_a_held_file_and_a_sigkill_loses_nothing_past_it(
    db_path: Path, tmp_path: Path, holder: Any
) -> None:
    ready = tmp_path / "child-let-go"
    child = subprocess.Popen(
        [sys.executable, str(HELPERS / "sink_child.py"), "barrier-locked", str(db_path),
         str(ready)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        hold = holder(ready=Path(str(ready) + ".held"))
        assert child.stdout is not None
        done = [json.loads(child.stdout.readline()) for _ in range(3)]
        # Every barrier returned while the other process held the file all along.
        assert hold.holding()
        assert [d["completed"] for d in done] == [0, 1, 2]
        assert done[-1]["pending"] > 0  # not in the store file yet: in the journal only
        child.kill()  # SIGKILL: no exit hook runs
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    hold.let_go()

    journals = tmp_path / "chats.duckdb.nbchat-journal"
    (left,) = journals.glob("*.jsonl")
    with Store.open(db_path) as store:  # replays the dead process's journal
        assert store.recovered is not None and left.name in store.recovered
        assert contents(store, "killed") == [
            text for n in range(3) for text in (f"turn {n}", None, "ok", "done")
        ]
        turns = store.query("SELECT status FROM turns ORDER BY started_at").data
        assert list(turns["status"]) == ["completed"] * 3
        assert len(store.query("SELECT id FROM requests").data["id"]) == 6
    assert list(journals.glob("*.jsonl")) == []
    with Store.open(db_path) as store:  # replayed once
        assert store.recovered is None
        assert len(store.load_session("killed").messages) == 12


def test_a_read_in_the_same_process_waits_for_its_own_unwritten_events(
    free_store: Store, holder: Any, db_path: Path
) -> None:
    sink = StoreSink(free_store, notify=Notes())
    wait_released(free_store)
    proc = holder()
    for seq in range(5):
        sink.handle(message(seq))
    assert sink.barrier(30) and proc.holding()  # durable, with the file still held
    assert sink.pending == 5
    proc.let_go_in(0.5)
    # A read of the same store in this process sees them: it waits for the writer.
    with Store.open(db_path) as other_handle:
        assert contents(other_handle) == [f"message {seq}" for seq in range(5)]
    assert sink.pending == 0
    assert sink.close() == []


def test_the_journal_is_emptied_once_written_and_deleted_at_close(free_store: Store) -> None:
    sink = StoreSink(free_store, notify=Notes())
    for seq in range(3):
        sink.handle(message(seq))
    assert sink.barrier(30) and sink.flush(30)
    (journal,) = Path(free_store.path + ".nbchat-journal").glob("*.jsonl")
    deadline = time.monotonic() + 10
    while journal.stat().st_size and time.monotonic() < deadline:
        time.sleep(0.01)  # the writer empties it after its last write
    assert journal.stat().st_size == 0
    assert sink.close() == [] and sink.kept_in is None
    assert not journal.exists()


def test_after_a_barrier_the_journal_holds_every_event_handed_in_order(
    free_store: Store, holder: Any
) -> None:
    # The writer journals what it finds queued when it wakes, the barrier the rest:
    # between them every event is there once, in the order it was handed.
    from nbchat._store._journal import _event

    sink = StoreSink(free_store, notify=Notes(), patience=60)
    sink.handle(message(0))
    assert sink.flush(30)
    wait_released(free_store)
    proc = holder()
    for seq in range(1, 101):
        sink.handle(message(seq))
        if seq % 10 == 0:
            time.sleep(0.002)  # let the writer take some of them
    assert sink.barrier(30)
    assert proc.holding()  # it did not wait for the file
    (journal,) = Path(free_store.path + ".nbchat-journal").glob("*.jsonl")
    lines = journal.read_bytes().splitlines()
    assert [_event(line).message.content for line in lines] == [  # type: ignore[union-attr]
        f"message {seq}" for seq in range(1, 101)
    ]
    proc.let_go()
    assert sink.close() == []


def test_a_live_process_journal_is_not_replayed_by_another_opener(
    free_store: Store, holder: Any, db_path: Path
) -> None:
    from nbchat._store._journal import Journal, replay_orphans

    folder = free_store.journal_folder()
    assert folder is not None
    mine = Journal(folder)
    mine.append(message(7))  # held by this open file, as a live kernel holds its own
    with Store.open(db_path) as store:
        assert replay_orphans(store) == (0, 0, [])
        assert contents(store) == []
    assert mine.path is not None and mine.path.exists()
    mine.close()  # let go with a line in it: now it belongs to nobody
    with Store.open(db_path) as store:
        assert store.recovered is not None and "stored 1 events" in store.recovered
        assert contents(store) == ["message 7"]


def test_an_opener_waits_for_a_replay_another_thread_has_under_way(
    free_store: Store, db_path: Path
) -> None:
    """A kernel's warm-up and its first cell both open the store after a restart: the
    cell must read the session the warm-up is replaying, not skip a file it sees locked."""
    from nbchat._store._journal import Journal, replay_orphans

    folder = free_store.journal_folder()
    assert folder is not None
    left = Journal(folder)
    for seq in range(3):
        left.append(message(seq))
    left.close()  # a restarted kernel's journal: nobody's now
    started, go_on = threading.Event(), threading.Event()

    class Slow:
        """The warm-up's store, held at its first write until the second opener has run."""

        def journal_folder(self) -> Path | None:
            return folder

        def write(self, event: Any) -> None:
            started.set()
            assert go_on.wait(30)
            free_store.write(event)

    warm = threading.Thread(target=replay_orphans, args=(Slow(),))
    warm.start()
    assert started.wait(30)
    seen: list[list[str | None]] = []
    cell = threading.Thread(target=lambda: seen.append(contents(db_path)))
    cell.start()
    cell.join(0.5)  # with the file skipped, it has read the store by now
    go_on.set()
    warm.join(30)
    cell.join(30)
    assert seen == [["message 0", "message 1", "message 2"]]


def test_without_a_journal_a_barrier_waits_for_the_store_and_says_why(
    db_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "chats.duckdb.nbchat-journal").write_text("in the way")
    notes = Notes()
    with Store.open(db_path) as store:
        store.create_session(session_id="s", model="m", system_prompt=None)
        sink = StoreSink(store, notify=notes)
        sink.handle(message(0))
        assert sink.barrier(30)  # waited for the store itself
        assert sink.pending == 0
        told = notes.wait_for("journal")
        assert "cannot be written" in told and "waits for the store file itself" in told
        assert contents(store) == ["message 0"]
        assert sink.close() == []


def test_rows_keep_the_time_their_event_happened_not_when_they_were_written(
    free_store: Store, holder: Any
) -> None:
    sink = StoreSink(free_store, notify=Notes())
    wait_released(free_store)
    proc = holder()
    event = UsageEvent(session_id="s", model="m", usage=RequestUsage(prompt_tokens=1))
    sink.handle(event)
    assert sink.barrier(30) and proc.holding()
    proc.let_go_in(1.0)
    assert sink.flush(30)  # written once the holder let go, a second or so later
    (stamp,) = free_store.query("SELECT epoch_us(created_at) FROM requests").data[
        "epoch_us(created_at)"
    ]
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert int(stamp) == (event.at - epoch) // dt.timedelta(microseconds=1)
    assert sink.close() == []


def test_a_forked_child_journals_in_a_file_of_its_own(free_store: Store) -> None:
    sink = StoreSink(free_store, notify=Notes())
    sink.handle(message(0))
    assert sink.barrier(30) and sink._journal is not None
    parent_journal = sink._journal.path
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a kernel forked by multiprocessing, say
        try:
            sink.handle(message(1))
            ok = sink.journal()
            mine = None if sink._journal is None else str(sink._journal.path)
            os.write(write_end, json.dumps({"ok": ok, "path": mine}).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    child = json.loads(os.read(read_end, 65536))
    os.close(read_end)
    os.close(write_end)
    assert child["ok"] and child["path"] not in (None, str(parent_journal))
    assert sink.flush(30) and sink.close() == []


def test_a_journal_line_is_the_event_union_encoding_for_every_stored_kind() -> None:
    # _journal encodes with each event's own serializer (faster than the union's); the
    # bytes must be the union's, and read back as the same event.
    import nbchat
    from nbchat._events import CompactionEvent, EventAdapter, MessagesMarked
    from nbchat._store._journal import _event, _line
    from nbchat.testing import FakeOpenAIServer, Reply, ToolCallSpec

    handed: list[Any] = []

    @nbchat.tool
    def noop() -> str:
        """Do nothing."""
        return "ok"

    with FakeOpenAIServer() as server:
        server.enqueue(Reply(tool_calls=[ToolCallSpec(name="noop", arguments={})]))
        server.enqueue("done")
        session = nbchat.Session(
            model="m", base_url=server.url, api_key="k", db=":memory:", tools=[noop]
        )
        session.send("go", on_event=lambda event: handed.append(event))
    handed += [
        MessagesMarked(session_id="s", message_ids=["a", "b"], state="compacted"),
        CompactionEvent(session_id="s", strategy="summary", from_seq=0, to_seq=3, cost_usd=0.1),
    ]
    stored = [event for event in handed if event.kind in STORED_KINDS]
    assert {event.kind for event in stored} == STORED_KINDS
    for event in stored:
        assert _line(event) == EventAdapter.dump_json(event) + b"\n"
        assert _event(_line(event)) == event


def test_the_journal_write_that_keeps_the_gil_writes_every_byte_and_raises_os_errors(
    tmp_path: Path,
) -> None:
    from nbchat._store._spool import _write

    path = tmp_path / "lines"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        assert _write(fd, b"one\n") == 4
        assert _write(fd, "two é\n".encode()) == 7
    finally:
        os.close(fd)
    assert path.read_bytes() == "one\ntwo é\n".encode()
    with pytest.raises(OSError):
        _write(fd, b"closed\n")
