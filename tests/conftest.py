"""Shared fixtures: an isolated environment, no network but loopback, a fake model server,
and a real PostgreSQL server for the team store (``store_db`` runs a test on both backends)."""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbchat import _client, _config, _images, _pricing, _request_errors
from nbchat.testing import FakeOpenAIServer

_ENV = (
    "NBCHAT_MODEL",
    "NBCHAT_BASE_URL",
    "NBCHAT_API_KEY",
    "NBCHAT_DB",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "NBCHAT_CONFIG",
    "NBCHAT_SPOOL_DIR",
    "PGPASSWORD",
    "PGPASSFILE",
)

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from pg_cluster import TempCluster, start_cluster  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No user settings leak in; the default store is a fresh file in tmp_path."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    db = tmp_path / "default.duckdb"
    monkeypatch.setenv("NBCHAT_DB", str(db))
    monkeypatch.setenv("NBCHAT_CONFIG", str(tmp_path / "config.json"))  # named endpoints
    monkeypatch.setenv("NBCHAT_SPOOL_DIR", str(tmp_path / "spool"))  # a team store's outages
    _config.reset_defaults()
    # What servers said of their context windows is kept per base URL for the process;
    # a fake server's port is reused by later tests, so each test starts without it.
    _client._windows.clear()
    # So are the endpoints known to be free or text-only (the embedded model's) and the
    # keyless servers already warned of: what a test marks goes with it (a module's
    # embedded server, marked before its first test, stays marked).
    free, text_only = set(_pricing._free_endpoints), dict(_images._text_only)
    warned = set(_request_errors._warned_keyless)
    embedded = _config._embedded_url
    yield db
    _config.reset_defaults()
    _config.serve_embedded(embedded)
    _pricing._free_endpoints.intersection_update(free)
    _images._text_only.clear()
    _images._text_only.update(text_only)
    _request_errors._warned_keyless.intersection_update(warned)


_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: Any) -> Any:
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            allowed = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            allowed = False
        if not allowed:
            raise ConnectionRefusedError(f"tests may only connect to loopback, not {host!r}")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests reach only servers on this machine (the fake model server, a local kernel)."""
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


@pytest.fixture
def fake() -> Iterator[FakeOpenAIServer]:
    """A running fake OpenAI-compatible server with an empty script."""
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A path for a fresh DuckDB store file."""
    return tmp_path / "chats.duckdb"


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[TempCluster]:
    """A server of one test module's own (each module gets one), which its tests stop and start."""
    cluster = start_cluster()
    if cluster.external:
        pytest.skip("NBCHAT_TEST_PG names a server the tests must not stop")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[TempCluster]:
    """One PostgreSQL server for the whole test run, stopped at the end."""
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: TempCluster) -> Iterator[str]:
    """The URL of a fresh, empty database (dropped after the test)."""
    from nbchat._store import evict_lease

    url = pg_cluster.new_database()
    yield url
    evict_lease(url)  # this process's idle connections to it go first
    pg_cluster.drop_database(url)


@pytest.fixture(params=["duckdb", "postgres"])
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store of each backend: a DuckDB file, then a PostgreSQL database."""
    if request.param == "duckdb":
        return str(tmp_path / "chats.duckdb")
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(params=["chat", "responses"])
def wire(request: pytest.FixtureRequest, isolated_env: Path) -> str:
    """Sessions made without ``api=`` speak this wire format: the loop suites run on both.

    Set as the kernel default (``%chat config api=...``), so a test body makes its
    sessions as usual; ``fake.chat_requests`` reads what either format sent.
    """
    _config.set_defaults(api=request.param)
    return str(request.param)
