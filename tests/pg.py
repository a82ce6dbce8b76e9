"""A throwaway PostgreSQL server for tests: initdb in a temp folder, served on loopback.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system
user. Without server binaries the tests skip, except in CI (CI=true), where they fail:
CI installs PostgreSQL and must not pass silently without it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PASSWORD = "s3cret-pw"


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self) -> None:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not initdb or not pg_ctl:
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are missing in CI")
            pytest.skip("PostgreSQL server binaries not installed")
        self.pg_ctl = pg_ctl
        self.dir = Path(tempfile.mkdtemp(prefix="saesweep-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        pwfile = self.dir / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres")
        user = "postgres" if self.as_user else os.environ.get("USER", "postgres")
        self.user = user
        self._run([initdb, "-D", str(self.data), "-U", user, "-A", "scram-sha-256", "--pwfile", str(pwfile), "-E", "UTF8"])
        self.start()
        self.url_admin = f"postgresql://{user}:{PASSWORD}@127.0.0.1:{self.port}/postgres"
        self.dbs = 0

    def start(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                   f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c max_connections=200 -c fsync=off",
                   "start"])

    def pause(self) -> None:
        """Stop the server as a crash or a failover would (connections cut), keeping its data."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])

    def _run(self, cmd) -> None:
        subprocess.run(self.as_user + cmd, check=True, capture_output=True, text=True)

    def new_database(self) -> str:
        import sqlalchemy

        self.dbs += 1
        name = f"sweep{self.dbs}"
        eng = sqlalchemy.create_engine(self.url_admin, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        eng.dispose()
        return f"postgresql://{self.user}:{PASSWORD}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    return postgres_server.new_database()
