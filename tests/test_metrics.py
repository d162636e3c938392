"""The metrics: what desk events and IAM calls count, and the endpoint's address rules."""

from __future__ import annotations

import urllib.request

import pytest

from provisioner.adapters.metrics import DeskMetrics, MetricsEndpoint
from provisioner.config import parse
from provisioner.core.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[DeskMetrics, Clock, dict[str, int]]:
    clock = Clock()
    counts = {"tokens": 2, "queued": 3, "running": 1, "ahead": 2}
    metrics = DeskMetrics(
        tokens_present=lambda: counts["tokens"],
        queue_length=lambda: counts["queued"],
        in_progress=lambda: counts["running"],
        devices_ahead=lambda: counts["ahead"],
        now=clock,
    )
    return metrics, clock, counts


def value(metrics: DeskMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_step_is_timed_until_the_next_step_or_the_outcome() -> None:
    metrics, clock, _ = make()
    for step, took in (("check", 0.01), ("create device", 0.2), ("enable", 0.03)):
        metrics.observe({"event": "step", "enrollment": 1, "step": step})
        clock.now += took
    metrics.observe({"event": "outcome", "enrollment": 1, "ok": True, "outcome": "enrolled"})
    sums = {
        step: value(metrics, "provisioner_enrollment_step_seconds_sum", step=step)
        for step in ("check", "create device", "enable")
    }
    assert sums == pytest.approx({"check": 0.01, "create device": 0.2, "enable": 0.03})
    assert value(metrics, "provisioner_enrollments_total", outcome="enrolled", reason="") == 1


def test_interleaved_enrollments_are_timed_apart() -> None:
    metrics, clock, _ = make()
    metrics.observe({"event": "step", "enrollment": 1, "step": "check"})
    clock.now += 1.0
    metrics.observe({"event": "step", "enrollment": 2, "step": "check"})
    clock.now += 0.5
    metrics.observe({"event": "step", "enrollment": 2, "step": "enable"})
    metrics.observe({"event": "step", "enrollment": 1, "step": "enable"})
    assert value(metrics, "provisioner_enrollment_step_seconds_sum", step="check") == 2.0


def test_failures_are_counted_by_outcome_and_reason_and_other_events_are_ignored() -> None:
    metrics, _, _ = make()
    failed = {"event": "outcome", "enrollment": 3, "ok": False, "reason": "TokenRemoved"}
    metrics.observe(failed | {"outcome": "failed"})
    metrics.observe(failed | {"outcome": "failed, NOT rolled back", "reason": "ServiceFailure"})
    metrics.observe({"event": "token-removed", "reader": "r"})
    metrics.observe({"event": "outcome", "queue": 4, "outcome": "cancelled"})  # no enrollment
    assert value(metrics, "provisioner_enrollments_total", outcome="failed", reason="TokenRemoved")
    leftovers = {"outcome": "failed_not_rolled_back", "reason": "ServiceFailure"}
    assert value(metrics, "provisioner_enrollments_total", **leftovers) == 1
    assert value(metrics, "provisioner_enrollments_total", outcome="cancelled", reason="") is None


def test_iam_calls_and_retries_by_action() -> None:
    metrics, _, _ = make()
    metrics.iam_call("CreateVirtualMFADevice", 2, None)
    metrics.iam_call("EnableMFADevice", 0, "InvalidAuthenticationCode")
    metrics.iam_call("GetUser", 1, None)
    assert value(metrics, "provisioner_iam_retries_total", action="CreateVirtualMFADevice") == 2
    assert value(metrics, "provisioner_iam_retries_total", action="GetUser") == 1
    assert value(metrics, "provisioner_iam_retries_total", action="EnableMFADevice") is None
    assert (
        value(
            metrics,
            "provisioner_iam_calls_total",
            action="EnableMFADevice",
            result="InvalidAuthenticationCode",
        )
        == 1
    )


def test_gauges_are_read_when_scraped_over_http() -> None:
    metrics, _, counts = make()
    endpoint = MetricsEndpoint(metrics, "127.0.0.1", 0)
    try:
        counts["queued"] = 7
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    finally:
        endpoint.close()
    assert "provisioner_queue_length 7.0" in text
    assert "provisioner_tokens_present 2.0" in text
    assert "provisioner_enrollments_in_progress 1.0" in text
    assert "provisioner_devices_ahead 2.0" in text


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("", None), ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9100", ("::1", 9100))],
)
def test_metrics_listen_accepts_loopback_addresses(
    listen: str, expected: tuple[str, int] | None
) -> None:
    config = parse(f'[daemon]\nmetrics_listen = "{listen}"\n', "test")
    assert config.daemon.metrics_address() == expected


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("0.0.0.0:9464", "not a loopback address"),
        ("10.1.2.3:9464", "not a loopback address"),
        ("localhost:9464", "is not HOST:PORT"),  # an IP address, not a name to resolve
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:http", "is not HOST:PORT"),
        ("127.0.0.1:70000", "is not HOST:PORT"),
    ],
)
def test_metrics_listen_refuses_anything_else_at_start(listen: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse(f'[daemon]\nmetrics_listen = "{listen}"\n', "test")
