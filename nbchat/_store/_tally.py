"""Counters kept up to date on write, so overview queries need not read every row (m007).

Three bookkeeping tables sum the rows of ``messages``, ``requests`` and ``turns``:

* ``_session_counts`` (one row per session): active messages, requests, token and cost
  sums with how many rows reported them, turns, and the latest message and request times
  — what ``sessions()`` shows — and the earliest message time (m008): between it and the
  latest lie all the session's messages, which lets ``transcript()`` skip the rest. Since
  m009 it also holds a copy of the session's own row (title, model, ...; ``created_at``
  NULL until that row is stored) and its superseded turns, so ``sessions()`` reads this
  one table: no join, no second table scanned.
* ``_turn_counts`` (one row per turn with a user message or a ``turns`` row): user
  messages, and how many of them are superseded — a stored turn whose user messages all
  are was replaced by a cell re-run — its ``turns`` rows and its session (m009).
* ``_usage_by_day`` (one row per UTC day, session and model): requests, tokens and costs
  — what the dashboard draws.
* ``_usage_by_day_model`` (m010; one row per UTC day and model): the same sums, for the
  dashboard's spend charts (a few hundred rows where ``_usage_by_day`` has ~1M).
* ``_tool_counts`` (m010; one row per UTC day, tool and duration bin): tool calls and
  errors — the dashboard's tool table, whose median duration is read from the bins
  (``_recount.duration_bin``: 16 per doubling, so within ~2% of the median of the rows).

A counter is never incremented blindly, so replays (the same event written twice), marks
(compaction, supersede) and replaced rows keep it exact: ``apply_rows`` reads the counted
columns of the rows a write touches before and after it, and adds the difference of their
contributions (``bumps``); copied columns are set to the row's values after the write.
Whether a turn is superseded is not a sum: ``apply_rows`` sees it flip when it bumps
the turn's counters and moves the session's ``superseded_turns`` by one. A backend
supplies four primitives (``RowOps``) and runs ``apply_rows`` on every event's rows
(``_rows.rows_of``) and on its own writes of a session's row, inside one transaction;
the arithmetic is here, once. Sums are exact; a latest time only ever moves forward, which
matches the rows because a replayed row's time is never earlier than the row it replaces;
an earliest time only ever moves back, so it may be earlier than any row left (a replayed
row moved later), never later: a bound, not a figure.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, Protocol

from ._recount import duration_bin
from ._rows import Insert, RowWrite, Update

__all__ = [
    "COUNTER_TABLES",
    "SESSION_COPIES",
    "TALLIES",
    "TURN_STATE",
    "Bump",
    "RowOps",
    "apply_rows",
    "bumps",
    "superseded",
]

Row = Mapping[str, Any]
_Slot = tuple[str, tuple[tuple[str, Any], ...]]  # a counter row: its table and key


@dataclass(frozen=True)
class Bump:
    """Add ``add`` to the counter row of ``table`` at ``key`` (created at zero if missing),
    raise each ``latest`` column to at least its value, lower each ``earliest`` one to at
    most its value, and set each ``copy`` column to its value."""

    table: str
    key: dict[str, Any]
    add: dict[str, int | float] = field(default_factory=dict)
    latest: dict[str, datetime] = field(default_factory=dict)
    earliest: dict[str, datetime] = field(default_factory=dict)
    copy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Counter:
    """How one source row counts in one counter table: its key (``None``: nowhere), the
    amounts it adds, the times it raises and lowers, and the values it copies there."""

    table: str
    key: Callable[[Row], dict[str, Any] | None]
    sums: Callable[[Row], dict[str, int | float]]
    latest: Callable[[Row], dict[str, datetime | None]] = lambda row: {}
    earliest: Callable[[Row], dict[str, datetime | None]] = lambda row: {}
    copies: Callable[[Row], dict[str, Any]] = lambda row: {}


@dataclass(frozen=True)
class Tally:
    """The counters of one source table and the columns they read; ``stamp`` is a column
    of ``_session_counts`` set to a new random number by every write of the table's rows
    (even one that changes no counter): a reader that kept rows of a session knows
    from it whether they are still the stored ones."""

    columns: tuple[str, ...]
    counters: tuple[Counter, ...]
    stamp: str | None = None


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


def _day_sums(row: Row) -> dict[str, int | float]:
    return {**_request_sums(row), "cached_tokens": row["cached_tokens"] or 0}


def _session(row: Row) -> dict[str, Any]:
    return {"session_id": row["session_id"]}


def _user_turn(row: Row) -> dict[str, Any] | None:
    if row["role"] != "user" or row["turn_id"] is None:
        return None
    return {"turn_id": row["turn_id"]}


def _in_session(row: Row) -> dict[str, Any]:
    return {"session_id": row["session_id"]}


# The columns of a session's row that its counter row copies (m009), as ``sessions()``
# shows them; ``sessions.id`` is the counters' ``session_id``.
SESSION_COPIES = (
    "title", "model", "created_at", "system_prompt", "parent_id", "notebook", "metadata",
)  # fmt: skip
# What says whether a turn is superseded (``_turn_counts``, m009).
TURN_STATE = ("session_id", "user_messages", "superseded_user_messages", "turn_rows")


def superseded(turn: Row) -> bool:
    """Whether a turn's counters say it is superseded: it is stored, and all its user
    messages (at least one) were replaced by a cell re-run."""
    users = turn["user_messages"]
    return bool(turn["turn_rows"] > 0 and users > 0 and turn["superseded_user_messages"] == users)


_REQUEST_COLUMNS = (
    "id", "session_id", "model", "prompt_tokens", "completion_tokens", "cached_tokens",
    "cost_usd", "error", "created_at",
)  # fmt: skip

TALLIES: dict[str, Tally] = {
    "messages": Tally(
        ("id", "session_id", "role", "state", "turn_id", "created_at"),
        stamp="messages_version",  # transcript()'s rows, kept by a reader (m009)
        counters=(
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
                copies=_in_session,
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
                _day_sums,
            ),
            Counter(
                "_usage_by_day_model",
                lambda row: {"day": _day(row), "model": row["model"] or ""},
                _day_sums,
            ),
        ),
    ),
    "turns": Tally(
        ("id", "session_id"),
        (
            Counter("_session_counts", _session, lambda row: {"turns": 1}),
            Counter(
                "_turn_counts",
                lambda row: {"turn_id": row["id"]},
                lambda row: {"turn_rows": 1},
                copies=_in_session,
            ),
        ),
    ),
    "tool_calls": Tally(
        ("id", "name", "is_error", "duration_ms", "created_at"),
        (
            Counter(
                "_tool_counts",
                lambda row: {
                    "day": _day(row),
                    "tool": row["name"],
                    "bin": duration_bin(row["duration_ms"]),
                },
                lambda row: {"calls": 1, "errors": int(bool(row["is_error"]))},
            ),
        ),
    ),
    "sessions": Tally(
        ("id", *SESSION_COPIES),
        (
            Counter(
                "_session_counts",
                lambda row: {"session_id": row["id"]},
                lambda row: {},
                # An Insert may leave a column out: NULL, as the row stores it.
                copies=lambda row: {c: row.get(c) for c in SESSION_COPIES},
            ),
        ),
    ),
}

# The counter tables, each with its key columns (m007 creates them).
COUNTER_TABLES: dict[str, tuple[str, ...]] = {
    "_session_counts": ("session_id",),
    "_turn_counts": ("turn_id",),
    "_usage_by_day": ("day", "session_id", "model"),
    "_tool_counts": ("day", "tool", "bin"),  # m010
    "_usage_by_day_model": ("day", "model"),  # m010
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
    was: dict[_Slot, dict[str, Any]] = {}  # the copied values before, and after
    now: dict[_Slot, dict[str, Any]] = {}
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
                (now if sign > 0 else was).setdefault(slot, {}).update(counter.copies(row))
                if sign > 0:
                    _keep(latest.setdefault(slot, {}), counter.latest(row), max)
                    _keep(earliest.setdefault(slot, {}), counter.earliest(row), min)
    out = []
    for slot, sums in totals.items():
        changed = {name: amount for name, amount in sums.items() if amount != 0}
        later, sooner = latest.get(slot, {}), earliest.get(slot, {})
        copy = now.get(slot, {})
        if copy == was.get(slot, {}) and slot in was:
            copy = {}  # the copied values did not change
        if changed or later or sooner or copy:
            out.append(Bump(slot[0], dict(slot[1]), changed, later, sooner, copy))
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
            known = _updated(write, before, tally.columns)
            after = ops.fetch(write.table, key, keys, tally.columns) if known is None else known
        changes = bumps(write.table, before, after)
        if tally.stamp is not None:
            changes = _stamped(changes, [*before, *after], tally.stamp)
        for bump in changes:
            if bump.table == "_turn_counts":
                _bump_turn(bump, ops)
            else:
                ops.bump(bump)


def _stamped(changes: list[Bump], rows: Sequence[Row], column: str) -> list[Bump]:
    """``changes`` with ``column`` of the counters of every session of ``rows`` set to a
    new random number, in the bump of those counters if there is one (no extra write)."""
    token = secrets.randbits(63)  # not random's: a user's random.seed() must not repeat it
    sessions = {row["session_id"] for row in rows}
    out = []
    for bump in changes:
        session = bump.key.get("session_id") if bump.table == "_session_counts" else None
        if session in sessions:
            bump = replace(bump, copy={**bump.copy, column: token})
            sessions.discard(session)
        out.append(bump)
    out += [Bump("_session_counts", {"session_id": s}, copy={column: token}) for s in sessions]
    return out


def _updated(write: Update, before: list[Row], columns: Sequence[str]) -> list[Row] | None:
    """The rows ``write`` leaves, from the rows it found, without reading them again
    (most writes are updates: one query less each); ``None`` when that cannot be known
    (no row found and an insert instead, a condition on a column not read)."""
    check = write.only_if_null
    if (write.otherwise is not None and not before) or (check and check not in columns):
        return None
    changed = {c: v for c, v in write.values.items() if c in columns}
    return [row if check and row[check] is not None else {**row, **changed} for row in before]


def _bump_turn(bump: Bump, ops: RowOps) -> None:
    """Apply a bump of a turn's counters, and move its session's ``superseded_turns`` if
    the turn became (or stopped being) superseded."""
    [turn_id] = bump.key.values()
    found = ops.fetch("_turn_counts", "turn_id", [turn_id], TURN_STATE)
    before: dict[str, Any] = (
        dict(found[0]) if found else {"session_id": None} | {c: 0 for c in TURN_STATE[1:]}
    )
    after: dict[str, Any] = {c: before[c] + bump.add.get(c, 0) for c in TURN_STATE[1:]}
    after["session_id"] = bump.copy.get("session_id", before["session_id"])
    ops.bump(bump)
    old = before["session_id"] if found and superseded(before) else None
    new = after["session_id"] if superseded(after) else None
    if old != new:
        for session_id, step in ((old, -1), (new, 1)):
            if session_id is not None:
                ops.bump(
                    Bump("_session_counts", {"session_id": session_id}, {"superseded_turns": step})
                )
