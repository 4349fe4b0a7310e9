"""The team store when its server misbehaves: absent at the first open, holding a lock,
frozen. Each test here has a server of this module's own, which it stops or blocks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pg_cluster import TempCluster

import nbchat
from nbchat import Session, StoreError
from nbchat._store import Store
from nbchat._store._mirror import Mirror
from nbchat.testing import FakeOpenAIServer


@pytest.fixture
def own_url(own_cluster: TempCluster) -> Iterator[str]:
    """A fresh database on the module's server (the server running again afterwards)."""
    from nbchat._store import evict_lease

    url = own_cluster.new_database()
    yield url
    evict_lease(url)
    own_cluster.drop_database(url)


# --------------------------------------------------------------------------- a failed open


def test_a_failed_first_open_is_forgotten_and_the_next_open_connects(
    own_cluster: TempCluster, own_url: str
) -> None:
    own_cluster.stop_server()
    try:
        with pytest.raises(StoreError, match="Cannot reach the store"):
            Store.open(own_url, connect_timeout=2)
        with pytest.raises(StoreError, match="Cannot reach the store"):
            nbchat.sessions(db=own_url)  # tried again, not "closed"
    finally:
        own_cluster.start()
    with Store.open(own_url) as store:
        store.create_session(session_id="s", model=None, system_prompt=None)
    assert nbchat.sessions(db=own_url)["id"].tolist() == ["s"]


def test_a_session_made_after_a_failed_open_writes_to_the_store(
    own_cluster: TempCluster, own_url: str, fake: FakeOpenAIServer
) -> None:
    own_cluster.stop_server()
    try:
        with pytest.raises(StoreError, match="Cannot reach the store"):
            Session(model="m", base_url=fake.url, api_key="k", db=own_url)
    finally:
        own_cluster.start()
    fake.enqueue("hello")
    s = Session(model="m", base_url=fake.url, api_key="k", db=own_url)
    assert s.send("hi").status == "completed"
    assert nbchat.transcript(s.id, db=own_url)["content"].tolist() == ["hi", "hello"]


# --------------------------------------------------------------------------- slow reads


def server_rows(url: str, query: str) -> list[tuple[Any, ...]]:
    """Rows read straight from the server, not through nbchat."""
    with psycopg.connect(url) as con:
        return con.execute(query).fetchall()  # type: ignore[arg-type]


@contextlib.contextmanager
def tables_locked(url: str) -> Iterator[psycopg.Connection[Any]]:
    """Another connection holding ACCESS EXCLUSIVE on the tables analysis reads."""
    con = psycopg.connect(url)
    # A bound, not a timing: a read that ignored the lock timeout would wait for ever.
    (pid,) = con.execute("SELECT pg_backend_pid()").fetchone() or (0,)
    valve = threading.Timer(60, server_rows, (url, f"SELECT pg_terminate_backend({pid})"))
    try:
        con.execute("LOCK TABLE sessions, messages, requests, turns IN ACCESS EXCLUSIVE MODE")
        valve.start()
        yield con
    finally:
        valve.cancel()
        with contextlib.suppress(psycopg.Error):
            con.rollback()
        con.close()


def test_a_read_of_a_locked_table_ends_after_the_lock_timeout_and_the_next_works(
    pg_url: str,
) -> None:
    with Store.open(pg_url, lock_timeout=1) as store:
        store.create_session(session_id="s", model=None, system_prompt=None)
        with tables_locked(pg_url):
            with pytest.raises(StoreError, match=r"did not answer within 1 s: .* a lock"):
                nbchat.sessions(db=store)
            with pytest.raises(StoreError, match=r"did not answer within 1 s"):
                nbchat.sql("SELECT count(*) AS n FROM messages", db=store)
        assert nbchat.sessions(db=store)["id"].tolist() == ["s"]


@contextlib.contextmanager
def slow_sessions_table(url: str, seconds: float) -> Iterator[None]:
    """Reading the sessions table takes ``seconds`` (a view that sleeps stands in for
    it), as a big table does; no lock is held."""
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("ALTER TABLE sessions RENAME TO sessions_rows")
        con.execute(
            "CREATE VIEW sessions AS SELECT * FROM sessions_rows"
            f" WHERE (SELECT pg_sleep({seconds}) IS NOT NULL)"
        )
        try:
            yield
        finally:
            con.execute("DROP VIEW sessions")
            con.execute("ALTER TABLE sessions_rows RENAME TO sessions")


def test_a_read_longer_than_the_lock_timeout_finishes_within_the_read_timeout(
    pg_url: str,
) -> None:
    # The lock timeout was the bound of the whole read: a sql() over a big team store
    # that took longer to fetch than 15 s was refused as if a table were locked.
    with Store.open(pg_url, lock_timeout=0.5) as store:
        store.create_session(session_id="s", model=None, system_prompt=None)
        assert nbchat.sessions(db=store)["id"].tolist() == ["s"]  # the mirror is ready
        with slow_sessions_table(pg_url, 2.0):
            assert nbchat.sql("SELECT id FROM sessions", db=store)["id"].tolist() == ["s"]
    with Store.open(pg_url, lock_timeout=0.5, read_timeout=1) as store:
        with (
            slow_sessions_table(pg_url, 3.0),
            pytest.raises(
                StoreError, match=r"did not answer within 1 s \(the server is busy.*READ_TIMEOUT"
            ),
        ):
            nbchat.sql("SELECT id FROM sessions", db=store)
        assert nbchat.sql("SELECT id FROM sessions", db=store)["id"].tolist() == ["s"]


def test_the_read_timeout_is_checked(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    monkeypatch.setenv("NBCHAT_DB_READ_TIMEOUT", "soon")
    with pytest.raises(StoreError, match="NBCHAT_DB_READ_TIMEOUT must be a positive number"):
        Store.open(pg_url)
    monkeypatch.delenv("NBCHAT_DB_READ_TIMEOUT")
    with pytest.raises(ValueError, match="read_timeout must be a positive number"):
        Store.open(pg_url, read_timeout=0)


def test_ctrl_c_ends_a_read_blocked_on_a_lock(pg_url: str) -> None:
    # Once the server shows the read waiting for the lock, a thread delivers SIGINT to
    # this (main) thread, as a kernel interrupt does; the lock is held on until then.
    told: list[str] = []

    def interrupt_when_blocked() -> None:
        for _ in range(600):  # a bound (60 s), not a timing
            waiting = server_rows(
                pg_url,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            if waiting[0][0]:
                told.append("blocked")
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    with Store.open(pg_url, lock_timeout=120) as store:
        assert nbchat.sessions(db=store).empty  # the analysis side is ready
        with tables_locked(pg_url):
            threading.Thread(target=interrupt_when_blocked, daemon=True).start()
            with pytest.raises(KeyboardInterrupt):
                nbchat.sessions(db=store)
            assert told == ["blocked"]
        assert nbchat.sessions(db=store).empty  # the lock released: reads work again


def test_a_server_that_never_answers_is_a_store_error_not_a_hang() -> None:
    # A port that accepts connections and never says a word (a frozen server).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"postgresql://nbchat@127.0.0.1:{silent.getsockname()[1]}/nbchat"
    mirror = Mirror(url, url)
    try:
        with pytest.raises(StoreError, match=r"did not answer within 1 s"):
            mirror.run("SELECT count(*) FROM sessions", timeout=1)
    finally:
        mirror.shutdown()
        silent.close()
