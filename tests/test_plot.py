"""``nbchat.plot``: charts drawn from a store that real sessions filled, checked on the Axes' data.

The sessions talk to the fake server over HTTP with scripted token counts; two models
have registered prices and one has none, so its cost is unknown and must never be
drawn as 0. ``test-artifacts/costs.png`` (the README's docs/costs.png) is drawn here.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import pytest
from IPython.core.error import UsageError
from matplotlib.axes import Axes

import nbchat
from nbchat._plot import magic_figure, plot_for_magic
from nbchat._pricing import forget_price, register_price
from nbchat.testing import FakeOpenAIServer

matplotlib.use("Agg")  # no display: draw off-screen

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PRICED, CHEAP, MYSTERY = "chart-priced", "chart-cheap", "chart-mystery"


@dataclass
class Filled:
    """A store with three sessions, and facts about what was sent."""

    db: str
    priced: str  # session ids
    cheap: str
    mystery: str
    cut: dt.datetime  # after the priced session, before the others


def _usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def flaky(x: int) -> int:
    """Fails for odd numbers."""
    if x % 2:
        raise ValueError("odd")
    return x


def fill_store(db: str, fake: FakeOpenAIServer) -> Filled:
    """Three sessions: two turns at known prices, one of unknown price, one with tools.

    The prices must be registered (``prices()``) while they send.
    """

    def session(model: str, **kw: Any) -> nbchat.Session:
        return nbchat.Session(
            model=model, base_url=fake.url, api_key="sk-test", db=db, max_retries=0, **kw
        )

    priced = session(PRICED, title="Priced work", notebook="/home/me/analysis.ipynb")
    fake.enqueue("one", usage=_usage(1000, 500, cached=400))
    fake.enqueue("two", usage=_usage(2000, 1000))
    priced.send("first")
    priced.send("second")
    cut = dt.datetime.now(dt.UTC)
    mystery = session(MYSTERY)
    fake.enqueue("three <b>bold</b>", usage=_usage(100, 50))
    mystery.send("third")
    cheap = session(CHEAP, title="Cheap tools", tools=[flaky])
    fake.enqueue(
        tool_calls=[
            {"name": "flaky", "arguments": {"x": 1}},
            {"name": "flaky", "arguments": {"x": 2}},
        ],
        usage=_usage(300, 20),
    )
    fake.enqueue("done", usage=_usage(300, 20))
    assert cheap.send("use the tool").status == "completed"
    return Filled(db, priced.id, cheap.id, mystery.id, cut)


@contextmanager
def prices() -> Iterator[None]:
    """The two known prices, registered for the duration."""
    register_price(PRICED, input_per_mtok=1.0, output_per_mtok=2.0)
    register_price(CHEAP, input_per_mtok=0.5, output_per_mtok=1.0)
    try:
        yield
    finally:
        forget_price(PRICED)
        forget_price(CHEAP)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    db = str(tmp_path_factory.mktemp("plot") / "chats.duckdb")
    with prices(), FakeOpenAIServer() as fake:
        yield fill_store(db, fake)


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def across(ax: Axes) -> bool:
    """Horizontal bars (sessions, notebooks): drawn first row on top, so y runs down."""
    return bool(ax.yaxis_inverted())


def bars(ax: Axes) -> dict[str, list[float]]:
    """Each bar series' label and lengths, in the chart's order (left to right, or down)."""
    length = "get_width" if across(ax) else "get_height"
    return {c.get_label(): [float(getattr(p, length)()) for p in c] for c in ax.containers}


def ticks(ax: Axes) -> list[str]:
    """The bars' labels, in the chart's order."""
    return [t.get_text() for t in (ax.get_yticklabels() if across(ax) else ax.get_xticklabels())]


def legend(ax: Axes) -> list[str]:
    shown = ax.get_legend()
    assert shown is not None
    return [t.get_text() for t in shown.get_texts()]


def hatched(ax: Axes) -> dict[str, tuple[float, float]]:
    """The hatched 'price unknown' columns: (place of the bar, where they start) by gid."""
    if across(ax):
        return {
            str(p.get_gid()): (p.get_y() + p.get_height() / 2, p.get_x())
            for p in ax.patches
            if str(p.get_gid()).startswith("unknown-bar:")
        }
    return {
        str(p.get_gid()): (p.get_x() + p.get_width() / 2, p.get_y())
        for p in ax.patches
        if str(p.get_gid()).startswith("unknown-bar:")
    }


def marks(ax: Axes) -> dict[str, tuple[float, float]]:
    """Where each '? N' note points, (along the bar, place of the bar) by gid."""
    points = {str(t.get_gid()): t.xy for t in ax.texts if t.get_gid()}  # type: ignore[attr-defined]
    return {gid: (float(x), float(y)) for gid, (x, y) in points.items()}


def notes(ax: Axes) -> dict[str, str]:
    """Texts with a gid (the '? N' marks over bars), by gid."""
    return {str(t.get_gid()): t.get_text() for t in ax.texts if t.get_gid()}


# --------------------------------------------------------------------------- costs


def test_costs_by_model_draws_known_dollars_and_counts_unknown_price_requests(
    filled: Filled,
) -> None:
    ax = nbchat.plot.costs(by="model", db=filled.db)
    assert ticks(ax) == [PRICED, CHEAP, MYSTERY]  # most expensive first, unknown last
    heights = bars(ax)
    assert set(heights) == {PRICED, CHEAP}  # the unknown model has no dollar bar at all
    assert heights[PRICED] == pytest.approx([0.006, 0, 0])  # 3000 in, 1500 out at $1/$2
    assert heights[CHEAP] == pytest.approx([0, 2 * (300 * 0.5 + 20) / 1e6, 0])
    assert notes(ax) == {f"unknown:{MYSTERY}": "? 1"}
    assert hatched(ax) == {f"unknown-bar:{MYSTERY}": (2, 0)}  # open-ended, not a 0 bar
    assert "cost unknown: 1 request\nmarked ? N; not drawn" in legend(ax)
    assert ax.get_title() == "Cost by model — 1 request of unknown cost"


def test_costs_by_day_match_the_costs_frame(filled: Filled) -> None:
    ax = nbchat.plot.costs(db=filled.db)  # by="day"
    frame = nbchat.costs(by="day", db=filled.db)
    assert ticks(ax) == [str(day) for day in frame["day"]]
    stacked = [sum(col) for col in zip(*bars(ax).values(), strict=True)]
    assert stacked == pytest.approx(list(frame["cost_usd"]))
    assert list(notes(ax).values()) == [f"? {n}" for n in frame["unknown_cost_requests"]]


def test_costs_by_session_and_notebook_label_groups_and_keep_the_top(filled: Filled) -> None:
    ax = nbchat.plot.costs(by="session", db=filled.db)
    assert ticks(ax) == [
        f"Priced work · {filled.priced[:8]}",
        f"Cheap tools · {filled.cheap[:8]}",
        f"third · {filled.mystery[:8]}",  # untitled sessions take their first question
    ]
    top = nbchat.plot.costs(by="session", db=filled.db, top=1)
    assert ticks(top) == [f"Priced work · {filled.priced[:8]}"] and notes(top) == {}

    by_notebook = nbchat.plot.costs(by="notebook", db=filled.db)
    assert ticks(by_notebook) == ["analysis.ipynb", "(no notebook)"]
    assert bars(by_notebook)[PRICED] == pytest.approx([0.006, 0])
    # Lying across, unknown prices are a label at the end of the known part of the bar,
    # not a hatched length to the axes' end (which read as the largest cost).
    assert notes(by_notebook) == {"unknown:(no notebook)": "? 1 · cost unknown"}
    assert hatched(by_notebook) == {}
    assert marks(by_notebook) == {
        "unknown:(no notebook)": (pytest.approx(2 * (300 * 0.5 + 20) / 1e6), 1)
    }
    ARTIFACTS.mkdir(exist_ok=True)
    ax.figure.savefig(ARTIFACTS / "costs.png", dpi=100)  # the README's docs/costs.png
    assert (ARTIFACTS / "costs.png").read_bytes()[:4] == b"\x89PNG"


def test_long_session_and_notebook_labels_lie_across_with_the_legend_below(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    db = str(tmp_path / "long.duckdb")
    model = "provider/a-model-with-a-rather-long-name-latest"
    register_price(model, input_per_mtok=1.0, output_per_mtok=2.0)
    try:
        for i in range(4):
            fake.enqueue("ok", usage=_usage(1000 * (i + 1), 100))
            nbchat.Session(
                model=model if i else MYSTERY,
                base_url=fake.url,
                api_key="k",
                db=db,
                title=f"Quarterly revenue analysis for the northern region, part {i}",
                notebook=f"/home/me/a_very_long_notebook_name_for_the_project_{i}_final.ipynb",
            ).send("hi")
    finally:
        forget_price(model)
    for by in ("session", "notebook"):
        ax = nbchat.plot.costs(by=by, db=db)  # type: ignore[arg-type]
        assert across(ax) and ax.get_xticklabels()[0].get_text().startswith("$")
        labels = ticks(ax)
        assert len(labels) == 4 and all(len(t) <= 40 for t in labels)
        if by == "notebook":  # cut in the middle: names alike differ at their ends
            assert labels[0] == "a_very_long_notebook_name_…3_final.ipynb"
        else:
            assert labels[0].startswith("Quarterly revenue analysis f… · ")
        # The unknown one, last: a label at $0, and nothing as long as a cost.
        assert hatched(ax) == {} and list(marks(ax).values()) == [(0, 3)]
        assert list(notes(ax).values()) == ["? 1 · cost unknown"]
        widest = max(p.get_x() + p.get_width() for p in ax.patches)  # type: ignore[attr-defined]
        assert ax.get_xlim()[1] < 1.5 * widest  # the scale is the known costs'
        legend_handles = ax.get_legend().legend_handles  # type: ignore[union-attr]
        assert not legend_handles[-1].get_hatch()  # no hatched swatch for a label
        figure = ax.figure
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
        box, shown = ax.get_window_extent(), ax.get_legend()
        assert shown is not None
        where = shown.get_window_extent(renderer)
        assert where.y1 < box.y0  # under the axes (and their labels), not beside them
        assert box.x1 > 0.9 * figure.bbox.width  # the axes reach the figure's right side
        figure.savefig(tmp_path / f"{by}.png", dpi=80)
    tokens = nbchat.plot.tokens(by="session", db=db)
    assert across(tokens) and sum(bars(tokens)["input"]) == 1000 + 2000 + 3000 + 4000
    assert nbchat.plot.tokens(by="model", db=db).get_legend() is not None
    assert not across(nbchat.plot.costs(by="day", db=db))


LONG = "a-very-long-model-name-from-some-provider/with-a-path-v2-instruct-2026"


def _ranked_store(db: str, fake: FakeOpenAIServer) -> None:
    """Two priced sessions, two of a free model (more requests), two of a long-named
    model without a price: one with 2 requests, one with 1."""
    register_price("free-local", input_per_mtok=0.0, output_per_mtok=0.0)
    try:
        for model, sends in [(PRICED, 1), (PRICED, 1), ("free-local", 3), ("free-local", 3),
                             (LONG, 2), (LONG, 1)]:  # fmt: skip
            session = nbchat.Session(model=model, base_url=fake.url, api_key="k", db=db)
            for _ in range(sends):
                fake.enqueue("ok", usage=_usage(1000, 100))
                session.send("hi")
    finally:
        forget_price("free-local")


def test_sessions_of_unknown_cost_are_not_hidden_behind_free_ones(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    db = str(tmp_path / "ranked.duckdb")
    with prices():
        _ranked_store(db, fake)
    ax = nbchat.plot.costs(by="session", db=db, top=3)
    # The priced ones, then the one with more requests of unknown price: it may have
    # cost anything, the free ones cost $0.
    assert len(ticks(ax)) == 3 and bars(ax)[PRICED][2] == 0
    assert list(notes(ax).values()) == ["? 2 · cost unknown"]
    # The whole range's unknown-price requests, with the one in a session not shown.
    assert ax.get_title() == (
        "Cost by session, top 3 of 6 — 3 requests of unknown cost (1 in sessions not shown)"
    )
    # Each bar says "cost unknown" beside it: no legend entry without a swatch (a trial).
    assert not [label for label in legend(ax) if "unknown" in label]
    everything = nbchat.plot.costs(by="session", db=db)
    assert everything.get_title() == "Cost by session — 3 requests of unknown cost"
    assert list(notes(everything).values()) == ["? 2 · cost unknown", "? 1 · cost unknown"]


def test_costs_by_model_names_models_under_their_bars_only(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    db = str(tmp_path / "long.duckdb")
    with prices():
        _ranked_store(db, fake)
    ax = nbchat.plot.costs(by="model", db=db)
    assert ticks(ax) == [PRICED, "a-very-long-model-name-fro…instruct-2026", "free-local"]
    # No legend of the names again: only what the hatching means.
    assert legend(ax) == ["cost unknown: 3 requests\nmarked ? N; not drawn"]
    figure = ax.figure
    figure.canvas.draw()
    assert ax.get_window_extent().width > 0.42 * figure.bbox.width  # was 0.35: a wide legend
    # By day, the free model's swatch matches no bar: its label says $0 (a trial).
    by_day = nbchat.plot.costs(by="day", db=db)
    assert "free-local ($0)" in legend(by_day) and PRICED in legend(by_day)


def test_only_unknown_prices_draw_no_dollars(filled: Filled) -> None:
    ax = nbchat.plot.costs(by="model", db=filled.db, since=filled.cut)
    assert ticks(ax) == [CHEAP, MYSTERY]
    assert bars(ax) == {CHEAP: pytest.approx([0.00034, 0])}
    mystery_only = _only_mystery(filled)
    assert bars(mystery_only) == {} and notes(mystery_only) == {f"unknown:{MYSTERY}": "? 1"}
    assert hatched(mystery_only) == {f"unknown-bar:{MYSTERY}": (0, 0)}
    assert list(mystery_only.get_yticks()) == []  # no dollar scale to misread as $0
    assert "1 request of unknown cost" in mystery_only.get_title()


def _only_mystery(filled: Filled) -> Axes:
    """A chart over the mystery session's single request: the window around it."""
    (stamp,) = nbchat.usage(db=filled.db, session_id=filled.mystery)["created_at"]
    return nbchat.plot.costs(by="model", db=filled.db, since=stamp, until=stamp)


