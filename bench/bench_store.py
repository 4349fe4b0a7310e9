"""The store: write cost while chatting, and analysis queries on a large store.

- write: median cost of ``Store.handle(MessageAdded)`` on a file store (goal ≤ 1 ms),
  against DuckDB's own one-row INSERT into an in-memory table (the floor under it).
- sandbox: a write followed by a user ``sql()`` query, which runs in a second,
  sandboxed instance (the file moves to it), against the same query on nbchat's own.
- held file: a reply of 5,000 deltas and its stored events goes through a
  ``StoreSink`` while another process holds the file for 4 s; the loop's time against
  the same reply with the file free (goal: no stall), and against writing each event
  synchronously as the loop did before the sink (what it stalled). Also p50/p99 of
  ``handle()`` on the loop and of one write on the writer thread.
- queries: on a synthetic store of 1,000,000 messages and 500,000 requests (10,000
  sessions, 5 models, 90 days), the median time of ``costs(by="model")`` (≤ 30 ms),
  ``transcript(id)`` (≤ 10 ms) and ``sessions()`` (≤ 50 ms), each through the public
  function (store open, query, DataFrame), against ``SELECT count(*)`` of the same table
  on a plain DuckDB connection.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._common import figure, median_ms

CONTENT = "A reply of a few hundred characters, like most chat messages are. " * 5
SESSIONS, MESSAGES_PER, REQUESTS_PER, TOOLS_PER = 10_000, 100, 50, 10


def write_cost(n: int = 500) -> list[dict[str, Any]]:
    import duckdb

    from nbchat._events import MessageAdded
    from nbchat._store import Store
    from nbchat._store._migrations import migrate
    from nbchat._types import Message

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "w.duckdb")
        store.create_session(session_id="s", model="m", system_prompt=None)
        counter = iter(range(10**9))

        def write() -> None:
            seq = next(counter)
            store.handle(
                MessageAdded(session_id="s", message=Message(role="user", content=CONTENT, seq=seq))
            )

        floor = duckdb.connect(":memory:")
        migrate(floor)
        now = datetime.now(UTC)

        def floor_insert() -> None:
            i = next(counter)
            floor.execute(
                "INSERT INTO messages (id, session_id, seq, role, content, status, state,"
                " created_at) VALUES (?, 's', ?, 'user', ?, 'ok', 'active', ?)",
                [f"f{i}", i, CONTENT, now],
            )

        write()
        ours = median_ms(write, n)
        base = median_ms(floor_insert, n)
        count = "SELECT count(*) FROM messages"
        sandboxed = median_ms(lambda: (write(), store.query_read_only(count)), 50)
        trusted = median_ms(lambda: (write(), store.query(count)), 50)
        store.close()
    return [
        figure(
            "store write per message (median)",
            ours,
            "ms",
            baseline=base,
            goal="<= 1 ms",
            ok=ours <= 1,
            note="baseline: DuckDB's own one-row INSERT into an in-memory table",
        ),
        figure(
            "a write, then a sandboxed sql() query",
            sandboxed,
            "ms",
            baseline=trusted,
            note="the file moves to the read-only sandboxed instance and back (a checkpoint); "
            "baseline: the same query on nbchat's own connection",
        ),
    ]


_HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holding the store file, as a plain DuckDB connection does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _reply(session_id: str, deltas: int) -> list[Any]:
    """The events of a two-round reply: the stored ones among many stream deltas."""
    from nbchat._events import MessageAdded, TextDelta, TurnFinished, TurnStarted, UsageEvent
    from nbchat._types import Message, RequestUsage, TurnResult

    def stored_round(seq: int) -> list[Any]:
        usage = UsageEvent(session_id=session_id, model="m", usage=RequestUsage(prompt_tokens=9))
        text = Message(role="assistant", content=CONTENT, seq=seq)
        return [usage, MessageAdded(session_id=session_id, message=text)]

    delta = TextDelta(session_id=session_id, text="tok ")
    result = TurnResult(session_id=session_id, turn_id="t", status="completed")
    return [
        TurnStarted(session_id=session_id, turn_id="t", text="go"),
        MessageAdded(session_id=session_id, message=Message(role="user", content="go", seq=0)),
        *[delta] * (deltas // 2),
        *stored_round(1),
        *[delta] * (deltas // 2),
        *stored_round(2),
        TurnFinished(session_id=session_id, turn_id="t", result=result),
    ]


def _stream(consume: Callable[[Any], None], events: list[Any]) -> tuple[float, list[float]]:
    """Seconds the loop takes to pass ``events`` on, and each stored event's handle() time."""
    from nbchat._store._rows import STORED_KINDS

    shown: list[Any] = []
    stored: list[float] = []
    started = time.perf_counter()
    for event in events:
        t0 = time.perf_counter()
        consume(event)
        if event.kind in STORED_KINDS:
            stored.append(time.perf_counter() - t0)
        shown.append(event)  # the front end's share, kept trivial
    return time.perf_counter() - started, stored


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _journal_append(folder: Path, events: list[Any]) -> float:
    """Median µs to append one stored event to a journal (encode + one write)."""
    from nbchat._store._journal import Journal

    journal = Journal(folder)
    costs = []
    for event in events:
        t0 = time.perf_counter()
        journal.append(event)
        costs.append(time.perf_counter() - t0)
    journal.clear()
    journal.close()
    return _pct(costs, 0.5) * 1e6


