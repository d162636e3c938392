"""A short run of bench/soak.py in CI: the same soak as docs/reliability.md's 500, cut to
40 enrollments so the suite stays quick; every token must be accounted for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from emulated_yubikey import PcscStack
from local_iam_server import LocalIamServer

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.pcsc
@pytest.mark.iam_server
@pytest.mark.slow
def test_soak_with_random_faults_accounts_for_every_token(
    pcsc_stack: PcscStack, iam_server: LocalIamServer
) -> None:
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # its dataclasses look their module up there
    spec.loader.exec_module(soak)
    iam_server.reset()
    report = soak.run(40, seed=11, stack=pcsc_stack, iam=iam_server)
    assert report.unaccounted == []
    assert report.enrolled + report.rolled_back == 40
    assert sum(report.faults.values()) == 40
    assert len(report.faults) >= 4  # the faults really were mixed in
    assert report.rolled_back >= 1 and report.enrolled >= 20