def test_since_and_until_pick_a_window_and_whole_days(filled: Filled) -> None:
    today = dt.datetime.now(dt.UTC).date()
    tomorrow = today + dt.timedelta(days=1)
    later = nbchat.plot.costs(by="model", db=filled.db, since=filled.cut)
    earlier = nbchat.plot.costs(by="model", db=filled.db, until=filled.cut)
    assert ticks(later) == [CHEAP, MYSTERY] and ticks(earlier) == [PRICED]
    assert ticks(nbchat.plot.costs(by="model", db=filled.db, until=today)) == [
        PRICED,
        CHEAP,
        MYSTERY,
    ]  # a date is the whole day
    empty = nbchat.plot.costs(db=filled.db, since=str(tomorrow))
    assert bars(empty) == {} and [t.get_gid() for t in empty.texts] == ["empty"]
    assert [t.get_text() for t in empty.texts] == ["no requests in this range"]
    assert not empty.axison  # no frame, no 0-to-1 ticks that read as a scale


def test_a_chart_of_an_empty_store_says_nothing_is_stored_yet(tmp_path: Path) -> None:
    db = str(tmp_path / "empty.duckdb")
    nbchat.Store.open(db).close()
    for ax in (nbchat.plot.costs(db=db), nbchat.plot.tokens(db=db), nbchat.plot.latency(db=db)):
        assert [t.get_text() for t in ax.texts] == ["no requests stored yet"]
        assert not ax.axison and ax.get_title()
    context = nbchat.plot.context("no-such-session", db=db)
    assert [t.get_text() for t in context.texts] == ["no chat requests in this session"]


