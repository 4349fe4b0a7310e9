"""Measure what one ``Store.handle()`` costs on a file store (run by hand, not a test).

    python tests/helpers/bench_store_write.py [N]

Prints medians and 90th percentiles in milliseconds for: a message write while the
file is attached (the common case inside a turn), the same with ``sync_every_write``,
the first write after the file was let go (attach included), an ignored stream delta,
and two floors for comparison: ``SELECT 1`` and the same INSERT into a plain in-memory
DuckDB database. The machine's load moves every number; compare them with each other.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from nbchat._events import MessageAdded, TextDelta, UsageEvent
from nbchat._store import Store
from nbchat._store._migrations import migrate
from nbchat._types import Message, RequestUsage

CONTENT = "A reply of a few hundred characters, like most chat messages are. " * 5


def timed(fn: Callable[[int], None], n: int) -> list[tuple[float, float]]:
    """(wall, this thread's CPU) milliseconds of each call."""
    out = []
    for i in range(n):
        wall, cpu = time.perf_counter(), time.thread_time()
        fn(i)
        out.append(((time.perf_counter() - wall) * 1000, (time.thread_time() - cpu) * 1000))
    return out


def show(label: str, values: list[tuple[float, float]]) -> None:
    walls = sorted(v[0] for v in values)
    cpus = [v[1] for v in values]
    p90 = walls[int(len(walls) * 0.9)]
    print(
        f"{label:50s} wall median {statistics.median(walls):6.3f} ms, p90 {p90:6.3f} ms;"
        f" CPU median {statistics.median(cpus):6.3f} ms"
    )


def main(n: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nbchat-bench-"))
    fast = Store.open(folder / "fast.duckdb")
    safe = Store.open(folder / "safe.duckdb", sync_every_write=True)
    cold = Store.open(folder / "cold.duckdb", linger=0.01)
    for store in (fast, safe, cold):
        store.create_session(session_id="s", model="m", system_prompt=None)

    def message(i: int) -> MessageAdded:
        return MessageAdded(session_id="s", message=Message(role="user", content=CONTENT, seq=i))

    floor = duckdb.connect(":memory:")
    migrate(floor)
    now = datetime.now(UTC)

    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(5):  # interleave the runs so load changes hit them all alike
        results.setdefault("handle(MessageAdded), attached", []).extend(
            timed(lambda i: fast.handle(message(i)), n // 5)
        )
        results.setdefault("handle(MessageAdded), sync_every_write", []).extend(
            timed(lambda i: safe.handle(message(i)), n // 5)
        )
        results.setdefault("handle(UsageEvent), attached", []).extend(
            timed(
                lambda i: fast.handle(
                    UsageEvent(
                        session_id="s",
                        model="gpt-4o-mini",
                        usage=RequestUsage(prompt_tokens=100, completion_tokens=20),
                        cost_usd=0.001,
                    )
                ),
                n // 5,
            )
        )
        results.setdefault("handle(TextDelta) (ignored)", []).extend(
            timed(lambda i: fast.handle(TextDelta(session_id="s", text="x")), n // 5)
        )
        results.setdefault("floor: in-memory DuckDB INSERT of the same row", []).extend(
            timed(
                lambda i: floor.execute(
                    "INSERT INTO messages (id, session_id, seq, role, content, status, state,"
                    " created_at) VALUES (?, 's', ?, 'user', ?, 'ok', 'active', ?)",
                    [f"{time.perf_counter_ns()}-{i}", i, CONTENT, now],
                ),
                n // 5,
            )
        )
        results.setdefault("floor: SELECT 1", []).extend(
            timed(lambda i: floor.execute("SELECT 1").fetchall(), n // 5)
        )

    cold_times: list[tuple[float, float]] = []
    for i in range(min(50, n)):
        while cold.stats()["open"]:
            time.sleep(0.005)
        cold_times += timed(lambda i: cold.handle(message(i)), 1)
    results["handle(MessageAdded), file let go before (attach)"] = cold_times

    for label, values in results.items():
        show(label, values)
    for store in (fast, safe, cold):
        store.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
