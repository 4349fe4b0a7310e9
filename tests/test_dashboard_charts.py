"""The dashboard's charts (``_dashboard_charts``): a chart whose figures move a little has
its data artists set and drawn again over the picture it kept of the rest; checked on the
Axes' data against the same figures drawn afresh, never on pixels.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from nbchat._dashboard_charts import CostScene, LatencyScene, LiveChart, Scene, png_of

MODELS = ["alpha", "beta", "gamma"]


def spend(days: int, bump: float = 0.0, unknown: int = 2) -> pd.DataFrame:
    """``overview().spend``-shaped rows keyed by day: each model's cost on each day;
    ``bump`` added to beta's last day; ``unknown`` requests of unknown price on gamma's
    second day."""
    keys = [f"2026-{1 + d // 28:02d}-{1 + d % 28:02d}" for d in range(days)]
    rows = []
    for i, model in enumerate(MODELS):
        for d, key in enumerate(keys):
            cost = 0.0003 + 0.01 * (i + 1) * (1 + d % 5)
            cost += bump if model == "beta" and d == days - 1 else 0
            missing = unknown if model == "gamma" and d == 1 else 0
            rows.append((key, model, cost, 3, missing))
    return pd.DataFrame(rows, columns=["key", "model", "cost_usd", "requests", "unknown"])


def by_model(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(key=frame["model"])


def latency(shift: float = 0.0) -> pd.DataFrame:
    """``overview().latency``-shaped quantiles (ms), every box moved by ``shift`` ms."""
    rows = [
        (model, metric, 100, [base + k * step + shift for k in range(5)])
        for i, model in enumerate(MODELS)
        for metric, base, step in (("ttft_ms", 100.0 * (i + 1), 50.0), ("duration_ms", 900, 300))
    ]
    return pd.DataFrame(rows, columns=["model", "metric", "n", "quantiles"])


def shown(ax: Axes) -> dict[str, Any]:
    """What a chart shows, artist by artist."""

    def patch(p: Any) -> tuple[Any, ...]:
        if isinstance(p, Rectangle):
            return (p.get_gid(), p.get_x(), p.get_y(), p.get_width(), p.get_height())
        return (p.get_gid(), tuple(p.get_path().get_extents().bounds))

    legend = ax.get_legend()
    return {
        "title": ax.get_title(),
        "ylim": ax.get_ylim(),
        "yticks": [t.get_text() for t in ax.get_yticklabels()],
        "xticks": [t.get_text() for t in ax.get_xticklabels()],
        "legend": [] if legend is None else [t.get_text() for t in legend.get_texts()],
        "patches": [patch(p) for p in ax.patches],
        "lines": [(ln.get_gid(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines],
        "shapes": [
            (c.get_gid(), [p.vertices.round(12).tolist() for p in c.get_paths()])
            for c in ax.collections
        ],
        "texts": [(t.get_gid(), t.get_text(), tuple(getattr(t, "xy", ()))) for t in ax.texts],
    }


def drawn_afresh(scene: Scene, right: float = 0.7) -> dict[str, Any]:
    chart = LiveChart(right)
    chart.picture(scene)
    return shown(chart.ax)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("a few bars, one marked unknown", lambda b: CostScene(by_model(spend(3, b)), "model")),
        ("a bar a day for 60 days", lambda b: CostScene(spend(60, b), "day")),
        ("every price known", lambda b: CostScene(by_model(spend(3, b, unknown=0)), "model")),
        ("latency boxes", lambda b: LatencyScene(latency(10_000 * b), sampled=True)),
    ],
)
def test_figures_that_move_a_little_redraw_only_the_data_over_the_kept_picture(
    name: str, make: Any
) -> None:
    chart = LiveChart()
    chart.picture(make(0.0))
    kept = chart._background
    moved = make(0.002)
    assert shown(chart.ax) != drawn_afresh(moved)
    assert chart.picture(moved)[:4] == b"\x89PNG"
    assert chart._background is kept, "the picture around the data was kept"
    assert shown(chart.ax) == drawn_afresh(moved), "the same chart as drawn whole"


@pytest.mark.parametrize("days", [3, 60])
def test_figures_that_move_less_than_a_256th_of_a_pixel_keep_the_picture(days: int) -> None:
    chart = LiveChart()
    first = chart.picture(CostScene(spend(days), "day"))
    tiny = CostScene(spend(days, bump=1e-9), "day")  # a billionth of a dollar more
    assert chart.picture(tiny) is first
    assert shown(chart.ax) == drawn_afresh(tiny)  # the Axes carry the new figures
    more = CostScene(spend(days, bump=0.01), "day")  # a cent: a pixel or more
    assert chart.picture(more) is not first
    assert shown(chart.ax) == drawn_afresh(more)


def test_a_new_layout_draws_the_whole_chart_again() -> None:
    chart = LiveChart()
    chart.picture(CostScene(spend(30), "day"))
    kept = chart._background
    longer = CostScene(spend(31), "day")  # a new day: a new bar and new tick labels
    chart.picture(longer)
    assert chart._background is not kept
    assert shown(chart.ax) == drawn_afresh(longer)
    more_unknown = CostScene(spend(31, unknown=5), "day")  # the title and legend change
    kept = chart._background
    chart.picture(more_unknown)
    assert chart._background is not kept
    assert "5 requests of unknown cost" in chart.ax.get_title()
    assert shown(chart.ax) == drawn_afresh(more_unknown)


def test_dashboard_text_is_a_size_up_on_both_paths() -> None:
    """Shown at half the dashboard's width, 10-point text read as ~6 px (a trial): the
    charts draw theirs at 12 points, whole or over the kept picture, and leave the
    user's own matplotlib settings as they were."""
    import matplotlib

    default = matplotlib.rcParams["font.size"]
    chart = LiveChart()

    def sizes() -> set[float]:
        ticks = [*chart.ax.get_xticklabels(), *chart.ax.get_yticklabels()]
        chart.figure.canvas.draw()  # tick labels are made when drawn
        return {t.get_fontsize() for t in ticks if t.get_text()}

    chart.picture(CostScene(spend(3), "day"))
    assert sizes() == {12.0} and chart.ax.title.get_fontsize() > 12
    chart.picture(CostScene(spend(3, bump=0.002), "day"))  # over the kept picture
    assert sizes() == {12.0}
    assert matplotlib.rcParams["font.size"] == default


