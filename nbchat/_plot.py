"""Charts of the store: spend, tokens, latency and context size, as matplotlib ``Axes``.

``nbchat.plot.costs()``, ``.tokens()``, ``.latency()`` and ``.context(id)`` read the
public DataFrames (``usage()``, ``sessions()``, ``compactions()``) and draw them. Each
takes ``db=``, ``since=`` / ``until=`` (a ``date`` or ``"YYYY-MM-DD"`` means that whole
UTC day; a datetime is that instant; naive values are UTC) and ``ax=`` (draw there;
otherwise a new pyplot figure, shown by the notebook like ``DataFrame.plot()``).

An unknown price is never drawn as 0: bars show known dollars only, each bar with
requests of unknown price is labelled "? N", and the legend and title give the total.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._store import Store

    Db = str | os.PathLike[str] | Store | None
    When = str | dt.date | dt.datetime | pd.Timestamp | None

__all__ = ["Charts", "plot", "plot_for_magic"]

By = Literal["day", "model", "session", "notebook"]
_BYS: tuple[str, ...] = get_args(By)
_UNKNOWN_HATCH = "///"
_NO_NOTEBOOK = "(no notebook)"
_TOP = 15  # sessions / notebooks shown: the most expensive ones
_MANY = 31  # more bars than this (days, mostly) are drawn as one shape per model
_OUTSIDE: dict[str, Any] = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small"}
_LEGEND_ROW = 60  # characters of labels side by side in a legend under the axes
_BELOW_POINTS = 32  # a legend under the axes: below their tick labels and axis label
_LABEL_CHARS = 40  # a longer label (a notebook's name) is cut, with "…" in the middle


def costs(
    by: By = "day",
    *,
    db: Db = None,
    since: When = None,
    until: When = None,
    top: int = _TOP,
    ax: Axes | None = None,
) -> Axes:
    """Dollars per UTC day, model, session or notebook, as bars stacked by model.

    Only known costs are stacked; requests whose price is unknown are counted above
    their bar ("? N") and in the legend, never drawn as 0. ``by="session"`` and
    ``"notebook"`` show the ``top`` most expensive, as horizontal bars (long labels).
    """
    requests = _requests(db, since, until)
    ax = _axes(ax)
    if requests.empty:
        return _empty(ax, f"Cost by {by}")
    return draw_costs(ax, cost_groups(requests.assign(key=_keys(requests, by, db))), by, top)


def cost_groups(requests: pd.DataFrame) -> pd.DataFrame:
    """Requests (with a ``key`` column) summed per key and model: ``key``, ``model``,
    ``cost_usd`` (known costs; NaN when none is known), ``requests``, ``unknown``."""
    grouped = requests.groupby(["key", "model"], dropna=False, observed=True, sort=False)
    return grouped.agg(
        cost_usd=("cost_usd", lambda c: c.sum(min_count=1)),
        requests=("cost_usd", "size"),
        unknown=("cost_usd", lambda c: int(c.isna().sum())),
    ).reset_index()


@dataclass(frozen=True, eq=False)
class CostBars:
    """A cost chart's figures before drawing: the keys in the order shown, the known
    dollars per key (rows, in ``order``) and model (columns), the requests of unknown
    price per key."""

    by: str
    order: list[str]
    table: pd.DataFrame
    unknown: pd.Series

    @functools.cached_property
    def totals(self) -> pd.Series | None:
        """Known dollars per key, or ``None`` when no model has a known cost."""
        return self.table.sum(axis=1) if len(self.table.columns) else None

    @property
    def free(self) -> bool:
        """Costs are known and every one is $0 (free or local models only)."""
        return self.totals is not None and not bool((self.totals > 0).any())

    @functools.cached_property
    def missing(self) -> int:
        """Requests of unknown price in the chart."""
        return int(self.unknown.sum())

    @property
    def many(self) -> bool:
        """Too many bars for one artist each: one shape per model, no "? N" labels."""
        return len(self.order) > _MANY

    @property
    def title(self) -> str:
        """The chart's title (with the requests of unknown price, if any)."""
        title = f"Cost by {self.by}"
        return title + f" — {_requests_n(self.missing)} without a price" if self.missing else title


