"""``nbchat.dashboard()``: your spend in one widget.

Spend over time and by model, the most expensive sessions (click one to read its
transcript below), tool error rates and request latency, for a date range picked with
two ``DatePicker``s (UTC days, both included). Charts are PNG images drawn off-screen
(``nbchat.plot``'s drawing on Agg figures; a refresh that only moves bars or boxes draws
just those, ``_dashboard_charts``), so the dashboard needs no plotting front end and
works the same in JupyterLab, Notebook 7 and Voila. It reads ``_analysis.overview()``:
sums the store keeps on write and a few small queries, so a refresh costs about the same
on a store of any size (the latency boxes come from a ~2% sample on large ranges).
"""

from __future__ import annotations

import datetime as dt
import html
import os
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ._dashboard_charts import CostScene, LatencyScene, LiveChart, Scene
from ._exceptions import NbchatError
from ._plot_data import session_label
from ._text import counted, money

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd
    from matplotlib.axes import Axes

    from ._analysis import Overview
    from ._store import Store

    Db = str | os.PathLike[str] | Store | None

__all__ = ["Dashboard", "dashboard"]


# Half a row, less the widgets' own margins: two 50% boxes plus margins overflow the row,
# and the second one's right edge (the legends) was cut off. At the row's top, not
# stretched to its height: a chart beside a taller one was squashed sideways (a trial).
def _half() -> widgets.Layout:
    return widgets.Layout(width="calc(50% - 8px)", height="auto", align_self="flex-start")


# A chart: at most half a row, never wider than its picture (a narrower chart blown up
# to the width had larger text than its neighbour, a wider one smaller).
def _half_chart() -> widgets.Layout:
    return widgets.Layout(
        width="auto", max_width="calc(50% - 8px)", height="auto", align_self="flex-start"
    )


class Dashboard(widgets.VBox):  # type: ignore[misc]
    """The dashboard widget; ``refresh()`` reads the store again for the picked dates.

    What it shows is kept for code (and tests) to read: ``axes`` (the charts),
    ``top_sessions`` and ``tool_errors`` (DataFrames), ``session_buttons``.
    """

    def __init__(
        self,
        db: Db = None,
        since: dt.date | None = None,
        until: dt.date | None = None,
        top: int = 10,
    ) -> None:
        self.db = db
        self.top = top
        self.axes: dict[str, Axes] = {}
        self._charted: dict[str, pd.DataFrame] = {}  # what each chart was drawn from
        self._charts = {"spend": LiveChart(), "by_model": LiveChart(), "latency": LiveChart()}
        self._seen: Overview | None = None  # the last overview read
        self.top_sessions: pd.DataFrame | None = None
        self.tool_errors: pd.DataFrame | None = None
        self.session_buttons: list[widgets.Button] = []
        self._buttons: list[widgets.Button] = []  # made so far; the first ones are shown
        self._sessions_heading = widgets.HTML("<b>Top sessions</b> (click one for its transcript)")
        self._no_sessions = widgets.HTML("<i>no sessions in this range</i>")
        self._button_ids: list[str] = []
        self.selected: str | None = None
        self.since = widgets.DatePicker(description="From", value=since)
        self.until = widgets.DatePicker(description="To", value=until)
        self.refresh_button = widgets.Button(
            description="Refresh", icon="refresh", tooltip="Read the store again"
        )
        self.summary = widgets.HTML()
        self.spend = widgets.Image(format="png", layout=_half_chart())
        self.by_model = widgets.Image(format="png", layout=_half_chart())
        self.latency = widgets.Image(format="png", layout=_half_chart())
        self.sessions_list = widgets.VBox(layout=_half())
        self.tools = widgets.HTML(layout=_half())
        self.transcript = widgets.HTML()
        self._images = {"spend": self.spend, "by_model": self.by_model, "latency": self.latency}
        self.refresh_button.on_click(lambda _: self.refresh())
        self.since.observe(self._on_dates, names="value")
        self.until.observe(self._on_dates, names="value")
        super().__init__(
            [
                widgets.HBox([self.since, self.until, self.refresh_button]),
                self.summary,
                widgets.HBox([self.spend, self.by_model]),
                widgets.HBox([self.sessions_list, self.latency]),
                self.tools,
                self.transcript,
            ]
        )
        self.add_class("nbchat-dashboard")
        self.refresh()

    def refresh(self) -> None:
        """Read the store again and redraw everything for the picked date range."""
        try:
            self._refresh()
        except NbchatError as e:  # a store held too long by another kernel, a bad file
            self.summary.value = f"<b>Could not read the store:</b> {html.escape(str(e))}"

    def show_session(self, session_id: str) -> None:
        """Show one session's transcript below the charts."""
        from ._analysis import transcript

        self.selected = session_id
        for button, sid in zip(self.session_buttons, self._button_ids, strict=True):
            button.button_style = "info" if sid == session_id else ""
        messages = transcript(session_id, db=self.db)
        self.transcript.value = transcript_html(session_id, messages)

    # ------------------------------------------------------------------ internals

    def _on_dates(self, change: dict[str, Any]) -> None:
        self.refresh()

    def _refresh(self) -> None:
        from ._analysis import overview

        since, until = self.since.value, self.until.value
        # Sums kept on write and a few small queries: quick on a store of any size.
        seen = overview(db=self.db, since=since, until=until, top=self.top, previous=self._seen)
        self._seen = seen
        self.summary.value = _summary_html(seen.spend, seen.top_sessions, since, until)
        by_day = seen.spend.assign(key=[d.strftime("%Y-%m-%d") for d in seen.spend["day"]])
        self._chart("spend", by_day, lambda: CostScene(by_day, "day"))
        by_model = seen.spend.assign(key=seen.spend["model"].fillna("(unknown model)"))
        self._chart("by_model", by_model, lambda: CostScene(by_model, "model"))
        latency = _latency_figures(seen.latency, seen.latency_sampled)
        self._chart("latency", latency, lambda: LatencyScene(seen.latency, seen.latency_sampled))
        self.top_sessions = _top_sessions(seen.top_sessions)
        self._show_sessions(self.top_sessions)
        self.tool_errors = _tool_errors(seen.tools)
        self.tools.value = _tools_html(self.tool_errors)
        if self.selected is not None and self.selected not in self._button_ids:
            self.selected = None
            self.transcript.value = ""

    def _chart(self, name: str, data: pd.DataFrame, scene: Callable[[], Scene]) -> None:
        """Draw chart ``name`` from ``data`` into its image, unless it shows ``data`` already:
        a chart is drawn again only when the figures it is drawn from changed (and then,
        mostly, only its data artists: ``_dashboard_charts``)."""
        shown = self._charted.get(name)
        if shown is not None and _same_figures(shown, data):
            return
        chart = self._charts[name]
        self._images[name].value = chart.picture(scene())
        self.axes[name] = chart.ax
        self._charted[name] = data

    def _show_sessions(self, top: pd.DataFrame) -> None:
        # Buttons are kept and relabelled: making widgets (and their comms) was most of it.
        self._button_ids = [str(sid) for sid in top["session_id"]]
        for i in range(len(self._buttons), len(top)):
            button = widgets.Button(layout=widgets.Layout(width="auto"))
            button.on_click(lambda _, i=i: self.show_session(self._button_ids[i]))
            self._buttons.append(button)
        self.session_buttons = self._buttons[: len(top)]
        for button, sid, row in zip(
            self.session_buttons, self._button_ids, top.to_dict("records"), strict=True
        ):
            button.description = f"{row['label']} — {_session_cost(row)}"
            button.tooltip = f"Show the transcript of session {sid}"
            button.button_style = "info" if sid == self.selected else ""
        empty = [self._no_sessions] if top.empty else []
        self.sessions_list.children = [self._sessions_heading, *self.session_buttons, *empty]


