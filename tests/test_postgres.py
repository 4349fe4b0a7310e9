"""The team store on a real PostgreSQL server: its schema, URLs and passwords, outages,
many processes at once, and copying a DuckDB store in.

The suites of ``test_store.py``, ``test_analysis.py`` and ``test_store_seam.py`` run on
both backends through the ``store_db`` fixture; this file has what only a server has.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from pg_cluster import PASSWORD_ROLE, TempCluster, wait_until_up
from test_store import EXPECTED_SCHEMA

import nbchat
from nbchat import Session, StoreError
from nbchat._events import (
    CompactionEvent,
    MessageAdded,
    MessagesMarked,
    ToolResult,
    TurnFinished,
    TurnStarted,
    UsageEvent,
)
from nbchat._store import Store, evict_lease, key_of
from nbchat._store._migrations import ATTRIBUTED_TABLES, MIGRATIONS
from nbchat._store._tally import COUNTER_TABLES
from nbchat._types import Message, RequestUsage, ToolCall, ToolCallRecord, TurnResult, Usage
from nbchat.testing import FakeOpenAIServer

CHILD = Path(__file__).parent / "helpers" / "pg_child.py"

# PostgreSQL's names for the types of the DuckDB schema.
_PG_TYPES = {
    "character varying": "VARCHAR",
    "timestamp with time zone": "TIMESTAMP WITH TIME ZONE",
    "double precision": "DOUBLE",
    "json": "JSON",
    "integer": "INTEGER",
    "bigint": "BIGINT",
    "boolean": "BOOLEAN",
    "bytea": "BLOB",
}


def server_rows(url: str, query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows read straight from the server, not through nbchat."""
    with psycopg.connect(url) as con:
        return con.execute(query, params).fetchall()  # type: ignore[arg-type]


