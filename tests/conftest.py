import sys
from pathlib import Path

# Lets tests import the shared fakes and helpers next to them as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import boto3  # noqa: E402
import pytest  # noqa: E402

from desk_harness import make_workdir  # noqa: E402
from emulated_yubikey import PcscStack  # noqa: E402
from local_iam_server import LocalIamServer  # noqa: E402


@pytest.fixture(scope="session")
def pcsc_stack() -> Iterator[PcscStack]:
    """The real pcscd with six vpcd readers (three banks of two, one per desk of the fleet
    tests): one pcscd per machine, so one per test run.

    Another run (the demo, a developer's tests) may hold the one pcscd: wait for it.
    """
    with PcscStack(busy_timeout=90, banks=3) as stack:
        yield stack


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory for a desk's files that an unprivileged client can reach."""
    path = make_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def iam_server() -> Iterator[LocalIamServer]:
    """The strict local IAM server, one process for the whole run."""
    with LocalIamServer() as server:
        yield server


@pytest.fixture
def local_iam(iam_server: LocalIamServer, monkeypatch: pytest.MonkeyPatch) -> LocalIamServer:
    """A clean local IAM with users alice and bob, and this process's boto3 pointed at it."""
    iam_server.reset()
    for name, value in iam_server.aws_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    admin = boto3.client("iam", endpoint_url=iam_server.endpoint_url, region_name="us-east-1")
    for user in ("alice", "bob"):
        admin.create_user(UserName=user)
    return iam_server


@pytest.fixture
def admin_iam(local_iam: LocalIamServer):  # type: ignore[no-untyped-def]
    """A plain boto3 IAM client for the test's own checks."""
    return boto3.client("iam", endpoint_url=local_iam.endpoint_url, region_name="us-east-1")


# --- a fleet's database ---------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402
from itertools import count  # noqa: E402

from desk_harness.postgres import DESK, OWNER, PostgresCluster  # noqa: E402

_databases = count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster (Debian's server), one per test run, on a Unix
    socket in a temporary directory."""
    with PostgresCluster() as cluster:
        yield cluster


@dataclass(frozen=True)
class FleetDatabase:
    cluster: PostgresCluster
    name: str

    @property
    def owner_url(self) -> str:
        return self.cluster.url(OWNER, self.name)

    @property
    def desk_url(self) -> str:
        return self.cluster.url(DESK, self.name)


@pytest.fixture
def pg_db(pg_cluster: PostgresCluster) -> Iterator[FleetDatabase]:
    """A fresh, empty database of the cluster for one test (not migrated)."""
    name = f"provisioner_t{next(_databases)}"
    pg_cluster.create_database(name)
    yield FleetDatabase(pg_cluster, name)
    pg_cluster.drop_database(name)