# --------------------------------------------------------------------------- tokens


def test_tokens_split_input_cached_and_output(filled: Filled) -> None:
    ax = nbchat.plot.tokens(by="model", db=filled.db)
    assert ticks(ax) == [PRICED, CHEAP, MYSTERY]
    assert bars(ax) == {
        "input": [3000 - 400, 600, 100],
        "cached input": [400, 0, 0],
        "output": [1500, 40, 50],
    }
    assert "reported no tokens" not in ax.get_title()


def test_requests_without_token_counts_are_noted(tmp_path: Path, fake: FakeOpenAIServer) -> None:
    db = str(tmp_path / "silent.duckdb")
    s = nbchat.Session(model="chart-silent", base_url=fake.url, api_key="sk-test", db=db)
    fake.enqueue("counted", usage=_usage(10, 5))
    fake.enqueue("not counted", usage=None)
    s.send("one")
    s.send("two")
    figure = plt.figure()
    ax = figure.add_subplot()
    assert nbchat.plot.tokens(by="model", db=db, ax=ax) is ax  # drawn where asked
    assert ax.get_title() == "Tokens by model — 1 request reported no tokens"
    assert bars(ax) == {"input": [10], "cached input": [0], "output": [5]}


# --------------------------------------------------------------------------- latency


def test_latency_boxes_show_each_models_medians(filled: Filled) -> None:
    ax = nbchat.plot.latency(db=filled.db)
    assert ticks(ax) == sorted([PRICED, CHEAP, MYSTERY])
    medians = {str(line.get_gid()): line.get_ydata()[0] for line in ax.lines if line.get_gid()}
    frame = nbchat.usage(db=filled.db)
    for model in (PRICED, CHEAP, MYSTERY):
        rows = frame[frame["model"] == model]
        for column in ("ttft_ms", "duration_ms"):
            expected = float(rows[column].astype(float).median()) / 1000
            assert medians[f"median:{column}:{model}"] == pytest.approx(expected)
    assert legend(ax) == ["time to first token", "whole request"]


