"""Start-up: ``import nbchat`` and ``%load_ext nbchat`` in fresh interpreters.

Each is timed inside a fresh process (median of several), so interpreter start-up is
not counted. The baseline is importing ``openai`` alone, what an eager package would pay
before anything else (ratio > 1: nbchat starts that many times faster). Goal: ≤ 150 ms.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench._common import figure, median_of

IMPORT = """
import json, time
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


def run(samples: int = 7) -> list[dict[str, Any]]:
    """Start-up figures."""
    base = median_of([_timed(IMPORT.format(module="openai"))["ms"] for _ in range(samples)])
    imp = median_of([_timed(IMPORT.format(module="nbchat"))["ms"] for _ in range(samples)])
    loads = [_timed(LOAD_EXT) for _ in range(samples)]
    load = median_of([r["ms"] for r in loads])
    heavy = sorted({m for r in loads for m in r["heavy"]})
    return [
        figure(
            "import nbchat (fresh interpreter)",
            imp,
            "ms",
            baseline=base,
            goal="<= 150 ms",
            ok=imp <= 150,
            note="baseline: import openai",
        ),
        figure(
            "%load_ext nbchat (fresh IPython shell)",
            load,
            "ms",
            baseline=base,
            goal="<= 150 ms",
            ok=load <= 150 and not heavy,
            note=f"heavy modules imported: {heavy or 'none'}",
        ),
    ]


if __name__ == "__main__":
    from bench._common import print_table

    print_table(run())
