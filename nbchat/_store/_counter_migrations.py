"""The migrations that keep counters beside the rows (m007–m011): each adds a counter
table or column and fills it from the rows already stored (``_recount.py``), or puts
old rows right so the counters count them as newer code does.

They are steps of ``_migrations.MIGRATIONS`` like any other, never edited after release.
The counters themselves are kept on every write by ``_tally.py``; PostgreSQL keeps none
(its analysis derives them per query), so there the fills are skipped.
"""

from __future__ import annotations

from ._recount import (
    NEW_VERSION,
    SESSION_COPIES,
    SUPERSEDED_TURNS,
    USER_TURNS,
    Connection,
    fill_counters,
    fill_dashboard_counts,
    fill_tool_counts,
)

__all__ = [
    "OLD_DECLINED",
    "m007_counters",
    "m008_first_message_times",
    "m009_session_summaries",
    "m010_dashboard_counts",
    "m011_declined_not_errors",
]

# The columns of the request sums in a counter table (m007, m010).
_SUMS = """
        requests BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        prompt_reported BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        completion_reported BIGINT NOT NULL DEFAULT 0,
        cost_usd DOUBLE NOT NULL DEFAULT 0,
        costed BIGINT NOT NULL DEFAULT 0,
        answered_costed BIGINT NOT NULL DEFAULT 0"""


def m007_counters(con: Connection) -> None:
    """Counters kept on write (``_tally.py``): per session, per turn, per day and model;
    filled here from the rows already stored.

    Not on PostgreSQL (``keeps_counters`` False): the team store's analysis derives them
    from the rows it fetches, per query (``_mirror``), so its writers keep none.
    """
    if not getattr(con, "keeps_counters", True):
        return
    sums = _SUMS
    con.execute(
        f"""
        CREATE TABLE _session_counts (
            session_id VARCHAR PRIMARY KEY,
            messages BIGINT NOT NULL DEFAULT 0,
            last_message_at TIMESTAMPTZ,
            {sums},
            last_request_at TIMESTAMPTZ,
            turns BIGINT NOT NULL DEFAULT 0
        )
        """
    )
    con.execute(
        """
        CREATE TABLE _turn_counts (
            turn_id VARCHAR PRIMARY KEY,
            user_messages BIGINT NOT NULL DEFAULT 0,
            superseded_user_messages BIGINT NOT NULL DEFAULT 0
        )
        """
    )
    con.execute(
        f"""
        CREATE TABLE _usage_by_day (
            day DATE NOT NULL,
            session_id VARCHAR NOT NULL,
            model VARCHAR NOT NULL,
            {sums},
            cached_tokens BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (day, session_id, model)
        )
        """
    )
    fill_counters(con)


def m008_first_message_times(con: Connection) -> None:
    """Each session's earliest message time beside its latest (``_session_counts``), so a
    session's messages are read from the stretch of the table between the two (DuckDB
    skips row groups whose times lie outside), not from every row; filled from the rows.

    Not on PostgreSQL, like m007: it keeps no counters.
    """
    if not getattr(con, "keeps_counters", True):
        return
    con.execute("ALTER TABLE _session_counts ADD COLUMN first_message_at TIMESTAMPTZ")
    con.execute(
        """
        UPDATE _session_counts SET first_message_at = m.first
        FROM (SELECT session_id, min(created_at) AS first FROM messages GROUP BY session_id) m
        WHERE m.session_id = _session_counts.session_id
        """
    )


