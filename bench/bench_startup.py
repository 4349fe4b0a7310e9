"""Start-up: ``import nbchat`` and ``%load_ext nbchat`` in fresh interpreters.

Each is timed inside a fresh process (median of several), so interpreter start-up is
not counted. The baseline is importing ``openai`` alone, what an eager package would pay
before anything else (ratio > 1: nbchat starts that many times faster). Goal: ≤ 150 ms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import figure, median_of

IMPORT = """
import json, sys, time
{before}
t = time.perf_counter(); import {module}; ms = (time.perf_counter() - t) * 1000
print(json.dumps({{"ms": ms}}))
"""

LOAD_EXT = """
import json, time, sys
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
t = time.perf_counter(); shell.run_line_magic("load_ext", "nbchat")
ms = (time.perf_counter() - t) * 1000
heavy = [m for m in ("openai", "pandas", "duckdb") if m in sys.modules]
print(json.dumps({"ms": ms, "heavy": heavy}))
"""


def _timed(code: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


HELPERS = Path(__file__).resolve().parents[1] / "tests" / "helpers"


def _first_outputs(run: Any, sent: float) -> tuple[float, float]:
    """Seconds from sending a cell to its first display, and to the first one with text."""
    placeholder = text = None
    for at, message in run.messages:
        kind = message["header"]["msg_type"]
        if kind not in ("display_data", "update_display_data"):
            continue
        placeholder = at if placeholder is None else placeholder
        if message["content"]["data"].get("text/plain"):
            text = at
            break
    assert placeholder is not None and text is not None, "the cell showed no text"
    return placeholder - sent, text - sent


def cold_first_turn(samples: int = 3, typing_s: float = 2.0) -> list[dict[str, Any]]:
    """The first %%chat of a fresh kernel, against the second turn in the same kernel.

    As a user works: ``%load_ext nbchat``, a pause while the first cell is typed, then the
    cell. The server (the fake one) answers at once, so the figures are nbchat's own.
    """
    sys.path.insert(0, str(HELPERS))
    from magics_kernel import kernel_env, running_kernel

    from nbchat.testing import FakeOpenAIServer

    rows: dict[str, list[tuple[float, float]]] = {"cold": [], "cold, no warm-up": [], "warm": []}
    with FakeOpenAIServer(fallback="The first words arrive at once.") as fake:
        for warm_up in ("1", "0"):
            for _ in range(samples):
                with tempfile.TemporaryDirectory() as tmp:
                    env = kernel_env(
                        fake.url, str(Path(tmp) / "cold.duckdb"), NBCHAT_WARMUP=warm_up
                    )
                    with running_kernel(env) as kernel:
                        kernel.execute("%load_ext nbchat")
                        time.sleep(typing_s)
                        sent = time.monotonic()
                        first = kernel.execute("%%chat\nhello", cell_id="first")
                        key = "cold" if warm_up == "1" else "cold, no warm-up"
                        rows[key].append(_first_outputs(first, sent))
                        sent = time.monotonic()
                        second = kernel.execute("%%chat\nagain", cell_id="second")
                        rows["warm"].append(_first_outputs(second, sent))
    med = {k: (median_of([p for p, _ in v]), median_of([t for _, t in v])) for k, v in rows.items()}
    warm_place, warm_text = med["warm"]
    cold_place, cold_text = med["cold"]
    slow_place, slow_text = med["cold, no warm-up"]
    return [
        figure(
            "first %%chat in a fresh kernel: placeholder",
            cold_place * 1000,
            "ms",
            baseline=warm_place * 1000,
            goal="<= 100 ms",
            ok=cold_place <= 0.1,
            note=f"baseline: the second turn; without the warm-up {slow_place * 1000:.0f} ms",
        ),
        figure(
            "first %%chat in a fresh kernel: first text",
            cold_text * 1000,
            "ms",
            baseline=warm_text * 1000,
            goal="<= 300 ms",
            ok=cold_text <= 0.3,
            note=f"baseline: the second turn; without the warm-up {slow_text * 1000:.0f} ms",
        ),
    ]


def run(samples: int = 7) -> list[dict[str, Any]]:
    """Start-up figures."""

    def import_ms(module: str, before: str = "") -> float:
        ms: float = _timed(IMPORT.format(module=module, before=before))["ms"]
        return ms

    base, bare, imp = [], [], []
    for _ in range(samples):  # interleaved, so that the machine's load hits all alike
        base.append(import_ms("openai"))
        # openai imports aiohttp (nbchat's transport) when it is installed: what it costs
        bare.append(import_ms("openai", 'sys.modules["aiohttp"] = None'))
        imp.append(import_ms("nbchat"))
    base_ms, bare_ms, imp_ms = median_of(base), median_of(bare), median_of(imp)
    loads = [_timed(LOAD_EXT) for _ in range(samples)]
    load = median_of([r["ms"] for r in loads])
    heavy = sorted({m for r in loads for m in r["heavy"]})
    return [
        figure(
            "import nbchat (fresh interpreter)",
            imp_ms,
            "ms",
            baseline=base_ms,
            goal="<= 150 ms",
            ok=imp_ms <= 150,
            note=f"baseline: import openai (without aiohttp installed: {bare_ms:.0f} ms)",
        ),
        figure(
            "%load_ext nbchat (fresh IPython shell)",
            load,
            "ms",
            baseline=base_ms,
            goal="<= 150 ms",
            ok=load <= 150 and not heavy,
            note=f"heavy modules imported: {heavy or 'none'}",
        ),
        *cold_first_turn(),
    ]


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