def dashboard(
    db: Db = None, since: dt.date | None = None, until: dt.date | None = None, top: int = 10
) -> Dashboard:
    """A widget with spend over time and by model, top sessions, tool errors and latency.

    ``since`` / ``until`` preset the date pickers (UTC days, both included); ``top`` is
    how many sessions are listed.
    """
    return Dashboard(db=db, since=since, until=until, top=top)


def _same_figures(before: pd.DataFrame, now: pd.DataFrame) -> bool:
    """Whether a chart's figures are unchanged: the same rows, counts and labels, and sums
    equal to 1e-9 (DuckDB adds floats across threads in no fixed order, so the same rows
    can sum to another last bit; any new request changes a count)."""
    import numpy as np

    if list(before.columns) != list(now.columns) or len(before) != len(now):
        return False
    for column in before.columns:
        a, b = before[column], now[column]
        if a.dtype == "float64" and b.dtype == "float64":
            if not np.allclose(a.to_numpy(), b.to_numpy(), rtol=1e-9, atol=0, equal_nan=True):
                return False
        elif not a.equals(b):
            return False
    return True


def _latency_figures(latency: pd.DataFrame, sampled: bool) -> pd.DataFrame:
    """The latency chart's figures as plain columns (``DataFrame.equals`` cannot compare
    the quantile lists), with whether they come from a sample (it is in the title)."""
    import pandas as pd

    quantiles = pd.DataFrame(
        [[float(v) for v in q] for q in latency["quantiles"]],
        columns=["q05", "q25", "q50", "q75", "q95"],
        dtype=float,
    )
    return latency.drop(columns="quantiles").join(quantiles).assign(sampled=sampled)


