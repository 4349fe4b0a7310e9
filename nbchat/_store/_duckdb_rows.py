"""The rows of events written to DuckDB: one transaction per batch, few statements.

``write_events`` applies the rows of several events (``_rows.rows_of``) and their
counters (``_tally``) in one transaction: all are written or none, and
``UnstorableRow`` names the table of the one DuckDB refused. A batch looks up at once
which of its ids exist and inserts rows of one table together, since each statement
costs ~0.3 ms; a plain INSERT runs where no row has the id, an upsert only where one
has (a replayed event). The transcripts this process keeps are brought up to date from
what it wrote (``_kept.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from .._events import Event
from .._exceptions import UnstorableRow
from . import key_of
from ._kept import KeptRows, Recorder
from ._rows import (
    Insert,
    RowWrite,
    Update,
    rows_of,
)
from ._tally import COUNTER_TABLES, Bump, apply_rows

__all__ = [
    "duckdb_module",
    "first_line",
    "from_epoch_us",
    "parsed",
    "write_event",
    "write_events",
]


def write_event(con: Any, event: Event) -> None:
    """Write ``event``'s rows (``_rows.rows_of``) and their counters in one transaction.

    Raises ``UnstorableRow`` if DuckDB refuses the values; other DuckDB errors pass.
    """
    write_events(con, [event])


def write_events(con: Any, events: Sequence[Event], kept: KeptRows | None = None) -> None:
    """``write_event`` for several events, in one transaction: all are written or none
    (``UnstorableRow`` names the table of the one refused). The rows ``kept`` holds of
    the sessions whose messages it writes are brought up to date (``_kept.py``)."""
    entries = [entry for event in events if (entry := rows_of(event)) is not None]
    if not entries:
        return
    writes = [write for _, writes in entries for write in writes]
    sessions = kept.sessions() if kept is not None else []
    recorder = Recorder() if sessions and any(w.table == "messages" for w in writes) else None
    ops = _BatchOps(con, writes, recorder)

    def work() -> None:
        if recorder is not None:  # the versions the kept rows must have been read at
            found = con.execute(parsed(_VERSIONS), [sessions]).fetchall()
            recorder.before.update({str(sid): version for sid, version in found})
        ops.look_up()
        for _, writes in entries:
            apply_rows(writes, ops)
        ops.finish()

    _in_transaction(con, lambda: ops.writing, work)
    if recorder is not None and kept is not None:
        kept.write_through(recorder)


_VERSIONS = (
    "SELECT session_id, messages_version FROM _session_counts WHERE list_contains(?, session_id)"
)


def _in_transaction(con: Any, table_of: Callable[[], str], work: Callable[[], None]) -> None:
    # ``table_of``: the table being written when it failed (for ``UnstorableRow``).
    duckdb = duckdb_module()
    con.execute(parsed("BEGIN TRANSACTION"))
    try:
        work()
        con.execute(parsed("COMMIT"))
    except BaseException as exc:
        con.execute("ROLLBACK")
        table = table_of()
        if isinstance(exc, duckdb.DataError | duckdb.IntegrityError):
            # Conversion (2**64 into BIGINT, NaN, bad JSON), out of range, a NOT NULL.
            raise UnstorableRow(table, first_line(exc)) from exc
        if isinstance(exc, duckdb.BinderException | duckdb.CatalogException):
            raise UnstorableRow(
                table, f"the store's schema is not the one this nbchat expects ({first_line(exc)})"
            ) from exc
        if isinstance(exc, duckdb.InvalidInputException):
            # The Python value itself cannot be converted (an int past 128 bits, a surrogate).
            raise UnstorableRow(table, first_line(exc)) from exc
        if isinstance(exc, TypeError | ValueError | OverflowError):
            raise UnstorableRow(table, f"{type(exc).__name__}: {exc}") from exc
        raise


class _RowOps:
    """``_tally.RowOps`` on a DuckDB connection inside a transaction."""

    def __init__(self, con: Any) -> None:
        self.con = con

    def fetch(
        self, table: str, key: str, keys: Sequence[Any], columns: Sequence[str]
    ) -> list[Mapping[str, Any]]:
        # Timestamps as epoch microseconds (see from_epoch_us); names are _tally's own.
        shown = ", ".join(f"epoch_us({c})" if c.endswith("_at") else c for c in columns)
        where = f"{key} = ?" if len(keys) == 1 else f"list_contains(?, {key})"
        sql = parsed(f"SELECT {shown} FROM {table} WHERE {where}")
        rows = self.con.execute(sql, [keys[0] if len(keys) == 1 else list(keys)]).fetchall()
        out: list[Mapping[str, Any]] = []
        for row in rows:
            values = dict(zip(columns, row, strict=True))
            for c in columns:
                if c.endswith("_at"):
                    values[c] = from_epoch_us(values[c])
            out.append(values)
        return out

    def apply(self, write: RowWrite, *, exists: bool | None) -> None:
        if isinstance(write, Insert):
            # Inside a transaction a failed INSERT would end it: find out first.
            if exists is None:
                key = key_of(write.table)
                found = self.con.execute(
                    parsed(f"SELECT count(*) FROM {write.table} WHERE {key} = ?"),
                    [write.values[write.columns.index(key)]],
                ).fetchone()
                exists = bool(found and found[0])
            _insert(self.con, write, upsert=exists)
        else:
            _update(self.con, write, self)

    def bump(self, bump: Bump) -> None:
        # UPDATE, and INSERT when no row matched: DuckDB's ON CONFLICT DO UPDATE costs
        # about three times as much, and the row exists for all but a session's first.
        changes = [f"{c} = {c} + ?" for c in bump.add]
        changes += [f"{c} = greatest({c}, ?::TIMESTAMPTZ)" for c in bump.latest]
        changes += [f"{c} = least({c}, ?::TIMESTAMPTZ)" for c in bump.earliest]
        changes += [f"{c} = ?" for c in bump.copy]
        where = " AND ".join(f"{c} = ?" for c in COUNTER_TABLES[bump.table])
        times = [*bump.latest.values(), *bump.earliest.values()]
        values = [*bump.add.values(), *times, *bump.copy.values(), *bump.key.values()]
        updated = self.con.execute(
            parsed(f"UPDATE {bump.table} SET {', '.join(changes)} WHERE {where}"), values
        ).fetchone()
        if updated and updated[0]:
            return
        names = [*bump.key, *bump.add, *bump.latest, *bump.earliest, *bump.copy]
        marks = ", ".join("?" * len(names))
        self.con.execute(
            parsed(f"INSERT INTO {bump.table} ({', '.join(names)}) VALUES ({marks})"),
            [*bump.key.values(), *bump.add.values(), *times, *bump.copy.values()],
        )


class _BatchOps(_RowOps):
    """``_RowOps`` for the rows of one or more events in one transaction, in fewer
    statements (each costs DuckDB ~0.3 ms, whatever it does): which ids are stored
    already is asked once per table, not once per row; the inserts of new rows are held
    and sent together, one statement per table; the counters' bumps are summed per
    counter row and applied once (sums, latest and earliest times do not depend on the
    order). A read or an update of a table first sends the inserts held for it, so every
    statement sees the rows before it. ``finish()`` sends what is still held.
    """

    def __init__(
        self, con: Any, writes: Sequence[RowWrite], recorder: Recorder | None = None
    ) -> None:
        super().__init__(con)
        self.recorder = recorder  # what it writes of messages (``_kept.Recorder``)
        self.writing = ""  # the table of the statement sent last (what a failure names)
        self._absent: dict[str, set[Any]] = {}  # per table: keys known not to be stored
        self._held: dict[str, list[Insert]] = {}
        self._bumps: dict[tuple[str, tuple[tuple[str, Any], ...]], Bump] = {}
        self._wanted: dict[str, set[Any]] = {}
        for write in writes:
            row = write if isinstance(write, Insert) else write.otherwise
            if row is not None:
                self._wanted.setdefault(row.table, set()).add(_key_value(row))

    def look_up(self) -> None:
        """Ask, once per table, which of the rows to insert are stored already."""
        for table, keys in self._wanted.items():
            self.writing = table
            key, listed = key_of(table), list(keys)
            sql = f"SELECT {key} FROM {table} WHERE {key} IN ({', '.join('?' * len(listed))})"
            stored = {found for (found,) in self.con.execute(parsed(sql), listed).fetchall()}
            self._absent[table] = keys - stored

    def fetch(
        self, table: str, key: str, keys: Sequence[Any], columns: Sequence[str]
    ) -> list[Mapping[str, Any]]:
        absent = self._absent.get(table, ())
        if key == key_of(table) and all(k in absent for k in keys):
            return []  # not stored, not held: nothing to read
        self._send(table)
        self._send_bumps(table)  # a counter read (a turn's state) sees the bumps before it
        rows = super().fetch(table, key, keys, columns)
        if self.recorder is not None and table == "messages":
            self.recorder.fetched(rows)
        return rows

    def apply(self, write: RowWrite, *, exists: bool | None) -> None:
        if self.recorder is not None and write.table == "messages":
            self.recorder.writes.append((write, exists))
        if isinstance(write, Insert) and not exists:
            absent = self._absent.get(write.table, set())
            value = _key_value(write)
            if value in absent:
                absent.discard(value)  # held now: a later read sends it first
                self._held.setdefault(write.table, []).append(write)
                return
        self._send(write.table)
        self.writing = write.table
        super().apply(write, exists=exists)

    def bump(self, bump: Bump) -> None:
        slot = (bump.table, tuple(bump.key.items()))
        held = self._bumps.get(slot)
        if held is None:
            self._bumps[slot] = Bump(
                bump.table,
                dict(bump.key),
                add=dict(bump.add),
                latest=dict(bump.latest),
                earliest=dict(bump.earliest),
                copy=dict(bump.copy),
            )
            return
        for name, amount in bump.add.items():
            held.add[name] = held.add.get(name, 0) + amount
        for name, stamp in bump.latest.items():
            held.latest[name] = max(held.latest.get(name, stamp), stamp)
        for name, stamp in bump.earliest.items():
            held.earliest[name] = min(held.earliest.get(name, stamp), stamp)
        held.copy.update(bump.copy)  # copied values: the last one is what stays

    def finish(self) -> None:
        """Send the held inserts and the summed bumps."""
        for table in list(self._held):
            self._send(table)
        self._send_bumps(None)

    def _send_bumps(self, table: str | None) -> None:
        """Apply the held bumps of ``table`` (of every table: ``None``)."""
        for slot in [slot for slot in self._bumps if table is None or slot[0] == table]:
            bump = self._bumps.pop(slot)
            if bump.latest or bump.earliest or bump.copy or any(bump.add.values()):
                self.writing = bump.table
                super().bump(bump)
                version = bump.copy.get("messages_version")
                if self.recorder is not None and version is not None:
                    self.recorder.stamped[str(bump.key["session_id"])] = version

    def _send(self, table: str) -> None:
        rows = self._held.pop(table, None)
        if rows:
            self.writing = table
        while rows:
            # One statement per run of rows with the same columns (a table's rows have one
            # shape but for a turn's ``otherwise`` row).
            columns = rows[0].columns
            run = [row for row in rows if row.columns == columns]
            rows = [row for row in rows if row.columns != columns]
            marks = "(" + ", ".join("?" * len(columns)) + ")"
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join(
                [marks] * len(run)
            )
            self.con.execute(parsed(sql), [value for row in run for value in row.values])


def _key_value(row: Insert) -> Any:
    return row.values[row.columns.index(key_of(row.table))]


def _update(con: Any, write: Update, ops: _RowOps) -> None:
    # Table and column names are fixed strings of _rows, never user text.
    names = list(write.values)
    assignments = ", ".join(f"{name} = ?" for name in names)
    if len(write.keys) == 1:
        where, keys = f"{write.key} = ?", write.keys[0]
    else:
        where, keys = f"list_contains(?, {write.key})", write.keys
    if write.only_if_null:
        where += f" AND {write.only_if_null} IS NULL"
    params = [*(write.values[name] for name in names), keys]
    updated = con.execute(
        parsed(f"UPDATE {write.table} SET {assignments} WHERE {where}"), params
    ).fetchone()
    if write.otherwise is not None and (not updated or not updated[0]):
        ops.apply(write.otherwise, exists=False)


def _insert(con: Any, row: Insert, *, upsert: bool = False) -> None:
    """Insert one row; with ``upsert``, a row with the same id is replaced (a replayed
    event), or kept (``row.keep``). A plain INSERT is about three times cheaper in
    DuckDB than an upsert, so the upsert runs only when the id is known to exist."""
    names = ", ".join(row.columns)
    marks = ", ".join("?" * len(row.columns))
    verb = ("INSERT OR IGNORE" if row.keep else "INSERT OR REPLACE") if upsert else "INSERT"
    con.execute(parsed(f"{verb} INTO {row.table} ({names}) VALUES ({marks})"), row.values)


@lru_cache(maxsize=256)  # batches add a statement per number of rows inserted together
def parsed(sql: str) -> Any:
    """``sql`` parsed once: DuckDB's parser is a large part of a one-row INSERT's cost
    (~30%), and a parsed statement can be executed again and again."""
    return duckdb_module().extract_statements(sql)[0]


def first_line(exc: BaseException) -> str:
    """The first line of a DuckDB error (its kind and message, without the query excerpt)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_epoch_us(value: int | None) -> datetime | None:
    # Timestamps are read as epoch microseconds: DuckDB's own TIMESTAMPTZ -> datetime
    # conversion needs pytz, which nbchat does not depend on.
    return None if value is None else _EPOCH + timedelta(microseconds=value)


def duckdb_module() -> Any:
    """The duckdb module, imported on first use."""
    import duckdb

    return duckdb
