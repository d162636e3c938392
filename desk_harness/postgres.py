"""A private PostgreSQL cluster for the tests and the bench: Debian's server binaries,
initdb into a temporary directory, listening on a Unix socket in it and nowhere else.

The server refuses to run as root, so as root the cluster belongs to the ``postgres``
user (Debian's package creates it) and runs through ``runuser``. It holds a database
``provisioner`` owned by ``provisioner_owner`` and a login role ``provisioner_desk`` with no
rights of its own: the migration grants what desks need.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

OWNER = "provisioner_owner"
DESK = "provisioner_desk"
DATABASE = "provisioner"


def server_binaries() -> Path:
    """Debian's newest PostgreSQL server binaries (not on PATH)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
    )
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed (Debian: apt install postgresql)")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    def __init__(self) -> None:
        self.bin = server_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="provisioner-pg-"))
        self.data = self.dir / "data"
        #: Only names the socket file (.s.PGSQL.<port>): nothing listens on TCP.
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.dir.chmod(0o755)  # the socket must be reachable; data/ itself is 0700

    def __enter__(self) -> PostgresCluster:
        self.init()
        self.start()
        self._create_roles()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses='' -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, role: str = OWNER, database: str = DATABASE) -> str:
        return f"postgresql://{role}@/{database}?host={self.dir}&port={self.port}"

    def psql(self, sql: str, role: str = "postgres", database: str = DATABASE) -> str:
        """Run ``sql`` as ``role``; the server's message on error."""
        done = subprocess.run(
            [
                "psql",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                self.url(role, database),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip())
        return done.stdout.strip()

    def _create_roles(self) -> None:
        self.psql(f"CREATE ROLE {OWNER} LOGIN; CREATE ROLE {DESK} LOGIN", database="postgres")
        self.create_database(DATABASE)

    def create_database(self, name: str) -> None:
        """An empty database owned by the owner role; its public schema the owner's."""
        self.psql(f"CREATE DATABASE {name} OWNER {OWNER}", database="postgres")
        self.psql(
            f"REVOKE CREATE ON SCHEMA public FROM PUBLIC; ALTER SCHEMA public OWNER TO {OWNER}",
            database=name,
        )

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", database="postgres")

    def make_role(self, name: str) -> None:
        self.psql(f"CREATE ROLE {name} LOGIN", database="postgres")

    def terminate_connections(self, role: str) -> int:
        """Cut every session of ``role`` (a desk whose connection is cut)."""
        if not role.isidentifier():
            raise ValueError(f"{role!r} is not a role name")
        query = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = "
        out = self.psql(query + f"'{role}'", database="postgres")
        return int(out or 0)

    def wait_accepting(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.psql("SELECT 1", database="postgres")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
