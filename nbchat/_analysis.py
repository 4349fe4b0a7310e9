"""Sessions, transcripts, usage and costs as pandas DataFrames.

Every function takes ``db=``: a path, ``":memory:"``, an open ``Store``, or ``None``
for the default store (``NBCHAT_DB`` or ``~/.nbchat/nbchat.duckdb``). Timestamps are
timezone-aware UTC; token counts are nullable integers (``<NA>`` when the server did
not report them); costs are floats with ``NaN`` where the price is unknown — an
unknown cost is never counted as 0, and the aggregates say how many requests had one.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from ._config import default_db_path
from ._exceptions import StoreError
from ._store import QueryResult, Store

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "compactions",
    "costs",
    "reprice",
    "sessions",
    "sql",
    "tool_calls",
    "transcript",
    "turns",
    "usage",
]

Db = str | os.PathLike[str] | Store | None

_INTEGER_TYPES = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER"}
)
_FLOAT_TYPES = frozenset({"FLOAT", "DOUBLE", "HUGEINT", "UBIGINT", "UHUGEINT"})
_TEXT_TYPES = frozenset({"VARCHAR", "JSON", "UUID"})


# One handle per store file, kept for the process: a query right after another (the
# usual notebook cell) then finds the file still attached instead of paying ~10 ms to
# attach and detach it. The handle holds the file only while the lease lingers (0.5 s
# after the last use), like a session's writes do, so other kernels are not locked out.
_handles: OrderedDict[str, Store] = OrderedDict()
_handles_lock = threading.Lock()
_MAX_HANDLES = 4


@contextmanager
def open_store(db: Db) -> Iterator[Store]:
    """The store ``db`` names (a path, ``":memory:"``, a ``Store``, or ``None``)."""
    if isinstance(db, Store):
        yield db
        return
    raw = default_db_path() if db is None else os.fspath(db)
    if raw == ":memory:":  # a new private store each time: nothing worth keeping
        store = Store.open(raw)
        try:
            yield store
        finally:
            store.close()
        return
    key = os.path.abspath(os.path.expanduser(raw))
    with _handles_lock:
        kept = _handles.pop(key, None)
        store = kept if kept is not None else Store.open(raw)
        _handles[key] = store  # most recently used last
        while len(_handles) > _MAX_HANDLES:
            _handles.popitem(last=False)[1].close()
    yield store


# ------------------------------------------------------------------ DataFrame building


def _text_dtype() -> Any:
    import pandas as pd

    # pandas 3 has a real string dtype ("str", NaN for missing); older pandas uses object.
    return "str" if int(pd.__version__.split(".")[0]) >= 3 else object


def _series(values: Any, type_name: str) -> pd.Series:
    """One DuckDB result column as a pandas Series of the matching dtype."""
    import numpy as np
    import pandas as pd

    mask = np.ma.getmaskarray(values)
    data = np.ma.getdata(values)
    kind = type_name.upper()
    if kind == "DATE":  # a calendar day, not a midnight timestamp
        days = data.astype("datetime64[D]").tolist()
        return pd.Series([None if m else d for d, m in zip(days, mask, strict=True)], dtype=object)
    if kind == "TIMESTAMP WITH TIME ZONE" or kind.startswith("TIMESTAMP"):
        stamps = data.astype("datetime64[us]").copy()
        stamps[mask] = np.datetime64("NaT")
        series = pd.Series(stamps)
        if kind == "TIMESTAMP WITH TIME ZONE":
            series = series.dt.tz_localize("UTC")
        return series
    if kind in _INTEGER_TYPES:
        return pd.Series(pd.arrays.IntegerArray(data.astype("int64"), mask.copy()))
    if kind in _FLOAT_TYPES or kind.startswith("DECIMAL"):
        floats = data.astype("float64").copy()
        floats[mask] = np.nan
        return pd.Series(floats)
    if kind == "BOOLEAN":
        return pd.Series(pd.arrays.BooleanArray(data.astype(bool), mask.copy()))
    items = [None if missing else item for item, missing in zip(data.tolist(), mask, strict=True)]
    if kind in _TEXT_TYPES:
        return pd.Series(items, dtype=_text_dtype())
    return pd.Series(items, dtype=object)


def _frame(
    result: QueryResult, parsers: dict[str, Callable[[Any], Any]] | None = None
) -> pd.DataFrame:
    """A DataFrame of ``result``; ``parsers`` turn named text columns into Python objects."""
    import pandas as pd

    columns: dict[str, pd.Series] = {}
    for name, kind in zip(result.columns, result.types, strict=True):
        series = _series(result.data[name], kind)
        if parsers and name in parsers:
            parse = parsers[name]
            series = pd.Series(
                [None if pd.isna(v) else parse(v) for v in series.tolist()], dtype=object
            )
        columns[name] = series
    return pd.DataFrame(columns, columns=result.columns)


def _json(text: str) -> Any:
    return json.loads(text)


# ------------------------------------------------------------------ the frames

# The cost of a group of requests. A request that was never answered (an HTTP error
# before any token) costs 0 and is known; the sum of the known costs is shown beside the
# count of unknown ones, but a group whose answered requests all have unknown costs is
# NULL (NaN), never 0.
_KNOWN_COST = """
    CASE WHEN count(*) FILTER (WHERE {r}cost_usd IS NULL) > 0
              AND count(*) FILTER (WHERE {r}cost_usd IS NOT NULL AND {r}error IS NULL) = 0
         THEN NULL ELSE sum({r}cost_usd) END"""


def sessions(db: Db = None) -> pd.DataFrame:
    """One row per session, oldest first.

    Columns: ``id``, ``title``, ``model``, ``created_at``, ``last_active`` (latest
    message or request), ``turns`` (live ones), ``superseded_turns`` (replaced by a
    cell re-run), ``messages`` (active ones), ``requests``, ``prompt_tokens``,
    ``completion_tokens`` (sums of reported counts), ``cost_usd`` (sum of known costs;
    NaN if no answered request's price is known), ``unknown_cost_requests`` (requests
    whose price is unknown: when > 0 the true spend is higher than ``cost_usd``),
    ``system_prompt``, ``parent_id``, ``notebook``, ``metadata`` (dict).
    """
    query = f"""
        WITH m AS (
            SELECT session_id, count(*) FILTER (WHERE state = 'active') AS messages,
                   max(created_at) AS last_message_at
            FROM messages GROUP BY session_id
        ), r AS (
            SELECT session_id, count(*) AS requests,
                   sum(prompt_tokens)::BIGINT AS prompt_tokens,
                   sum(completion_tokens)::BIGINT AS completion_tokens,
                   {_KNOWN_COST.format(r="")} AS cost_usd,
                   count(*) FILTER (WHERE cost_usd IS NULL) AS unknown_cost_requests,
                   max(created_at) AS last_request_at
            FROM requests GROUP BY session_id
        ), superseded AS (  -- turns whose user message a cell re-run replaced
            SELECT turn_id FROM messages WHERE role = 'user' AND turn_id IS NOT NULL
            GROUP BY turn_id HAVING bool_and(state = 'superseded')
        ), t AS (
            SELECT turns.session_id, count(*) FILTER (WHERE x.turn_id IS NULL) AS turns,
                   count(x.turn_id) AS superseded_turns
            FROM turns LEFT JOIN superseded x ON x.turn_id = turns.id
            GROUP BY turns.session_id
        )
        SELECT s.id, s.title, s.model, s.created_at,
               greatest(s.created_at, m.last_message_at, r.last_request_at) AS last_active,
               coalesce(t.turns, 0) AS turns, coalesce(t.superseded_turns, 0) AS superseded_turns,
               coalesce(m.messages, 0) AS messages,
               coalesce(r.requests, 0) AS requests,
               -- no request at all costs nothing; requests without a known value stay NULL
               CASE WHEN r.requests IS NULL THEN 0 ELSE r.prompt_tokens END AS prompt_tokens,
               CASE WHEN r.requests IS NULL THEN 0 ELSE r.completion_tokens END
                   AS completion_tokens,
               CASE WHEN r.requests IS NULL THEN 0.0 ELSE r.cost_usd END AS cost_usd,
               coalesce(r.unknown_cost_requests, 0) AS unknown_cost_requests,
               s.system_prompt, s.parent_id, s.notebook, s.metadata
        FROM sessions s
        LEFT JOIN m ON m.session_id = s.id
        LEFT JOIN r ON r.session_id = s.id
        LEFT JOIN t ON t.session_id = s.id
        ORDER BY s.created_at, s.id
    """
    with open_store(db) as store:
        return _frame(store.query(query), {"metadata": _json})


def transcript(
    session_id: str,
    db: Db = None,
    include_compacted: bool = False,
    include_superseded: bool = False,
) -> pd.DataFrame:
    """The messages of one session in conversation order (``seq``).

    By default only the live context (state ``active``); ``include_compacted`` adds
    messages folded into a summary, ``include_superseded`` those replaced by a cell
    re-run. Columns: ``seq``, ``role``, ``content``, ``name``, ``tool_calls`` (list of
    dicts with id, name, arguments), ``tool_call_id``, ``status`` (ok, interrupted,
    error, cancelled, aborted, ...), ``state``, ``turn_id``, ``round``, ``cell_id``,
    ``created_at``, ``id``.
    """
    query = """
        SELECT seq, role, content, name, tool_calls, tool_call_id, status, state, turn_id,
               round, cell_id, created_at, id
        FROM messages
        WHERE session_id = ?
          AND (state = 'active' OR (? AND state = 'compacted') OR (? AND state = 'superseded'))
        ORDER BY seq, created_at
    """
    with open_store(db) as store:
        if not store.has_session(session_id):
            raise StoreError(f"No session {session_id} in {store.path}.")
        result = store.query(query, [session_id, include_compacted, include_superseded])
        return _frame(result, {"tool_calls": _json})


def usage(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per model request (chat and summary requests), oldest first.

    Columns: ``created_at``, ``session_id``, ``turn_id``, ``round``, ``model``,
    ``provider``, ``purpose`` (chat or summary), ``prompt_tokens``,
    ``completion_tokens``, ``cached_tokens``, ``reasoning_tokens``, ``total_tokens``
    (``<NA>`` when unreported), ``cost_usd`` (NaN = unknown price), ``ttft_ms``
    (time to first token), ``duration_ms``, ``finish_reason``, ``error``, ``id``.
    """
    query = """
        SELECT created_at, session_id, turn_id, round, model, provider, purpose,
               prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens,
               prompt_tokens + completion_tokens AS total_tokens, cost_usd, ttft_ms,
               duration_ms, finish_reason, error, id
        FROM requests WHERE ? IS NULL OR session_id = ?
        ORDER BY created_at, id
    """
    with open_store(db) as store:
        return _frame(store.query(query, [session_id, session_id]))