def wait_for(check: Any, what: str, timeout: float = 60.0) -> None:
    """Poll ``check()`` until true; fail after ``timeout`` s (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


# --------------------------------------------------------------------------- schema


def test_a_fresh_team_store_has_the_file_stores_schema(pg_url: str) -> None:
    Store.open(pg_url).close()
    rows = server_rows(
        pg_url,
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    )
    schema: dict[str, dict[str, str]] = {}
    for table, column, kind in rows:
        schema.setdefault(table, {})[column] = _PG_TYPES[kind]
    # The counters a file keeps on write are derived by the team store's analysis instead.
    kept = {t: c for t, c in EXPECTED_SCHEMA.items() if t not in COUNTER_TABLES}
    assert schema == kept
    recorded = [name for (name,) in server_rows(pg_url, "SELECT name FROM _migrations")]
    assert sorted(recorded) == sorted(name for name, _ in MIGRATIONS)
    primary = server_rows(
        pg_url,
        "SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc"
        " JOIN information_schema.key_column_usage kcu USING (constraint_name, table_name)"
        " WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = 'public' ORDER BY 1",
    )
    assert {table: column for table, column in primary} == {
        "_migrations": "name",
        **{t: key_of(t) for t in nbchat._store.TABLES},
    }


def test_every_row_says_who_wrote_it(pg_url: str, fake: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("JUPYTERHUB_USER", "grace")
    fake.enqueue(tool_calls=[{"name": "lookup", "arguments": {}}])
    fake.enqueue("done")

    def lookup() -> str:
        """Look something up."""
        return "found"

    s = Session(model="m", base_url=fake.url, api_key="k", db=pg_url, tools=[lookup])
    assert s.send("go").status == "completed"
    assert s._sink is not None and s._sink.flush(30)  # raw reads below wait for no writer
    for table in ATTRIBUTED_TABLES:
        if table == "compactions":
            continue  # none in this turn
        who = set(server_rows(pg_url, f"SELECT username, hostname FROM {table}"))
        assert len(who) == 1 and next(iter(who))[0] == "grace", table
        assert next(iter(who))[1] == s.metadata["host"]


# --------------------------------------------------------------------------- URLs


def test_a_password_in_the_url_is_refused_and_never_shown(pg_cluster: TempCluster) -> None:
    host = pg_cluster.url("postgres").split("@", 1)[1]
    urls = (
        f"postgresql://ada:hunter2-secret@{host}",
        f"postgresql://ada@{host}?password=hunter2-secret",
    )
    for url in urls:
        with pytest.raises(StoreError, match="pgpass") as info:
            Store.open(url)
        assert "hunter2-secret" not in str(info.value)
        assert "[redacted]" in str(info.value)


def test_authentication_failures_are_clear_and_redacted(
    pg_cluster: TempCluster, monkeypatch: Any, tmp_path: Path
) -> None:
    if pg_cluster.external:
        pytest.skip("the password role exists only on the tests' own server")
    role, password = PASSWORD_ROLE
    url = pg_cluster.url("postgres", user=role)
    monkeypatch.setenv("PGPASSWORD", "wrong-but-secret-value")
    with pytest.raises(StoreError, match="password authentication failed") as info:
        Store.open(url)
    assert "wrong-but-secret-value" not in str(info.value) + repr(info.value)

    monkeypatch.delenv("PGPASSWORD")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg_cluster.port}:*:{role}:{password}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    database = pg_cluster.new_database()
    pg_cluster.admin(f"ALTER DATABASE {database.rsplit('/', 1)[1]} OWNER TO {role}")
    url = pg_cluster.url(database.rsplit("/", 1)[1], user=role)
    with Store.open(url) as store:  # the password comes from .pgpass
        store.create_session(session_id="s", model=None, system_prompt=None)
        assert password not in repr(store) and store.path == url
        assert nbchat.sessions(db=store)["id"].tolist() == ["s"]
    evict_lease(url)
    pg_cluster.drop_database(database)


def test_bad_urls_and_absent_servers_are_clear_errors(pg_cluster: TempCluster) -> None:
    with pytest.raises(StoreError, match="Not a valid PostgreSQL URL"):
        Store.open("postgresql://127.0.0.1:notaport/x")
    with pytest.raises(
        StoreError, match=r"Cannot reach the store postgresql://nbchat@127\.0\.0\.1:1/"
    ):
        Store.open("postgresql://nbchat@127.0.0.1:1/nbchat", connect_timeout=2)
    # The server answered and refused: said so, not "Cannot reach", with its reason.
    for url, reason in (
        (pg_cluster.url("no_such_database"), 'database "no_such_database" does not exist'),
        (pg_cluster.url("postgres", user="no_such_role"), 'role "no_such_role" does not exist'),
    ):
        with pytest.raises(StoreError) as info:
            Store.open(url)
        said = str(info.value)
        assert said.startswith("The server of the store postgresql://"), said
        assert "refused the connection" in said and reason in said, said


# --------------------------------------------------------------------------- writes


def test_values_postgresql_cannot_take_are_unstorable_rows_and_nul_is_kept(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        store.create_session(session_id="s", model=None, system_prompt=None)
        with pytest.raises(nbchat._exceptions.UnstorableRow, match="requests"):
            store.write(UsageEvent(session_id="s", model="m", round=2**40))
        message = Message(role="assistant", content="a\x00b", seq=0)
        store.write(MessageAdded(session_id="s", message=message))
        assert store.load_session("s").messages[0].content == "a\ufffdb"
        store.write(MessageAdded(session_id="s", message=message))  # a replay: no new row
        assert store._fetchall("SELECT count(*) FROM messages") == [(1,)]


def test_user_sql_runs_in_duckdb_never_on_the_server(pg_url: str) -> None:
    with Store.open(pg_url) as store:
        store.create_session(session_id="s", model=None, system_prompt=None)
        assert nbchat.sql("SELECT list_value(1, 2) AS l", db=store)["l"][0].tolist() == [1, 2]
        with pytest.raises(StoreError):
            nbchat.sql("SELECT * FROM pg_catalog.pg_roles", db=store)
        with pytest.raises(StoreError, match="may not read files"):
            nbchat.sql("SELECT * FROM read_csv('/etc/passwd')", db=store)
        # As on DuckDB: a change inside a SELECT is refused (not run on the copy), and an
        # unknown table is named with the store's tables.
        with pytest.raises(StoreError, match=r"tries to change data \(a DELETE inside it\)"):
            nbchat.sql("WITH d AS (DELETE FROM sessions RETURNING id) SELECT * FROM d", db=store)
        with pytest.raises(StoreError, match="no table pg_constraintz; its tables are sessions"):
            nbchat.sql("SELECT * FROM pg_constraintz", db=store)
        assert store.has_session("s")


# --------------------------------------------------------------------------- outages


@pytest.mark.slow
def test_a_server_stopped_for_5_s_mid_turn_loses_nothing(
    own_cluster: TempCluster, fake: FakeOpenAIServer
) -> None:
    url = own_cluster.new_database()
    restarted = threading.Event()

    def stop_the_database() -> str:
        """Stop the database server for five seconds."""
        own_cluster.stop_server()

        def restart() -> None:
            time.sleep(5)
            own_cluster.start()
            restarted.set()

        threading.Thread(target=restart, daemon=True).start()
        return "stopped"

    fake.enqueue(tool_calls=[{"name": "stop_the_database", "arguments": {}}])
    fake.enqueue("the answer, written while the server was away")
    events: list[Any] = []  # the session's own handler: the writer's notices come there too
    s = Session(
        model="m",
        base_url=fake.url,
        api_key="k",
        db=url,
        tools=[stop_the_database],
        on_event=events.append,
    )
    result = s.send("go")
    # The turn ended without waiting for the server (its events are in the journal).
    assert result.status == "completed" and not restarted.is_set()

    def told() -> list[str]:
        return [e.message for e in events if e.kind == "notice" and "Not saved yet" in e.message]

    wait_for(lambda: bool(told()), "the user to be told the store is away")
    assert len(told()) == 1 and url in told()[0]

    wait_for(restarted.is_set, "the server to restart")
    wait_until_up(own_cluster)
    wait_for(lambda: len(server_rows(url, "SELECT id FROM turns WHERE status = 'completed'")) == 1,
             "the spooled turn to arrive")  # fmt: skip
    frame = nbchat.transcript(s.id, db=url)
    assert frame["role"].tolist() == ["user", "assistant", "tool", "assistant"]
    assert frame["content"].iloc[-1] == result.text
    assert len(nbchat.usage(db=url, session_id=s.id)) == 2
    assert nbchat.tool_calls(db=url)["result"].tolist() == ["stopped"]
    # The next turn writes straight through again.
    fake.enqueue("back to normal")
    assert s.send("again").status == "completed"
    assert nbchat.transcript(s.id, db=url)["content"].iloc[-1] == "back to normal"
    assert s.store is not None and s.store.stats()["online"]


@pytest.mark.slow
def test_a_spool_left_by_a_stopped_process_is_written_by_the_next_open(
    own_cluster: TempCluster, tmp_path: Path
) -> None:
    url = own_cluster.new_database()
    Store.open(url).close()
    ready, go = tmp_path / "ready", tmp_path / "go"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "spool", url, str(ready), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: ready.exists() or child.poll() is not None, "the child to open the store")
    own_cluster.stop_server()
    try:
        go.touch()
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert json.loads(out) == {"online": False}
        assert list((tmp_path / "spool").rglob("*.jsonl")), "the child left its spool file"
    finally:
        own_cluster.start()
    evict_lease(url)  # as if this were another process: the next open is a first one
    with pytest.warns(UserWarning, match="stored 3 writes"), Store.open(url) as store:
        assert store.load_session("spooled").messages[0].content == "written while away"
        assert store._fetchall("SELECT user_text FROM turns") == [("written while away",)]
    assert not list((tmp_path / "spool").rglob("*.jsonl"))


def test_an_empty_spool_left_behind_is_cleared_without_a_warning(
    own_cluster: TempCluster, tmp_path: Path
) -> None:
    """A spool file a process left with nothing in it (it wrote everything before it
    ended) is removed quietly: a trial's kernel had warned 'nbchat stored 0 writes'."""
    from nbchat._store._pg_url import shown_url
    from nbchat._store._spool import spool_folder

    url = own_cluster.new_database()
    Store.open(url).close()
    folder = spool_folder(str(tmp_path / "spool"), shown_url(url))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "4242-0123abcd.jsonl").write_bytes(b"")
    evict_lease(url)  # the next open is a first one, which replays what was left
    with Store.open(url) as store:  # pyproject turns any warning into an error here
        assert store.recovered is None
    assert not list(folder.glob("*.jsonl"))


# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_processes_migrating_a_fresh_database_at_once_both_succeed(
    pg_url: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, str(CHILD), "open", pg_url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(1.0)  # let all of them import nbchat and wait at the line
    go.touch()
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert json.loads(out) == {"opened": True}
    names = [name for (name,) in server_rows(pg_url, "SELECT name FROM _migrations")]
    assert sorted(names) == sorted(name for name, _ in MIGRATIONS)


@pytest.mark.slow
def test_four_processes_of_100_turns_and_a_reader_lose_and_duplicate_nothing(
    pg_url: str,
) -> None:
    Store.open(pg_url).close()  # migrated once, so the children only write
    labels = [f"user{k}" for k in range(4)]
    children = {
        label: subprocess.Popen(
            [sys.executable, str(CHILD), "turns", pg_url, "100", label],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "JUPYTERHUB_USER": label},
        )
        for label in labels
    }
    seen: list[int] = []
    while any(child.poll() is None for child in children.values()):
        frame = nbchat.costs(by="user", db=pg_url)  # a reader, all along
        seen.append(int(frame["requests"].sum()) if len(frame) else 0)
        time.sleep(0.1)
    results = {}
    for label, child in children.items():
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        results[label] = json.loads(out)
        assert results[label]["completed"] == 100
    assert seen == sorted(seen), "a reader saw the spend go down"

    by_user = nbchat.costs(by="user", db=pg_url).set_index("user")["requests"].to_dict()
    assert by_user == {label: 100 for label in labels}
    asked = Counter(
        text for (text,) in server_rows(pg_url, "SELECT content FROM messages WHERE role = 'user'")
    )
    assert asked == Counter(f"{label} turn {i}" for label in labels for i in range(100))
    answered = Counter(
        text
        for (text,) in server_rows(pg_url, "SELECT content FROM messages WHERE role = 'assistant'")
    )
    assert answered == Counter(f"{label} answer {i}" for label in labels for i in range(100))
    turns = nbchat.turns(db=pg_url)
    assert len(turns) == 400 and set(turns["status"]) == {"completed"}
    for label in labels:
        sid = results[label]["session_id"]
        who = server_rows(pg_url, "SELECT DISTINCT username FROM messages WHERE session_id = %s",
                          [sid])  # fmt: skip
        assert who == [(label,)]