def m009_session_summaries(con: Connection) -> None:
    """Everything ``sessions()`` shows in one row per session (``_session_counts``): a
    copy of the session's own columns (``created_at`` NULL while only counters exist)
    and its superseded turns, with each turn's session and ``turns`` rows kept in
    ``_turn_counts`` to count them (``_tally.py``); filled from the rows. And a random
    ``messages_version`` that every write of the session's messages changes, so a
    transcript read once is known to be still current.

    Not on PostgreSQL, like m007: it keeps no counters.
    """
    if not getattr(con, "keeps_counters", True):
        return
    for name, kind in SESSION_COPIES.items():
        con.execute(f"ALTER TABLE _session_counts ADD COLUMN {name} {kind}")
    con.execute("ALTER TABLE _session_counts ADD COLUMN superseded_turns BIGINT NOT NULL DEFAULT 0")
    con.execute("ALTER TABLE _session_counts ADD COLUMN messages_version BIGINT")
    con.execute("ALTER TABLE _turn_counts ADD COLUMN session_id VARCHAR")
    con.execute("ALTER TABLE _turn_counts ADD COLUMN turn_rows BIGINT NOT NULL DEFAULT 0")
    # Filled by updates, not by fill_counters: DuckDB commits half a million rows deleted
    # and inserted again in a keyed table in ~50 s, these in ~5 s (1M messages).
    copies = ", ".join(f"{name} = s.{name}" for name in SESSION_COPIES)
    copies += f", messages_version = {NEW_VERSION}"
    con.execute(
        f"UPDATE _session_counts SET {copies} FROM sessions s"
        " WHERE s.id = _session_counts.session_id"
    )
    names = ", ".join(SESSION_COPIES)
    con.execute(  # sessions with nothing counted yet
        f"INSERT INTO _session_counts (session_id, {names}) SELECT id, {names} FROM sessions s"
        " WHERE NOT EXISTS (SELECT 1 FROM _session_counts c WHERE c.session_id = s.id)"
    )
    con.execute(
        f"UPDATE _turn_counts SET session_id = u.session_id FROM ({USER_TURNS}) u"
        " WHERE u.turn_id = _turn_counts.turn_id"
    )
    con.execute(
        "UPDATE _turn_counts SET session_id = t.session_id, turn_rows = 1 FROM turns t"
        " WHERE t.id = _turn_counts.turn_id"
    )
    con.execute(  # turns without a user message
        "INSERT INTO _turn_counts (turn_id, session_id, turn_rows)"
        " SELECT id, session_id, 1 FROM turns t"
        " WHERE NOT EXISTS (SELECT 1 FROM _turn_counts c WHERE c.turn_id = t.id)"
    )
    con.execute(SUPERSEDED_TURNS)


def m010_dashboard_counts(con: Connection) -> None:
    """Two more counters for the dashboard (``_tally.py``): tool calls and errors per UTC
    day, tool and duration bin, so its tool table reads a few thousand counters, not
    every call; and requests and costs per UTC day and model, so its spend charts read
    one row per day and model, not one per day, session and model. Filled from the rows.

    Not on PostgreSQL, like m007: it keeps no counters.
    """
    if not getattr(con, "keeps_counters", True):
        return
    con.execute(
        """
        CREATE TABLE _tool_counts (
            day DATE NOT NULL,
            tool VARCHAR NOT NULL,
            bin INTEGER NOT NULL,
            calls BIGINT NOT NULL DEFAULT 0,
            errors BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (day, tool, bin)
        )
        """
    )
    con.execute(
        f"""
        CREATE TABLE _usage_by_day_model (
            day DATE NOT NULL,
            model VARCHAR NOT NULL,
            {_SUMS},
            cached_tokens BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (day, model)
        )
        """
    )
    fill_dashboard_counts(con)


# What the python tool answered, before declined calls had their own error_kind, when the
# user chose not to run its code: a PermissionError, stored as a failed call.
OLD_DECLINED = "%PermissionError: the user declined to run this code; do not retry it%"


def m011_declined_not_errors(con: Connection) -> None:
    """Tool calls the user declined, stored before ``"declined"`` existed (as a
    ``tool_error``, ``is_error`` true, their message's status ``"error"``), count as the
    newer ones do: ``error_kind`` ``"declined"``, not an error, the message ``"declined"``.
    What the model was told (the result) stays. Where counters are kept, the tool counts
    are filled again from the rows (PostgreSQL's analysis derives them per query).
    """
    con.execute(
        "UPDATE tool_calls SET is_error = false, error_kind = 'declined'"
        " WHERE is_error AND error_kind = 'tool_error' AND result LIKE ?",
        [OLD_DECLINED],
    )
    con.execute(
        "UPDATE messages SET status = 'declined'"
        " WHERE role = 'tool' AND status = 'error' AND content LIKE ?",
        [OLD_DECLINED],
    )
    if getattr(con, "keeps_counters", True):
        fill_tool_counts(con)
