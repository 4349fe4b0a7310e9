"""A throwaway PostgreSQL cluster for tests and benchmarks (Debian's ``postgresql`` package).

``TempCluster()`` runs ``initdb`` into a temporary folder (as the ``postgres`` user when
this process is root: initdb refuses root), starts ``postgres`` on a free port of
127.0.0.1 with trust authentication (plus one role that must give a password, for the
tests of authentication errors), and ``stop()`` removes it all. ``NBCHAT_TEST_PG`` (a
URL) names a server to use instead; the cluster is then never started or stopped here.

    python tests/helpers/pg_cluster.py     # start one, print its URL, stop on Enter
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from ports import free_port

__all__ = ["PASSWORD_ROLE", "ClusterUnavailable", "TempCluster", "find_bin_dir"]

# A role whose connections need the password below (scram), for authentication tests.
PASSWORD_ROLE = ("nbchat_pw", "correct-horse-battery")


class ClusterUnavailable(RuntimeError):
    """PostgreSQL's server programs are not installed (or the cluster did not start)."""


def find_bin_dir() -> Path:
    """The folder of Debian's ``initdb``/``pg_ctl`` (the newest installed major version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if not found:
        on_path = shutil.which("initdb")
        if on_path is None:
            raise ClusterUnavailable(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
                "apt-get install postgresql"
            )
        return Path(on_path).parent
    return Path(found[-1]).parent


def _major(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


class TempCluster:
    """One PostgreSQL server for a test session; ``url(db)`` names a database on it."""

    def __init__(self) -> None:
        external = os.environ.get("NBCHAT_TEST_PG")
        self.external = bool(external)
        self._dir: Path | None = None
        self._run_as: str | None = None
        if external:
            self.base_url = external
            self.port = urlsplit(external).port or 5432
            return
        self.bin = find_bin_dir()
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="nbchat-pg-"))
        self._run_as = "postgres" if os.geteuid() == 0 else None
        if self._run_as:
            uid = pwd.getpwnam(self._run_as).pw_uid
            os.chown(self._dir, uid, -1)
        self.data = self._dir / "data"
        self.base_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._start()

    # ------------------------------------------------------------------ the server

    def _as_owner(self, *argv: str) -> list[str]:
        if self._run_as is None:
            return list(argv)
        return ["runuser", "-u", self._run_as, "--", *argv]

    def _start(self) -> None:
        assert self._dir is not None
        subprocess.run(
            self._as_owner(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
            ),
            check=True, capture_output=True,
        )  # fmt: skip
        role, _ = PASSWORD_ROLE
        hba = self.data / "pg_hba.conf"
        rules = hba.read_text()
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + rules)
        self.start()
        self.admin(
            f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD_ROLE[1]}'",
        )

    def start(self) -> None:
        """Start the server (again, after ``stop_server``) and wait until it takes connections."""
        assert self._dir is not None
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories='{self._dir}'"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200"
        )
        subprocess.run(
            self._as_owner(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self._dir / "log"),
                "-o", options, "-w", "-t", "60", "start",
            ),
            check=True, capture_output=True,
        )  # fmt: skip

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (``start()`` brings it back)."""
        if self._dir is None:
            raise ClusterUnavailable("an external server (NBCHAT_TEST_PG) is not stopped by tests")
        subprocess.run(
            self._as_owner(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"
            ),
            check=True, capture_output=True,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server and delete its folder (nothing for an external server)."""
        if self._dir is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop_server("immediate")
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    # ------------------------------------------------------------------ databases

    def url(self, database: str, user: str | None = None) -> str:
        """The URL of ``database`` on this server (as ``user``, if given)."""
        parts = urlsplit(self.base_url)
        netloc = parts.netloc
        if user is not None:
            netloc = f"{user}@{netloc.rsplit('@', 1)[-1]}"
        return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, ""))

    def admin(self, statement: str) -> None:
        """Run one statement as the server's administrator (outside a transaction)."""
        import psycopg

        with psycopg.connect(self.base_url, autocommit=True) as con:
            con.execute(statement)  # type: ignore[arg-type]  # fixed text of the tests

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by ``new_database`` (its connections are ended first)."""
        name = urlsplit(url).path.lstrip("/")
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def __enter__(self) -> TempCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until_up(cluster: TempCluster, timeout: float = 30.0) -> None:
    """Wait until the server accepts a connection (after ``start()``)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(cluster.base_url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


if __name__ == "__main__":
    with TempCluster() as cluster:
        print(cluster.base_url, flush=True)
        with contextlib.suppress(EOFError):
            input("PostgreSQL is running; press Enter to stop it. ")


def start_cluster() -> TempCluster:
    """A throwaway PostgreSQL server (or ``NBCHAT_TEST_PG``'s); skipped without one, but in
    CI (``CI`` set) a missing server fails: .ci/run installs it, a skip would hide that."""
    try:
        return TempCluster()
    except (ClusterUnavailable, subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        message = f"no PostgreSQL server for the team-store tests: {exc} {detail.decode()[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
