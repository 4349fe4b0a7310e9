"""Counters kept up to date on write, so overview queries need not read every row (m007).

Three bookkeeping tables sum the rows of ``messages``, ``requests`` and ``turns``:

* ``_session_counts`` (one row per session): active messages, requests, token and cost
  sums with how many rows reported them, turns, and the latest message and request times
  — what ``sessions()`` shows — and the earliest message time (m008): between it and the
  latest lie all the session's messages, which lets ``transcript()`` skip the rest.
* ``_turn_counts`` (one row per turn with a user message): user messages, and how many of
  them are superseded — a turn whose user messages all are was replaced by a cell re-run.
* ``_usage_by_day`` (one row per UTC day, session and model): requests, tokens and costs
  — what the dashboard draws.

A counter is never incremented blindly, so replays (the same event written twice), marks
(compaction, supersede) and replaced rows keep it exact: ``apply_rows`` reads the counted
columns of the rows a write touches before and after it, and adds the difference of their
contributions (``bumps``). A backend supplies four primitives (``RowOps``) and runs
``apply_rows`` on every event's rows (``_sink.rows_of``) inside one transaction; the
arithmetic is here, once. Sums are exact; a latest time only ever moves forward, which
matches the rows because a replayed row's time is never earlier than the row it replaces;
an earliest time only ever moves back, so it may be earlier than any row left (a replayed
row moved later), never later: a bound, not a figure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

from ._sink import Insert, RowWrite, Update

__all__ = ["COUNTER_TABLES", "TALLIES", "Bump", "RowOps", "apply_rows", "bumps"]

Row = Mapping[str, Any]
_Slot = tuple[str, tuple[tuple[str, Any], ...]]  # a counter row: its table and key


@dataclass(frozen=True)
class Bump:
    """Add ``add`` to the counter row of ``table`` at ``key`` (created at zero if missing),
    raise each ``latest`` column to at least its value, lower each ``earliest`` one to at
    most its value."""

    table: str
    key: dict[str, Any]
    add: dict[str, int | float] = field(default_factory=dict)
    latest: dict[str, datetime] = field(default_factory=dict)
    earliest: dict[str, datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Counter:
    """How one source row counts in one counter table: its key (``None``: nowhere), the
    amounts it adds, the times it raises and the times it lowers."""

    table: str
    key: Callable[[Row], dict[str, Any] | None]
    sums: Callable[[Row], dict[str, int | float]]
    latest: Callable[[Row], dict[str, datetime | None]] = lambda row: {}
    earliest: Callable[[Row], dict[str, datetime | None]] = lambda row: {}


@dataclass(frozen=True)
class Tally:
    """The counters of one source table and the columns they read."""

    columns: tuple[str, ...]
    counters: tuple[Counter, ...]


def _day(row: Row) -> date:
    stamp: datetime = row["created_at"]
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).astimezone(UTC).date()


def _reported(value: Any) -> int:
    return 0 if value is None else 1


def _request_sums(row: Row) -> dict[str, int | float]:
    cost = row["cost_usd"]
    return {
        "requests": 1,
        "prompt_tokens": row["prompt_tokens"] or 0,
        "prompt_reported": _reported(row["prompt_tokens"]),
        "completion_tokens": row["completion_tokens"] or 0,
        "completion_reported": _reported(row["completion_tokens"]),
        "cost_usd": 0.0 if cost is None else float(cost),
        "costed": _reported(cost),
        # Known cost of an answered request: without one, unknown costs make the sum NULL.
        "answered_costed": int(cost is not None and row["error"] is None),
    }


def _session(row: Row) -> dict[str, Any]:
    return {"session_id": row["session_id"]}


def _user_turn(row: Row) -> dict[str, Any] | None:
    if row["role"] != "user" or row["turn_id"] is None:
        return None
    return {"turn_id": row["turn_id"]}


_REQUEST_COLUMNS = (
    "id", "session_id", "model", "prompt_tokens", "completion_tokens", "cached_tokens",
    "cost_usd", "error", "created_at",
)  # fmt: skip

TALLIES: dict[str, Tally] = {
    "messages": Tally(
        ("id", "session_id", "role", "state", "turn_id", "created_at"),
        (
            Counter(
                "_session_counts",
                _session,
                lambda row: {"messages": int(row["state"] == "active")},
                lambda row: {"last_message_at": row["created_at"]},
                lambda row: {"first_message_at": row["created_at"]},
            ),
            Counter(
                "_turn_counts",
                _user_turn,
                lambda row: {
                    "user_messages": 1,
                    "superseded_user_messages": int(row["state"] == "superseded"),
                },
            ),
        ),
    ),
    "requests": Tally(
        _REQUEST_COLUMNS,
        (
            Counter(
                "_session_counts",
                _session,
                _request_sums,
                lambda row: {"last_request_at": row["created_at"]},
            ),
            Counter(
                "_usage_by_day",
                lambda row: {
                    "day": _day(row),
                    "session_id": row["session_id"],
                    "model": row["model"] or "",
                },
                lambda row: {**_request_sums(row), "cached_tokens": row["cached_tokens"] or 0},
            ),
        ),
    ),
    "turns": Tally(
        ("id", "session_id"),
        (Counter("_session_counts", _session, lambda row: {"turns": 1}),),
    ),
}

# The counter tables, each with its key columns (m007 creates them).
COUNTER_TABLES: dict[str, tuple[str, ...]] = {
    "_session_counts": ("session_id",),
    "_turn_counts": ("turn_id",),
    "_usage_by_day": ("day", "session_id", "model"),
}


def bumps(table: str, before: Iterable[Row], after: Iterable[Row]) -> list[Bump]:
    """What the counters must change by when ``table``'s rows went from ``before`` to
    ``after`` (the same rows, by id, read before and after one write)."""
    tally = TALLIES.get(table)
    if tally is None:
        return []
    totals: dict[_Slot, dict[str, int | float]] = {}
    latest: dict[_Slot, dict[str, datetime]] = {}
    earliest: dict[_Slot, dict[str, datetime]] = {}
    for sign, rows in ((-1, before), (1, after)):
        for row in rows:
            for counter in tally.counters:
                key = counter.key(row)
                if key is None:
                    continue
                slot = (counter.table, tuple(key.items()))
                sums = totals.setdefault(slot, {})
                for name, amount in counter.sums(row).items():
                    sums[name] = sums.get(name, 0) + sign * amount
                if sign > 0:
                    _keep(latest.setdefault(slot, {}), counter.latest(row), max)
                    _keep(earliest.setdefault(slot, {}), counter.earliest(row), min)
    out = []
    for slot, sums in totals.items():
        changed = {name: amount for name, amount in sums.items() if amount != 0}
        later, sooner = latest.get(slot, {}), earliest.get(slot, {})
        if changed or later or sooner:
            out.append(Bump(slot[0], dict(slot[1]), changed, later, sooner))
    return out


def _keep(
    times: dict[str, datetime],
    stamps: Mapping[str, datetime | None],
    pick: Callable[[datetime, datetime], datetime],
) -> None:
    """Put each known stamp into ``times``, keeping the ``pick`` (max or min) of the two."""
    for name, stamp in stamps.items():
        if stamp is not None:
            times[name] = stamp if name not in times else pick(times[name], stamp)


class RowOps(Protocol):
    """What a backend provides to apply rows with their counters (one transaction)."""

    def fetch(self, table: str, key: str, keys: Sequence[Any], columns: Sequence[str]) -> list[Row]:
        """The ``columns`` of the rows of ``table`` whose ``key`` is one of ``keys``."""

    def apply(self, write: RowWrite, *, exists: bool | None) -> None:
        """Apply one write; for an ``Insert``, ``exists`` says whether its id is stored
        already (``None``: not known, the backend finds out)."""

    def bump(self, bump: Bump) -> None:
        """Upsert one ``Bump`` into its counter table (``COUNTER_TABLES`` gives the key)."""


def apply_rows(writes: Iterable[RowWrite], ops: RowOps) -> None:
    """Apply ``writes`` in order, keeping the counters of the rows they touch exact."""
    for write in writes:
        tally = TALLIES.get(write.table)
        if tally is None:
            ops.apply(write, exists=None)
            continue
        if isinstance(write, Insert):
            key, keys = "id", [write.values[write.columns.index("id")]]
        else:
            key, keys = write.key, list(write.keys)
        before = ops.fetch(write.table, key, keys, tally.columns)
        if isinstance(write, Insert):
            ops.apply(write, exists=bool(before))
            if before and write.keep:
                continue  # kept as it was: nothing changed
            after = (
                ops.fetch(write.table, key, keys, tally.columns)
                if before
                else [dict(zip(write.columns, write.values, strict=True))]
            )
        else:
            assert isinstance(write, Update)
            ops.apply(write, exists=None)
            after = ops.fetch(write.table, key, keys, tally.columns)
        for bump in bumps(write.table, before, after):
            ops.bump(bump)
