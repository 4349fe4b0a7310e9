"""Child processes for the store-sink tests: ``python sink_child.py MODE ARGS...``.

They drive ``StoreSink`` directly with the events a session emits, so the tests do not
depend on how the session is wired to it. Each mode prints JSON lines on stdout.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any


def turn_events(session_id: str, number: int) -> tuple[list[Any], list[Any], list[Any]]:
    """One tool-using turn, as the session emits it: before tools, the tool, the end."""
    from nbchat._events import (
        MessageAdded,
        TextDelta,
        ToolResult,
        TurnFinished,
        TurnStarted,
        UsageEvent,
    )
    from nbchat._types import Message, RequestUsage, ToolCall, ToolCallRecord, TurnResult

    turn = f"{session_id}-t{number}"
    seq = number * 5
    call = ToolCall(id="call_0", name="work", arguments="{}")  # reused in every turn

    def message(offset: int, role: Any, **kw: Any) -> MessageAdded:
        body = Message(role=role, seq=seq + offset, turn_id=turn, **kw)
        return MessageAdded(session_id=session_id, turn_id=turn, message=body)

    usage = RequestUsage(prompt_tokens=10, completion_tokens=2)
    before = [
        TurnStarted(session_id=session_id, turn_id=turn, text=f"turn {number}"),
        message(0, "user", content=f"turn {number}"),
        TextDelta(session_id=session_id, turn_id=turn, text="let me"),
        UsageEvent(session_id=session_id, turn_id=turn, model="m", usage=usage),
        message(1, "assistant", tool_calls=[call]),
    ]
    record = ToolCallRecord(
        call_id="call_0", name="work", arguments="{}", result="ok", turn_id=turn
    )
    tool = [
        ToolResult(session_id=session_id, turn_id=turn, call=record),
        message(2, "tool", content="ok", tool_call_id="call_0", name="work"),
    ]
    result = TurnResult(session_id=session_id, turn_id=turn, status="completed", text="done")
    after = [
        UsageEvent(session_id=session_id, turn_id=turn, model="m", usage=usage, round=1),
        message(3, "assistant", content="done"),
        TurnFinished(session_id=session_id, turn_id=turn, result=result),
    ]
    return before, tool, after


def turns(path: str, session_id: str, count: str, tool_seconds: str) -> None:
    """Run ``count`` turns through a sink, with the session's barriers; print each one done.

    A line ``{"completed": n}`` is printed only after the barrier at the end of turn n
    returned True: that turn is durable (journaled, or written). The parent SIGKILLs
    this process at random.
    """
    from nbchat._store import Store
    from nbchat._store._sink import StoreSink

    store = Store.open(path)
    if not store.has_session(session_id):
        store.create_session(session_id=session_id, model="m", system_prompt=None)
    sink = StoreSink(store, notify=lambda message: print(json.dumps({"notice": message})))
    first = int(os.environ.get("FIRST_TURN", "0"))
    for number in range(first, first + int(count)):
        before, tool, after = turn_events(session_id, number)
        for event in before:
            sink.handle(event)
        assert sink.barrier(60), "the barrier before tools timed out"
        print(json.dumps({"tools_running": number}), flush=True)
        time.sleep(float(tool_seconds) * random.random())  # the tool runs: a kill may land
        for event in [*tool, *after]:
            sink.handle(event)
        assert sink.barrier(60), "the barrier before send() returns timed out"
        print(json.dumps({"completed": number}), flush=True)
    writes = sorted(sink.write_seconds)
    print(json.dumps({"writes": len(writes), "p50_ms": 1000 * writes[len(writes) // 2],
                      "p99_ms": 1000 * writes[int(len(writes) * 0.99)]}), flush=True)  # fmt: skip


def sink_once_held(path: str, session_id: str, ready: str) -> Any:
    """A sink on a new session of the store at ``path``, once another process holds the
    file: this one lets go, touches ``ready`` and waits for ``ready.held``."""
    from nbchat._store import Store
    from nbchat._store._sink import StoreSink

    store = Store.open(path, lock_timeout=60, linger=0.05)
    store.create_session(session_id=session_id, model="m", system_prompt=None)
    while store.stats()["open"]:  # the lease lets go of the file: the holder takes it
        time.sleep(0.01)
    Path(ready).touch()
    while not Path(ready + ".held").exists():
        time.sleep(0.01)
    return StoreSink(store, notify=lambda message: None)


def finish_locked(path: str, exit_wait: str, ready: str) -> None:
    """Hand a whole turn to a sink while another process holds the file, then exit normally."""
    import nbchat._store._live_sinks as live_sinks

    live_sinks.EXIT_WAIT_S = float(exit_wait)
    sink = sink_once_held(path, "exiting", ready)
    before, tool, after = turn_events("exiting", 0)
    for event in [*before, *tool, *after]:
        sink.handle(event)
    print(json.dumps({"pending": sink.pending}), flush=True)
    # A normal exit: the atexit hook flushes (bounded) or writes the recovery file.


def barrier_locked(path: str, ready: str) -> None:
    """Run three turns through a sink's barriers while another process holds the file,
    print each one done, then wait to be killed."""
    sink = sink_once_held(path, "killed", ready)
    for number in range(3):
        before, tool, after = turn_events("killed", number)
        for event in before:
            sink.handle(event)
        assert sink.barrier(60)
        for event in [*tool, *after]:
            sink.handle(event)
        assert sink.barrier(60)
        print(json.dumps({"completed": number, "pending": sink.pending}), flush=True)
    time.sleep(600)


def hold_until(path: str, stop: str, released: str, most: str, ready: str) -> None:
    """Hold the file (plain DuckDB) until ``stop`` appears or ``most`` seconds pass.

    ``released`` is created just before letting go: while it is absent, the file is held.
    """
    import duckdb

    con = duckdb.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
    Path(ready).touch()
    deadline = time.monotonic() + float(most)
    while not Path(stop).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(released).touch()
    con.close()


MODES = {
    "turns": turns,
    "finish-locked": finish_locked,
    "barrier-locked": barrier_locked,
    "hold-until": hold_until,
}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