def cost_bars(groups: pd.DataFrame, by: str, top: int = _TOP) -> CostBars | None:
    """The figures ``draw_costs`` draws from ``cost_groups``-shaped rows (``None``: none)."""
    if groups.empty:
        return None
    import numpy as np
    import pandas as pd

    order = _order(groups, by, top)
    # Each row's place in the chart (by dicts: an Index of Arrow strings was slower),
    # summed with numpy: pivot_table took ~20 ms here.
    places = {key: i for i, key in enumerate(order)}
    row = np.array([places.get(key, -1) for key in groups["key"].tolist()], dtype=np.intp)
    shown = row >= 0  # not shown: past the top ones
    cost = groups["cost_usd"].to_numpy(dtype=float, na_value=np.nan)
    known = shown & ~np.isnan(cost) & groups["model"].notna().to_numpy()
    names = [name for name, k in zip(groups["model"].tolist(), known, strict=True) if k]
    models = sorted(set(names))
    columns = {name: j for j, name in enumerate(models)}
    column = np.array([columns[name] for name in names], dtype=np.intp)
    dollars = np.zeros((len(order), len(models)))
    np.add.at(dollars, (row[known], column), cost[known])
    unknown = np.zeros(len(order), dtype=np.int64)
    counts = groups["unknown"].to_numpy(dtype=np.int64, na_value=0)
    np.add.at(unknown, row[shown], counts[shown])
    index = pd.Index(order, name="key")
    return CostBars(
        by=by,
        order=order,
        table=pd.DataFrame(dollars, index=index, columns=pd.Index(models, name="model")),
        unknown=pd.Series(unknown, index=index, name="unknown"),
    )


def draw_costs(ax: Axes, groups: pd.DataFrame, by: str, top: int = _TOP) -> Axes:
    """Draw ``cost_groups``-shaped rows: known dollars stacked by model, unknown marked."""
    bars = cost_bars(groups, by, top)
    return _empty(ax, f"Cost by {by}") if bars is None else draw_cost_bars(ax, bars)


def draw_cost_bars(ax: Axes, bars: CostBars) -> Axes:
    """Draw ``cost_bars`` figures: known dollars stacked by model, unknown marked."""
    order, table, totals, missing = bars.order, bars.table, bars.totals, bars.missing
    across = _across(bars.by, order)
    _stack(ax, table, order, across=across)
    if missing:
        _mark_unknown(ax, order, bars.unknown, totals, across=across)
        from matplotlib.patches import Patch

        handles, labels = ax.get_legend_handles_labels()
        handles.append(Patch(facecolor="none", edgecolor="0.5", hatch=_UNKNOWN_HATCH))
        counted = "" if bars.many else "? N, "  # many bars carry no "? N" labels
        labels.append(f"price unknown: {_requests_n(missing)} ({counted}not in bars)")
        ax.legend(handles, labels, title="model", **_legend_place(ax, across, labels))
    elif len(table.columns):
        where = _legend_place(ax, across, ax.get_legend_handles_labels()[1])
        ax.legend(title="model", **where)
    ax.set_title(bars.title)
    (ax.set_xlabel if across else ax.set_ylabel)("cost (USD, known prices)")
    if totals is not None:
        if bars.free:  # bars of height 0: say so, on a scale from $0 (not -$0.04 to $0.04)
            (ax.set_xlim if across else ax.set_ylim)(0, 1)
            ax.text(
                0.5,
                0.5,
                plain("every known cost is $0 (free models or failed requests)"),
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.4",
            )
        usd_ticks(ax, ax.xaxis if across else ax.yaxis)
    return ax


def _across(by: str, order: list[str]) -> bool:
    """Whether the bars lie across (horizontal): sessions' and notebooks' long labels."""
    return by in ("session", "notebook") and len(order) <= _MANY


def _legend_place(ax: Axes, across: bool, labels: list[str]) -> dict[str, Any]:
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


