"""The analysis queries, by name.

Each ``NamedQuery`` is the SQL of one DataFrame of ``nbchat._analysis`` and the names
of its parameters, in the order of its ``?`` placeholders. The queries are DuckDB SQL:
a second backend runs them through DuckDB too (attached to its database), so there is
one copy of each. ``_frames.to_frame`` turns a result into typed columns.

A new DataFrame is a query here (and its name in ``QueryName``) plus a function in
``_analysis.py`` that asks the store for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import StoreError
from ._recount import BINS_PER_DOUBLING, NO_DURATION

__all__ = [
    "QUERIES",
    "SESSION_TIMES",
    "SESSION_USAGE",
    "NamedQuery",
    "check_select",
]


@dataclass(frozen=True)
class NamedQuery:
    """One analysis query: its SQL, its parameters in placeholder order, its JSON columns."""

    sql: str
    params: tuple[str, ...] = ()
    json_columns: frozenset[str] = field(default_factory=frozenset)
    # Its ``first_us`` and ``last_us`` bound the times of one session's messages (epoch
    # microseconds, both included): a backend that keeps the counters passes the
    # session's (m008); the others leave them open (NULL), which reads the same rows.
    session_times: bool = False
    # Columns its rows are put in order by after the fetch (ascending, none NULL), for a
    # query whose SQL has no ORDER BY: DuckDB sorting 10k session rows with their text
    # took ~7 ms of sessions()' ~17, where ordering the fetched columns takes ~1.
    order_by: tuple[str, ...] = ()

    def bind(self, values: Mapping[str, Any]) -> list[Any]:
        """The placeholder values, from ``values`` by name (a missing one is ``None``)."""
        unknown = set(values) - set(self.params)
        if unknown:
            raise TypeError(f"unexpected query parameters: {', '.join(sorted(unknown))}")
        return [values.get(name) for name in self.params]


# The cost of a group of requests. A request that was never answered (an HTTP error
# before any token) costs 0 and is known; the sum of the known costs is shown beside the
# count of unknown ones, but a group whose answered requests all have unknown costs is
# NULL (NaN), never 0.
_KNOWN_COST = """
    CASE WHEN count(*) FILTER (WHERE {r}cost_usd IS NULL) > 0
              AND count(*) FILTER (WHERE {r}cost_usd IS NOT NULL AND {r}error IS NULL) = 0
         THEN NULL ELSE sum({r}cost_usd) END"""

# From the counters kept on write (``_tally.py``), which hold a copy of each session's row
# (m009): one table read, no join. A row without ``created_at`` counts rows of a session
# whose own row is not stored (yet): not a session to list.
_SESSIONS = """
    SELECT session_id AS id, title, model, created_at,
           greatest(created_at, last_message_at, last_request_at) AS last_active,
           turns - superseded_turns AS turns, superseded_turns, messages, requests,
           -- no request at all costs nothing; requests without a known value stay NULL
           CASE WHEN requests = 0 THEN 0 WHEN prompt_reported > 0 THEN prompt_tokens END
               AS prompt_tokens,
           CASE WHEN requests = 0 THEN 0 WHEN completion_reported > 0 THEN completion_tokens END
               AS completion_tokens,
           CASE WHEN requests = 0 THEN 0.0
                WHEN costed = 0 OR (requests > costed AND answered_costed = 0) THEN NULL
                ELSE cost_usd END AS cost_usd,
           requests - costed AS unknown_cost_requests,
           system_prompt, parent_id, notebook, metadata
    FROM _session_counts
    WHERE created_at IS NOT NULL
"""

# Ids are random, so every stretch of the table holds every id and DuckDB reads the whole
# session_id column to find one session; its messages' times (the counters' bounds) let
# it skip the stretches written before or after them.
_TRANSCRIPT = """
    SELECT seq, role, content, reasoning, name, tool_calls, tool_call_id, status, state,
           turn_id, round, cell_id, created_at, id, attachments
    FROM messages
    WHERE session_id = ?
      AND created_at BETWEEN coalesce(make_timestamptz(?::BIGINT), '-infinity'::TIMESTAMPTZ)
                         AND coalesce(make_timestamptz(?::BIGINT), 'infinity'::TIMESTAMPTZ)
      AND (state = 'active' OR (? AND state = 'compacted') OR (? AND state = 'superseded'))
    ORDER BY seq, created_at
