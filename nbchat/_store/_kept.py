"""The transcripts a process read, kept for its next reads of the same sessions.

``transcript()`` reads a session's rows from wherever in the file its time window
falls, and decoding that stretch of every column is most of its cost. A process keeps
the last few results (``KeptRows``), each with the session's ``messages_version`` when
it was read: every write of a session's messages, by any process, sets a new version in
the same transaction (``_tally.Tally.stamp``; a refill of the counters, new ones for
all), so the version read with the file held says whether the kept rows are still the
stored ones.

This process's own writes go through: the writer reads the kept sessions' versions at
the start of its transaction, records the messages rows it writes (``Recorder``), and
after the commit applies them to the kept rows whose version was the stored one
(``KeptRows.write_through``), with the version the write set. A read after this
process's write is then a read of the version alone. A write the recorder cannot follow
(an update of a row the kept rows leave out) drops the kept rows; another process's
write leaves them stale, and the next read reads the session from the file.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ._frames import QueryResult, to_frame
from ._queries import QUERIES
from ._rows import Insert, RowWrite, Update

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["KEEP_RESULTS", "KeptRows", "Recorder"]

KEEP_RESULTS = 8  # transcripts kept per store
_KEEP_ROWS = 20_000  # and none longer

# The states ``transcript()`` shows with each of its two flags (``_queries._TRANSCRIPT``).
_FLAGS = {"compacted": "include_compacted", "superseded": "include_superseded"}


@dataclass
class _Kept:
    version: int
    result: QueryResult
    frame: pd.DataFrame | None = None


def _copied(frame: pd.DataFrame, json_columns: frozenset[str]) -> pd.DataFrame:
    """A copy of ``frame`` that shares nothing a caller can change: its parsed JSON
    values (lists, dicts) are copied too, not only the column holding them."""
    import pandas as pd

    out = frame.copy(deep=True)
    for name in json_columns & set(out.columns):
        values = [copy.deepcopy(v) for v in out[name]]
        out[name] = pd.Series(values, index=out.index, dtype=object)
    return out


@dataclass
class Recorder:
    """What one transaction wrote to ``messages``, for ``KeptRows.write_through``:
    the kept sessions' versions at its start, its writes in order (each ``Insert`` with
    whether its id was stored), the session of each row it read, and the version it
    left on each session whose messages it wrote."""

    before: dict[str, int | None] = field(default_factory=dict)
    writes: list[tuple[RowWrite, bool | None]] = field(default_factory=list)
    sessions: dict[Any, str] = field(default_factory=dict)
    stamped: dict[str, int] = field(default_factory=dict)

    def fetched(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            if "id" in row and "session_id" in row:
                self.sessions[row["id"]] = row["session_id"]


class KeptRows:
    """The last few Arrow results of one session's rows a lease read, by query and
    parameters, each with the session's ``messages_version`` then.

    Arrow tables are immutable and each call builds its own frame, so a kept result is
    never changed by its readers; a write-through replaces it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Each result with its version, and the frame made of it once asked for.
        self._rows: OrderedDict[tuple[Any, ...], _Kept] = OrderedDict()

    def get(self, key: tuple[Any, ...], version: int | None) -> QueryResult | None:
        with self._lock:
            found = self._rows.get(key)
            if version is None or found is None or found.version != version:
                return None
            self._rows.move_to_end(key)
            return found.result

    def put(self, key: tuple[Any, ...], version: int | None, result: QueryResult) -> None:
        if version is None or result.table is None or result.table.num_rows > _KEEP_ROWS:
            return
        with self._lock:
            self._rows[key] = _Kept(version, result)
            self._rows.move_to_end(key)
            while len(self._rows) > KEEP_RESULTS:
                self._rows.popitem(last=False)

    def frame(
        self, key: tuple[Any, ...], result: QueryResult, json_columns: frozenset[str]
    ) -> pd.DataFrame:
        """``to_frame(result)``, copied from the frame made of it before if it is kept:
        making one was most of what a read of kept rows cost (~1.4 ms for 100 rows,
        a copy ~0.3 ms). The kept frame is never handed out, only copies of it."""
        with self._lock:
            found = self._rows.get(key)
            made = found.frame if found is not None and found.result is result else None
        if made is None:
            made = to_frame(result, json_columns)
            with self._lock:
                found = self._rows.get(key)
                if found is not None and found.result is result:
                    found.frame = made
                else:
                    return made  # not kept (any more): this one is the caller's
        return _copied(made, json_columns)

    def sessions(self) -> list[str]:
        """The sessions some kept rows are of."""
        with self._lock:
            return sorted({str(dict(key[1:])["session_id"]) for key in self._rows})

    def write_through(self, recorded: Recorder) -> None:
        """Apply a committed transaction's writes to the kept rows of the sessions it
        stamped; rows kept at another version than the one it started from, or that its
        writes cannot be applied to, are dropped."""
        with self._lock:
            for key, kept in list(self._rows.items()):
                version, result = kept.version, kept.result
                params = dict(key[1:])
                session = str(params["session_id"])
                if session not in recorded.stamped:
                    continue  # its messages were not written
                del self._rows[key]
                if recorded.before.get(session, None) != version:
                    continue  # another process wrote them since they were read
                try:
                    patched = _patched(result, session, params, recorded)
                except (KeyError, TypeError, ValueError):
                    # Rows it cannot follow: read from the file next time. The write is
                    # committed and must not look failed to the writer (it would retry).
                    patched = None
                if patched is not None and patched.table.num_rows <= _KEEP_ROWS:
                    # Its frame made here, on the writer's side: the read after the
                    # write is then the version and a copy (making it was ~1.4 ms).
                    frame = to_frame(patched, QUERIES[key[0]].json_columns)
                    self._rows[key] = _Kept(recorded.stamped[session], patched, frame)


def _patched(
    result: QueryResult, session: str, params: Mapping[str, Any], recorded: Recorder
) -> QueryResult | None:
    """``result`` with ``recorded``'s writes applied as the store applied them, filtered
    and ordered as the query does; ``None`` when that cannot be known from the rows."""
    import pyarrow as pa

    table = result.table
    rows: dict[Any, dict[str, Any]] = {row["id"]: row for row in table.to_pylist()}
    columns = table.column_names
    for write, exists in recorded.writes:
        if isinstance(write, Insert):
            values = dict(zip(write.columns, write.values, strict=True))
            if write.keep and exists:
                continue  # INSERT OR IGNORE of a stored row: nothing changed
            rows.pop(values["id"], None)  # replaced (or new)
            if values.get("session_id") == session:
                rows[values["id"]] = {c: values.get(c) for c in columns}
        elif isinstance(write, Update):
            if write.key != "id":
                return None
            for row_id in write.keys:
                row = rows.get(row_id)
                if row is None:
                    if recorded.sessions.get(row_id) == session:
                        return None  # a stored row the kept ones leave out (its state)
                    continue
                check = write.only_if_null
                if check is not None and (check not in row or row[check] is not None):
                    if check not in row:
                        return None
                    continue
                row.update({c: v for c, v in write.values.items() if c in row})
    shown = {"active"} | {state for state, flag in _FLAGS.items() if params.get(flag)}
    kept = [row for row in rows.values() if row["state"] in shown]
    kept.sort(key=lambda row: (row["seq"], row["created_at"]))
    try:
        patched = pa.Table.from_pylist(kept, schema=table.schema)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None
    return replace(result, table=patched)
