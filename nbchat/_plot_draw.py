"""How the charts are drawn on a matplotlib ``Axes``: bars, boxes, legends and labels.

Cost and token bars stacked by model (``stack_bars``; horizontal for sessions' and
notebooks' long labels, one filled shape per model past ``MANY`` bars), the marks of
requests of unknown price (hatched open columns, "? N" labels: never a bar of $0),
latency boxes with a legend under the axes, dollar ticks, and text set as it is
(``plain``: a ``$`` in a name is not mathtext). The figures come from ``_plot_data``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._plot_data import MANY, TOP, cost_bars, quantile_boxes, requests_n

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

    from ._plot_data import CostBars

__all__ = [
    "LATENCY_METRICS",
    "NOTHING_IN_RANGE",
    "bars_across",
    "draw_cost_bars",
    "draw_costs",
    "draw_latency_quantiles",
    "empty_chart",
    "latency_boxes",
    "legend_place",
    "new_axes",
    "plain",
    "stack_bars",
    "stacked",
    "step_outline",
    "usd_ticks",
]


_UNKNOWN_HATCH = "///"
_FREE_NOTE = "every known cost is $0 (free models or failed requests)"
_OUTSIDE: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}
_LEGEND_ROW = 60  # characters of labels side by side in a legend under the axes
_BELOW_POINTS = 32  # a legend under the axes: below their tick labels and axis label
_LABEL_CHARS = 40  # a longer label (a notebook's name) is cut, with "…" in the middle


def draw_costs(ax: Axes, groups: pd.DataFrame, by: str, top: int = TOP) -> Axes:
    """Draw ``cost_groups``-shaped rows: known dollars stacked by model, unknown marked."""
    bars = cost_bars(groups, by, top)
    return empty_chart(ax, f"Cost by {by}") if bars is None else draw_cost_bars(ax, bars)


def draw_cost_bars(ax: Axes, bars: CostBars) -> Axes:
    """Draw ``cost_bars`` figures: known dollars stacked by model, unknown marked."""
    order, table, totals, missing = bars.order, bars.table, bars.totals, bars.missing
    across = bars_across(bars.by, order)
    stack_bars(ax, table, order, across=across)
    # By model, each bar is its model's, named under it: a legend of the names again
    # (one long name was wider than the chart) would only narrow the axes.
    named = bars.by == "model"
    free = totals is not None and bars.free
    if free:  # bars of height 0: a scale from $0 (not -$0.04 to $0.04), set before the marks
        (ax.set_xlim if across else ax.set_ylim)(0, 1)
    if missing:
        _mark_unknown(ax, order, bars.unknown, totals, across=across)
    handles, labels = ([], []) if named else ax.get_legend_handles_labels()
    # A model whose bars are all $0 has a swatch and no bar to match it: it says $0.
    zero = {plain(str(c)) for c in table.columns if not float(table[c].sum())}
    labels = [f"{label} ($0)" if label in zero else label for label in labels]
    if missing and not across:  # horizontal bars say "cost unknown" beside each bar
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="none", edgecolor="0.5", hatch=_UNKNOWN_HATCH))
        marks = "" if bars.many else "marked ? N; "  # many bars carry no "? N" labels
        here = " shown" if bars.hidden else ""  # the title gives the range's count
        labels.append(f"cost unknown: {requests_n(missing)}{here}\n{marks}not drawn")
    if handles:
        title = None if named else "model"
        ax.legend(handles, labels, title=title, **legend_place(ax, across, labels))
    ax.set_title(bars.title)
    axis_label = "cost (USD, known costs)"
    if free and missing:  # the "? N" marks fill the axes: the note goes in the axis label
        axis_label = "cost (USD): every known cost is $0"
    elif free:
        ax.text(0.5, 0.5, plain(_FREE_NOTE), transform=ax.transAxes,
                ha="center", va="center", color="0.4")  # fmt: skip
    if totals is not None:
        usd_ticks(ax, ax.xaxis if across else ax.yaxis)
    if free and missing:  # a $0–$1 scale beside open columns read as "about $1" (a trial)
        (ax.set_xticks if across else ax.set_yticks)([0.0])
    (ax.set_xlabel if across else ax.set_ylabel)(plain(axis_label))
    return ax


def bars_across(by: str, order: list[str]) -> bool:
    """Whether the bars lie across (horizontal): sessions' and notebooks' long labels."""
    return by in ("session", "notebook") and len(order) <= MANY


def legend_place(ax: Axes, across: bool, labels: list[str]) -> dict[str, Any]:
    """Beside the axes; under horizontal bars, whose labels already take width on the left
    (a legend of long model names beside them would narrow the axes from both sides)."""
    if not across:
        return _OUTSIDE
    from matplotlib.transforms import ScaledTranslation

    down = ScaledTranslation(0, -_BELOW_POINTS / 72, ax.figure.dpi_scale_trans)
    under = ax.transAxes + down
    return {
        "loc": "upper center",
        "bbox_to_anchor": (0.5, 0.0),
        "bbox_transform": under,
        "fontsize": "small",
        # Side by side while they fit under the axes, which keep their width.
        "ncols": max(1, min(len(labels), _LEGEND_ROW // max(map(len, labels), default=1))),
    }


def draw_latency_quantiles(ax: Axes, stats: pd.DataFrame, *, sampled: bool = False) -> Axes:
    """Box plots from figures already computed (``overview().latency``): per model, time
    to first token and whole request; boxes at the quartiles, whiskers at the 5th and
    95th percentiles (seconds)."""
    title = "Latency per model" + (" (a ~2% sample)" if sampled else "")
    if stats.empty:
        return empty_chart(ax, title)

    models = sorted(stats["model"].unique())
    boxes = quantile_boxes(stats)
    return latency_boxes(
        ax, models, lambda *which: boxes.get(which), title, whiskers=_QUANTILE_WHISKERS
    )


_QUANTILE_WHISKERS = "whiskers: 5th–95th percentile"
LATENCY_METRICS = ("ttft_ms", "duration_ms")
_LATENCY_METRICS = tuple(zip(LATENCY_METRICS, ("C0", "C1"), strict=True))


def latency_boxes(
    ax: Axes,
    models: list[str],
    box: Callable[[str, str], dict[str, Any] | None],
    title: str,
    whiskers: str | None = None,
) -> Axes:
    """Per model, a box for each metric (``box(model, metric)``: ``Axes.bxp`` figures, in
    seconds; ``None`` when it has no values), side by side, and the legend that names them.
    Each part of a box has a gid: ``box``, ``median``, ``whisker-low`` / ``-high`` and
    ``cap-low`` / ``-high``, then ``:metric:model``."""
    shown: list[tuple[dict[str, Any], float, str, str]] = []  # figures, x, colour, gid
    for i, model in enumerate(models):
        for offset, (metric, color) in enumerate(_LATENCY_METRICS):
            figures = box(model, metric)
            if figures is not None:
                shown.append((figures, 3 * i + offset, color, f"median:{metric}:{model}"))
    if shown:  # one bxp call: each call reads every rc setting again (most of a chart's time)
        stats, positions, colors, gids = zip(*shown, strict=True)
        boxes = ax.bxp(list(stats), positions=list(positions), widths=0.8, patch_artist=True)
        for i, (patch, median, color, gid) in enumerate(
            zip(boxes["boxes"], boxes["medians"], colors, gids, strict=True)
        ):
            patch.set_facecolor(color)
            median.set_color("black")
            which = gid.removeprefix("median:")
            median.set_gid(gid)
            patch.set_gid(f"box:{which}")
            for part in ("whisker", "cap"):  # bxp gives each box two of each: low, high
                low, high = boxes[f"{part}s"][2 * i : 2 * i + 2]
                low.set_gid(f"{part}-low:{which}")
                high.set_gid(f"{part}-high:{which}")
    from matplotlib.patches import Patch

    # Cut and slanted as the cost charts' model names: a long one covered its neighbours.
    crowded = len(models) > 4 or sum(len(m) for m in models) > 30
    ax.set_xticks(
        [3 * i + 0.5 for i in range(len(models))],
        [plain(_cut(m)) for m in models],
        rotation=20 if crowded else 0,
        ha="right" if crowded else "center",
    )
    # Beside the axes, never over a box nor the slanted model names under them; a legend
    # placed "best" is searched for on every draw, and that was most of the drawing time.
    ax.legend(
        [Patch(facecolor=color) for _, color in _LATENCY_METRICS],
        ["time to first token", "whole request"],
        fontsize="small",
        title=whiskers,
        title_fontsize="x-small",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_title(title)
    logged = [figures for figures, *_ in shown]
    ax.set_ylabel("seconds (log scale)" if _log_scale(ax, logged) else "seconds")
    return ax


# A box plot reads linearly until something drawn reaches this many times above the
# highest box: one cold start (5 s among 0.2 s requests) would squash every box flat.
_SPREAD = 5.0


def _log_scale(ax: Axes, stats: list[dict[str, Any]]) -> bool:
    """Put the seconds on a log scale when a whisker or an outlier dwarfs the boxes (the
    y label then says so); whether it did."""
    tops = [float(f["q3"]) for f in stats]
    drawn = [float(v) for f in stats for v in (f["whislo"], f["whishi"], *f.get("fliers", ()))]
    if not tops or max(tops) <= 0 or max(drawn, default=0.0) <= _SPREAD * max(tops):
        return False
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in [*drawn, *(float(f["q1"]) for f in stats)] if v > 0]
    if min(drawn) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    else:  # a 0 s time stays on the chart: linear below the smallest positive one
        ax.set_yscale("symlog", linthresh=min(positive), linscale=0.5)
        ax.set_ylim(0, max(drawn) * 1.5)  # no negative seconds; the top outlier inside
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    return True


def plain(text: str) -> str:
    """``text`` as matplotlib should show it, as it is: a pair of ``$`` in a title, a
    notebook's or a model's name would be read as mathtext (``costs $5 and $20`` set in
    italics, a bad formula failing the whole draw). An escaped ``\\$`` is drawn as ``$``."""
    return text.replace("$", r"\$")


def stack_bars(ax: Axes, table: pd.DataFrame, order: list[str], *, across: bool = False) -> None:
    """Bars for ``table``'s rows (in ``order``), its columns stacked and labelled.

    ``across``: horizontal bars, the first row at the top, labels on the left.
    """
    import numpy as np

    x = np.arange(len(order))
    many = len(order) > MANY
    if across:
        for column, left, widths in stacked(table):
            ax.barh(x, widths, left=left, label=plain(str(column)), gid=f"bar:{column}")
        ax.set_yticks(x, [plain(_cut(str(key))) for key in order])
        ax.set_ylim(len(order) - 0.4, -0.6)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # dollar labels side by side
        return
    for i, (column, bottom, heights) in enumerate(stacked(table)):
        if many:  # one artist per column, not one per bar: drawing stays quick
            color = f"C{i % 10}"  # the colour ax.bar gives the column's bars
            _steps(ax, bottom, bottom + heights, label=plain(str(column)), gid=f"bar:{column}",
                   facecolor=color)  # fmt: skip
        else:
            ax.bar(x, heights, bottom=bottom, label=plain(str(column)), gid=f"bar:{column}")
    crowded = len(order) > 4 or sum(len(k) for k in order) > 30
    step = -(-len(order) // 10) if many else 1  # many bars: about ten labels
    ax.set_xticks(
        x[::step],
        [plain(_cut(str(key))) for key in order[::step]],
        rotation=20 if crowded else 0,
        ha="right" if crowded else "center",
    )
    ax.set_xlim(-0.6, len(order) - 0.4)


def _cut(label: str) -> str:
    """``label``, cut in the middle past ``_LABEL_CHARS``: notebooks named alike differ at
    their ends (``…_v2.ipynb``)."""
    if len(label) <= _LABEL_CHARS:
        return label
    end = _LABEL_CHARS // 3
    return label[: _LABEL_CHARS - end - 1] + "…" + label[-end:]


def stacked(table: pd.DataFrame) -> list[tuple[Any, Any, Any]]:
    """Per column of ``table``: the column, and its bars' bottoms and heights (arrays), each
    column stacked on the ones before it."""
    import numpy as np

    layers = []
    bottom = np.zeros(len(table))
    for column in table.columns:
        heights = table[column].to_numpy(dtype=float)
        layers.append((column, bottom, heights))
        bottom = bottom + heights
    return layers


def _steps(ax: Axes, bottom: Any, top: Any, **style: Any) -> None:
    """One filled shape from ``bottom`` to ``top`` over bars 0, 1, ... (each 1 wide).

    ``fill_between`` rather than ``ax.stairs``: adding a patch measures its limits one
    path segment at a time in Python (~15 ms for 90 bars), a collection all at once.
    """
    ax.fill_between(*step_outline(bottom, top), step="post", linewidth=0, **style)


def step_outline(bottom: Any, top: Any) -> tuple[Any, Any, Any]:
    """``fill_between(..., step="post")``'s x, y1 and y2 for bars 0, 1, ... (each 1 wide)
    from ``bottom`` to ``top``."""
    import numpy as np

    edges = np.arange(len(top) + 1) - 0.5
    return edges, np.append(bottom, bottom[-1]), np.append(top, top[-1])


def _mark_unknown(
    ax: Axes, order: list[str], unknown: pd.Series, totals: Any, *, across: bool = False
) -> None:
    """Over each bar whose group has requests of unknown price: "? N", and a hatched,
    open-ended column up to the top of the axes (the true cost is higher by an amount
    nobody knows). ``across`` (horizontal bars): a "? N · cost unknown" label at the
    end of the known bar, and no column: beside short labelled bars, a column to
    the axes' end read as the largest cost (a trial)."""
    from matplotlib.patches import Rectangle

    get_lim, set_lim = (ax.get_xlim, ax.set_xlim) if across else (ax.get_ylim, ax.set_ylim)
    if totals is None:  # not one known dollar: a value scale would only suggest a value
        set_lim(0, 1)
        (ax.set_xticks if across else ax.set_yticks)([])
    # Headroom, so the open column stands out above the tallest known bar.
    top = get_lim()[1] if totals is None else max(get_lim()[1], 1.25 * totals.max())
    if len(order) > MANY:  # one hatched outline over every such bar; counts in the legend
        import numpy as np

        bottom = np.zeros(len(order)) if totals is None else totals.to_numpy(dtype=float)
        has = unknown.to_numpy() > 0
        _steps(ax, bottom, np.where(has, top, bottom), gid="unknown-bars",
               facecolor="none", hatch=_UNKNOWN_HATCH, edgecolor="0.6")  # fmt: skip
        ax.set_ylim(0, top)
        return
    for i, key in enumerate(order):
        n = int(unknown[key])
        if not n:
            continue
        bottom = float(totals[key]) if totals is not None else 0.0
        label: dict[str, Any]
        at: tuple[float, float]
        if across:  # a label, not a length: it says nothing of how much
            text, at, offset = f"? {n} · cost unknown", (bottom, i), (4, 0)
            label = {"ha": "left", "va": "center", "fontstyle": "italic", "color": "0.3"}
        else:
            hatch = Rectangle((i - 0.4, bottom), 0.8, top - bottom, fill=False)
            hatch.set(hatch=_UNKNOWN_HATCH, edgecolor="0.6", linewidth=0, gid=f"unknown-bar:{key}")
            ax.add_patch(hatch)
            text, at, offset = f"? {n}", (i, bottom), (0, 3)
            label = {"ha": "center", "va": "bottom"}
        ax.annotate(
            text,
            at,
            xytext=offset,
            textcoords="offset points",
            fontsize="small",
            gid=f"unknown:{key}",
            **label,
        )
    set_lim(0, top)


def usd_ticks(ax: Axes, axis: Any = None) -> None:
    """Dollar tick labels with enough decimals for cents or for millionths of a cent
    (on ``axis``; the y axis unless given)."""
    import math

    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if axis is None else axis
    top = (ax.get_xlim() if axis is ax.xaxis else ax.get_ylim())[1]
    decimals = max(2, 1 - math.floor(math.log10(top))) if top > 0 else 2
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:,.{decimals}f}"))


def new_axes(ax: Axes | None) -> Axes:
    """``ax``, or the Axes of a new pyplot figure (shown by the notebook)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, new = plt.subplots(figsize=(8, 4), layout="constrained")
    return new


NOTHING_IN_RANGE = "no requests in this range"


def empty_chart(ax: Axes, title: str, note: str = NOTHING_IN_RANGE) -> Axes:
    """``ax`` titled, saying there is nothing to draw: no frame and no ticks, whose 0 to 1
    would read as a scale (``ax.clear()`` brings them back for the next drawing)."""
    ax.set_title(title)
    ax.set_axis_off()
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, gid="empty")
    return ax
