"""Compaction: prompt tokens per request over a 200-turn session, with and without it.

One scripted 200-turn conversation (varied message lengths; every third turn, two
parallel tool calls with sizeable results) is played three times against the fake
server: no compaction, ``compaction="summary"`` and ``compaction="window"``, with an
8,000-token context window configured. The fake's "tokenizer" is deliberately not the
estimator's characters / 4: it reports 1.3 × that plus 40 tokens of fixed overhead, so
the figures also show how closely the calibrated estimate follows a server's counts.

Figures: the largest and the mean prompt per request; the prompt tokens of the whole
session, summary requests included (what you pay for input); the number of
compactions; the estimate's error against the server's count (calibrated, against
plain characters / 4); and the cost of estimating a long history incrementally. A plot
is saved to ``bench/results/compaction.png``.

Run: ``python -m bench compaction`` (or ``python -m bench.bench_compaction``).
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

import nbchat
from bench._common import figure
from nbchat import Message, Session
from nbchat._history import TokenEstimator
from nbchat.testing import FakeOpenAIServer, Reply, estimate_prompt_tokens

TURNS = 200
WINDOW = 8000
TRIGGER = 0.8
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = [
    "data",
    "frame",
    "column",
    "value",
    "mean",
    "median",
    "plot",
    "axis",
    "group",
    "filter",
    "join",
    "index",
    "series",
    "model",
    "token",
    "cost",
    "session",
    "notebook",
    "cell",
    "output",
    "result",
    "error",
    "query",
    "table",
    "row",
]
SYSTEM = "You are a data analysis assistant working in a Jupyter notebook."


# --------------------------------------------------------------------------- the session


def server_tokens(messages: Any) -> int:
    """The fake model's count of a prompt's tokens (on purpose not characters / 4)."""
    return math.ceil(1.3 * estimate_prompt_tokens(messages)) + 40


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _model(seed: int) -> Any:
    """The fake model: summaries, two parallel tool calls when asked, else prose.

    Each answer is drawn from a generator seeded by the question, so every run of the
    session, compacted or not, gets the same answers to the same messages.
    """

    def reply(body: dict[str, Any]) -> Reply:
        messages = body["messages"]
        first = messages[0]["content"] or ""
        user_at = max(i for i, m in enumerate(messages) if m["role"] == "user")
        question = messages[user_at]["content"] or ""
        rng = random.Random(f"{seed}:{question}:{len(messages) - user_at}")
        if first.startswith("You condense"):  # a summary request
            found = re.search(r"at most (\d+) words", first)
            limit = int(found.group(1)) if found else 300
            return _reply(messages, text="Summary: " + _words(rng, limit // 2, limit))
        if messages[-1]["role"] == "user" and question.endswith("[tools]"):
            calls = [
                {"name": "query_table", "arguments": {"sql": _words(rng, 5, 12)}} for _ in range(2)
            ]
            return _reply(messages, calls=calls)
        return _reply(messages, text=_words(rng, 40, 200))

    return reply


def _reply(messages: Any, text: str = "", calls: list[dict[str, Any]] | None = None) -> Reply:
    generated = len(text) + len(json.dumps(calls or []))
    usage = {"prompt_tokens": server_tokens(messages), "completion_tokens": generated // 4}
    return Reply(text=text, tool_calls=calls or [], usage=usage)


def play(compaction: str | None, seed: int = 7) -> dict[str, Any]:
    """Play the scripted session once; returns what each request cost and when it compacted."""
    rng = random.Random(seed)  # the user's messages

    @nbchat.tool
    def query_table(sql: str) -> str:
        """Run a query on the demo table."""
        return "rows: " + _words(random.Random(f"{seed}:{sql}"), 60, 150)

    events: list[Any] = []
    # Before each turn: (calibrated estimate, characters / 4) of the prompt about to go.
    guesses: list[tuple[int, int]] = []
    with FakeOpenAIServer(fallback=_model(seed)) as fake:
        s = Session(
            model="bench-model",
            base_url=fake.url,
            api_key="sk-bench",
            db=False,
            system=SYSTEM,
            tools=[query_table],
            compaction=compaction,
            context_window=WINDOW,
            trigger_ratio=TRIGGER,
            on_event=events.append,
        )
        tool_chars = len(json.dumps(s.tools.specs(), separators=(",", ":")))
        started = time.perf_counter()
        for turn in range(TURNS):
            text = _words(rng, 20, 120) + (" [tools]" if turn % 3 == 0 else "")
            if s.compactor is not None:
                pending = [*s.history, Message(role="user", content=text)]
                guesses.append(
                    (
                        s.compactor.estimator.estimate(pending, tool_chars),
                        math.ceil(TokenEstimator.heuristic(pending, tool_chars)),
                    )
                )
            result = s.send(text)
            if result.status != "completed":
                raise RuntimeError(f"turn {turn} ended {result.status}: {result.error}")
        seconds = time.perf_counter() - started

    chat: list[int] = []
    summary_tokens: list[int] = []
    compacted_at: list[int] = []  # index of the chat request each compaction preceded
    first_of_turn: list[tuple[int, bool]] = []  # (server count, compacted before it)
    compacted_in_turn = False
    for e in events:
        if e.kind == "turn_started":
            compacted_in_turn, first = False, True
        elif e.kind == "compaction" and e.error is None:
            compacted_at.append(len(chat))
            compacted_in_turn = True
        elif e.kind == "usage" and e.purpose == "summary":
            summary_tokens.append(e.usage.prompt_tokens + e.usage.completion_tokens)
        elif e.kind == "usage":
            chat.append(e.usage.prompt_tokens)
            if first:
                first_of_turn.append((e.usage.prompt_tokens, compacted_in_turn))
                first = False
    # Estimate errors, on turns whose first prompt went out as estimated (no compaction).
    errors = [
        (abs(g[0] - real) / real, abs(g[1] - real) / real)
        for g, (real, compacted) in zip(guesses, first_of_turn, strict=False)
        if not compacted
    ]
    return {
        "chat": chat,
        "summary_tokens": summary_tokens,
        "compacted_at": compacted_at,
        "compactions": sum(1 for e in events if e.kind == "compaction" and e.error is None),
        "failed": sum(1 for e in events if e.kind == "compaction" and e.error),
        "errors": errors,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- figures


def _estimate_cost() -> tuple[float, float]:
    """Microseconds to estimate a 400-message history: incrementally vs from scratch."""
    history = [
        Message(role="user" if i % 2 == 0 else "assistant", content="word " * 80)
        for i in range(400)
    ]
    est = TokenEstimator()
    est.observe(history[:-2], 0, prompt_tokens=40_000)
    repeats = 200
    t0 = time.perf_counter()
    for _ in range(repeats):
        est.estimate(history)
    incremental = (time.perf_counter() - t0) / repeats * 1e6
    t0 = time.perf_counter()
    for _ in range(repeats):
        TokenEstimator.heuristic(history)
    scratch = (time.perf_counter() - t0) / repeats * 1e6
    return incremental, scratch


def run() -> list[dict[str, Any]]:
    """Play the session without, with summary and with window compaction; return figures."""
    runs = {name: play(name) for name in (None, "summary", "window")}
    base = runs[None]
    base_max, base_mean = max(base["chat"]), statistics.mean(base["chat"])
    base_total = sum(base["chat"])
    limit = TRIGGER * WINDOW
    figures: list[dict[str, Any]] = []
    for name in ("summary", "window"):
        r = runs[name]
        peak, mean = max(r["chat"]), statistics.mean(r["chat"])
        total = sum(r["chat"]) + sum(r["summary_tokens"])
        figures += [
            figure(
                f"compaction {name}: largest prompt",
                peak,
                "tokens",
                baseline=base_max,
                goal=f"<= {WINDOW} (the window; trigger at {limit:.0f})",
                ok=peak <= WINDOW,
                note=f"{r['compactions']} compactions, {r['failed']} failed",
            ),
            figure(
                f"compaction {name}: mean prompt per request",
                mean,
                "tokens",
                baseline=base_mean,
                goal="<= 0.8 x window",
                ok=mean <= limit,
            ),
            figure(
                f"compaction {name}: input tokens, whole session",
                total,
                "tokens",
                baseline=base_total,
                goal="ratio >= 2 (summaries included)",
                ok=base_total / total >= 2,
                note=f"{sum(r['summary_tokens'])} of them in summary requests",
            ),
        ]
    calibrated = statistics.mean(e[0] for e in runs["summary"]["errors"]) * 100
    plain = statistics.mean(e[1] for e in runs["summary"]["errors"]) * 100
    figures.append(
        figure(
            "token estimate error vs server count",
            calibrated,
            "%",
            baseline=plain,
            goal="<= 5 % (chars/4 alone is the baseline)",
            ok=calibrated <= 5,
            note=f"server counts 1.3 x chars/4 + 40; {len(runs['summary']['errors'])} prompts",
        )
    )
    incremental, scratch = _estimate_cost()
    figures.append(
        figure(
            "estimate a 400-message history",
            incremental,
            "us",
            baseline=scratch,
            goal="cheaper than estimating it all (only new messages are measured)",
            ok=incremental < scratch,
        )
    )
    figures.append(
        figure(
            "200 turns, loop time per turn (summary)",
            runs["summary"]["seconds"] / TURNS * 1000,
            "ms",
            baseline=base["seconds"] / TURNS * 1000,
            goal="informational (fake server on loopback)",
        )
    )
    plot(runs)
    return figures


def plot(runs: dict[str | None, dict[str, Any]], path: Path | None = None) -> Path:
    """Prompt tokens per request for each run: whole range above, a zoom on the window below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or RESULTS / "compaction.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (top, zoom) = plt.subplots(
        2, 1, figsize=(9, 7), dpi=110, gridspec_kw={"height_ratios": [1, 1.3]}
    )
    styles = {
        None: ("no compaction", "#888888"),
        "summary": ('compaction="summary"', "#1f77b4"),
        "window": ('compaction="window"', "#ff7f0e"),
    }
    marks = runs["summary"]["compacted_at"]
    summary_chat = runs["summary"]["chat"]
    for ax in (top, zoom):
        for name, (label, color) in styles.items():
            chat = runs[name]["chat"]
            ax.plot(range(1, len(chat) + 1), chat, label=label, color=color, linewidth=1.2)
        ax.axhline(WINDOW, color="#d62728", linestyle="--", linewidth=1, label="context window")
        ax.axhline(TRIGGER * WINDOW, color="#d62728", linestyle=":", linewidth=1, label="trigger")
        ax.grid(alpha=0.25)
        ax.set_ylabel("prompt tokens")
    zoom.scatter(
        [i + 1 for i in marks if i < len(summary_chat)],
        [summary_chat[i] for i in marks if i < len(summary_chat)],
        color="#1f77b4",
        marker="v",
        s=24,
        zorder=3,
        label="after a summary",
    )
    top.set_title(f"Prompt size per request over a {TURNS}-turn session ({WINDOW:,}-token window)")
    top.legend(loc="upper left", fontsize=8, frameon=False)
    zoom.set_ylim(0, WINDOW * 1.15)
    zoom.set_title(
        "the same, up to the window: compaction keeps every prompt under the trigger", fontsize=9
    )
    zoom.legend(loc="lower right", fontsize=8, ncol=3, frameon=True)
    zoom.set_xlabel("model request (tool turns make two requests)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":  # python -m bench.bench_compaction (or python -m bench compaction)
    from bench._common import print_table

    print_table(run())
    print(f"plot: {RESULTS / 'compaction.png'}")
