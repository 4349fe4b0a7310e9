"""Child processes for the multi-process store tests: ``python store_child.py MODE ARGS...``.

Each mode prints one JSON line on stdout when it finishes (if it finishes at all).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def hold(path: str, seconds: str, ready: str, stop: str = "") -> None:
    """Hold the file with a plain DuckDB connection (not nbchat), like another tool would,
    for ``seconds`` or until the file ``stop`` appears."""
    import duckdb

    con = duckdb.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
    Path(ready).touch()
    started = time.monotonic()
    deadline = started + float(seconds)
    while time.monotonic() < deadline and not (stop and Path(stop).exists()):
        time.sleep(0.01)
    con.close()
    print(json.dumps({"held": round(time.monotonic() - started, 3)}))


def write_and_die(path: str) -> None:
    """Store a session and a message, then die by SIGKILL before closing anything."""
    from nbchat._events import MessageAdded
    from nbchat._store import Store
    from nbchat._types import Message

    store = Store.open(path)
    store.create_session(session_id="killed", model="m", system_prompt=None)
    message = Message(role="user", content="written just before SIGKILL", seq=0)
    store.handle(MessageAdded(session_id="killed", message=message))
    os.kill(os.getpid(), signal.SIGKILL)


def busy_writer(path: str, seconds: str, session_id: str, ready: str) -> None:
    """Write messages back to back for ``seconds`` through an nbchat Store.

    ``ready`` is created once the first 20 messages are written.
    """
    from nbchat._events import MessageAdded
    from nbchat._store import Store
    from nbchat._types import Message

    store = Store.open(path)
    store.create_session(session_id=session_id, model="m", system_prompt=None)
    stop = time.monotonic() + float(seconds)
    seq = 0
    slowest = 0.0
    while time.monotonic() < stop:
        message = Message(role="user", content=f"message {seq}", seq=seq)
        started = time.perf_counter()
        store.handle(MessageAdded(session_id=session_id, message=message))
        slowest = max(slowest, time.perf_counter() - started)
        seq += 1
        if seq == 20:
            Path(ready).touch()
    stats = store.stats()
    store.close()
    print(json.dumps({"writes": seq, "slowest_s": slowest, **stats}))


def pending_tool(path: str, base_url: str, marker: str) -> None:
    """Start a turn whose tool sleeps; the test kills this process while it sleeps."""
    from nbchat import Session

    def slow(seconds: float) -> str:
        """Sleep, then say so."""
        Path(marker).touch()
        time.sleep(seconds)
        return "slept"

    session = Session(
        model="test-model", base_url=base_url, api_key="sk-test", db=path, tools=[slow]
    )
    print(json.dumps({"session_id": session.id}), flush=True)
    session.send("please run the slow tool")
    print(json.dumps({"finished": True}))  # never reached: the test kills us first


def turns(path: str, count: str, label: str, per_session: str = "20") -> None:
    """Complete ``count`` turns against an in-process fake server; report errors and time.

    A new session starts every ``per_session`` turns: a conversation re-sends its whole
    history each turn, and the store, not that growing cost, is what is under test.
    """
    from nbchat import Session
    from nbchat.testing import FakeOpenAIServer, echo_reply

    errors: list[str] = []
    sessions: list[str] = []
    stats: dict[str, Any] = {}
    started = time.perf_counter()
    with FakeOpenAIServer(fallback=echo_reply) as server:
        session = None
        for number in range(int(count)):
            if number % int(per_session) == 0:
                if session is not None and session.store is not None:
                    stats = session.store.stats()
                session = Session(
                    model="gpt-4o-mini",
                    base_url=server.url,
                    api_key="sk-test",
                    db=path,
                    title=f"{label} {len(sessions)}",
                    max_retries=0,
                )
                sessions.append(session.id)
            assert session is not None
            try:
                result = session.send(f"{label} turn {number}")
                if result.status != "completed" or result.text != f"Echo: {label} turn {number}":
                    errors.append(f"turn {number}: {result.status} {result.error}")
            except Exception as exc:
                errors.append(f"turn {number}: {type(exc).__name__}: {exc}")
        if session is not None and session.store is not None:
            stats = session.store.stats()  # all sessions of a process share one lease
            session.store.close()
    report: dict[str, Any] = {
        "sessions": sessions,
        "errors": errors[:20],
        "error_count": len(errors),
        "elapsed_s": time.perf_counter() - started,
        **stats,
    }
    print(json.dumps(report))


def reader(path: str, stop_file: str) -> None:
    """Query the store in a loop (as another kernel would) until ``stop_file`` appears."""
    from nbchat import _analysis

    queries = 0
    errors: list[str] = []
    seen_requests = 0
    while not os.path.exists(stop_file):
        try:
            frame = _analysis.sql("SELECT count(*) AS n FROM requests", db=path)
            seen_requests = max(seen_requests, int(frame["n"][0]))
            _analysis.usage(path)
            queries += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        time.sleep(0.01)
    print(json.dumps({"queries": queries, "errors": errors[:20], "error_count": len(errors),
                      "seen_requests": seen_requests}))  # fmt: skip


MODES = {
    "hold": hold,
    "write-and-die": write_and_die,
    "busy-writer": busy_writer,
    "pending-tool": pending_tool,
    "turns": turns,
    "reader": reader,
}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
