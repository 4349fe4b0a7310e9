"""The store's schema, built by named migrations that run in order when a store opens.

Each migration is a function that takes a connection and changes the schema once. The
SQL is DuckDB's, kept to what PostgreSQL also takes: the PostgreSQL backend runs the
same functions through a small translation (``_pg_lease.PgMigrationConnection``: its
types, its placeholders), so both backends have one schema. The table ``_migrations``
records the name and time of every migration that has run, so opening a store applies
only the ones it has not seen. Migrations are
never edited after release: a schema change is a new migration appended to
``MIGRATIONS``. Each runs in its own transaction together with its record, so a
crash mid-migration leaves the store at the previous version. A store that records a
migration this version does not know was written by a newer nbchat: it is refused
rather than written with the wrong idea of its schema.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from .._exceptions import StoreError

__all__ = [
    "ATTRIBUTED_TABLES",
    "BINS_PER_DOUBLING",
    "MIGRATIONS",
    "NO_DURATION",
    "applied_migrations",
    "check_not_newer",
    "duration_bin",
    "fill_counters",
    "migrate",
]

Connection = Any  # a DuckDB connection, or the PostgreSQL backend's translating wrapper
Migration = tuple[str, Callable[[Connection], None]]

_RECORD_TABLE = """
CREATE TABLE IF NOT EXISTS _migrations (
    name VARCHAR PRIMARY KEY,
    applied_at TIMESTAMPTZ NOT NULL
)
"""


def m001_initial(con: Connection) -> None:
    """The first schema: sessions, messages, requests, tool_calls, compactions."""
    con.execute(
        """
        CREATE TABLE sessions (
            id VARCHAR PRIMARY KEY,
            title VARCHAR,
            created_at TIMESTAMPTZ NOT NULL,
            model VARCHAR,
            system_prompt VARCHAR,
            parent_id VARCHAR,
            notebook VARCHAR,
            metadata JSON
        )
        """
    )
    con.execute(
        """
        CREATE TABLE messages (
            id VARCHAR PRIMARY KEY,
            session_id VARCHAR NOT NULL,
            seq INTEGER NOT NULL,
            role VARCHAR NOT NULL,
            content VARCHAR,
            name VARCHAR,
            tool_calls JSON,
            tool_call_id VARCHAR,
            turn_id VARCHAR,
            round INTEGER,
            cell_id VARCHAR,
            status VARCHAR NOT NULL,
            state VARCHAR NOT NULL,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    con.execute(
        """
        CREATE TABLE requests (
            id VARCHAR PRIMARY KEY,
            session_id VARCHAR NOT NULL,
            turn_id VARCHAR,
            round INTEGER,
            model VARCHAR,
            provider VARCHAR,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            cached_tokens BIGINT,
            reasoning_tokens BIGINT,
            cost_usd DOUBLE,
            ttft_ms DOUBLE,
            duration_ms DOUBLE,
            finish_reason VARCHAR,
            error VARCHAR,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    # `arguments` is the model's raw text, not JSON: a model can send malformed
    # arguments, and that failure is exactly what the row must record.
    con.execute(
        """
        CREATE TABLE tool_calls (
            id VARCHAR PRIMARY KEY,
            session_id VARCHAR NOT NULL,
            turn_id VARCHAR,
            call_id VARCHAR,
            name VARCHAR NOT NULL,
            arguments VARCHAR,
            result VARCHAR,
            is_error BOOLEAN NOT NULL,
            duration_ms DOUBLE,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    con.execute(
        """
        CREATE TABLE compactions (
            id VARCHAR PRIMARY KEY,
            session_id VARCHAR NOT NULL,
            from_seq INTEGER,
            to_seq INTEGER,
            summary VARCHAR,
            tokens_before BIGINT,
            tokens_after BIGINT,
            model VARCHAR,
            cost_usd DOUBLE,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )


def m002_turns_and_details(con: Connection) -> None:
    """One row per turn, and the details the event stream carries beyond the first schema."""
    con.execute(
        """
        CREATE TABLE turns (
            id VARCHAR PRIMARY KEY,
            session_id VARCHAR NOT NULL,
            cell_id VARCHAR,
            user_text VARCHAR,
            status VARCHAR,
            rounds INTEGER,
            requests INTEGER,
            prompt_tokens BIGINT,
            completion_tokens BIGINT,
            cost_usd DOUBLE,
            error VARCHAR,
            duration_ms DOUBLE,
            started_at TIMESTAMPTZ NOT NULL,
            finished_at TIMESTAMPTZ
        )
        """
    )
    con.execute("ALTER TABLE requests ADD COLUMN purpose VARCHAR DEFAULT 'chat'")
    con.execute("ALTER TABLE tool_calls ADD COLUMN round INTEGER")
    con.execute("ALTER TABLE tool_calls ADD COLUMN error_kind VARCHAR")
    con.execute("ALTER TABLE compactions ADD COLUMN turn_id VARCHAR")
    con.execute("ALTER TABLE compactions ADD COLUMN strategy VARCHAR")
    con.execute("ALTER TABLE compactions ADD COLUMN error VARCHAR")


def m003_request_estimates(con: Connection) -> None:
    """What the budget check estimated before each chat request, beside what it cost."""
    con.execute("ALTER TABLE requests ADD COLUMN estimated_prompt_tokens BIGINT")
    con.execute("ALTER TABLE requests ADD COLUMN estimated_cost_usd DOUBLE")


def m004_reasoning_and_cost_sources(con: Connection) -> None:
    """Reasoning text on messages; where each cost came from, cache writes, and whether
    the server seemed to cut the prompt, on requests."""
    con.execute("ALTER TABLE messages ADD COLUMN reasoning VARCHAR")
    con.execute("ALTER TABLE requests ADD COLUMN cost_source VARCHAR")
    con.execute("ALTER TABLE requests ADD COLUMN cache_write_tokens BIGINT")
    con.execute("ALTER TABLE requests ADD COLUMN suspected_truncation BOOLEAN")
    con.execute("ALTER TABLE requests ADD COLUMN first_text_ms DOUBLE")


# The tables whose rows say who wrote them (m005).
ATTRIBUTED_TABLES = ("sessions", "messages", "requests", "tool_calls", "compactions", "turns")


def m005_row_attribution(con: Connection) -> None:
    """Who wrote each row and on which host (``JUPYTERHUB_USER`` or the OS user): a team
    store gathers many users' kernels, and a DBA's row-level security needs a column."""
    for table in ATTRIBUTED_TABLES:
        con.execute(f"ALTER TABLE {table} ADD COLUMN username VARCHAR")
        con.execute(f"ALTER TABLE {table} ADD COLUMN hostname VARCHAR")


def m006_attachments(con: Connection) -> None:
    """Images sent with messages: each kept once by its hash, referenced from messages."""
    con.execute(
        """
        CREATE TABLE attachments (
            sha256 VARCHAR PRIMARY KEY,
            mime VARCHAR NOT NULL,
            size BIGINT NOT NULL,
            width INTEGER,
            height INTEGER,
            data BLOB,
            url VARCHAR,
            created_at TIMESTAMPTZ NOT NULL
        )
        """
    )
    # The message's images, without their bytes: [{sha256, mime, size, ...}, ...].
    con.execute("ALTER TABLE messages ADD COLUMN attachments JSON")


# What a group of requests adds to a counter row (``_tally._request_sums``, in SQL).
_REQUEST_SUMS = """
    count(*) AS requests,
    coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
    count(prompt_tokens) AS prompt_reported,
    coalesce(sum(completion_tokens), 0) AS completion_tokens,
    count(completion_tokens) AS completion_reported,
    coalesce(sum(cost_usd), 0.0) AS cost_usd,
    count(cost_usd) AS costed,
    count(*) FILTER (WHERE cost_usd IS NOT NULL AND error IS NULL) AS answered_costed"""


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


# Each turn's user messages, how many of them are superseded, and its session.
_USER_TURNS = """
    SELECT turn_id, any_value(session_id) AS session_id, count(*) AS n,
           count(*) FILTER (WHERE state = 'superseded') AS superseded
    FROM messages WHERE role = 'user' AND turn_id IS NOT NULL GROUP BY turn_id"""

# Each session's superseded turns, from the turns' counters (``_tally.superseded``, in SQL).
_SUPERSEDED_TURNS = """
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
    requests = _REQUEST_SUMS
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
        extra += [(c, f"s.{c}") for c in _SESSION_COPIES]
        extra.append(("messages_version", _NEW_VERSION))
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
    users = _USER_TURNS
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
        con.execute(_SUPERSEDED_TURNS)
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
               {_REQUEST_SUMS}, coalesce(sum(cached_tokens), 0) AS cached_tokens
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


# A new ``messages_version`` (``_tally.Tally.stamp``): a reader that kept a session's
# messages reads them again.
_NEW_VERSION = "(random() * 4611686018427387904)::BIGINT"

# The columns of a session's row that m009 copies into its counter row
# (``_tally.SESSION_COPIES``), with their types.
_SESSION_COPIES = {
    "title": "VARCHAR",
    "model": "VARCHAR",
    "created_at": "TIMESTAMPTZ",
    "system_prompt": "VARCHAR",
    "parent_id": "VARCHAR",
    "notebook": "VARCHAR",
    "metadata": "JSON",
}


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
    for name, kind in _SESSION_COPIES.items():
        con.execute(f"ALTER TABLE _session_counts ADD COLUMN {name} {kind}")
    con.execute("ALTER TABLE _session_counts ADD COLUMN superseded_turns BIGINT NOT NULL DEFAULT 0")
    con.execute("ALTER TABLE _session_counts ADD COLUMN messages_version BIGINT")
    con.execute("ALTER TABLE _turn_counts ADD COLUMN session_id VARCHAR")
    con.execute("ALTER TABLE _turn_counts ADD COLUMN turn_rows BIGINT NOT NULL DEFAULT 0")
    # Filled by updates, not by fill_counters: DuckDB commits half a million rows deleted
    # and inserted again in a keyed table in ~50 s, these in ~5 s (1M messages).
    copies = ", ".join(f"{name} = s.{name}" for name in _SESSION_COPIES)
    copies += f", messages_version = {_NEW_VERSION}"
    con.execute(
        f"UPDATE _session_counts SET {copies} FROM sessions s"
        " WHERE s.id = _session_counts.session_id"
    )
    names = ", ".join(_SESSION_COPIES)
    con.execute(  # sessions with nothing counted yet
        f"INSERT INTO _session_counts (session_id, {names}) SELECT id, {names} FROM sessions s"
        " WHERE NOT EXISTS (SELECT 1 FROM _session_counts c WHERE c.session_id = s.id)"
    )
    con.execute(
        f"UPDATE _turn_counts SET session_id = u.session_id FROM ({_USER_TURNS}) u"
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
    con.execute(_SUPERSEDED_TURNS)


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


MIGRATIONS: list[Migration] = [
    ("m001_initial", m001_initial),
    ("m002_turns_and_details", m002_turns_and_details),
    ("m003_request_estimates", m003_request_estimates),
    ("m004_reasoning_and_cost_sources", m004_reasoning_and_cost_sources),
    ("m005_row_attribution", m005_row_attribution),
    ("m006_attachments", m006_attachments),
    ("m007_counters", m007_counters),
    ("m008_first_message_times", m008_first_message_times),
    ("m009_session_summaries", m009_session_summaries),
    ("m010_dashboard_counts", m010_dashboard_counts),
]

# The migrations that read every row of some tables (to fill counters), with those
# tables: on a large store they take a while, and ``migrate`` says so first.
# tables and about how many of their rows they go through per second on one core (m009:
# 1M messages in ~5 s). A store they would take longer than ``_NOTICE_AFTER_S`` on
# hears about it first.
_READ_ROWS: dict[str, tuple[tuple[str, ...], float]] = {
    "m007_counters": (("messages", "requests", "turns"), 200_000),
    "m008_first_message_times": (("messages",), 1_000_000),
    "m009_session_summaries": (("messages", "turns", "sessions"), 200_000),
    "m010_dashboard_counts": (("tool_calls", "requests"), 300_000),  # 600k rows: ~2–3 s
}
_NOTICE_AFTER_S = 1.5


def applied_migrations(con: Connection) -> list[str]:
    """Names of the migrations already recorded in this store, in the order they ran."""
    con.execute(_RECORD_TABLE)
    rows = con.execute("SELECT name FROM _migrations ORDER BY applied_at, name").fetchall()
    return [str(name) for (name,) in rows]


def migrate(con: Connection, *, stop_after: str | None = None) -> list[str]:
    """Apply every migration this store has not seen; return the names just applied.

    ``stop_after`` stops after the named migration (tests build old stores with it).
    Raises ``StoreError`` if the store has a migration this nbchat does not know.
    """
    recorded = applied_migrations(con)
    _refuse_newer(recorded)
    done = set(recorded)
    applied: list[str] = []
    _tell_if_slow(con, [name for name, _ in MIGRATIONS if name not in done], stop_after)
    for name, migration in MIGRATIONS:
        if name not in done:
            con.execute("BEGIN TRANSACTION")
            try:
                migration(con)
                con.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    [name, datetime.now(UTC)],
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            applied.append(name)
        if name == stop_after:
            break
    return applied


def _tell_if_slow(con: Connection, pending: list[str], stop_after: str | None) -> None:
    """Say on stderr, before they start, that the pending migrations will take a while
    (they read every row of some tables), so a first open that seems to hang is not
    taken for one."""
    if stop_after is not None and stop_after in pending:
        pending = pending[: pending.index(stop_after) + 1]
    slow = [name for name in pending if name in _READ_ROWS]
    if not slow or not getattr(con, "keeps_counters", True):
        return
    tables = con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    present = {str(t) for (t,) in tables}
    wanted = {t for name in slow for t in _READ_ROWS[name][0]} & present
    counts = {t: int(con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in wanted}
    steps = [_READ_ROWS[name] for name in slow]
    seconds = sum(sum(counts.get(t, 0) for t in tables) / rate for tables, rate in steps)
    if seconds >= _NOTICE_AFTER_S:
        rows = sum(counts.values())
        print(
            f"nbchat: updating this store's schema ({', '.join(slow)}) reads its {rows:,}"
            f" rows once; this may take about {_about(seconds)}.",
            file=sys.stderr,
            flush=True,
        )


def _about(seconds: float) -> str:
    return f"{round(seconds)} s" if seconds < 90 else f"{round(seconds / 60)} minutes"


def check_not_newer(con: Connection) -> None:
    """Raise ``StoreError`` if a newer nbchat has migrated the store since it was migrated here."""
    rows = con.execute(_recorded_names()).fetchall()
    _refuse_newer([str(name) for (name,) in rows])


@lru_cache(maxsize=1)
def _recorded_names() -> Any:
    # Parsed once: this runs on every attach, where parsing is most of its ~0.1 ms.
    import duckdb

    return duckdb.extract_statements("SELECT name FROM _migrations ORDER BY applied_at, name")[0]


def _refuse_newer(recorded: list[str]) -> None:
    known = [name for name, _ in MIGRATIONS]
    newer = [name for name in recorded if name not in known]
    if newer:
        raise StoreError(
            f"this store was written by a newer nbchat (schema {newer[-1]}); this nbchat "
            f"knows up to {known[-1]}. Upgrade nbchat to use it."
        )
