"""The team store: PostgreSQL against a DuckDB file shared through nbchat's lease.

- writers: 4 processes writing turns flat out, and 16 paced (a turn every 50 ms), each
  turn 9 events as the loop writes them (``Store.write``, one commit each), while a
  reader runs ``costs()`` every 0.1 s. Figures: wall time per commit (1 / commits/s)
  and the p99 of one write's wait, PostgreSQL against the DuckDB file + lease (the
  baseline) in the same run.
- queries: the same synthetic store (10,000 sessions, 500,000 requests, 1,000,000
  messages at scale 1) in a DuckDB file and in PostgreSQL; the median time of the
  public functions on each, the DuckDB file the baseline. For ``costs(by="model")`` also
  the same aggregate pushed down to PostgreSQL as SQL of its own (what the team store
  does instead: fetch the columns as Arrow, run ``_queries.py``'s SQL in DuckDB).

``NBCHAT_BENCH_TEAM_SCALE`` scales the store (0.02 for a quick run) and
``NBCHAT_BENCH_TEAM_TURNS`` the turns per writer (default 60). ``NBCHAT_TEST_PG`` names a
server to use; otherwise a throwaway cluster of Debian's PostgreSQL is started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench._common import figure, median_ms

ROOT = Path(__file__).resolve().parents[1]

_WRITER = r"""
import json, sys, time
from pathlib import Path
from nbchat._store import Store
from nbchat._types import Message, RequestUsage, ToolCall, ToolCallRecord, TurnResult
from nbchat._events import MessageAdded, ToolResult, TurnFinished, TurnStarted, UsageEvent
db, turns, pace, label, go = sys.argv[1:6]
turns, pace = int(turns), float(pace)
store = Store.open(db, lock_timeout=120)
store.create_session(session_id=label, model="m", system_prompt=None)
while not Path(go).exists():
    time.sleep(0.001)
waits, seq, began = [], 0, time.time()
for i in range(turns):
    t = f"{label}-t{i}"
    def msg(role, content, **kw):
        global seq
        seq += 1
        return MessageAdded(session_id=label, turn_id=t,
                            message=Message(role=role, content=content, seq=seq, turn_id=t, **kw))
    usage = UsageEvent(session_id=label, turn_id=t, model="m", cost_usd=0.001,
                       usage=RequestUsage(prompt_tokens=100, completion_tokens=20))
    call = ToolCall(id="c", name="f", arguments="{}")
    events = [
        TurnStarted(session_id=label, turn_id=t, text=f"question {i}"),
        msg("user", f"question {i}"), usage, msg("assistant", None, tool_calls=[call]),
        ToolResult(session_id=label, turn_id=t,
                   call=ToolCallRecord(call_id="c", name="f", arguments="{}", result="1")),
        msg("tool", "1", tool_call_id="c"),
        usage.model_copy(update={"request_id": usage.request_id + "b"}),
        msg("assistant", "An answer of a few words. " * 10),
        TurnFinished(session_id=label, turn_id=t,
                     result=TurnResult(session_id=label, turn_id=t, status="completed")),
    ]
    for event in events:
        t0 = time.perf_counter()
        store.write(event)
        waits.append(time.perf_counter() - t0)
    if pace:
        time.sleep(pace)