def tokens(
    by: By = "day",
    *,
    db: Db = None,
    since: When = None,
    until: When = None,
    top: int = _TOP,
    ax: Axes | None = None,
) -> Axes:
    """Tokens per UTC day, model, session or notebook: input, cached input and output.

    Cached input is the part of the prompt the server reported as cached (none when it
    reported nothing); requests that reported no token counts are noted in the title.
    """
    requests = _requests(db, since, until)
    ax = _axes(ax)
    title = f"Tokens by {by}"
    if requests.empty:
        return _empty(ax, title)
    frame = requests.assign(key=_keys(requests, by, db))
    order = _order(frame, by, top)
    frame = frame[frame["key"].isin(order)]
    prompt = frame["prompt_tokens"].astype("Float64")
    cached = frame["cached_tokens"].astype("Float64").fillna(0.0)
    parts = frame[["key"]].assign(
        **{
            "input": (prompt - cached).fillna(0.0),
            "cached input": cached.where(prompt.notna(), 0.0),
            "output": frame["completion_tokens"].astype("Float64").fillna(0.0),
        }
    )
    table = parts.groupby("key", observed=True).sum().reindex(order).fillna(0.0).astype(float)
    across = _across(by, order)
    _stack(ax, table, order, across=across)
    ax.legend(**_legend_place(ax, across, ax.get_legend_handles_labels()[1]))
    unreported = int((frame["prompt_tokens"].isna() & frame["completion_tokens"].isna()).sum())
    if unreported:
        title += f" — {_requests_n(unreported)} reported no tokens"
    ax.set_title(title)
    (ax.set_xlabel if across else ax.set_ylabel)("tokens")
    return ax


def latency(
    *,
    db: Db = None,
    since: When = None,
    until: When = None,
    ax: Axes | None = None,
) -> Axes:
    """Time to first token and whole-request duration per model, as box plots (seconds)."""
    requests = _requests(db, since, until)
    ax = _axes(ax)
    title = "Latency per model"
    if requests.empty:
        return _empty(ax, title)
    from matplotlib.cbook import boxplot_stats

    def box(model: str, metric: str) -> dict[str, Any] | None:
        rows = requests[requests["model"] == model]
        seconds = rows[metric].astype("Float64").dropna().astype(float) / 1000.0
        # What ``ax.boxplot`` would draw: quartiles, whiskers at 1.5 IQR, the points beyond.
        return None if seconds.empty else boxplot_stats(seconds.to_numpy())[0]

    return _latency_boxes(ax, sorted(requests["model"].dropna().unique()), box, title)


def draw_latency_quantiles(ax: Axes, stats: pd.DataFrame, *, sampled: bool = False) -> Axes:
    """Box plots from figures already computed (``overview().latency``): per model, time
    to first token and whole request; boxes at the quartiles, whiskers at the 5th and
    95th percentiles (seconds)."""
    title = "Latency per model" + (" (a ~2% sample)" if sampled else "")
    if stats.empty:
        return _empty(ax, title)

    models = sorted(stats["model"].unique())
    boxes = quantile_boxes(stats)
    return _latency_boxes(
        ax, models, lambda *which: boxes.get(which), title, whiskers=_QUANTILE_WHISKERS
    )


