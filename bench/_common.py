"""The record every benchmark returns, and how the runner prints and saves them."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def figure(
    name: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    goal: str = "",
    ok: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One measured figure; ``ratio`` is ``baseline / value`` (>1: faster than baseline)."""
    ratio = baseline / value if baseline and value else None
    return {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "baseline": None if baseline is None else round(baseline, 4),
        "ratio": None if ratio is None else round(ratio, 3),
        "goal": goal,
        "ok": ok,
        "note": note,
    }


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """The fastest of ``repeats`` wall-clock timings of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def median_ms(fn: Callable[[], Any], n: int) -> float:
    """The median wall-clock time of ``n`` calls of ``fn()``, in milliseconds."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def median_of(samples: list[float]) -> float:
    """The median of a list of samples."""
    return statistics.median(samples)


def print_table(figures: list[dict[str, Any]]) -> None:
    """A plain-text table of figures, one row each."""
    header = f"{'figure':<44} {'value':>12} {'unit':<9} {'baseline':>10} {'ratio':>7}  goal"
    print(header)
    print("-" * len(header))
    for f in figures:
        base = "" if f["baseline"] is None else f"{f['baseline']:g}"
        ratio = "" if f["ratio"] is None else f"{f['ratio']:.2f}"
        mark = {True: "ok", False: "MISSED", None: ""}[f["ok"]]
        print(
            f"{f['name']:<44} {f['value']:>12g} {f['unit']:<9} {base:>10} {ratio:>7}  "
            f"{f['goal']} {mark}".rstrip()
        )


def save(figures: list[dict[str, Any]], path: Path | None = None) -> Path:
    """Write one JSON line per figure; returns the file."""
    path = path or RESULTS / "results.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for f in figures:
            fh.write(json.dumps(f) + "\n")
    return path