print(json.dumps({"waits": waits, "began": began, "ended": time.time()}))
"""


def _scale() -> float:
    return float(os.environ.get("NBCHAT_BENCH_TEAM_SCALE", "1"))


def _turns() -> int:
    return int(os.environ.get("NBCHAT_BENCH_TEAM_TURNS", "60"))


@contextmanager
def _server() -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    from pg_cluster import TempCluster

    cluster = TempCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _writers(db: str, count: int, turns: int, pace: float, tmp: Path) -> dict[str, float]:
    """Run ``count`` writer processes on ``db`` with a reader; commits/s and p99 wait (ms)."""
    import nbchat
    from nbchat._store import Store

    Store.open(db).close()  # migrated before the clock starts
    go = tmp / f"go-{count}-{abs(hash(db))}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, db, str(turns), str(pace), f"w{count}-{k}", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(count)
    ]
    time.sleep(2.0 + 0.2 * count)  # every writer has opened the store and waits
    stop = threading.Event()
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            nbchat.costs(db=db)
            reads[0] += 1
            stop.wait(0.1)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    go.touch()
    results = []
    for child in children:
        out, err = child.communicate(timeout=1800)
        if child.returncode != 0:
            raise RuntimeError(f"a writer failed: {err[-2000:]}")
        results.append(json.loads(out))
    stop.set()
    thread.join()
    waits = [w for r in results for w in r["waits"]]
    wall = max(r["ended"] for r in results) - min(r["began"] for r in results)
    return {"rate": len(waits) / wall, "p99_ms": _p99(waits) * 1000, "reads": reads[0]}


def writers() -> list[dict[str, Any]]:
    figures = []
    turns = _turns()
    with _server() as cluster, tempfile.TemporaryDirectory() as tmp:
        for count, pace in ((4, 0.0), (16, 0.05)):
            kind = "flat out" if not pace else "paced"
            duck = _writers(str(Path(tmp) / f"w{count}.duckdb"), count, turns, pace, Path(tmp))
            pg = _writers(cluster.new_database(), count, turns, pace, Path(tmp))
            note = (
                f"commits/s: PostgreSQL {pg['rate']:.0f}, DuckDB {duck['rate']:.0f}; "
                f"{turns} turns x 9 commits per writer; reader queries: PostgreSQL "
                f"{pg['reads']}, DuckDB {duck['reads']}"
            )
            figures.append(
                figure(
                    f"{count} writers {kind}: PostgreSQL ms per commit",
                    1000 / pg["rate"],
                    "ms",
                    baseline=1000 / duck["rate"],
                    note=note + "; baseline: DuckDB file + lease",
                )
            )
            figures.append(
                figure(
                    f"{count} writers {kind}: PostgreSQL p99 write wait",
                    pg["p99_ms"],
                    "ms",
                    baseline=duck["p99_ms"],
                    note="baseline: DuckDB file + lease, same writers",
                )
            )
    return figures


# ------------------------------------------------------------------ analysis queries


def _tables(sessions: int, requests: int, messages: int) -> dict[str, Any]:
    """The synthetic store as Arrow tables with the schema's exact types."""
    from datetime import UTC, datetime

    import numpy as np
    import pyarrow as pa

    start = np.datetime64(datetime(2024, 1, 1, tzinfo=UTC).replace(tzinfo=None), "us")
    ts = pa.timestamp("us", tz="UTC")

    def ids(prefix: str, n: int) -> pa.Array:
        return pa.array([f"{prefix}{i:08d}" for i in range(n)])

    def stamps(n: int, span_days: int = 90) -> pa.Array:
        offsets = np.arange(n, dtype=np.int64) * (span_days * 86_400_000_000 // max(n, 1))
        return pa.array(start + offsets.astype("timedelta64[us]"), type=ts)

    s_idx = np.arange(sessions)
    session_of_r = np.arange(requests) % sessions
    session_of_m = np.arange(messages) % sessions
    users = [f"user{i % 40}" for i in range(sessions)]
    session_ids = [f"s{i:08d}" for i in range(sessions)]
    return {
        "sessions": pa.table(
            {
                "id": pa.array(session_ids),
                "title": pa.array([f"Session {i}" for i in s_idx]),
                "created_at": stamps(sessions),
                "model": pa.array([f"model-{i % 5}" for i in s_idx]),
                "notebook": pa.array([f"nb{i % 100}.ipynb" for i in s_idx]),
                "metadata": pa.array(
                    [
                        json.dumps({"user": u, "host": "h", "tags": [f"t{i % 7}"]})
                        for i, u in enumerate(users)
                    ]
                ),
                "username": pa.array(users),
                "hostname": pa.array(["h"] * sessions),
            }
        ),
        "requests": pa.table(
            {
                "id": ids("r", requests),
                "session_id": pa.array([session_ids[i] for i in session_of_r]),
                "round": pa.array(np.zeros(requests, dtype=np.int32)),
                "model": pa.array([f"model-{i % 5}" for i in session_of_r]),
                "provider": pa.array(["openai"] * requests),
                "prompt_tokens": pa.array(100 + np.arange(requests, dtype=np.int64) % 900),
                "completion_tokens": pa.array(10 + np.arange(requests, dtype=np.int64) % 90),
                "cached_tokens": pa.array(np.zeros(requests, dtype=np.int64)),
                "cost_usd": pa.array(
                    np.where(
                        np.arange(requests) % 10 == 0, np.nan, 0.0001 * (np.arange(requests) % 50)
                    ),
                    from_pandas=True,
                ),
                "duration_ms": pa.array(np.full(requests, 500.0)),
                "finish_reason": pa.array(["stop"] * requests),
                "created_at": stamps(requests),
                "purpose": pa.array(["chat"] * requests),
                "cost_source": pa.array(["genai-prices"] * requests),
            }
        ),
        "messages": pa.table(
            {
                "id": ids("m", messages),
                "session_id": pa.array([session_ids[i] for i in session_of_m]),
                "seq": pa.array((np.arange(messages) // sessions).astype(np.int32)),
                "role": pa.array(["user" if i % 2 == 0 else "assistant" for i in range(messages)]),
                "content": pa.array([f"A message of a chat, number {i}." for i in range(messages)]),
                "status": pa.array(["ok"] * messages),
                "state": pa.array(["active"] * messages),
                "created_at": stamps(messages),
            }
        ),
    }


def _load(tables: dict[str, Any], duck_path: Path, url: str) -> None:
    import adbc_driver_postgresql.dbapi
    import duckdb

    from nbchat._store import Store

    Store.open(duck_path).close()
    Store.open(url).close()
    con = duckdb.connect(str(duck_path))
    for name, table in tables.items():
        con.register("_t", table)
        names = ", ".join(table.column_names)
        con.execute(f"INSERT INTO {name} ({names}) SELECT {names} FROM _t")
        con.unregister("_t")
    con.close()
    with adbc_driver_postgresql.dbapi.connect(url) as pg, pg.cursor() as cur:
        for name, table in tables.items():
            cur.adbc_ingest(name, table, mode="append")
        pg.commit()
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("ANALYZE")


_PUSHED_DOWN = """
    SELECT model, provider, count(*) AS requests, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, sum(cached_tokens) AS cached_tokens,
           sum(cost_usd) AS cost_usd, count(*) FILTER (WHERE cost_usd IS NULL) AS unknown,
           coalesce(string_agg(DISTINCT cost_source, ', ' ORDER BY cost_source), '') AS sources
    FROM requests GROUP BY model, provider ORDER BY cost_usd DESC NULLS LAST
"""


def queries(n: int = 5) -> list[dict[str, Any]]:
    import psycopg

    import nbchat

    scale = _scale()
    sessions, requests, messages = (max(10, int(x * scale)) for x in (10_000, 500_000, 1_000_000))
    size = f"{requests:,} requests / {sessions:,} sessions / {messages:,} messages"
    figures = []
    with _server() as cluster, tempfile.TemporaryDirectory() as tmp:
        url, duck = cluster.new_database(), Path(tmp) / "big.duckdb"
        t0 = time.perf_counter()
        _load(_tables(sessions, requests, messages), duck, url)
        built = time.perf_counter() - t0
        sid = "s00000007"
        cases: list[tuple[str, Callable[[str], Any]]] = [
            ("costs(by='model')", lambda db: nbchat.costs(by="model", db=db)),
            ("costs(by='user')", lambda db: nbchat.costs(by="user", db=db)),
            ("costs(by='tag')", lambda db: nbchat.costs(by="tag", db=db)),
            ("sessions()", lambda db: nbchat.sessions(db=db)),
            ("transcript(id)", lambda db: nbchat.transcript(sid, db=db)),
            ("usage(session_id=id)", lambda db: nbchat.usage(db=db, session_id=sid)),
        ]
        for name, fn in cases:
            fn(str(duck)), fn(url)  # warm: instances, connections, caches
            local = median_ms(lambda fn=fn: fn(str(duck)), n)
            team = median_ms(lambda fn=fn: fn(url), n)
            figures.append(
                figure(
                    f"team store {name}",
                    team,
                    "ms",
                    baseline=local,
                    note=f"{size}; baseline: the same on a DuckDB file; built in {built:.0f} s",
                )
            )
        with psycopg.connect(url) as con:
            pushed = median_ms(lambda: con.execute(_PUSHED_DOWN).fetchall(), n)
        fetched = median_ms(lambda: nbchat.costs(by="model", db=url), n)
        figures.append(
            figure(
                "costs(by='model') pushed down to PostgreSQL",
                pushed,
                "ms",
                baseline=fetched,
                note="the aggregate as PostgreSQL SQL; baseline: Arrow fetch + DuckDB (used)",
            )
        )
    return figures


def run() -> list[dict[str, Any]]:
    return writers() + queries()
