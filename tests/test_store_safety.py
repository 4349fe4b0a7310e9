"""What the store refuses: files from user SQL, other file formats, schemas from the future."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import duckdb
import pytest

import nbchat
from nbchat import StoreError
from nbchat._events import MessageAdded, TurnStarted
from nbchat._store import Store, UnstorableRow
from nbchat._store._migrations import MIGRATIONS
from nbchat._types import Message


@pytest.fixture
def store(db_path: Path) -> Store:
    store = Store.open(db_path)
    store.create_session(session_id="s", model="m", system_prompt=None)
    store.handle(MessageAdded(session_id="s", message=Message(role="user", content="hi")))
    return store


# --------------------------------------------------------------------------- user SQL


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
    ],
)
def test_user_sql_cannot_read_files(store: Store, db_path: Path, query: str) -> None:
    with pytest.raises(StoreError, match=r"may not read files.*allow_files=True"):
        store.query_read_only(query)
    with pytest.raises(StoreError, match="may not read files"):
        nbchat.sql(query, db=db_path)
    store.close()


def test_allow_files_lets_a_query_read_files(store: Store, tmp_path: Path) -> None:
    data = tmp_path / "prices.csv"
    data.write_text("model,price\nm,0.5\n")
    result = store.query_read_only(f"SELECT * FROM read_csv('{data}')", allow_files=True)
    assert list(result.data["model"]) == ["m"]
    # allow_files is per query: the next one is sandboxed again.
    with pytest.raises(StoreError, match="may not read files"):
        store.query_read_only(f"SELECT * FROM read_csv('{data}')")
    store.close()


def test_user_queries_and_writes_take_turns_on_the_file(store: Store) -> None:
    for seq in range(1, 4):
        assert store.query_read_only("SELECT count(*) AS n FROM messages").data["n"][0] == seq
        body = Message(role="user", content=f"more {seq}", seq=seq)
        store.handle(MessageAdded(session_id="s", message=body))
    with pytest.raises(StoreError, match="read-only"):
        store.query_read_only("INSERT INTO sessions (id, created_at) VALUES ('x', now())")
    assert len(store.load_session("s").messages) == 4
    store.close()


def test_memory_store_queries_are_sandboxed_too() -> None:
    with Store.open(":memory:") as store:
        with pytest.raises(StoreError, match="may not read files"):
            store.query_read_only("SELECT * FROM read_text('/etc/passwd')")
        with pytest.raises(StoreError, match="allow_files=True needs a store file"):
            store.query_read_only("SELECT 1", allow_files=True)


def test_a_sqlite_file_is_refused_without_fetching_an_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"  # where DuckDB would put a downloaded extension
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="is not a DuckDB database"):
        Store.open(path)
    assert list(home.rglob("*")) == []
    assert path.read_bytes().startswith(b"SQLite format 3")  # left as it was


# --------------------------------------------------------------------------- schema


def test_a_store_from_a_newer_nbchat_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    _release(db_path)
    con = duckdb.connect(str(db_path))
    con.execute("INSERT INTO _migrations VALUES ('m004_reasoning', now())")
    con.close()
    with pytest.raises(StoreError) as info:
        Store.open(db_path)
    text = str(info.value)
    assert "written by a newer nbchat (schema m004_reasoning)" in text
    assert f"knows up to {MIGRATIONS[-1][0]}" in text and "Upgrade nbchat" in text
    assert str(db_path) in text


def test_a_renamed_column_gives_a_clear_error(db_path: Path) -> None:
    Store.open(db_path).close()
    _release(db_path)
    con = duckdb.connect(str(db_path))
    con.execute("ALTER TABLE messages RENAME COLUMN content TO body")
    con.close()
    with Store.open(db_path) as store:
        store.create_session(session_id="s", model="m", system_prompt=None)
        event = MessageAdded(session_id="s", message=Message(role="user", content="hi"))
        with pytest.raises(UnstorableRow, match=r"messages.*schema is not the one") as info:
            store.write(event)
        assert info.value.table == "messages"
        with pytest.raises(StoreError, match="does not have the tables and columns"):
            store.load_session("s")


def _release(db_path: Path) -> None:
    from nbchat._store._leases import cached_lease

    lease = cached_lease(str(db_path.resolve()))
    if lease is not None:
        lease.release()


# --------------------------------------------------------------------------- turns


def test_a_started_turn_is_running_until_closed(store: Store) -> None:
    for turn in ("t1", "t2", "t3"):
        store.handle(TurnStarted(session_id="s", turn_id=turn, text=turn))
    store.handle(TurnStarted(session_id="other", turn_id="t9", text="elsewhere"))
    status = "SELECT id, status, error, finished_at IS NOT NULL FROM turns ORDER BY id"
    assert [row[1] for row in store._fetchall(status)] == ["running"] * 4

    closed = store.end_unfinished_turns(
        "s", status="aborted", error="the process running it stopped", keep="t3"
    )
    assert closed == 2
    assert store._fetchall(status) == [
        ("t1", "aborted", "the process running it stopped", True),
        ("t2", "aborted", "the process running it stopped", True),
        ("t3", "running", None, False),
        ("t9", "running", None, False),
    ]
    assert store.end_unfinished_turns("s", status="aborted", error="again", keep="t3") == 0
    store.close()