# --------------------------------------------------------------------------- copy_store


def _fill(store: Store) -> None:
    """Two sessions with every kind of row (as test_analysis's store), and a third."""
    store.create_session(session_id="a", model="gpt-4o-mini", system_prompt="Be terse.",
                         title="A", metadata={"user": "ada", "tags": ["x", "y"]})  # fmt: skip
    store.handle(TurnStarted(session_id="a", turn_id="t", text="weather?", cell_id="c1"))
    seq = iter(range(100))

    def add(role: str, content: str | None, **kw: Any) -> Message:
        message = Message(role=role, content=content, seq=next(seq), turn_id="t", **kw)  # type: ignore[arg-type]
        store.handle(MessageAdded(session_id="a", turn_id="t", message=message))
        return message

    add("system", "Be terse.")
    old = add("user", "old question about the weather")
    add("user", "weather?", cell_id="c1")
    call = ToolCall(id="call_1", name="weather", arguments='{"city": "Paris"}')
    add("assistant", None, tool_calls=[call])
    for cost, tokens in ((0.002, (100, 10)), (None, (50, 5)), (None, None)):
        usage = (
            None
            if tokens is None
            else RequestUsage(prompt_tokens=tokens[0], completion_tokens=tokens[1])
        )
        store.handle(UsageEvent(session_id="a", turn_id="t", model="gpt-4o-mini", usage=usage,
                                cost_usd=cost, cost_source="genai-prices"))  # fmt: skip
    record = ToolCallRecord(call_id="call_1", name="weather", arguments="{}", result='{"t": 21}')
    store.handle(ToolResult(session_id="a", turn_id="t", call=record))
    add("tool", '{"t": 21}', tool_call_id="call_1", name="weather")
    add("assistant", "21 degrees in Paris, the weather is fine.")
    store.handle(MessagesMarked(session_id="a", message_ids=[old.id], state="superseded"))
    store.handle(CompactionEvent(session_id="a", strategy="summary", from_seq=1, to_seq=2))
    total = Usage(requests=3, prompt_tokens=150, completion_tokens=15, cost_usd=None)
    result = TurnResult(session_id="a", turn_id="t", status="completed", usage=total)
    store.handle(TurnFinished(session_id="a", turn_id="t", result=result))
    store.create_session(session_id="b", model="m2", system_prompt=None, notebook="n.ipynb")
    store.handle(UsageEvent(session_id="b", model="m2", cost_usd=0.5))