def test_latency_leaves_failed_requests_out_and_cuts_long_model_names(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    db = str(tmp_path / "failed.duckdb")
    session = nbchat.Session(model=LONG, base_url=fake.url, api_key="k", db=db, max_retries=0)
    fake.enqueue("ok", usage=_usage(10, 5), delay=0.05)
    session.send("hi")
    fake.enqueue_error(400, "bad")  # back in milliseconds, with no first token
    session.send("again")
    ax = nbchat.plot.latency(db=db)
    assert ax.get_title() == "Latency per model — 1 request failed, left out"
    (ok,) = nbchat.usage(db=db).query("error.isna()")["duration_ms"]
    medians = {str(ln.get_gid()): ln.get_ydata()[0] for ln in ax.lines if ln.get_gid()}
    assert medians[f"median:duration_ms:{LONG}"] == pytest.approx(ok / 1000)
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "a-very-long-model-name-fro…instruct-2026"
    ]
    ax.figure.canvas.draw()
    shown = ax.get_legend()
    assert shown is not None
    where = shown.get_window_extent()
    assert not any(where.overlaps(t.get_window_extent()) for t in ax.get_xticklabels())


def test_one_cold_start_does_not_squash_the_latency_boxes() -> None:
    """One 5 s request among 0.2 s ones: on a linear scale every box was a flat line
    under its whisker; the seconds go on a log scale, and the axis says so."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.cbook import boxplot_stats

    from nbchat._plot_draw import latency_boxes

    warm = [0.15, 0.18, 0.2, 0.24, 0.28, 0.3, 0.35]
    samples = {
        ("m", "ttft_ms"): [5.0, *warm],  # the cold start
        ("m", "duration_ms"): [9.0, *(2 * w for w in warm)],
    }
    _, ax = plt.subplots()
    latency_boxes(ax, ["m"], lambda *which: boxplot_stats(np.array(samples[which]))[0], "L")
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "seconds (log scale)"
    height = ax.bbox.height
    for patch in ax.patches:
        box = patch.get_window_extent()
        # Linear, the boxes were under 2% of the height.
        assert box.height > 0.08 * height, (patch.get_gid(), box.height, height)
    # A 0 s time cannot go on a log scale: linear near 0, logarithmic above, from 0 up.
    samples[("m", "ttft_ms")] = [0.0, *warm, 5.0]
    _, ax = plt.subplots()
    latency_boxes(ax, ["m"], lambda *which: boxplot_stats(np.array(samples[which]))[0], "L")
    assert ax.get_yscale() == "symlog" and ax.get_ylabel() == "seconds (log scale)"
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 9.0


def test_latency_of_similar_requests_stays_linear(filled: Filled) -> None:
    ax = nbchat.plot.latency(db=filled.db)
    assert ax.get_yscale() == "linear" and ax.get_ylabel() == "seconds"


# --------------------------------------------------------------------------- context


def test_context_marks_each_compaction_between_the_requests(tmp_path: Path) -> None:
    db = str(tmp_path / "long.duckdb")
    with FakeOpenAIServer(fallback="Noted.") as fake:
        s = nbchat.Session(
            model="chart-long", base_url=fake.url, api_key="sk-test", db=db,
            context_window=1_000, keep_last_n=2,
        )  # fmt: skip
        for i in range(12):
            s.send(f"note {i}: " + "lorem ipsum " * 20)
    ax = nbchat.plot.context(s.id, db=db)
    chat = nbchat.usage(db=db, session_id=s.id)
    chat = chat[chat["purpose"] == "chat"].reset_index(drop=True)
    (line,) = [x for x in ax.lines if x.get_gid() == "prompt_tokens"]
    assert list(line.get_ydata()) == [float(v) for v in chat["prompt_tokens"]]
    folded = nbchat.compactions(db=db, session_id=s.id)
    assert len(folded) >= 1 and folded["error"].isna().all()
    marks = {str(x.get_gid()): x.get_xdata()[0] for x in ax.lines if x.get_gid() != "prompt_tokens"}
    for row in folded.itertuples():
        before = int((chat["created_at"] <= row.created_at).sum())
        assert marks[f"compaction:{row.id}"] == before + 0.5
        # the prompt right after a compaction is smaller than the one before it
        assert chat["prompt_tokens"][before] < chat["prompt_tokens"][before - 1]
    assert legend(ax) == ["prompt tokens", "compaction"]


# --------------------------------------------------------------------------- the magic


def test_plot_for_magic_returns_a_png_of_the_chart_asked_for(filled: Filled) -> None:
    nbchat.configure(db=filled.db)
    image = plot_for_magic(["model", "--plot"])
    assert image.format == "png" and image.data[:4] == b"\x89PNG"
    (ax,) = magic_figure(["session", "--plot", "--tokens", "--since", str(filled.cut)]).axes
    assert ax.get_title() == "Tokens by session"
    assert ticks(ax) == [f"Cheap tools · {filled.cheap[:8]}", f"third · {filled.mystery[:8]}"]
    with pytest.raises(UsageError, match="unknown argument 'weekly'"):
        plot_for_magic(["weekly", "--plot"])
    with pytest.raises(UsageError, match="--since needs a date"):
        plot_for_magic(["--plot", "--since"])


def test_plot_is_a_module_of_charts() -> None:
    # A new-user trial wrote `import nbchat.plot`, which failed while plot was an object.
    code = (
        "import nbchat.plot\n"
        "from nbchat.plot import costs\n"
        "from nbchat import plot\n"
        "assert plot is nbchat.plot and costs is plot.costs, (plot, costs)\n"
        "assert sorted(plot.__all__) == ['context', 'costs', 'latency', 'tokens']\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert nbchat.plot.costs.__module__ == "nbchat._plot"


# --------------------------------------------------------------------------- many bars, PNGs


def test_many_days_are_one_shape_per_model_at_each_days_cost() -> None:
    import numpy as np
    import pandas as pd

    from nbchat._plot_draw import draw_costs

    days = [f"2026-03-{d:02d}" for d in range(1, 32)] + [f"2026-04-{d:02d}" for d in range(1, 10)]
    groups = pd.DataFrame(
        {
            "key": days * 2,
            "model": ["a"] * len(days) + ["b"] * len(days),
            "cost_usd": [0.01 * (i + 1) for i in range(len(days))] + [0.5] * len(days),
            "requests": [1] * (2 * len(days)),
            "unknown": [0] * len(days) + [2 if i == 3 else 0 for i in range(len(days))],
        }
    )
    figure = plt.figure()
    ax = draw_costs(figure.subplots(), groups, "day")
    shapes = {c.get_gid(): c.get_paths()[0] for c in ax.collections}
    assert set(shapes) == {"bar:a", "bar:b", "unknown-bars"}

    def spans(gid: str, day: int) -> tuple[float, float]:  # the shape over a day (to 0.5e-3)
        inside = [y for y in np.linspace(0, 1.5, 3001) if shapes[gid].contains_point((day, y))]
        return min(inside), max(inside)

    for day in range(len(days)):  # a's cost that day, and b's stacked on it
        a = 0.01 * (day + 1)
        assert spans("bar:a", day) == pytest.approx((0, a), abs=1e-3)
        assert spans("bar:b", day) == pytest.approx((a, a + 0.5), abs=1e-3)
    top = ax.get_ylim()[1]
    assert top == pytest.approx(1.25 * (0.01 * len(days) + 0.5))  # headroom over the top bar
    assert spans("unknown-bars", 3) == pytest.approx((0.04 + 0.5, top), abs=1e-3)
    assert not any(shapes["unknown-bars"].contains_point((2, y)) for y in (0.6, 1.0))
    assert legend(ax) == ["a", "b", "cost unknown: 2 requests\nnot drawn"]


def test_a_tight_png_is_what_was_drawn_and_grows_for_a_long_legend() -> None:
    import io

    from matplotlib.figure import Figure
    from PIL import Image

    from nbchat._plot_png import figure_png

    def png(label: str) -> tuple[int, int]:
        figure = Figure(figsize=(6, 3))
        figure.subplots_adjust(left=0.15, right=0.7)
        ax = figure.subplots()
        ax.plot([0, 1], [0, 1], label=label)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        data = figure_png(figure, dpi=50, tight=True)
        assert data[:4] == b"\x89PNG"
        size: tuple[int, int] = Image.open(io.BytesIO(data)).size
        return size

    short, long = png("a"), png("a label far longer than the room beside the axes " * 2)
    assert short[0] < 6 * 50  # cut to what was drawn
    assert long[0] > 6 * 50  # grown: the legend is not cut off
    assert abs(short[1] - long[1]) <= 3  # the same height (cut by pixels, or by extents)


def test_dollar_signs_in_titles_notebooks_and_model_names_are_drawn_as_they_are(
    tmp_path: Path, fake: FakeOpenAIServer
) -> None:
    # Text from users and servers: a pair of $ would be mathtext (set in italics, or a
    # bad formula failing the whole draw), so every label escapes it.
    db = str(tmp_path / "dollars.duckdb")
    for title, model, notebook in (
        ("costs $5 and $20", "m$1", "/nb/$HOME and $PATH.ipynb"),
        (r"a $\frac{$ b", r"x$\alpha$", None),
    ):
        register_price(model, input_per_mtok=1.0, output_per_mtok=2.0)
        fake.enqueue("ok", usage=_usage(100, 10))
        session = nbchat.Session(
            model=model, base_url=fake.url, api_key="k", db=db, title=title, notebook=notebook
        )
        try:
            assert session.send("hi").status == "completed"
        finally:
            forget_price(model)
    charts = {
        "session": nbchat.plot.costs(by="session", db=db),
        "notebook": nbchat.plot.costs(by="notebook", db=db),
        "model": nbchat.plot.tokens(by="model", db=db),
        "latency": nbchat.plot.latency(db=db),
    }
    for ax in charts.values():
        ax.figure.canvas.draw()  # a bad formula raised here
    assert sorted(t.split(" · ")[0] for t in ticks(charts["session"])) == [
        r"a \$\frac{\$ b",
        r"costs \$5 and \$20",
    ]
    assert r"\$HOME and \$PATH.ipynb" in ticks(charts["notebook"])
    assert set(ticks(charts["latency"])) == {r"m\$1", r"x\$\alpha\$"}
    assert {r"m\$1", r"x\$\alpha\$"} <= set(legend(charts["session"]))
    for ax in charts.values():  # and none of them is read as mathtext
        texts = [*ax.get_xticklabels(), *ax.get_yticklabels()]
        texts += ax.get_legend().get_texts() if ax.get_legend() else []
        assert not any(matplotlib.cbook.is_math_text(t.get_text()) for t in texts)
    board = nbchat.dashboard(db=db)  # its charts draw the same labels
    assert board.spend.value and board.by_model.value and board.latency.value


def test_free_models_only_draw_a_scale_from_zero_that_says_so() -> None:
    import pandas as pd

    from nbchat._plot_draw import draw_costs

    # A trial's %chat cost --plot after local-model turns: no bar, and a y axis from
    # -$0.04 to $0.04.
    groups = pd.DataFrame(
        {
            "key": ["2026-12-01"],
            "model": ["local/smollm2"],
            "cost_usd": [0.0],
            "requests": [3],
            "unknown": [0],
        }
    )
    ax = draw_costs(plt.figure().subplots(), groups, "day")
    assert ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.texts] == [
        r"every known cost is \$0 (free models or failed requests)"
    ]
    paid = groups.assign(cost_usd=[0.25])
    ax = draw_costs(plt.figure().subplots(), paid, "day")
    assert ax.get_ylim()[0] == 0.0 and len(ax.texts) == 0
    # "known costs", not "known prices": a priced request can be of unknown cost (cut).
    assert ax.get_ylabel() == "cost (USD, known costs)"
    # With requests of unknown price too, their "? N" marks fill the axes: a note in the
    # middle was drawn over them (a trial), so the axis label says it.
    for by in ("day", "session"):
        mixed = groups.assign(unknown=[2])
        ax = draw_costs(plt.figure().subplots(), mixed, by)
        label = (ax.get_xlabel() if by == "session" else ax.get_ylabel()).replace("\\", "")
        assert label == "cost (USD): every known cost is $0"
        ticks = ax.get_xticklabels() if by == "session" else ax.get_yticklabels()
        assert [t.get_text().replace("\\", "") for t in ticks] == ["$0.00"]  # no "$1.00"
        assert [t.get_text() for t in ax.texts] == (
            ["? 2 · cost unknown"] if by == "session" else ["? 2"]
        )