def held_file(hold_s: float = 4.0, deltas: int = 5000) -> list[dict[str, Any]]:
    from nbchat._store import Store
    from nbchat._store._sink import StoreSink

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "held.duckdb"
        store = Store.open(path, linger=0.05, lock_timeout=15)
        for name in ("free", "held", "sync"):
            store.create_session(session_id=name, model="m", system_prompt=None)
        notes: list[str] = []
        sink = StoreSink(store, notify=notes.append)

        def idle() -> None:
            while store.stats()["open"]:
                time.sleep(0.01)

        idle()
        free_s, _ = _stream(sink.handle, _reply("free", deltas))
        sink.flush(30)
        # handle() and the writer, file free: 400 replies' worth of stored events.
        store.create_session(session_id="many", model="m", system_prompt=None)
        many = [e for e in _reply("many", 0)[1:-1] for _ in range(400)]
        for seq, event in enumerate(many):
            if event.kind == "message":
                many[seq] = event.model_copy(update={"message": event.message.model_copy(
                    update={"id": f"m{seq}", "seq": seq})})  # fmt: skip
            elif event.kind == "usage":
                many[seq] = event.model_copy(update={"request_id": f"r{seq}"})
        sink.write_seconds.clear()
        _, handles = _stream(sink.handle, many)
        sink.flush(60)
        writes = list(sink.write_seconds)
        idle()
        holder = _hold(path, hold_s)
        held_s, _ = _stream(sink.handle, _reply("held", deltas))
        t0 = time.perf_counter()
        assert sink.barrier(30)  # the end-of-turn barrier: the journal, not the file
        barrier_s = time.perf_counter() - t0
        sink.flush(30)  # the writer: waits for the holder, within patience
        landed_s = time.perf_counter() - t0
        holder.communicate()
        journal_us = _journal_append(Path(tmp) / "journal", many)
        sink.close()
        idle()
        holder = _hold(path, hold_s)
        sync_s, _ = _stream(store.handle, _reply("sync", deltas))  # the loop before the sink
        holder.communicate()
        assert len(store.load_session("held").messages) == 3 and not notes
        store.close()
    stall = max(0.0, held_s - free_s)
    busy = f"{len(handles)} events back to back, the writer busy beside (GIL)"
    return [
        figure(
            "reply while another process holds the file",
            held_s * 1000,
            "ms",
            baseline=free_s * 1000,
            goal="no stall (ratio ~1)",
            ok=stall < 0.05,
            note=f"{deltas} deltas; file held {hold_s:g} s; baseline: the same reply, file "
            f"free; stall {stall * 1000:.1f} ms",
        ),
        figure(
            "same reply, each event written synchronously",
            sync_s * 1000,
            "ms",
            baseline=free_s * 1000,
            note="the loop before StoreSink (Session._store_write): it waits for the file",
        ),
        figure(
            "end-of-turn barrier, file held",
            barrier_s * 1000,
            "ms",
            goal="≤ 5 ms",
            ok=barrier_s <= 0.005,
            note=f"the journal; the rows reached the file {landed_s:.1f} s later, when the "
            f"holder let go (held {hold_s:g} s)",
        ),
        figure(
            "journal append of a stored event, median",
            journal_us,
            "µs",
            note="what a barrier pays per event the writer has not journaled yet",
        ),
        figure("handle() of a stored event, p50", _pct(handles, 0.5) * 1e6, "µs", note=busy),
        figure("handle() of a stored event, p99", _pct(handles, 0.99) * 1e6, "µs", note=busy),
        figure("one write on the writer thread, p50", _pct(writes, 0.5) * 1000, "ms"),
        figure("one write on the writer thread, p99", _pct(writes, 0.99) * 1000, "ms"),
    ]


