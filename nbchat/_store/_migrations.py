"""The store's schema, built by named migrations that run in order when a store opens.

Each migration is a function that takes a connection and changes the schema once. The
SQL is DuckDB's, kept to what PostgreSQL also takes: the PostgreSQL backend runs the
same functions through a small translation (``_pg_sql.PgMigrationConnection``: its
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

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from .._exceptions import StoreError
from ._counter_migrations import (
    m007_counters,
    m008_first_message_times,
    m009_session_summaries,
    m010_dashboard_counts,
    m011_declined_not_errors,
)

__all__ = [
    "ATTRIBUTED_TABLES",
    "MIGRATIONS",
    "applied_migrations",
    "check_not_newer",
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


def m012_request_attempts(con: Connection) -> None:
    """Each request's HTTP attempts, and what the retried ones got (None on older rows:
    not counted then)."""
    con.execute("ALTER TABLE requests ADD COLUMN attempts INTEGER")
    con.execute("ALTER TABLE requests ADD COLUMN retried_after VARCHAR")


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
    ("m011_declined_not_errors", m011_declined_not_errors),
    ("m012_request_attempts", m012_request_attempts),
]

# The migrations that read every row of some tables (to fill counters), with those
# tables and about how many of their rows they go through per second on one core (m009:
# 1M messages in ~5 s). A store they would take longer than ``_NOTICE_AFTER_S`` on
# hears about it first.
_READ_ROWS: dict[str, tuple[tuple[str, ...], float]] = {
    "m007_counters": (("messages", "requests", "turns"), 200_000),
    "m008_first_message_times": (("messages",), 1_000_000),
    "m009_session_summaries": (("messages", "turns", "sessions"), 200_000),
    "m010_dashboard_counts": (("tool_calls", "requests"), 300_000),  # 600k rows: ~2–3 s
    "m011_declined_not_errors": (("tool_calls", "messages"), 1_000_000),
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
    if stop_after is not None:  # only those up to it (it may have run already)
        names = [name for name, _ in MIGRATIONS]
        upto = set(names[: names.index(stop_after) + 1])
        pending = [name for name in pending if name in upto]
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
