"""bench/many.py, run small so that it cannot rot: two workers, one enrollment each, no
latency; every enrollment done, none failed."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
pytestmark = [pytest.mark.iam_server]


def load() -> Any:
    sys.path.insert(0, str(BENCH_DIR))  # bench/many.py imports bench/bench.py
    try:
        spec = importlib.util.spec_from_file_location("bench_many", BENCH_DIR / "many.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH_DIR))


def test_the_many_tokens_benchmark_runs_every_enrollment() -> None:
    saved = dict(os.environ)  # the bench points boto3 at its own server
    try:
        result = load().run(0.0, 2, 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result["one_at_a_time"]["enrollments"] == 1
    assert result["at_once"] == result["at_once"] | {"workers": 2, "enrollments": 2, "errors": 0}
    assert result["ratio"] > 0
