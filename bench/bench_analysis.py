"""Overview queries on large stores: ``sessions()``, ``transcript(id)``, the dashboard.

For each size (``NBCHAT_BENCH_SESSIONS``, default ``10000,100000``: 1M and 10M messages,
500k and 5M requests, 100k and 1M tool calls) a store is built with bulk SQL
(``bench_store._synthetic``, then ``fill_counters``) with its rows laid out as a store
written over time has them (``as_written``: in the order of their times, random session
ids), and the median time of each figure is taken against ``SELECT count(*) FROM
messages`` on a plain DuckDB connection to the same file, measured in the same run:

- ``sessions()`` (goal ≤ 20 ms at 1M messages), and the full aggregation it replaced (the
  same query over every message, request and turn, through the same DataFrame code);
- ``transcript(id)`` (goal ≤ 5 ms at 1M), and after each of a few writes of one of its
  messages (the rows a process keeps for it are then read again);
- a dashboard refresh (goal ≤ 200 ms at 10M): with nothing new (no chart is drawn again)
  and after a request was written (its charts are), and of that, the store reads
  (``overview()``, timed inside the same refreshes) and the rest;
- the write cost the counters add: one message and one request written through the
  store (rows + counters, one transaction) against the same rows alone, on the big store.

``python -m bench analysis`` runs it; ``NBCHAT_BENCH_SESSIONS=1000 python -m bench
analysis`` is a quick run (100k messages).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import figure, median_ms, median_of
from bench.bench_store import MESSAGES_PER, REQUESTS_PER, _synthetic

# sessions() before m007: every message, request and turn aggregated on each call.
FULL_SESSIONS = """
    WITH m AS (
        SELECT session_id, count(*) FILTER (WHERE state = 'active') AS messages,
               max(created_at) AS last_message_at
        FROM messages GROUP BY session_id
    ), r AS (
        SELECT session_id, count(*) AS requests,
               sum(prompt_tokens)::BIGINT AS prompt_tokens,
               sum(completion_tokens)::BIGINT AS completion_tokens,
               CASE WHEN count(*) FILTER (WHERE cost_usd IS NULL) > 0
                         AND count(*) FILTER (WHERE cost_usd IS NOT NULL AND error IS NULL) = 0
                    THEN NULL ELSE sum(cost_usd) END AS cost_usd,
               count(*) FILTER (WHERE cost_usd IS NULL) AS unknown_cost_requests,
               max(created_at) AS last_request_at
        FROM requests GROUP BY session_id
    ), superseded AS (
        SELECT turn_id FROM messages WHERE role = 'user' AND turn_id IS NOT NULL
        GROUP BY turn_id HAVING bool_and(state = 'superseded')
    ), t AS (
        SELECT turns.session_id, count(*) FILTER (WHERE x.turn_id IS NULL) AS turns,
               count(x.turn_id) AS superseded_turns
        FROM turns LEFT JOIN superseded x ON x.turn_id = turns.id
        GROUP BY turns.session_id
    )
    SELECT s.id, s.title, s.model, s.created_at,
           greatest(s.created_at, m.last_message_at, r.last_request_at) AS last_active,
           coalesce(t.turns, 0) AS turns, coalesce(t.superseded_turns, 0) AS superseded_turns,
           coalesce(m.messages, 0) AS messages, coalesce(r.requests, 0) AS requests,
           CASE WHEN r.requests IS NULL THEN 0 ELSE r.prompt_tokens END AS prompt_tokens,
           CASE WHEN r.requests IS NULL THEN 0 ELSE r.completion_tokens END
               AS completion_tokens,
           CASE WHEN r.requests IS NULL THEN 0.0 ELSE r.cost_usd END AS cost_usd,
           coalesce(r.unknown_cost_requests, 0) AS unknown_cost_requests,
           s.system_prompt, s.parent_id, s.notebook, s.metadata
    FROM sessions s LEFT JOIN m ON m.session_id = s.id LEFT JOIN r ON r.session_id = s.id
    LEFT JOIN t ON t.session_id = s.id
    ORDER BY s.created_at, s.id
