"""What the charts show, before anything is drawn: which requests, grouped and ordered how.

The store's requests in a time range (``in_range``: a date means that whole UTC day),
each one's group label by day, model, session or notebook (``group_keys``,
``session_label``), the groups in the order shown (``key_order``: days in time order,
others by known cost), and the figures of a cost chart (``cost_groups`` → ``CostBars``)
and of latency boxes (``quantile_boxes``). No matplotlib here.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from ._text import counted

if TYPE_CHECKING:
    import pandas as pd

    from ._store import Store

    Db = str | os.PathLike[str] | Store | None
    When = str | dt.date | dt.datetime | pd.Timestamp | None

__all__ = [
    "BYS",
    "MANY",
    "TOP",
    "By",
    "CostBars",
    "cost_bars",
    "cost_groups",
    "group_keys",
    "in_range",
    "key_order",
    "quantile_boxes",
    "requests_n",
    "session_label",
    "store_requests",
]


By = Literal["day", "model", "session", "notebook"]
BYS: tuple[str, ...] = get_args(By)
_NO_NOTEBOOK = "(no notebook)"
TOP = 15  # sessions / notebooks shown: the most expensive ones
MANY = 31  # more bars than this (days, mostly) are drawn as one shape per model


def store_requests(db: Db, since: When, until: When) -> pd.DataFrame:
    """The store's requests (``usage()``) made in [since, until]."""
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


def group_keys(requests: pd.DataFrame, by: str, db: Db) -> pd.Series:
    """The label of each request's group."""
    if by not in BYS:
        raise ValueError(f"by must be one of {', '.join(BYS)}, not {by!r}")
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


def session_label(session_id: str, title: Any) -> str:
    """A short, unique label for a session: its title (cut) and the id's first 8 hex."""
    if isinstance(title, str) and title.strip():
        text = title.strip()
        return (
            f"{text[:28]}… · {session_id[:8]}" if len(text) > 29 else f"{text} · {session_id[:8]}"
        )
    return session_id[:8]


def key_order(frame: pd.DataFrame, by: str, top: int) -> list[str]:
    """Keys in the order shown: days in time order, others by known cost, highest first.

    Among equal known costs (most often none, or $0 of failed requests) the groups with
    more requests of unknown price come first: each may have cost anything, so a session
    of a model without a price is never hidden behind one known to have cost $0.
    """
    if by == "day":
        return sorted(frame["key"].unique())
    groups = frame.groupby("key")
    spend = groups["cost_usd"].sum()  # known dollars; 0 when none is known
    # Rows are requests, or groups of them (``cost_groups``) that say how many.
    if "requests" in frame:
        count, unknown = groups["requests"].sum(), groups["unknown"].sum()
    else:
        count, unknown = groups.size(), frame["cost_usd"].isna().groupby(frame["key"]).sum()
    ranked = sorted(
        spend.index,
        key=lambda k: (-float(spend[k]), -int(unknown[k]), -int(count[k]), str(k)),
    )
    return ranked[:top] if by in ("session", "notebook") else ranked


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
    price per key; and of the whole range, how many keys (``order`` may be its top ones)
    and requests of unknown price there are."""

    by: str
    order: list[str]
    table: pd.DataFrame
    unknown: pd.Series
    keys: int
    unknown_in_range: int

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
        return len(self.order) > MANY

    @property
    def hidden(self) -> int:
        """Requests of unknown price in the range's groups not shown (past the top ones)."""
        return self.unknown_in_range - self.missing

    @property
    def title(self) -> str:
        """The chart's title: the top N of M groups shown, if not all, and the range's
        requests of unknown price, with how many are in groups not shown."""
        title = f"Cost by {self.by}"
        if len(self.order) < self.keys:
            title += f", top {len(self.order)} of {self.keys}"
        if self.unknown_in_range:
            title += f" — {requests_n(self.unknown_in_range)} of unknown cost"
        if self.hidden:
            title += f" ({self.hidden} in {self.by}s not shown)"
        return title


def cost_bars(groups: pd.DataFrame, by: str, top: int = TOP) -> CostBars | None:
    """The figures ``draw_costs`` draws from ``cost_groups``-shaped rows (``None``: none)."""
    if groups.empty:
        return None
    import numpy as np
    import pandas as pd

    order = key_order(groups, by, top)
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
        keys=int(groups["key"].nunique()),
        unknown_in_range=int(counts.sum()),
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


def requests_n(n: int) -> str:
    """``1 request``, ``3 requests``."""
    return counted(n, "request")