def _top_sessions(rows: pd.DataFrame) -> pd.DataFrame:
    """The sessions that spent most in the range: id, label, cost, requests, unknown."""
    import pandas as pd

    columns = ["session_id", "label", "cost_usd", "requests", "unknown"]
    if rows.empty:
        return pd.DataFrame({c: [] for c in columns})
    labels = [
        session_label(sid, title)
        for sid, title in zip(rows["session_id"], rows["title"], strict=True)
    ]
    return rows.assign(label=labels)[columns].reset_index(drop=True)


def _session_cost(row: dict[Any, Any]) -> str:
    """A session's cost and requests; never "$0.00" when a price is unknown: "≥ $x" when
    some are, "cost unknown" when all are."""
    requests, unknown = int(row["requests"]), int(row["unknown"])
    if not unknown:
        return f"{_usd(row['cost_usd'])} · {requests} req"
    cost = "cost unknown" if unknown == requests else f"≥ {_usd(row['cost_usd'])}"
    return f"{cost} · {requests} req ({unknown} of unknown cost)"


def _tool_errors(calls: pd.DataFrame) -> pd.DataFrame:
    """Per tool: calls, errors, error rate and median duration (ms)."""
    table = calls.assign(error_rate=calls["errors"] / calls["calls"])
    return table[["tool", "calls", "errors", "error_rate", "median_ms"]].reset_index(drop=True)


def _summary_html(
    spend: pd.DataFrame, top: pd.DataFrame, since: dt.date | None, until: dt.date | None
) -> str:
    span = f"{since or 'the start'} to {until or 'today'}"
    # Nothing in the range costs $0; requests whose prices are all unknown cost "$?".
    known = spend["cost_usd"].sum(min_count=1) if int(spend["requests"].sum()) else 0.0
    unknown = int(spend["unknown"].sum())
    note = f", plus {counted(unknown, 'request')} of unknown cost" if unknown else ""
    sessions = int(top["sessions_in_range"].iloc[0]) if len(top) else 0
    requests = counted(int(spend["requests"].sum()), "request")
    return (
        f"<b>{html.escape(span)}</b>: {requests} in {counted(sessions, 'session')}, "
        f"{_usd(known)} known cost{note}"
    )


def _tools_html(table: pd.DataFrame) -> str:
    if table.empty:
        return "<b>Tool calls</b><br><i>no tool calls in this range</i>"
    rows = "".join(
        f"<tr><td>{html.escape(str(r.tool))}</td><td>{r.calls}</td><td>{r.errors}</td>"
        f"<td>{r.error_rate:.0%}</td><td>{_ms(r.median_ms)}</td></tr>"
        for r in table.itertuples()
    )
    # The median comes from duration bins kept on write (``_store/_queries.py``).
    median = "<th title='from durations counted in bins: within ~2%'>median ≈</th>"
    head = f"<tr><th>tool</th><th>calls</th><th>errors</th><th>error rate</th>{median}</tr>"
    return f"{_STYLE}<b>Tool calls</b><table class='nbchat-tools'>{head}{rows}</table>"


def transcript_html(session_id: str, messages: pd.DataFrame) -> str:
    """One session's messages as safe HTML (Markdown rendered, raw HTML escaped)."""
    from ._panel_transcript import markdown_to_html

    parts = [_STYLE, f"<h4>Session {html.escape(session_id)}</h4>"]
    for m in messages.itertuples():
        role = str(m.role)
        body = m.content if isinstance(m.content, str) else ""
        if isinstance(m.tool_calls, list) and m.tool_calls:
            calls = ", ".join(f"{c.get('name')}({c.get('arguments')})" for c in m.tool_calls)
            body += f"\n\n*asks for* `{calls}`"
        shown = f"<pre>{html.escape(body)}</pre>" if role == "tool" else markdown_to_html(body)
        who = f"{role} {m.name}" if role == "tool" and isinstance(m.name, str) else role
        parts.append(
            f"<div class='nbchat-dash-{html.escape(role)}'><b>{html.escape(who)}</b>{shown}</div>"
        )
    return "\n".join(parts)


# Scoped to the dashboard's own classes: a notebook's other outputs are not restyled.
_STYLE = """<style>
.nbchat-tools td, .nbchat-tools th { padding: 2px 10px; text-align: left; }
.nbchat-dashboard [class^='nbchat-dash-'] {
  border-left: 3px solid #ccc; padding: 2px 8px; margin: 6px 0;
}
.nbchat-dashboard .nbchat-dash-user { border-left-color: #4a90d9; }
.nbchat-dashboard .nbchat-dash-tool pre { margin: 2px 0; white-space: pre-wrap; }
</style>"""


def _usd(value: Any) -> str:
    """nbchat's money (``$0.0000393``, not ``$0.0000``), or ``$?`` when unknown."""
    if value is None or value != value:
        return "$?"
    return money(float(value))


def _ms(value: Any) -> str:
    if value is None or value != value:
        return "—"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"