"""

# The bounds of a session's message times, from the counters (``session_times``), and
# the version of its messages (m009: a new one with every write of them).
SESSION_TIMES = (
    "SELECT epoch_us(first_message_at), epoch_us(last_message_at), messages_version"
    " FROM _session_counts WHERE session_id = ?"
)

# One row per image a message carries (an image sent twice is two rows, one stored copy).
_ATTACHMENTS = """
    WITH refs AS (
        SELECT m.session_id, m.id AS message_id, m.seq, m.role, m.created_at,
               unnest(from_json(m.attachments, '["json"]')) AS ref
        FROM messages m
        WHERE m.attachments IS NOT NULL
    )
    SELECT r.created_at, r.session_id, r.message_id, r.seq, r.role,
           ref->>'name' AS name, ref->>'sha256' AS sha256, ref->>'mime' AS mime,
           (ref->>'size')::BIGINT AS size, (ref->>'width')::INTEGER AS width,
           (ref->>'height')::INTEGER AS height, ref->>'detail' AS detail, ref->>'url' AS url,
           CASE WHEN ? THEN a.data END AS data
    FROM refs r LEFT JOIN attachments a ON a.sha256 = ref->>'sha256'
    WHERE ? IS NULL OR r.session_id = ?
    ORDER BY r.created_at, r.seq
"""

_USAGE = """
    SELECT created_at, session_id, turn_id, round, model, provider, purpose,
           prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens,
           cache_write_tokens, prompt_tokens + completion_tokens AS total_tokens, cost_usd,
           cost_source, ttft_ms, first_text_ms, duration_ms, finish_reason, error,
           estimated_prompt_tokens, estimated_cost_usd, suspected_truncation, attempts,
           retried_after, id
    FROM requests WHERE ? IS NULL OR session_id = ?
    ORDER BY created_at, id
"""

_TOOL_CALLS = """
    SELECT created_at, session_id, turn_id, round, call_id, name, arguments, result,
           is_error, error_kind, duration_ms, id
    FROM tool_calls WHERE ? IS NULL OR session_id = ?
    ORDER BY created_at, id
"""

_COMPACTIONS = """
    SELECT created_at, session_id, turn_id, strategy, from_seq, to_seq, tokens_before,
           tokens_after, model, cost_usd, summary, error, id
    FROM compactions WHERE ? IS NULL OR session_id = ?
    ORDER BY created_at, id
"""

_TURNS = """
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


def _costs(select: str, group: str, order: str, join: str = "") -> str:
    return f"""
        SELECT {select}, count(*) AS requests, sum(r.prompt_tokens)::BIGINT AS prompt_tokens,
               sum(r.completion_tokens)::BIGINT AS completion_tokens,
               sum(r.cached_tokens)::BIGINT AS cached_tokens,
               {_KNOWN_COST.format(r="r.")} AS cost_usd,
               count(*) FILTER (WHERE r.cost_usd IS NULL) AS unknown_cost_requests,
               -- where the known costs came from: "genai-prices", "server", "registered"...
               coalesce(string_agg(DISTINCT r.cost_source, ', ' ORDER BY r.cost_source), '')
                   AS cost_sources
        FROM requests r {join}
        GROUP BY {group}
        ORDER BY {order}
    """


_BY_SESSION = ("session_id", "session_id")

# Messages containing the search terms (lower-cased), ranked: more distinct terms first,
# then more occurrences, then the newest. No full-text index: DuckDB's fts extension
# cannot be installed offline, and this stays fast enough for a notebook's store.
_SEARCH = """
    WITH hits AS (
        SELECT m.session_id, s.title, m.seq, m.role, m.content, m.state, m.created_at, m.id,
               list_sum(list_transform(?::VARCHAR[], lambda t:
                   CASE WHEN contains(lower(m.content), t) THEN 1 ELSE 0 END)) AS matched,
               list_sum(list_transform(?::VARCHAR[], lambda t:
                   (length(m.content) - length(replace(lower(m.content), t, '')))
                   // greatest(length(t), 1))) AS occurrences
        FROM messages m LEFT JOIN sessions s ON s.id = m.session_id
        WHERE m.content IS NOT NULL AND m.role IN ('user', 'assistant', 'tool')
          AND (? IS NULL OR m.session_id = ?)
    )
    SELECT * FROM hits WHERE matched > 0
    ORDER BY matched DESC, occurrences DESC, created_at DESC, id
    LIMIT ?
"""