def tool_calls(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per tool call that ran (or failed), oldest first.

    Columns: ``created_at``, ``session_id``, ``turn_id``, ``round``, ``call_id``,
    ``name``, ``arguments`` (the model's raw JSON text), ``result`` (what the model
    saw), ``is_error``, ``error_kind``, ``duration_ms``, ``id``.
    """
    query = """
        SELECT created_at, session_id, turn_id, round, call_id, name, arguments, result,
               is_error, error_kind, duration_ms, id
        FROM tool_calls WHERE ? IS NULL OR session_id = ?
        ORDER BY created_at, id
    """
    with open_store(db) as store:
        return _frame(store.query(query, [session_id, session_id]))


def compactions(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per compaction of a session's history (failed attempts too), oldest first.

    Columns: ``created_at``, ``session_id``, ``turn_id``, ``strategy``, ``from_seq``,
    ``to_seq`` (the folded message range), ``tokens_before``, ``tokens_after``,
    ``model``, ``cost_usd``, ``summary``, ``error`` (set when the attempt failed and
    the history stayed as it was), ``id``.
    """
    query = """
        SELECT created_at, session_id, turn_id, strategy, from_seq, to_seq, tokens_before,
               tokens_after, model, cost_usd, summary, error, id
        FROM compactions WHERE ? IS NULL OR session_id = ?
        ORDER BY created_at, id
    """
    with open_store(db) as store:
        return _frame(store.query(query, [session_id, session_id]))


def turns(db: Db = None, session_id: str | None = None) -> pd.DataFrame:
    """One row per turn (one ``send()`` or ``%%chat`` cell), oldest first.

    Columns: ``started_at``, ``finished_at`` (NaT while running or if the process
    died), ``session_id``, ``status`` (how it ended), ``state`` (``active``, or
    ``superseded`` once a cell re-run replaced it, or ``compacted``), ``user_text``,
    ``rounds``, ``requests``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``
    (NaN = unknown), ``duration_ms``, ``error``, ``cell_id``, ``id``.
    """
    query = """
        WITH asked AS (
            SELECT turn_id,
                   CASE WHEN bool_and(state = 'superseded') THEN 'superseded'
                        WHEN bool_or(state = 'active') THEN 'active'
                        ELSE 'compacted' END AS state
            FROM messages
            WHERE role = 'user' AND turn_id IS NOT NULL AND (? IS NULL OR session_id = ?)
            GROUP BY turn_id
        )
        SELECT t.started_at, t.finished_at, t.session_id, t.status,
               coalesce(a.state, 'active') AS state, t.user_text, t.rounds, t.requests,
               t.prompt_tokens, t.completion_tokens, t.cost_usd, t.duration_ms, t.error,
               t.cell_id, t.id
        FROM turns t LEFT JOIN asked a ON a.turn_id = t.id
        WHERE ? IS NULL OR t.session_id = ?
        ORDER BY t.started_at, t.id
    """
    with open_store(db) as store:
        return _frame(store.query(query, [session_id] * 4))


# Grouping keys of costs(): fixed SQL fragments chosen by name, never caller text.
_COST_GROUPS: dict[str, tuple[str, str, str]] = {
    "model": (
        "r.model, r.provider",
        "r.model, r.provider",
        "cost_usd DESC NULLS LAST, requests DESC, r.model",
    ),
    "day": ("(r.created_at AT TIME ZONE 'UTC')::DATE AS day", "day", "day"),
    "session": (
        "r.session_id, any_value(s.title) AS title, min(r.created_at) AS first_request_at",
        "r.session_id",
        "first_request_at, r.session_id",
    ),
}


def costs(by: Literal["model", "day", "session"] = "model", db: Db = None) -> pd.DataFrame:
    """Requests, tokens and dollars grouped by model, by UTC day, or by session.

    Key columns: ``model`` and ``provider`` (sorted by cost, highest first), ``day``
    (the UTC calendar day, a ``datetime.date``, oldest first), or ``session_id``,
    ``title``, ``first_request_at``. Then ``requests``, ``prompt_tokens``,
    ``completion_tokens``, ``cached_tokens``, ``cost_usd`` (sum of known costs; NaN
    when no answered request's cost is known; a request refused before any token
    costs 0) and
    ``unknown_cost_requests`` — requests whose price is unknown, never counted as 0:
    when it is above 0 the real spend is higher than ``cost_usd``.
    """
    if by not in _COST_GROUPS:
        raise ValueError(f"costs(by=...) must be 'model', 'day' or 'session', not {by!r}.")
    select, group, order = _COST_GROUPS[by]
    # Only the per-session view needs the session's title.
    join = "LEFT JOIN sessions s ON s.id = r.session_id" if by == "session" else ""
    query = f"""
        SELECT {select}, count(*) AS requests, sum(r.prompt_tokens)::BIGINT AS prompt_tokens,
               sum(r.completion_tokens)::BIGINT AS completion_tokens,
               sum(r.cached_tokens)::BIGINT AS cached_tokens,
               {_KNOWN_COST.format(r="r.")} AS cost_usd,
               count(*) FILTER (WHERE r.cost_usd IS NULL) AS unknown_cost_requests
        FROM requests r {join}
        GROUP BY {group}
        ORDER BY {order}
    """
    with open_store(db) as store:
        return _frame(store.query(query))


def sql(
    query: str,
    params: Sequence[Any] | Mapping[str, Any] | None = None,
    db: Db = None,
    *,
    allow_files: bool = False,
) -> pd.DataFrame:
    """Run one read-only SELECT against the store and return its rows.

    Use ``?`` placeholders with a list of ``params`` (or ``$name`` ones with a dict)
    rather than formatting values into the text. Anything but a SELECT (INSERT,
    UPDATE, DROP, ATTACH, SET, ...) is refused, and the query runs sandboxed on the
    store opened read-only: it cannot change the store, load extensions, or read other
    files (``read_csv``, ``glob``...) unless ``allow_files=True``. Tables:
    sessions, messages, requests, tool_calls, compactions, turns, _migrations.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise StoreError(f"sql() could not parse the query: {exc}") from exc
    if len(statements) != 1:
        raise StoreError(f"sql() runs exactly one statement; this query has {len(statements)}.")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise StoreError(
            f"sql() is read-only: it runs SELECT queries, and this is a {kind.name} statement."
        )
    with open_store(db) as store:
        return _frame(store.query_read_only(query, params, allow_files=allow_files))


# ------------------------------------------------------------------ tables for people
# What %chat cost and %chat sessions show: rounded, labelled columns and a totals row.
# The functions above stay the numeric source of truth; these only format them.


def _when(values: pd.Series) -> pd.Series:
    shown: pd.Series = values.dt.strftime("%Y-%m-%d %H:%M:%S UTC").fillna("—")
    return shown


def _money_total(costs: pd.Series, unknown: int) -> str:
    from ._text import money

    known = costs.dropna()
    if known.empty and unknown:
        return "unknown"
    text = money(float(known.sum()))
    return f"{text} + {unknown} unknown" if unknown else text


def _human_table(
    frame: pd.DataFrame,
    columns: dict[str, str],
    *,
    totals: dict[str, str] | None = None,
    label_column: str | None = None,
) -> pd.DataFrame:
    """``frame`` with ``columns`` renamed and formatted for reading, plus a totals row.

    Timestamps to the second, durations in seconds, costs as money ("unknown" where a
    cost is NaN), text trimmed; ``totals`` maps a shown column to its total's text.
    """
    import pandas as pd

    from ._text import money

    shown: dict[str, pd.Series] = {}
    for name, label in columns.items():
        values = frame[name]
        if name.endswith("_at"):
            values = _when(values)
        elif name == "duration_ms":
            values = (values / 1000).round(1)
        elif name == "cost_usd":
            values = values.map(lambda v: "unknown" if pd.isna(v) else money(float(v)))
        elif name in ("user_text", "title"):
            values = values.fillna("").map(lambda t: t if len(t) <= 60 else t[:59] + "…")
        shown[label] = values.reset_index(drop=True)
    table = pd.DataFrame(shown)
    if totals is not None and not table.empty:
        row = {label: "" for label in table.columns}
        row.update(totals)
        if label_column is not None:
            row[label_column] = "total"
        table = pd.concat([table.astype(object), pd.DataFrame([row])], ignore_index=True)
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
    live = frame[frame["state"] != "superseded"]
    unknown = int(live["cost_usd"].isna().sum())
    totals = {
        "requests": str(int(live["requests"].sum())),
        "tokens in": str(int(live["prompt_tokens"].sum())),
        "tokens out": str(int(live["completion_tokens"].sum())),
        "cost": _money_total(live["cost_usd"], unknown),
        "seconds": f"{live['duration_ms'].sum() / 1000:.1f}",
        "state": "live turns",
    }
    return _human_table(frame, columns, totals=totals, label_column="started")


def costs_table(by: Literal["model", "day", "session"], db: Db = None) -> pd.DataFrame:
    """``costs(by)`` made readable (what ``%chat cost model|day|session`` shows)."""
    frame = costs(by=by, db=db)
    keys = {
        "model": {"model": "model", "provider": "provider"},
        "day": {"day": "day (UTC)"},
        "session": {"session_id": "session", "title": "title"},
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
    unknown = int(frame["unknown_cost_requests"].sum())
    totals = {
        "requests": str(int(frame["requests"].sum())),
        "tokens in": str(int(frame["prompt_tokens"].sum())),
        "tokens out": str(int(frame["completion_tokens"].sum())),
        "cost": _money_total(frame["cost_usd"], unknown),
        "unknown-cost requests": str(unknown),
    }
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
    return _human_table(frame, columns)


def reprice(model: str | None = None, db: Db = None) -> pd.DataFrame:
    """``usage()`` with every request's cost computed again from today's prices.

    For "what would this traffic have cost": after ``register_price()`` (or a newer
    genai-prices), requests stored before it show their cost from their token counts.
    ``cost_usd`` is the new figure (NaN where tokens or a price are still missing) and
    ``stored_cost_usd`` what was stored then; the store itself is not changed. ``model``
    keeps only that model's requests.
    """
    from ._pricing import request_cost
    from ._types import RequestUsage

    frame = usage(db=db)
    if model is not None:
        frame = frame[frame["model"] == model].reset_index(drop=True)
    frame = frame.rename(columns={"cost_usd": "stored_cost_usd"})

    import pandas as pd

    def count(value: Any) -> int | None:
        return None if pd.isna(value) else int(value)

    # Requests with the same model and token counts cost the same: priced once.
    prices: dict[tuple[Any, ...], float | None] = {}
    new_costs = []
    columns = ["model", "prompt_tokens", "completion_tokens", "cached_tokens"]
    for name, prompt, completion, cached in frame[columns].itertuples(index=False):
        key = (name, count(prompt), count(completion), count(cached))
        if key not in prices:
            tokens = RequestUsage(
                prompt_tokens=key[1], completion_tokens=key[2], cached_tokens=key[3]
            )
            prices[key] = request_cost(str(name), None, tokens)[0]
        new_costs.append(prices[key])
    position = list(frame.columns).index("stored_cost_usd")
    frame.insert(position, "cost_usd", [float("nan") if c is None else c for c in new_costs])
    return frame
