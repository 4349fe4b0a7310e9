"""The counter tables computed again from every row they count.

The counters (``_tally.py`` keeps them on each write) are filled from the stored rows
when a migration adds them (m007, m010), after a bulk load, and by the team store's
analysis, which keeps none and derives them per query (``_mirror.py``). The SQL here
is the same arithmetic as ``_tally``'s, in bulk; tool-call durations are counted in bins
of equal ratio (``duration_bin``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "BINS_PER_DOUBLING",
    "NEW_VERSION",
    "NO_DURATION",
    "REQUEST_SUMS",
    "SESSION_COPIES",
    "SUPERSEDED_TURNS",
    "USER_TURNS",
    "duration_bin",
    "fill_counters",
    "fill_dashboard_counts",
    "fill_tool_counts",
]

Connection = Any  # a DuckDB connection, or the PostgreSQL backend's translating wrapper


# What a group of requests adds to a counter row (``_tally._request_sums``, in SQL).
REQUEST_SUMS = """
    count(*) AS requests,
    coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    count(prompt_tokens) AS prompt_reported,
    coalesce(sum(completion_tokens), 0) AS completion_tokens,
    count(completion_tokens) AS completion_reported,
    coalesce(sum(cost_usd), 0.0) AS cost_usd,
    count(cost_usd) AS costed,
    count(*) FILTER (WHERE cost_usd IS NOT NULL AND error IS NULL) AS answered_costed"""


# A new ``messages_version`` (``_tally.Tally.stamp``): a reader that kept a session's
# messages reads them again.
NEW_VERSION = "(random() * 4611686018427387904)::BIGINT"

# The columns of a session's row that m009 copies into its counter row
# (``_tally.SESSION_COPIES``), with their types.
SESSION_COPIES = {
    "title": "VARCHAR",
    "model": "VARCHAR",
    "created_at": "TIMESTAMPTZ",
    "system_prompt": "VARCHAR",
    "parent_id": "VARCHAR",
    "notebook": "VARCHAR",
    "metadata": "JSON",
}


# Each turn's user messages, how many of them are superseded, and its session.
USER_TURNS = """
    SELECT turn_id, any_value(session_id) AS session_id, count(*) AS n,
           count(*) FILTER (WHERE state = 'superseded') AS superseded
    FROM messages WHERE role = 'user' AND turn_id IS NOT NULL GROUP BY turn_id"""

# Each session's superseded turns, from the turns' counters (``_tally.superseded``, in SQL).
SUPERSEDED_TURNS = """
    UPDATE _session_counts SET superseded_turns = x.turns
    FROM (
        SELECT session_id, count(*) AS turns FROM _turn_counts
        WHERE turn_rows > 0 AND user_messages > 0 AND superseded_user_messages = user_messages
        GROUP BY session_id
    ) x
    WHERE x.session_id = _session_counts.session_id
