"""Long sessions: nbchat's own cost per turn with 2,000 messages of history against 10.

On each wire format (chat completions, the Responses API), both sessions talk to the
same fake server, run in another process so that its work
(parsing ever larger requests) is not counted; a turn is one ``send()`` with the store
on. What is measured is this process's CPU time per turn (every nbchat thread: the
caller, the background loop, the store's writer), the median over ``turns`` turns, the
two sessions' turns interleaved so that a change in the machine's load hits both alike.
Each turn waits for its store writes to be done: ``send()`` returns once they are
journaled, and the writer thread would otherwise write them during a later turn (of
either session), counting one session's writes in the other's turn. The loop thread's
CPU alone (what a turn's own path costs, without the writer) is noted beside it.
Goal: the long session's turn costs at most twice the short one's.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import figure

SHORT, LONG = 10, 2_000
# A message of ordinary size (a paragraph), so the long history is ~500k characters.
WORDS = "The quarterly figures moved as expected; the notebook checks them again. " * 3


def _session(url: str, db: Path, history: int, api: str = "chat") -> Any:
    """A session whose history holds ``history`` messages (stored, as turns leave them)."""
    import nbchat
    from nbchat._types import Message

    s = nbchat.Session(model="bench", base_url=url, api_key="b", db=db, system="Be brief.", api=api)
    for i in range(history - 1):  # the system prompt is the first message
        role = "user" if i % 2 == 0 else "assistant"
        s._add(Message(role=role, content=f"{i}: {WORDS}", turn_id=f"t{i // 2}"))
    if s._sink is not None:
        s._sink.flush(30)
    return s


def _loop_clock() -> int | None:
    """The CPU clock of nbchat's background loop thread (where a turn runs), once running."""
    import threading

    loop = next((t for t in threading.enumerate() if t.name == "nbchat-loop"), None)
    return None if loop is None or loop.ident is None else time.pthread_getcpuclockid(loop.ident)


def _turn_cpu(session: Any, text: str) -> tuple[float, float]:
    """CPU seconds of one turn and its store writes: the process's, the loop thread's."""
    loop = _loop_clock()  # None before the first turn (a warm-up turn starts it)
    t0 = time.process_time()
    l0 = time.clock_gettime(loop) if loop is not None else 0.0
    result = session.send(text)
    if result.status != "completed":
        raise RuntimeError(f"bench turn failed: {result.error}")
    if not session._sink.flush(30):
        raise RuntimeError("bench turn: the store writes did not finish in 30 s")
    spent = time.process_time() - t0
    return spent, (time.clock_gettime(loop) - l0 if loop is not None else spent)


def per_turn(turns: int = 30, api: str = "chat") -> list[dict[str, Any]]:
    """The median CPU milliseconds of a turn at SHORT and at LONG messages of history."""
    server = subprocess.Popen(
        [sys.executable, "-m", "nbchat.testing", "--echo"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            short = _session(url, Path(tmp) / "short.duckdb", SHORT, api)
            long = _session(url, Path(tmp) / "long.duckdb", LONG, api)
            for s in (short, long):  # warm: connections, caches, the first-turn work
                _turn_cpu(s, "warm up")
            times: dict[int, list[tuple[float, float]]] = {SHORT: [], LONG: []}
            for i in range(turns):
                # Each turn adds two messages to both; the long one stays ~2,000.
                times[SHORT].append(_turn_cpu(short, f"question {i}: {WORDS}"))
                times[LONG].append(_turn_cpu(long, f"question {i}: {WORDS}"))
    finally:
        server.terminate()
        server.wait()
    short_ms, short_loop = (statistics.median(c) * 1000 for c in zip(*times[SHORT], strict=True))
    long_ms, long_loop = (statistics.median(c) * 1000 for c in zip(*times[LONG], strict=True))
    ratio = long_ms / short_ms
    return [
        figure(
            f"turn overhead at {LONG:,} vs {SHORT} messages ({api})",
            long_ms,
            "ms CPU",
            baseline=short_ms,
            goal="<= 2x the 10-message turn",
            ok=ratio <= 2,
            note=f"{long_ms:.1f} ms vs {short_ms:.1f} ms per turn ({ratio:.2f}x; median of "
            f"{turns}, store on and its writes waited for, server in another process); "
            f"the loop thread alone: {long_loop:.1f} vs {short_loop:.1f} ms "
            f"({long_loop / short_loop:.2f}x)",
        )
    ]


def run() -> list[dict[str, Any]]:
    """The long-session figure, on each wire format."""
    return [*per_turn(api="chat"), *per_turn(api="responses")]


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
