"""Run every benchmark (or those named): ``python -m bench [streaming startup ...]``."""

from __future__ import annotations

import importlib
import platform
import sys
import traceback
from typing import Any

from bench._common import print_table, save

SUITES = [
    "streaming",
    "startup",
    "rendering",
    "store",
    "compaction",
    "contention",
    "team_store",
    "analysis",
    "history",
]


def main(argv: list[str]) -> int:
    """Run the chosen suites, print the table, save JSON lines; exit 1 if a suite crashed."""
    chosen = argv or SUITES
    unknown = sorted(set(chosen) - set(SUITES))
    if unknown:
        print(f"unknown suite(s): {', '.join(unknown)}; choose from {', '.join(SUITES)}")
        return 2
    print(f"# nbchat benchmarks on {platform.platform()}, Python {platform.python_version()}")
    figures: list[dict[str, Any]] = []
    crashed = []
    for name in chosen:
        print(f"# running {name} ...", flush=True)
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            figures.extend(module.run())
        except Exception:
            traceback.print_exc()
            crashed.append(name)
    print()
    print_table(figures)
    print(f"\nJSON lines: {save(figures)}")
    if crashed:
        print(f"suites that crashed: {', '.join(crashed)}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