"""


def fill_counters(con: Connection) -> None:
    """Compute the counter tables again from every stored row (m007 to m010, bulk loads)."""
    requests = REQUEST_SUMS
    for table in ("_session_counts", "_turn_counts", "_usage_by_day"):
        con.execute(f"DELETE FROM {table}")
    tables = {
        str(name)
        for (name,) in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_name = '_tool_counts'"
        ).fetchall()
    }
    if tables:  # m010
        fill_dashboard_counts(con)
    # The columns later migrations add: m007 and m008 fill the tables as they were then.
    present = {
        str(name)
        for (name,) in con.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = '_session_counts'"
        ).fetchall()
    }
    extra: list[tuple[str, str]] = []  # (column, the value selected for it)
    if "first_message_at" in present:  # m008
        extra.append(("first_message_at", "m.first_message_at"))
    summaries = "superseded_turns" in present  # m009: the session's row, copied
    if summaries:
        extra += [(c, f"s.{c}") for c in SESSION_COPIES]
        extra.append(("messages_version", NEW_VERSION))
    con.execute(
        f"""
        INSERT INTO _session_counts (
            session_id, messages, last_message_at, requests, prompt_tokens, prompt_reported,
            completion_tokens, completion_reported, cost_usd, costed, answered_costed,
            last_request_at, turns{"".join(f", {c}" for c, _ in extra)}
        )
        WITH m AS (
            SELECT session_id, count(*) FILTER (WHERE state = 'active') AS messages,
                   max(created_at) AS last_message_at, min(created_at) AS first_message_at
            FROM messages GROUP BY session_id
        ), r AS (
            SELECT session_id, {requests}, max(created_at) AS last_request_at
            FROM requests GROUP BY session_id
        ), t AS (
            SELECT session_id, count(*) AS turns FROM turns GROUP BY session_id
        ), ids AS (
            SELECT session_id FROM m UNION SELECT session_id FROM r
            UNION SELECT session_id FROM t UNION SELECT id FROM sessions
        )
        SELECT ids.session_id, coalesce(m.messages, 0), m.last_message_at,
               coalesce(r.requests, 0), coalesce(r.prompt_tokens, 0),
               coalesce(r.prompt_reported, 0), coalesce(r.completion_tokens, 0),
               coalesce(r.completion_reported, 0), coalesce(r.cost_usd, 0.0),
               coalesce(r.costed, 0), coalesce(r.answered_costed, 0), r.last_request_at,
               coalesce(t.turns, 0){"".join(f", {v}" for _, v in extra)}
        FROM ids LEFT JOIN m USING (session_id) LEFT JOIN r USING (session_id)
        LEFT JOIN t USING (session_id) LEFT JOIN sessions s ON s.id = ids.session_id
        """
    )
    users = USER_TURNS
    if not summaries:
        con.execute(f"INSERT INTO _turn_counts SELECT turn_id, n, superseded FROM ({users})")
    else:
        con.execute(
            f"""
            INSERT INTO _turn_counts (
                turn_id, user_messages, superseded_user_messages, session_id, turn_rows
            )
            WITH u AS ({users}), t AS (
                SELECT id AS turn_id, any_value(session_id) AS session_id, count(*) AS n
                FROM turns GROUP BY id
            )
            SELECT turn_id, coalesce(u.n, 0), coalesce(u.superseded, 0),
                   coalesce(t.session_id, u.session_id), coalesce(t.n, 0)
            FROM u FULL JOIN t USING (turn_id)
            """
        )
        con.execute(SUPERSEDED_TURNS)
    con.execute(
        f"""
        INSERT INTO _usage_by_day
        SELECT (created_at AT TIME ZONE 'UTC')::DATE AS day, session_id,
               coalesce(model, '') AS model, {requests},
               coalesce(sum(cached_tokens), 0) AS cached_tokens
        FROM requests GROUP BY ALL
        """
    )


# Tool-call durations are counted in bins of equal ratio (m010, ``_tally.py``): bin ``b``
# holds the durations from 2**(b/16) ms to 2**((b+1)/16) ms (~4.4% wide); everything
# under 1/64 ms is in the first. ``NO_DURATION``: a call whose duration is unknown (or
# not a finite number). Written in Python on write, in SQL when filled from the rows.
BINS_PER_DOUBLING = 16
SHORTEST_MS = 1 / 64
NO_DURATION = -(2**31)


def duration_bin(ms: float | None) -> int:
    """The bin a tool call of ``ms`` milliseconds is counted in."""
    if ms is None or not math.isfinite(ms):
        return NO_DURATION
    return math.floor(BINS_PER_DOUBLING * math.log2(max(ms, SHORTEST_MS)))


# The bin of a tool call's duration (``duration_bin``), in SQL.
_DURATION_BIN = f"""
    CASE WHEN isfinite(duration_ms)
         THEN floor({BINS_PER_DOUBLING} * log2(greatest(duration_ms, {SHORTEST_MS})))::INTEGER
         ELSE {NO_DURATION} END"""


def fill_dashboard_counts(con: Connection) -> None:
    """Compute m010's counters again from every stored tool call and request."""
    fill_tool_counts(con)
    con.execute("DELETE FROM _usage_by_day_model")
    con.execute(
        f"""
        INSERT INTO _usage_by_day_model
        SELECT (created_at AT TIME ZONE 'UTC')::DATE AS day, coalesce(model, '') AS model,
               {REQUEST_SUMS}, coalesce(sum(cached_tokens), 0) AS cached_tokens
        FROM requests GROUP BY ALL
        """
    )


def fill_tool_counts(con: Connection) -> None:
    """Compute ``_tool_counts`` again from every stored tool call (m010)."""
    con.execute("DELETE FROM _tool_counts")
    con.execute(
        f"""
        INSERT INTO _tool_counts (day, tool, bin, calls, errors)
        SELECT (created_at AT TIME ZONE 'UTC')::DATE, name, {_DURATION_BIN}, count(*),
               count(*) FILTER (WHERE is_error)
        FROM tool_calls GROUP BY ALL
        """
    )
