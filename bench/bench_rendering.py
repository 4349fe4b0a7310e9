"""Rendering: display updates from a fast stream through a real kernel, and renderer CPU.

- update rate: a 10,000-token reply streamed as fast as it goes (≥ 5,000 tokens/s) into
  a ``%%chat`` cell of a real kernel (jupyter_client); count ``update_display_data``
  messages per second of streaming (goal ≤ 15/s; baseline: the token rate, i.e. one
  update per token) and check the final display text is exact.
- renderer CPU per token: the cell renderer's work per text event (view fold, throttle,
  Markdown bundle at each due update), against folding the same tokens into a string.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import figure

HELPERS = Path(__file__).resolve().parents[1] / "tests" / "helpers"
TOKENS = 10_000


def update_rate() -> list[dict[str, Any]]:
    sys.path.insert(0, str(HELPERS))
    from magics_kernel import kernel_env, running_kernel

    from nbchat.testing import FakeOpenAIServer

    chunks = [f"w{i} " for i in range(TOKENS)]
    with FakeOpenAIServer() as fake, tempfile.TemporaryDirectory() as tmp:
        env = kernel_env(fake.url, str(Path(tmp) / "bench.duckdb"))
        with running_kernel(env) as kernel:
            fake.enqueue("warm")
            kernel.execute("%load_ext nbchat\n")
            kernel.execute("%%chat\nwarm up", cell_id="warm")
            # no delay: as fast as the kernel takes them (harsher than the 5,000/s asked for)
            fake.enqueue(chunks=chunks)
            run = kernel.execute("%%chat\nstream", cell_id="bench", timeout=120)
    shown = ("display_data", "update_display_data")
    stamps = [t for t, m in run.messages if m["header"]["msg_type"] in shown]
    updates = len(run.of_type("update_display_data"))
    seconds = max(stamps[-1] - stamps[0], 1e-9)
    rate = updates / seconds
    token_rate = TOKENS / seconds
    final_text = run.displays()[-1]["data"]["text/plain"]
    exact = final_text == "".join(chunks)
    return [
        figure(
            "display updates per second (real kernel)",
            rate,
            "updates/s",
            baseline=token_rate,
            goal="<= 15/s, final text exact",
            ok=rate <= 15 and exact,
            note=f"{updates} updates for {TOKENS} tokens at {token_rate:.0f} tokens/s; "
            f"final text exact: {exact}",
        )
    ]


def renderer_cpu(tokens: int = 100_000) -> list[dict[str, Any]]:
    from nbchat._display import CellRenderer
    from nbchat._events import TextDelta
    from nbchat._throttle import Throttle

    events = [TextDelta(text=f"w{i} ") for i in range(tokens)]
    # A clock that advances 0.2 ms per token: the renderer sees 5,000 tokens/s.
    clock_now = [0.0]

    def clock() -> float:
        clock_now[0] += 0.0002
        return clock_now[0]

    renderer = CellRenderer("bench", "final", throttle=Throttle(clock=clock))
    renderer.mode = "live"
    published: list[int] = []
    renderer._publish = lambda *, update: (  # type: ignore[method-assign]
        published.append(len(renderer.bundle()[0]["text/markdown"])),
        setattr(renderer, "shown", True),
        renderer.throttle.mark(renderer.view.size),
    )
    t0 = time.process_time()
    for event in events:
        renderer(event)
    ours = (time.process_time() - t0) / tokens * 1e6

    t0 = time.process_time()
    parts = []
    for event in events:
        parts.append(event.text)
    "".join(parts)
    base = (time.process_time() - t0) / tokens * 1e6
    sent = sum(published) / max(1, len("".join(parts)))
    return [
        figure(
            "renderer CPU per token",
            ours,
            "us/token",
            baseline=base,
            goal="linear total work",
            ok=sent < 40,
            note=f"{len(published)} updates; bytes rendered = {sent:.1f}x the final text",
        )
    ]


def run() -> list[dict[str, Any]]:
    """All rendering figures."""
    return [*update_rate(), *renderer_cpu()]


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