def _frames(db: str) -> dict[str, pd.DataFrame]:
    frames = {
        "sessions": nbchat.sessions(db=db),
        "transcript": nbchat.transcript(
            "a", db=db, include_compacted=True, include_superseded=True
        ),
        "usage": nbchat.usage(db=db),
        "usage a": nbchat.usage(db=db, session_id="a"),
        "tool_calls": nbchat.tool_calls(db=db),
        "compactions": nbchat.compactions(db=db, session_id="a"),
        "turns": nbchat.turns(db=db),
        "turns a": nbchat.turns(db=db, session_id="a"),
        "search": nbchat.search("weather paris", db=db),
        "search a": nbchat.search("weather", db=db, session_id="a"),
        "sql": nbchat.sql("SELECT * FROM messages ORDER BY id", db=db),
    }
    for by in ("model", "day", "session", "notebook", "user", "tag"):
        frames[f"costs {by}"] = nbchat.costs(by=by, db=db)  # type: ignore[arg-type]
    return frames


def test_copy_store_keeps_ids_adds_nothing_twice_and_every_frame_is_the_same(
    pg_url: str, db_path: Path
) -> None:
    with Store.open(db_path) as local:
        _fill(local)
    added = nbchat.copy_store(db_path, pg_url)
    assert added == {"sessions": 2, "messages": 6, "requests": 4, "tool_calls": 1,
                     "compactions": 1, "turns": 1, "attachments": 0}  # fmt: skip
    assert nbchat.copy_store(str(db_path), pg_url) == dict.fromkeys(added, 0)
    local_frames, team_frames = _frames(str(db_path)), _frames(pg_url)
    for name, frame in local_frames.items():
        assert len(frame), name  # every view has rows to compare
        pd.testing.assert_frame_equal(team_frames[name], frame, obj=name)
    spent = Store.open(pg_url)
    assert spent.session_usage("a") == Store.open(db_path).session_usage("a")
    assert math.isclose(spent.session_usage("b").cost_usd or 0, 0.5)
    spent.close()
    # Back into a new DuckDB file, the same again.
    backup = db_path.with_name("backup.duckdb")
    assert nbchat.copy_store(pg_url, backup) == added
    pd.testing.assert_frame_equal(nbchat.sessions(db=backup), local_frames["sessions"])
    with pytest.raises(StoreError, match="two stores"):
        nbchat.copy_store(pg_url, pg_url)