def quantile_boxes(stats: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    """``draw_latency_quantiles``' boxes as ``Axes.bxp`` figures (seconds), by model and
    metric (the first row of each)."""
    boxes: dict[tuple[str, str], dict[str, Any]] = {}
    for model, metric, quantiles in zip(
        stats["model"], stats["metric"], stats["quantiles"], strict=True
    ):
        low, q1, med, q3, high = (float(v) / 1000.0 for v in quantiles)
        figures = {"whislo": low, "q1": q1, "med": med, "q3": q3, "whishi": high, "fliers": []}
        boxes.setdefault((model, metric), figures)
    return boxes


_QUANTILE_WHISKERS = "whiskers: 5th–95th percentile"
LATENCY_METRICS = ("ttft_ms", "duration_ms")
_LATENCY_METRICS = tuple(zip(LATENCY_METRICS, ("C0", "C1"), strict=True))


def _latency_boxes(
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

    ax.set_xticks([3 * i + 0.5 for i in range(len(models))], [plain(m) for m in models])
    # Below the axes, never over a box; a legend placed "best" is searched for on every
    # draw, and that search was most of the chart's drawing time.
    ax.legend(
        [Patch(facecolor=color) for _, color in _LATENCY_METRICS],
        ["time to first token", "whole request"],
        fontsize="small",
        title=whiskers,
        title_fontsize="x-small",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncols=2,
    )
    ax.set_title(title)
    ax.set_ylabel("seconds")
    return ax


def context(
    session_id: str,
    *,
    db: Db = None,
    since: When = None,
    until: When = None,
    ax: Axes | None = None,
) -> Axes:
    """Prompt tokens of each chat request of one session, with its compactions marked.

    A dotted line stands between the last request before a compaction and the first
    after it (labelled tokens before → after); a failed attempt is a grey dashed line.
    """
    from ._analysis import compactions, usage

    requests = in_range(usage(db=db, session_id=session_id), "created_at", since, until)
    requests = requests[requests["purpose"] == "chat"].reset_index(drop=True)
    ax = _axes(ax)
    title = f"Prompt size per request — session {session_id[:8]}"
    if requests.empty:
        return _empty(ax, title)
    x = list(range(1, len(requests) + 1))
    y = requests["prompt_tokens"].astype("Float64").astype(float)
    ax.plot(x, y.to_numpy(), marker=".", label="prompt tokens", gid="prompt_tokens")
    folded = in_range(compactions(db=db, session_id=session_id), "created_at", since, until)
    labelled: set[str] = set()
    for row in folded.itertuples():
        before = int((requests["created_at"] <= row.created_at).sum())
        failed = isinstance(row.error, str)
        label = "compaction failed" if failed else "compaction"
        ax.axvline(
            before + 0.5,
            color="0.5" if failed else "C3",
            linestyle="--" if failed else ":",
            label=None if label in labelled else label,
            gid=f"compaction:{row.id}",
        )
        labelled.add(label)
        if not failed:
            ax.annotate(
                f"{_count(row.tokens_before)} → {_count(row.tokens_after)}",
                (before + 0.5, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                va="top",
                fontsize="x-small",
                color="C3",
            )
    ax.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("chat request")
    ax.set_ylabel("prompt tokens")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return ax


class Charts:
    """Charts of the store: ``costs(by=...)``, ``tokens(by=...)``, ``latency()``,
    ``context(session_id)``; each returns a matplotlib ``Axes``."""

    costs = staticmethod(costs)
    tokens = staticmethod(tokens)
    latency = staticmethod(latency)
    context = staticmethod(context)

    def __repr__(self) -> str:
        return "nbchat.plot: costs(by=...), tokens(by=...), latency(), context(session_id)"


plot = Charts()


def plot_for_magic(args: list[str]) -> Any:
    """``%chat cost [day|model|session|notebook] --plot [--tokens] [--since D] [--until D]``.

    Returns a PNG image to display (drawn on its own figure, so nothing else shows it
    twice). Bad arguments raise IPython's ``UsageError``.
    """
    from IPython.core.error import UsageError
    from IPython.display import Image

    try:
        figure = magic_figure(args)
    except ValueError as e:
        raise UsageError(f"%chat cost --plot: {e}") from None
    return Image(data=figure_png(figure), format="png")  # type: ignore[no-untyped-call]


def magic_figure(args: Sequence[str]) -> Figure:
    """The figure ``plot_for_magic(args)`` shows (its Axes carry the data)."""
    by: str = "day"
    chart = costs
    bounds: dict[str, str] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--plot":
            continue
        if arg == "--tokens":
            chart = tokens
        elif arg in ("--since", "--until"):
            if not rest:
                raise ValueError(f"{arg} needs a date, e.g. {arg} 2026-01-31")
            bounds[arg[2:]] = rest.pop(0)
        elif arg in _BYS:
            by = arg
        else:
            raise ValueError(
                f"unknown argument {arg!r}; give {'|'.join(_BYS)}, --tokens, "
                "--since DATE, --until DATE"
            )
    figure = new_figure()
    chart(by, ax=figure.subplots(), **bounds)  # type: ignore[arg-type]
    return figure


def new_figure(width: float = 8.0, height: float = 4.0) -> Figure:
    """A matplotlib figure outside pyplot (Agg canvas): no backend, no global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def figure_png(figure: Figure, dpi: int = 100, *, tight: bool = False) -> bytes:
    """``figure`` as PNG bytes; ``tight`` grows or crops it to what was drawn.

    Tight, the figure is drawn once and the drawn pixels cut out of the canvas; only when
    something reaches the canvas's edge (a long legend, cut off) is it drawn again by
    ``savefig``, which grows the canvas to it (laying the figure out once more to find
    how far). A figure's Agg canvas is kept: drawn again, it reuses the text it measured.
    """
    import io

    buffer = io.BytesIO()
    if tight:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        figure.set_dpi(dpi)
        canvas: Any = figure.canvas  # Agg's methods carry no annotations
        if not isinstance(canvas, FigureCanvasAgg):
            canvas = FigureCanvasAgg(figure)
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())
        area = drawn_area(pixels, round(_PAD_INCHES * dpi))
        if area is not None:
            Image.fromarray(pixels[area]).save(buffer, format="png")
            return buffer.getvalue()
    extra: dict[str, Any] = {"bbox_inches": "tight", "pad_inches": _PAD_INCHES} if tight else {}
    figure.savefig(buffer, format="png", dpi=dpi, **extra)
    return buffer.getvalue()


_PAD_INCHES = 0.05


def drawn_area(pixels: Any, pad: int) -> tuple[slice, slice] | None:
    """The rows and columns of an RGBA canvas that were drawn on (not its first pixel's
    colour), ``pad`` pixels wider; ``None`` when the drawing reaches an edge (it may have
    been cut off) or there is none."""
    import numpy as np

    drawn = (pixels != pixels[0, 0]).any(axis=2)
    rows, columns = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
    if not len(rows) or not len(columns):
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])
    if top == 0 or left == 0 or bottom == len(drawn) - 1 or right == len(drawn[0]) - 1:
        return None
    return slice(max(0, top - pad), bottom + 1 + pad), slice(max(0, left - pad), right + 1 + pad)


# --------------------------------------------------------------------------- helpers


def _requests(db: Db, since: When, until: When) -> pd.DataFrame:
    from ._analysis import usage

    return in_range(usage(db=db), "created_at", since, until)


def in_range(frame: pd.DataFrame, column: str, since: When, until: When) -> pd.DataFrame:
    """Rows of ``frame`` whose ``column`` lies in [since, until] (whole days for dates)."""
    start, end = _bound(since, end=False), _bound(until, end=True)
    keep = frame[column].notna()
    if start is not None:
        keep &= frame[column] >= start
    if end is not None:
        keep &= frame[column] < end
    return frame[keep]


def _bound(value: When, *, end: bool) -> pd.Timestamp | None:
    import pandas as pd

    if value is None:
        return None
    whole_day = (isinstance(value, dt.date) and not isinstance(value, dt.datetime)) or (
        isinstance(value, str) and len(value.strip()) == 10
    )
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    if whole_day and end:
        return stamp + pd.Timedelta(days=1)
    # An instant given as ``until`` is included: compare with the next microsecond.
    return stamp + pd.Timedelta(microseconds=1) if end else stamp


def _keys(requests: pd.DataFrame, by: str, db: Db) -> pd.Series:
    """The label of each request's group."""
    if by not in _BYS:
        raise ValueError(f"by must be one of {', '.join(_BYS)}, not {by!r}")
    if by == "day":
        days: pd.Series = requests["created_at"].dt.tz_convert("UTC").dt.strftime("%Y-%m-%d")
        return days
    if by == "model":
        return requests["model"].fillna("(unknown model)")
    from ._analysis import sessions

    known = sessions(db=db).set_index("id")
    if by == "session":
        labels = {sid: session_label(sid, known["title"].get(sid)) for sid in known.index}
    else:
        labels = {
            sid: os.path.basename(nb) if isinstance(nb, str) and nb else _NO_NOTEBOOK
            for sid, nb in known["notebook"].items()
        }
    return requests["session_id"].map(labels).fillna(_NO_NOTEBOOK if by == "notebook" else "?")


def plain(text: str) -> str:
    """``text`` as matplotlib should show it, as it is: a pair of ``$`` in a title, a
    notebook's or a model's name would be read as mathtext (``costs $5 and $20`` set in
    italics, a bad formula failing the whole draw). An escaped ``\\$`` is drawn as ``$``."""
    return text.replace("$", r"\$")


def session_label(session_id: str, title: Any) -> str:
    """A short, unique label for a session: its title (cut) and the id's first 8 hex."""
    if isinstance(title, str) and title.strip():
        text = title.strip()
        return (
            f"{text[:28]}… · {session_id[:8]}" if len(text) > 29 else f"{text} · {session_id[:8]}"
        )
    return session_id[:8]


def _order(frame: pd.DataFrame, by: str, top: int) -> list[str]:
    """Keys in the order shown: days in time order, others by known cost, highest first."""
    if by == "day":
        return sorted(frame["key"].unique())
    spend = frame.groupby("key")["cost_usd"].sum(min_count=1)
    # Rows are requests, or groups of them (``cost_groups``) that say how many.
    count = (
        frame.groupby("key")["requests"].sum()
        if "requests" in frame
        else frame.groupby("key").size()
    )
    ranked = sorted(spend.index, key=lambda k: (-_or_minus(spend[k]), -int(count[k]), str(k)))
    return ranked[:top] if by in ("session", "notebook") else ranked


def _or_minus(value: Any) -> float:
    return -1.0 if value != value else float(value)  # NaN (all unknown) sorts last


def _stack(ax: Axes, table: pd.DataFrame, order: list[str], *, across: bool = False) -> None:
    """Bars for ``table``'s rows (in ``order``), its columns stacked and labelled.

    ``across``: horizontal bars, the first row at the top, labels on the left.
    """
    import numpy as np

    x = np.arange(len(order))
    many = len(order) > _MANY
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
    nobody knows). ``across``: the same to the right of horizontal bars."""
    from matplotlib.patches import Rectangle

    get_lim, set_lim = (ax.get_xlim, ax.set_xlim) if across else (ax.get_ylim, ax.set_ylim)
    if totals is None:  # not one known dollar: a value scale would only suggest a value
        set_lim(0, 1)
        (ax.set_xticks if across else ax.set_yticks)([])
    # Headroom, so the open column stands out above the tallest known bar.
    top = get_lim()[1] if totals is None else max(get_lim()[1], 1.25 * totals.max())
    if len(order) > _MANY:  # one hatched outline over every such bar; counts in the legend
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
        if across:
            hatch = Rectangle((bottom, i - 0.4), top - bottom, 0.8, fill=False)
        else:
            hatch = Rectangle((i - 0.4, bottom), 0.8, top - bottom, fill=False)
        hatch.set(hatch=_UNKNOWN_HATCH, edgecolor="0.6", linewidth=0, gid=f"unknown-bar:{key}")
        ax.add_patch(hatch)
        ax.annotate(
            f"? {n}",
            (bottom, i) if across else (i, bottom),
            xytext=(3, 0) if across else (0, 3),
            textcoords="offset points",
            ha="left" if across else "center",
            va="center" if across else "bottom",
            fontsize="small",
            gid=f"unknown:{key}",
        )
    set_lim(0, top)


def _requests_n(n: int) -> str:
    return f"{n} request{'s' if n != 1 else ''}"


def usd_ticks(ax: Axes, axis: Any = None) -> None:
    """Dollar tick labels with enough decimals for cents or for millionths of a cent
    (on ``axis``; the y axis unless given)."""
    import math

    from matplotlib.ticker import FuncFormatter

    axis = ax.yaxis if axis is None else axis
    top = (ax.get_xlim() if axis is ax.xaxis else ax.get_ylim())[1]
    decimals = max(2, 1 - math.floor(math.log10(top))) if top > 0 else 2
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:,.{decimals}f}"))


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, new = plt.subplots(figsize=(8, 4), layout="constrained")
    return new


def _empty(ax: Axes, title: str) -> Axes:
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        "no requests in this range",
        ha="center",
        va="center",
        transform=ax.transAxes,
        gid="empty",
    )
    return ax


def _count(value: Any) -> str:
    return "?" if value is None or value != value else f"{int(value):,}"
