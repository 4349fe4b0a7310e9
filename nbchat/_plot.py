"""Charts of the store: spend, tokens, latency and context size, as matplotlib ``Axes``.

``nbchat.plot.costs()``, ``.tokens()``, ``.latency()`` and ``.context(id)`` read the
public DataFrames (``usage()``, ``sessions()``, ``compactions()``) and draw them. Each
takes ``db=``, ``since=`` / ``until=`` (a ``date`` or ``"YYYY-MM-DD"`` means that whole
UTC day; a datetime is that instant; naive values are UTC) and ``ax=`` (draw there;
otherwise a new pyplot figure, shown by the notebook like ``DataFrame.plot()``).

An unknown cost (no price, or tokens never reported) is never drawn as 0: bars show known
dollars only, each bar with requests of unknown cost is labelled "? N", and the legend and
title give the total.

What the charts show is picked in ``_plot_data``, drawn by ``_plot_draw``, and made a
PNG (for ``%chat cost --plot``) by ``_plot_png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._plot_data import (
    BYS,
    TOP,
    By,
    cost_groups,
    group_keys,
    in_range,
    key_order,
    requests_n,
    store_requests,
)
from ._plot_draw import (
    NOTHING_IN_RANGE,
    bars_across,
    draw_costs,
    empty_chart,
    latency_boxes,
    legend_place,
    new_axes,
    stack_bars,
)
from ._plot_png import figure_png, new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._plot_data import Db, When

__all__ = ["context", "costs", "latency", "plot_for_magic", "tokens"]


def _nothing(since: When, until: When, unranged: str = "no requests stored yet") -> str:
    """What an empty chart says: nothing in the range asked for, or nothing at all."""
    return NOTHING_IN_RANGE if since is not None or until is not None else unranged


def costs(
    by: By = "day",
    *,
    db: Db = None,
    since: When = None,
    until: When = None,
    top: int = TOP,
    ax: Axes | None = None,
) -> Axes:
    """Dollars per UTC day, model, session or notebook, as bars stacked by model.

    Only known costs are stacked; requests whose cost is unknown are counted above
    their bar ("? N") and in the legend, never drawn as 0. ``by="session"`` and
    ``"notebook"`` show the ``top`` most expensive, as horizontal bars (long labels).
    """
    requests = store_requests(db, since, until)
    ax = new_axes(ax)
    if requests.empty:
        return empty_chart(ax, f"Cost by {by}", _nothing(since, until))
    return draw_costs(ax, cost_groups(requests.assign(key=group_keys(requests, by, db))), by, top)


def tokens(
    by: By = "day",
    *,
    db: Db = None,
    since: When = None,
    until: When = None,
    top: int = TOP,
    ax: Axes | None = None,
) -> Axes:
    """Tokens per UTC day, model, session or notebook: input, cached input and output.

    Cached input is the part of the prompt the server reported as cached (none when it
    reported nothing); requests that reported no token counts are noted in the title.
    """
    requests = store_requests(db, since, until)
    ax = new_axes(ax)
    title = f"Tokens by {by}"
    if requests.empty:
        return empty_chart(ax, title, _nothing(since, until))
    frame = requests.assign(key=group_keys(requests, by, db))
    order = key_order(frame, by, top)
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
    across = bars_across(by, order)
    stack_bars(ax, table, order, across=across)
    ax.legend(**legend_place(ax, across, ax.get_legend_handles_labels()[1]))
    unreported = int((frame["prompt_tokens"].isna() & frame["completion_tokens"].isna()).sum())
    if unreported:
        title += f" — {requests_n(unreported)} reported no tokens"
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
    """Time to first token and whole-request duration per model, as box plots (seconds).

    Failed requests are left out (the title says how many): an HTTP error comes back in
    milliseconds with no first token, and put a whole-request median below the TTFT one.
    """
    requests = store_requests(db, since, until)
    ax = new_axes(ax)
    title = "Latency per model"
    if requests.empty:
        return empty_chart(ax, title, _nothing(since, until))
    failed = requests["error"].notna()
    if failed.any():
        title += f" — {requests_n(int(failed.sum()))} failed, left out"
        requests = requests[~failed]
    from matplotlib.cbook import boxplot_stats

    def box(model: str, metric: str) -> dict[str, Any] | None:
        rows = requests[requests["model"] == model]
        seconds = rows[metric].astype("Float64").dropna().astype(float) / 1000.0
        # What ``ax.boxplot`` would draw: quartiles, whiskers at 1.5 IQR, the points beyond.
        return None if seconds.empty else boxplot_stats(seconds.to_numpy())[0]

    return latency_boxes(ax, sorted(requests["model"].dropna().unique()), box, title)


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
    ax = new_axes(ax)
    title = f"Prompt size per request — session {session_id[:8]}"
    if requests.empty:
        return empty_chart(ax, title, _nothing(since, until, "no chat requests in this session"))
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
        elif arg in BYS:
            by = arg
        else:
            raise ValueError(
                f"unknown argument {arg!r}; give {'|'.join(BYS)}, --tokens, "
                "--since DATE, --until DATE"
            )
    figure = new_figure()
    chart(by, ax=figure.subplots(), **bounds)  # type: ignore[arg-type]
    return figure


def _count(value: Any) -> str:
    return "?" if value is None or value != value else f"{int(value):,}"
