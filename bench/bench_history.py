"""Long sessions: nbchat's own cost per turn with 2,000 messages of history against 10.

On each wire format (chat completions, the Responses API), both sessions talk to the
same fake server, run in another process so that its work
(parsing ever larger requests) is not counted; a turn is one ``send()`` with the store
on. What is measured is this process's CPU time per turn (every nbchat thread: the
caller, the background loop, the store's writer), the median over ``turns`` turns, the
two sessions' turns interleaved so that a change in the machine's load hits both alike.
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


def _turn_cpu(session: Any, text: str) -> float:
    t0 = time.process_time()
    result = session.send(text)
    if result.status != "completed":
        raise RuntimeError(f"bench turn failed: {result.error}")
    return time.process_time() - t0


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
            times: dict[int, list[float]] = {SHORT: [], LONG: []}
            for i in range(turns):
                # Each turn adds two messages to both; the long one stays ~2,000.
                times[SHORT].append(_turn_cpu(short, f"question {i}: {WORDS}"))
                times[LONG].append(_turn_cpu(long, f"question {i}: {WORDS}"))
    finally:
        server.terminate()
        server.wait()
    short_ms = statistics.median(times[SHORT]) * 1000
    long_ms = statistics.median(times[LONG]) * 1000
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
            f"{turns}, store on, server in another process)",
        )
    ]


def run() -> list[dict[str, Any]]:
    """The long-session figure, on each wire format."""
    return [*per_turn(api="chat"), *per_turn(api="responses")]


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
