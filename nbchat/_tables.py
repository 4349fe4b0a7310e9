"""The tables ``%chat cost`` and ``%chat sessions`` print: ``_analysis``' DataFrames made readable.

Rounded, labelled columns and a totals row. The analysis functions stay the numeric
source of truth; these only format them, for people.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._analysis import CostGrouping, costs, sessions, turns
from ._store import Db

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["costs_table", "sessions_table", "turn_costs_table", "utc_text"]


def utc_text(values: pd.Series) -> pd.Series:
    """Times as people read them in a table: ``2026-12-04 20:46:34 UTC`` (— when unknown)."""
    shown: pd.Series = values.dt.strftime("%Y-%m-%d %H:%M:%S UTC").fillna("—")
    return shown


def _money_total(amounts: pd.Series, unknown: int) -> str:
    """Known dollars, and how many requests' cost is not known ("$2.00 + 1 request
    unknown": a bare "+ 1 unknown" read as one unknown dollar or token)."""
    from ._text import counted, money

    known = amounts.dropna()
    if known.empty and unknown:
        return "unknown"
    text = money(float(known.sum()))
    return f"{text} + {counted(unknown, 'request')} unknown" if unknown else text


def _one_line(text: str) -> str:
    """A message as one table cell: as the user wrote it (no ``--format`` instruction),
    its lines run together (a table shows ``\n`` as the two characters), cut at 60."""
    from ._context import without_format_instruction

    text = " ".join(without_format_instruction(text).split())
    return text if len(text) <= 60 else text[:59] + "…"


def _summed(frame: pd.DataFrame, columns: dict[str, str], row: str, *names: str) -> dict[str, str]:
    """The totals row's cells of count columns: each shown label and its sum (of the
    known counts, and how many rows, each a ``row``, have none: "32 + 1 turn unknown")."""
    from ._text import counted

    cells = {}
    for name in names:
        unknown = int(frame[name].isna().sum())
        known = str(int(frame[name].sum()))
        cells[columns[name]] = f"{known} + {counted(unknown, row)} unknown" if unknown else known
    return cells


def _cost_total(frame: pd.DataFrame) -> str:
    """The totals row's cost: the known costs' sum, and how many requests have none."""
    if "unknown_cost_requests" in frame:
        unknown = int(frame["unknown_cost_requests"].sum())
    else:  # a turn's cost is unknown as a whole
        unknown = int(frame["cost_usd"].isna().sum())
    return _money_total(frame["cost_usd"], unknown)


def _human_table(
    frame: pd.DataFrame,
    columns: dict[str, str],
    *,
    totals: dict[str, str] | list[dict[str, str]] | None = None,
    label_column: str | None = None,
) -> pd.DataFrame:
    """``frame`` with ``columns`` renamed and formatted for reading, plus totals rows.

    Timestamps to the second, durations in seconds, costs as money ("unknown" where a
    cost is NaN), text trimmed; ``totals`` maps a shown column to its total's text (a
    list: one row each; ``label_column`` says "total" unless the row names itself).
    """
    import pandas as pd

    from ._text import money

    shown: dict[str, pd.Series] = {}
    for name, label in columns.items():
        values = frame[name]
        if pd.api.types.is_datetime64_any_dtype(values):
            values = utc_text(values)
        elif name == "duration_ms":
            values = (values / 1000).round(1)
        elif name == "cost_usd" and "unknown_cost_requests" in frame:
            # A known part is not the whole cost: "$0.00" alone read as free.
            unknown = frame["unknown_cost_requests"].fillna(0).astype(int)
            values = pd.Series(
                [_money_total(pd.Series([v]), n) for v, n in zip(values, unknown, strict=True)],
                index=values.index,
            )
        elif name == "cost_usd":
            values = values.map(lambda v: "unknown" if pd.isna(v) else money(float(v)))
        elif name in ("user_text", "title"):
            values = values.fillna("").map(_one_line)
        elif name.endswith("_tokens"):  # not reported: said, not a raw <NA>
            values = values.astype(object).where(values.notna(), "unknown")
        elif name == "notebook":  # a session run outside a notebook has none: not "NaN"
            values = values.astype(object).where(values.notna(), "")
        shown[label] = values.reset_index(drop=True)
    table = pd.DataFrame(shown)
    if totals is not None and not table.empty:
        rows = []
        for given in [totals] if isinstance(totals, dict) else totals:
            row = {label: "" for label in table.columns}
            if label_column is not None:
                row[label_column] = "total"
            row.update(given)
            rows.append(row)
        table = pd.concat([table.astype(object), pd.DataFrame(rows)], ignore_index=True)
    return table


def turn_costs_table(session_id: str, db: Db = None) -> pd.DataFrame:
    """One readable row per turn of a session (what ``%chat cost`` shows), with totals."""
    frame = turns(db=db, session_id=session_id)
    columns = {
        "started_at": "started",
        "user_text": "you asked",
        "status": "status",
        "state": "state",
        "requests": "requests",
        "prompt_tokens": "tokens in",
        "completion_tokens": "tokens out",
        "cost_usd": "cost",
        "duration_ms": "seconds",
    }

    def total(rows: pd.DataFrame, which: str) -> dict[str, str]:
        return {
            **_summed(rows, columns, "turn", "requests", "prompt_tokens", "completion_tokens"),
            "cost": _cost_total(rows),
            "seconds": f"{rows['duration_ms'].sum() / 1000:.1f}",
            "state": which,
        }

    live = frame[frame["state"] != "superseded"]
    totals = [total(live, "live turns")]
    if len(live) < len(frame):  # re-run cells' old turns were paid for too (a trial)
        totals.append({**total(frame, "all turns"), "started": "spent"})
    return _human_table(frame, columns, totals=totals, label_column="started")


def costs_table(by: CostGrouping, db: Db = None) -> pd.DataFrame:
    """``costs(by)`` made readable (what ``%chat cost model|day|session|...`` shows)."""
    frame = costs(by=by, db=db)
    keys = {
        "model": {"model": "model", "provider": "provider"},
        "day": {"day": "day (UTC)"},
        "session": {"session_id": "session", "title": "title"},
        "notebook": {"notebook": "notebook"},
        "user": {"user": "user"},
        "tag": {"tag": "tag"},
    }[by]
    columns = {
        **keys,
        "requests": "requests",
        "prompt_tokens": "tokens in",
        "completion_tokens": "tokens out",
        "cached_tokens": "cached",
        "cost_usd": "cost",
        "unknown_cost_requests": "unknown-cost requests",
    }
    counts = (
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "unknown_cost_requests",
    )
    totals = {**_summed(frame, columns, by, *counts), "cost": _cost_total(frame)}
    return _human_table(frame, columns, totals=totals, label_column=next(iter(keys.values())))


def sessions_table(db: Db = None) -> pd.DataFrame:
    """The useful columns of ``sessions()``, newest first (what ``%chat sessions`` shows)."""
    frame = sessions(db=db).sort_values("last_active", ascending=False)
    columns = {
        "id": "id",
        "title": "title",
        "model": "model",
        "last_active": "last active",
        "turns": "turns",
        "requests": "requests",
        "cost_usd": "cost",
        "notebook": "notebook",
    }
    totals = {**_summed(frame, columns, "session", "turns", "requests"), "cost": _cost_total(frame)}
    return _human_table(frame, columns, totals=totals, label_column="id")