# The dashboard's overview, from the per-day counters (``_usage_by_day_model``: per day and
# model, m010; ``_usage_by_day``: per day, session and model) for a range of UTC days
# (both included; NULL: open-ended). A group's cost is the sum of its known costs,
# NULL when none is known; ``unknown`` counts the requests without a price. Sessions
# rank by known cost, then by requests of unknown price (each may have cost anything:
# a session without a price comes before one known to have cost $0), as the charts do.
_DAYS = "(? IS NULL OR u.day >= ?) AND (? IS NULL OR u.day <= ?)"
_DAY_PARAMS = ("since", "since", "until", "until")
_GROUP_SUMS = """sum(u.requests)::BIGINT AS requests,
           CASE WHEN sum(u.costed) > 0 THEN sum(u.cost_usd) END AS cost_usd,
           sum(u.requests - u.costed)::BIGINT AS unknown"""

_SPEND_BY_DAY_MODEL = f"""
    SELECT u.day, nullif(u.model, '') AS model, {_GROUP_SUMS}
    FROM _usage_by_day_model u WHERE {_DAYS}
    GROUP BY u.day, u.model HAVING sum(u.requests) > 0
    ORDER BY u.day, u.model
"""

_SPEND_BY_SESSION_ALL = """
    WITH g AS (
        SELECT session_id, requests,
               CASE WHEN costed > 0 THEN cost_usd END AS cost_usd,
               requests - costed AS unknown,
               title  -- the session's, copied in its counters (m009)
        FROM _session_counts WHERE requests > 0
        ORDER BY coalesce(CASE WHEN costed > 0 THEN cost_usd END, 0) DESC,
                 requests - costed DESC, requests DESC, session_id
        LIMIT ?
    )
    SELECT g.*,
           (SELECT count(*) FROM _session_counts WHERE requests > 0) AS sessions_in_range
    FROM g
    ORDER BY coalesce(g.cost_usd, 0) DESC, g.unknown DESC, g.requests DESC, g.session_id
"""

_SPEND_BY_SESSION = f"""
    WITH g AS (
        SELECT u.session_id, {_GROUP_SUMS}
        FROM _usage_by_day u WHERE {_DAYS}
        GROUP BY u.session_id HAVING sum(u.requests) > 0
    ), totals AS (
        SELECT count(*) AS sessions FROM g
    )
    SELECT g.*, s.title, totals.sessions AS sessions_in_range
    FROM g CROSS JOIN totals LEFT JOIN sessions s ON s.id = g.session_id
    ORDER BY coalesce(g.cost_usd, 0) DESC, g.unknown DESC, g.requests DESC, g.session_id
    LIMIT ?
"""

# Request latency per model for a range of instants [since, until): box-plot figures
# (quartiles; whiskers at the 5th and 95th percentiles) of the requests that did not
# fail (an HTTP error comes back in milliseconds: it is no measure of the model), as
# ``plot.latency`` draws. On a large range the sampled variant reads about 1 row in 50
# (whole blocks of rows, DuckDB's system sampling).
_LATENCY = """
    SELECT model, metric, count(*) AS n,
           quantile_cont(value, [0.05, 0.25, 0.5, 0.75, 0.95]) AS quantiles
    FROM (
        SELECT model, ttft_ms, duration_ms FROM requests {sample}
        WHERE (? IS NULL OR created_at >= ?) AND (? IS NULL OR created_at < ?)
          AND model IS NOT NULL AND error IS NULL
    ) UNPIVOT (value FOR metric IN (ttft_ms, duration_ms))
    GROUP BY model, metric ORDER BY model, metric
"""
_INSTANTS = ("since", "since", "until", "until")

