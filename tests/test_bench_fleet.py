"""bench/fleet.py, run small so that it cannot rot: its desks' readers enroll every
queued user once, and the round trips it reports are the store's own count."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from local_iam_server import LocalIamServer
from provisioner.adapters.postgres_store import PostgresStore, migrate

BENCH = Path(__file__).resolve().parent.parent / "bench" / "fleet.py"
pytestmark = [pytest.mark.iam_server, pytest.mark.postgres]


def test_two_desks_enroll_every_queued_user_once(
    local_iam: LocalIamServer, pg_db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("bench_fleet", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for i in range(4):
        local_iam.create_user(f"u{60_000_000 + i}")
    migrate(pg_db.owner_url)
    stores = {name: PostgresStore(pg_db.desk_url, desk=name) for name in ("a", "b")}
    try:
        result = bench.run_desks(stores, 1, 2, 60_000_000)
        assert result["enrollments"] == 4 and result["readers"] == 2
        records = {r.user: r for r in stores["a"].history(limit=100) if r.event == "enrollment"}
        assert sorted(records) == [f"u{60_000_000 + i}" for i in range(4)]
        assert {r.desk for r in records.values()} <= {"a", "b"}
        assert stores["a"].round_trips > 0
    finally:
        for store in stores.values():
            store.close()