"""


def _sizes() -> list[int]:
    raw = os.environ.get("NBCHAT_BENCH_SESSIONS", "10000,100000")
    return [int(part) for part in raw.split(",") if part.strip()]


def _label(sessions: int) -> str:
    messages = sessions * MESSAGES_PER
    return f"{messages / 1e6:g}M messages" if messages >= 1e6 else f"{messages // 1000}k messages"


def _write_cost(path: Path, session_id: str, label: str, n: int) -> list[dict[str, Any]]:
    """A message and a request written with their counters, against the rows alone."""
    from nbchat._events import MessageAdded, UsageEvent
    from nbchat._store import Store
    from nbchat._store._duckdb_rows import _RowOps
    from nbchat._store._rows import rows_of
    from nbchat._types import Message, RequestUsage

    def events(i: int) -> list[Any]:
        message = Message(role="assistant", content="a reply " * 40, seq=1000 + i)
        usage = RequestUsage(prompt_tokens=900, completion_tokens=40)
        return [
            MessageAdded(session_id=session_id, message=message),
            UsageEvent(session_id=session_id, model="model-1", usage=usage, cost_usd=0.001),
        ]

    counter = iter(range(10**9))
    store = Store.open(path)
    try:
        with_counters = median_ms(lambda: [store.write(e) for e in events(next(counter))], n)

        def rows_alone() -> None:  # what a write did before m007: the rows, autocommitted
            with store._connection() as con:  # type: ignore[attr-defined]
                ops = _RowOps(con)
                for event in events(next(counter)):
                    entry = rows_of(event)
                    assert entry is not None
                    for write in entry[1]:
                        ops.apply(write, exists=False)

        alone = median_ms(rows_alone, n)
    finally:
        store.close()
    return [
        figure(
            f"write a message + a request, counters on, {label}",
            with_counters,
            "ms",
            baseline=alone,
            note="baseline: the same rows alone, as written before m007 (no counters)",
        )
    ]


def _transcripts_after_a_write(path: Path, session_id: str, n: int) -> list[float]:
    """The times of ``n`` ``transcript(id)`` calls, each after one of the session's
    messages was written again (a replay, same time) through a store this process keeps
    open, as its session does: the rows it kept are stale."""
    import nbchat
    from nbchat._events import MessageAdded
    from nbchat._store import Store

    samples = []
    with Store.open(path) as store:
        messages = store.load_session(session_id).messages
        for i in range(n):
            store.write(MessageAdded(session_id=session_id, message=messages[i % len(messages)]))
            t0 = time.perf_counter()
            nbchat.transcript(session_id, db=path)
            samples.append((time.perf_counter() - t0) * 1000)
    return samples


def _refreshes_after_a_request(
    path: Path, session_id: str, board: Any, n: int
) -> tuple[list[float], list[float]]:
    """The times of ``n`` dashboard refreshes, each after one more request was stored, and
    of the store reads (``overview()``) in each."""
    from nbchat import _analysis
    from nbchat._events import UsageEvent
    from nbchat._store import Store
    from nbchat._types import RequestUsage

    def write() -> None:
        usage = RequestUsage(prompt_tokens=900, completion_tokens=40)
        event = UsageEvent(
            session_id=session_id, model="model-1", usage=usage, cost_usd=0.001, ttft_ms=300.0
        )
        with Store.open(path) as store:
            store.write(event)

    reads: list[float] = []
    overview = _analysis.overview

    def timed(*args: Any, **kwargs: Any) -> Any:  # the refresh looks it up on each call
        t0 = time.perf_counter()
        try:
            return overview(*args, **kwargs)
        finally:
            reads.append((time.perf_counter() - t0) * 1000)

    write()
    board.refresh()  # warm: the day of the new requests is a new bar
    samples = []
    _analysis.overview = timed  # type: ignore[assignment]
    try:
        for _ in range(n):
            write()
            t0 = time.perf_counter()
            board.refresh()
            samples.append((time.perf_counter() - t0) * 1000)
    finally:
        _analysis.overview = overview  # type: ignore[assignment]
    return samples, reads


def _one_size(sessions: int, n: int) -> list[dict[str, Any]]:
    import duckdb

    import nbchat
    from nbchat._analysis import overview
    from nbchat._dashboard import Dashboard
    from nbchat._store import Store
    from nbchat._store._duckdb import _frame_rows
    from nbchat._store._frames import to_frame

    label = _label(sessions)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.duckdb"
        t0 = time.perf_counter()
        session_id = _synthetic(path, sessions, as_written=True)
        built = time.perf_counter() - t0
        con = duckdb.connect(str(path), read_only=True)
        count = "SELECT count(*) FROM messages"
        con.execute(count).fetchall()
        base = median_ms(lambda: con.execute(count).fetchall(), max(n, 15))
        con.close()
        note = f"baseline: SELECT count(*) FROM messages; store built in {built:.0f} s"
        figures = []

        def add(name: str, fn: Callable[[], Any], goal: float | None, runs: int = n) -> float:
            fn()  # warm: the store's instance and DuckDB's caches
            ours = median_ms(fn, runs)
            figures.append(
                figure(
                    f"{name}, {label}",
                    ours,
                    "ms",
                    baseline=base,
                    goal="" if goal is None else f"<= {goal:g} ms",
                    ok=None if goal is None else ours <= goal,
                    note=note,
                )
            )
            return ours

        big = sessions >= 100_000
        add("sessions()", lambda: nbchat.sessions(db=path), None if big else 20)
        store = Store.open(path)

        def full_aggregation() -> Any:  # fetched and framed as sessions() is
            with store._connection() as con:  # type: ignore[attr-defined]
                result = _frame_rows(con, FULL_SESSIONS, [])
            return to_frame(result, frozenset({"metadata"}))

        try:
            add(
                "sessions() by full aggregation (before m007)",
                full_aggregation,
                None,
                runs=max(3, n // 3),
            )
        finally:
            store.close()
        add("transcript(id)", lambda: nbchat.transcript(session_id, db=path), None if big else 5)
        assert len(nbchat.transcript(session_id, db=path)) == MESSAGES_PER
        rewritten = median_of(_transcripts_after_a_write(path, session_id, max(n, 15)))
        figures.append(
            figure(
                f"transcript(id) after a write of its messages, {label}",
                rewritten,
                "ms",
                baseline=base,
                note=note + "; a message written again before each (read from the file)",
            )
        )
        add("overview() (the dashboard's reads)", lambda: overview(db=path), None)
        board = Dashboard(db=path)
        assert f"{sessions * REQUESTS_PER} requests" in board.summary.value
        goal = 200 if big else None
        add("dashboard refresh, nothing new", board.refresh, goal, runs=max(3, n // 2))
        samples, reads = _refreshes_after_a_request(path, session_id, board, max(5, n))
        assert f"{sessions * REQUESTS_PER + len(samples) + 1} requests" in board.summary.value
        figures.append(
            figure(
                f"dashboard refresh after a request, {label}",
                median_of(samples),
                "ms",
                baseline=base,
                goal="" if goal is None else f"<= {goal:g} ms",
                ok=None if goal is None else median_of(samples) <= goal,
                note=note + "; a request written before each (its charts drawn again)",
            )
        )
        rest = [total - read for total, read in zip(samples, reads, strict=True)]
        parts = (("the reads (overview())", reads), ("the rest: charts, widgets", rest))
        for part, values in parts:
            figures.append(
                figure(
                    f"  of it, {part}, {label}",
                    median_of(values),
                    "ms",
                    baseline=base,
                    note=note + "; timed within the same refreshes",
                )
            )
        if not big:
            figures.extend(_write_cost(path, session_id, label, 200))
    return figures


def run() -> list[dict[str, Any]]:
    """The overview figures for every size."""
    figures: list[dict[str, Any]] = []
    for sessions in _sizes():
        figures.extend(_one_size(sessions, n=9))
    return figures


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