# Per tool: calls, errors and the median duration, from the counters per day, tool and
# duration bin (m010): the median is the middle of the bin the middle call falls in (of
# the two middle calls' bins, averaged, for an even count), so within half a bin
# (~2.2%, ``_recount.duration_bin``) of the rows' median.
_TOOL_STATS = f"""
    WITH b AS (
        SELECT u.tool, u.bin, sum(u.calls) AS calls, sum(u.errors) AS errors
        FROM _tool_counts u WHERE {_DAYS}
        GROUP BY u.tool, u.bin
    ), timed AS (
        SELECT tool, bin, sum(calls) OVER (PARTITION BY tool ORDER BY bin) AS upto,
               sum(calls) OVER (PARTITION BY tool) AS timed
        FROM b WHERE bin <> {NO_DURATION}
    ), middle AS (  -- the bins of the middle call (of the two middle ones: an even count)
        SELECT tool, min(bin) FILTER (WHERE upto >= (timed + 1) // 2) AS low,
               min(bin) FILTER (WHERE upto >= timed // 2 + 1) AS high
        FROM timed WHERE timed > 0 GROUP BY tool
    )
    SELECT * FROM (
        SELECT b.tool, sum(b.calls)::BIGINT AS calls, sum(b.errors)::BIGINT AS errors,
               any_value(2 ** ((middle.low + 0.5) / {BINS_PER_DOUBLING}) / 2
                         + 2 ** ((middle.high + 0.5) / {BINS_PER_DOUBLING}) / 2) AS median_ms
        FROM b LEFT JOIN middle USING (tool)
        GROUP BY b.tool HAVING sum(b.calls) > 0
    )
    ORDER BY errors / calls DESC, calls DESC, tool
"""

QUERIES: dict[str, NamedQuery] = {
    "sessions": NamedQuery(
        _SESSIONS, json_columns=frozenset({"metadata"}), order_by=("created_at", "id")
    ),
    "transcript": NamedQuery(
        _TRANSCRIPT,
        ("session_id", "first_us", "last_us", "include_compacted", "include_superseded"),
        json_columns=frozenset({"tool_calls", "attachments"}),
        session_times=True,
    ),
    "attachments": NamedQuery(_ATTACHMENTS, ("with_data", "session_id", "session_id")),
    "usage": NamedQuery(_USAGE, _BY_SESSION),
    "tool_calls": NamedQuery(_TOOL_CALLS, _BY_SESSION),
    "compactions": NamedQuery(_COMPACTIONS, _BY_SESSION),
    # One name bound four times: each placeholder is its own parameter.
    "turns": NamedQuery(_TURNS, ("session_id", "session_id", "session_id", "session_id")),
    "search": NamedQuery(_SEARCH, ("terms", "terms", "session_id", "session_id", "limit")),
    "spend_by_day_model": NamedQuery(_SPEND_BY_DAY_MODEL, _DAY_PARAMS),
    "spend_by_session": NamedQuery(_SPEND_BY_SESSION, (*_DAY_PARAMS, "limit")),
    "spend_by_session_all": NamedQuery(_SPEND_BY_SESSION_ALL, ("limit",)),
    "latency_by_model": NamedQuery(_LATENCY.format(sample=""), _INSTANTS),
    "latency_by_model_sampled": NamedQuery(
        _LATENCY.format(sample="TABLESAMPLE 2 PERCENT (system)"), _INSTANTS
    ),
    "tool_stats": NamedQuery(_TOOL_STATS, _DAY_PARAMS),
    "costs_by_model": NamedQuery(
        _costs(
            "r.model, r.provider",
            "r.model, r.provider",
            "cost_usd DESC NULLS LAST, requests DESC, r.model",
        )
    ),
    "costs_by_day": NamedQuery(
        _costs("(r.created_at AT TIME ZONE 'UTC')::DATE AS day", "day", "day")
    ),
    "costs_by_notebook": NamedQuery(
        _costs(
            "coalesce(s.notebook, '(no notebook)') AS notebook",
            "notebook",
            "cost_usd DESC NULLS LAST, requests DESC, notebook",
            "LEFT JOIN sessions s ON s.id = r.session_id",
        )
    ),
    "costs_by_user": NamedQuery(
        _costs(
            "coalesce(json_extract_string(s.metadata, '$.user'), '(unknown)') AS user",
            "user",
            "cost_usd DESC NULLS LAST, requests DESC, user",
            "LEFT JOIN sessions s ON s.id = r.session_id",
        )
    ),
    # A session with several tags counts in each of them; untagged ones in "(untagged)".
    "costs_by_tag": NamedQuery(
        _costs(
            "t.tag",
            "t.tag",
            "cost_usd DESC NULLS LAST, requests DESC, t.tag",
            "LEFT JOIN (SELECT id, unnest(CASE WHEN json_array_length(metadata, '$.tags') > 0"
            " THEN CAST(json_extract(metadata, '$.tags') AS VARCHAR[])"
            " ELSE ['(untagged)'] END) AS tag FROM sessions) t ON t.id = r.session_id",
        )
    ),
    "costs_by_session": NamedQuery(
        _costs(
            "r.session_id, any_value(s.title) AS title, min(r.created_at) AS first_request_at",
            "r.session_id",
            "first_request_at, r.session_id",
            # Only the per-session view needs the session's title.
            "LEFT JOIN sessions s ON s.id = r.session_id",
        )
    ),
}