def test_the_y_scale_ends_at_a_round_tick_above_the_data() -> None:
    chart = LiveChart()
    chart.picture(CostScene(by_model(spend(3, unknown=0)), "model"))
    tallest = max(p.get_y() + p.get_height() for p in chart.ax.patches)
    bottom, top = chart.ax.get_ylim()
    assert bottom == 0 and top >= 1.05 * tallest
    assert top in chart.ax.get_yticks()  # the scale ends at a labelled tick
    # room for the open hatched column above a bar of unknown price
    chart.picture(CostScene(by_model(spend(3)), "model"))
    assert chart.ax.get_ylim()[1] >= 1.25 * tallest
    hatch = next(p for p in chart.ax.patches if p.get_gid() == "unknown-bar:gamma")
    assert hatch.get_y() + hatch.get_height() == chart.ax.get_ylim()[1]  # up to the top
    chart.picture(LatencyScene(latency(), sampled=False))
    assert chart.ax.get_ylim() == (0.0, 2.25)  # the longest whisker ends at 2.1 s


def test_a_range_with_nothing_in_it_is_said() -> None:
    chart = LiveChart()
    empty = pd.DataFrame(columns=["key", "model", "cost_usd", "requests", "unknown"])
    chart.picture(CostScene(empty, "day"))
    assert [t.get_gid() for t in chart.ax.texts] == ["empty"]
    chart.picture(LatencyScene(latency().iloc[:0], sampled=False))
    assert [t.get_text() for t in chart.ax.texts] == ["no requests in this range"]
    assert not chart.ax.axison
    chart.picture(LatencyScene(latency(), sampled=False))  # the same chart, with data again
    assert chart.ax.axison and chart.ax.get_ylim() == (0.0, 2.25)


def test_png_of_keeps_every_pixel() -> None:
    from PIL import Image

    pixels = np.random.default_rng(7).integers(0, 256, size=(31, 47, 4), dtype=np.uint8)
    data = png_of(pixels)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)


def test_a_latency_chart_on_a_log_scale_draws_without_a_warning() -> None:
    # One slow model (a cold start) puts the seconds on a log scale; setting a bottom of
    # 0 on it warned on every dashboard (an error here: filterwarnings = error).
    slow = latency()
    slow.loc[0, "quantiles"] = [100.0, 110.0, 120.0, 130.0, 30_000.0]
    chart = LiveChart()
    chart.picture(LatencyScene(slow, sampled=False))
    assert chart.ax.get_yscale() == "log" and chart.ax.get_ylim()[0] > 0