def _synthetic(path: Path, sessions: int = SESSIONS, *, as_written: bool = False) -> str:
    """Fill ``path`` with the large store (``sessions`` x 100 messages, x 50 requests, x 10
    tool calls), in bulk SQL; returns one session id to read back.

    Sessions fall on 90 UTC days. By default session ``k`` is ``s<k>``, on day ``k % 90``:
    the rows are stored in session order, every stretch of them spans all 90 days, and
    neighbouring rows have neighbouring session ids. ``as_written`` lays the rows out as
    a store written over time has them: session ``k`` on day ``k * 90 // sessions`` (the
    rows in the order of their times) and its id random-looking hex (``md5('s<k>')``, as
    nbchat's ids are random), so a stretch of rows spans a few days and every id.
    """
    import duckdb

    from nbchat._store import Store
    from nbchat._store._recount import fill_counters

    def day(per: int = 1) -> str:  # the day of row ``i``'s session, ``per`` rows a session
        session = f"i // {per}"
        days = f"{session} * 90 // {sessions}" if as_written else f"{session} % 90"
        return f"INTERVAL ({days}) DAY"

    def sid(per: int = 1) -> str:  # the id of row ``i``'s session
        name = f"'s' || (i // {per})"
        return f"md5({name})" if as_written else name

    Store.open(path).close()  # the schema, by the real migrations
    con = duckdb.connect(str(path))
    con.execute(
        f"""
        INSERT INTO sessions (id, title, created_at, model)
        SELECT {sid()}, 'session ' || i,
               TIMESTAMPTZ '2026-08-01 00:00:00+00' + {day()},
               'model-' || (i % 5)
        FROM range({sessions}) t(i);
        INSERT INTO messages (id, session_id, seq, role, content, turn_id, status, state,
                              created_at)
        SELECT 'm' || i, {sid(MESSAGES_PER)}, i % {MESSAGES_PER},
               CASE WHEN i % 2 = 0 THEN 'user' ELSE 'assistant' END,
               'message text number ' || i, 't' || (i // 2), 'ok', 'active',
               TIMESTAMPTZ '2026-08-01 00:00:00+00' + {day(MESSAGES_PER)}
        FROM range({sessions * MESSAGES_PER}) t(i);
        INSERT INTO requests (id, session_id, turn_id, round, model, provider, prompt_tokens,
                              completion_tokens, cost_usd, ttft_ms, duration_ms, finish_reason,
                              created_at, purpose)
        SELECT 'r' || i, {sid(REQUESTS_PER)}, 't' || i, 0, 'model-' || (i % 5),
               'openai', 100 + i % 900, 20 + i % 300,
               CASE WHEN i % 7 = 0 THEN NULL ELSE 0.0001 * (i % 50) END,
               100.0 + (i * 37) % 900, 500.0 + (i * 91) % 5000, 'stop',
               TIMESTAMPTZ '2026-08-01 00:00:00+00' + {day(REQUESTS_PER)},
               'chat'
        FROM range({sessions * REQUESTS_PER}) t(i);
        INSERT INTO turns (id, session_id, status, user_text, started_at, finished_at)
        SELECT 't' || (i * 2), {sid(MESSAGES_PER // 2)}, 'completed', 'q',
               TIMESTAMPTZ '2026-08-01 00:00:00+00', TIMESTAMPTZ '2026-08-01 00:00:01+00'
        FROM range({sessions * MESSAGES_PER // 2}) t(i);
        INSERT INTO tool_calls (id, session_id, turn_id, round, call_id, name, arguments,
                                result, is_error, duration_ms, created_at)
        SELECT 'c' || i, {sid(TOOLS_PER)}, 't' || (i * 5), 0, 'call_' || i,
               'tool_' || (i % 4), '{{}}', 'ok', i % 9 = 0, 5.0 + i % 100,
               TIMESTAMPTZ '2026-08-01 00:00:00+00' + {day(TOOLS_PER)}
        FROM range({sessions * TOOLS_PER}) t(i);
        """
    )
    fill_counters(con)  # what writing each row through the store would have kept
    con.execute("CHECKPOINT")
    con.close()
    name = f"s{sessions // 2}"
    return hashlib.md5(name.encode()).hexdigest() if as_written else name


def queries(n: int = 7) -> list[dict[str, Any]]:
    import duckdb

    import nbchat

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.duckdb"
        t0 = time.perf_counter()
        session_id = _synthetic(path)
        built = time.perf_counter() - t0
        cases = [
            ("costs(by='model')", lambda: nbchat.costs(by="model", db=path), 30, "requests"),
            ("transcript(id)", lambda: nbchat.transcript(session_id, db=path), 10, "messages"),
            ("sessions()", lambda: nbchat.sessions(db=path), 50, "sessions"),
        ]
        # Baselines first: a plain DuckDB connection cannot open the file while nbchat's
        # handle still holds it (its lease lets go 0.5 s after the last query).
        con = duckdb.connect(str(path), read_only=True)
        bases = {
            table: median_ms(lambda q=f"SELECT count(*) FROM {table}": con.execute(q).fetchall(), n)
            for table in ("requests", "messages", "sessions")
        }
        con.close()
        figures = []
        assert len(nbchat.transcript(session_id, db=path)) == MESSAGES_PER
        for name, fn, goal, table in cases:
            fn()  # warm: the store's instance and DuckDB's caches
            ours = median_ms(fn, n)
            figures.append(
                figure(
                    f"{name} on 1M messages / 500k requests",
                    ours,
                    "ms",
                    baseline=bases[table],
                    goal=f"<= {goal} ms",
                    ok=ours <= goal,
                    note=f"baseline: SELECT count(*) FROM {table}; store built in {built:.0f} s",
                )
            )
    return figures


def run() -> list[dict[str, Any]]:
    """All store figures."""
    return [*write_cost(), *held_file(), *queries()]


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