# What a session already spent: count(x) = count(*) exactly when no row has x unknown.
SESSION_USAGE = (
    "SELECT count(*),"
    " CASE WHEN count(prompt_tokens) = count(*) THEN coalesce(sum(prompt_tokens), 0) END,"
    " CASE WHEN count(completion_tokens) = count(*)"
    " THEN coalesce(sum(completion_tokens), 0) END,"
    " coalesce(sum(cached_tokens), 0), coalesce(sum(reasoning_tokens), 0),"
    " CASE WHEN count(cost_usd) = count(*) THEN coalesce(sum(cost_usd), 0) END,"
    # The known parts, and how many requests are not in them (Usage.known_tokens, ...).
    " coalesce(sum(prompt_tokens + completion_tokens), 0),"
    " coalesce(sum(cost_usd), 0),"
    " count(*) - count(prompt_tokens + completion_tokens), count(*) - count(cost_usd)"
    " FROM requests WHERE session_id = ?"
)


def check_select(query: str) -> None:
    """Raise ``StoreError`` unless ``query`` is exactly one SELECT statement that reads only.

    Both backends check here, before running anything: a data-changing statement inside
    a SELECT (``WITH d AS (DELETE ...) SELECT ...``) is refused too, by name.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise StoreError(f"sql() could not parse the query: {exc}") from exc
    if len(statements) != 1:
        raise StoreError(f"sql() runs exactly one statement; this query has {len(statements)}.")
    kind = statements[0].type
    if kind == duckdb.StatementType.MULTI:
        raise StoreError(
            "sql() runs exactly one statement; DuckDB runs this query as several (PIVOT does)."
        )
    if kind != duckdb.StatementType.SELECT:
        # DuckDB's type names are not always the user's words (INSTALL is a LOAD,
        # CHECKPOINT a CALL): name the statement by its first keyword.
        word = _first_keyword(statements[0].query) or kind.name
        if word in ("WITH", "SELECT", "FROM"):  # a read's keyword: DuckDB's name says more
            word = kind.name
        raise StoreError(
            f"sql() is read-only: it runs SELECT queries, and this is {_a(word)} statement."
        )
    changed = _data_change(query) if _CHANGE_WORDS.search(query) else None
    if changed is not None:
        raise StoreError(
            "sql() is read-only: it runs SELECT queries, and this one tries to change data "
            f"({_a(changed)} inside it)."
        )


# Before a comment, a parenthesis or whitespace at its start, a statement's first word.
_FIRST_WORD = re.compile(r"(?:\s+|\(|--[^\n]*(?:\n|$)|/\*.*?\*/)*([A-Za-z_]+)", re.S)
_CHANGE_WORDS = re.compile(r"\b(?:insert|update|delete)\b", re.I)
_CHANGE_NODES = {f"{word}_QUERY_NODE": word for word in ("INSERT", "UPDATE", "DELETE")}


def _a(word: str) -> str:
    """``word`` with its article: an INSERT, a DELETE, a USE."""
    vowel = word[0] in "AEIOU" and not word.startswith(("USE", "UNI"))
    return f"{'an' if vowel else 'a'} {word}"


def _first_keyword(statement: str) -> str | None:
    found = _FIRST_WORD.match(statement)
    return found.group(1).upper() if found else None


def _data_change(query: str) -> str | None:
    """INSERT, UPDATE or DELETE when the SELECT ``query`` holds one (in a CTE), else None.

    From DuckDB's parse tree of the query; only asked when one of those words occurs in
    its text, since it takes a throwaway in-memory DuckDB (no state kept across forks).
    """
    import duckdb

    with duckdb.connect() as con:
        row = con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
    tree = json.loads(row[0]) if row else {}
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            change = _CHANGE_NODES.get(node.get("type"))  # type: ignore[arg-type]
            if change is not None:
                return change
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None
