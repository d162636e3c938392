"""The daemon's Prometheus metrics (the only module that imports prometheus_client).

Counters and histograms are fed from the desk's events (:meth:`DeskMetrics.observe`,
a listener on the service's event hub) and from the IAM adapter's calls
(:meth:`DeskMetrics.iam_call`); gauges are read from the service when scraped. Each
daemon has its own registry: nothing process-global, so tests can run several.

Labels are bounded: outcomes, step names, error codes and IAM action names, never a
user, a serial or anything else that grows with the number of people enrolled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from provisioner.core.messages import EventKind

# Steps take milliseconds (token, IAM round trips) to tens of seconds (a time-step wait,
# an EnableMFADevice retried while IAM settles).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _label(text: object) -> str:
    """An outcome as a label value: "failed, NOT rolled back" -> "failed_not_rolled_back"."""
    return "_".join("".join(c if c.isalnum() else " " for c in str(text).lower()).split())


class DeskMetrics:
    def __init__(
        self,
        *,
        tokens_present: Callable[[], int],
        queue_length: Callable[[], int],
        in_progress: Callable[[], int],
        devices_ahead: Callable[[], int] = lambda: 0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._now = now
        self._lock = threading.Lock()
        self._step_started: dict[int, tuple[str, float]] = {}
        self.enrollments = Counter(
            "provisioner_enrollments",
            "Finished enrollments by outcome and, for failures, the error that stopped them.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "provisioner_enrollment_step_seconds",
            "How long each step of an enrollment took.",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.iam_calls = Counter(
            "provisioner_iam_calls",
            "IAM calls by action and result (ok, or the error code).",
            ["action", "result"],
            registry=self.registry,
        )
        self.iam_retries = Counter(
            "provisioner_iam_retries",
            "Retries botocore made of IAM calls (throttling, 5xx, dropped connections).",
            ["action"],
            registry=self.registry,
        )
        self.iam_throttled = Counter(
            "provisioner_iam_throttled",
            "IAM answers that said the desk's account is throttled (botocore's adaptive "
            "retries back off and try again).",
            ["action"],
            registry=self.registry,
        )
        gauges = (
            ("provisioner_tokens_present", "Tokens in the desk's readers.", tokens_present),
            ("provisioner_queue_length", "Requests waiting for a token.", queue_length),
            ("provisioner_enrollments_in_progress", "Enrollments now running.", in_progress),
            (
                "provisioner_devices_ahead",
                "Virtual MFA devices made ahead of their token's plug, unused yet.",
                devices_ahead,
            ),
        )
        for name, text, read in gauges:
            Gauge(name, text, registry=self.registry).set_function(read)

    def observe(self, event: Mapping[str, Any]) -> None:
        """A desk event: a step started (so the previous one ended), or an outcome."""
        enrollment = event.get("enrollment")
        if not isinstance(enrollment, int):
            return
        kind = event.get("event")
        if kind == EventKind.STEP:
            self._end_step(enrollment, next_step=str(event.get("step")))
        elif kind == EventKind.OUTCOME:
            self._end_step(enrollment, next_step=None)
            outcome = _label(event.get("outcome"))
            reason = str(event.get("reason") or "") if not event.get("ok") else ""
            self.enrollments.labels(outcome=outcome, reason=reason).inc()

    def _end_step(self, enrollment: int, next_step: str | None) -> None:
        now = self._now()
        with self._lock:
            previous = self._step_started.pop(enrollment, None)
            if next_step is not None:
                self._step_started[enrollment] = (next_step, now)
        if previous is not None:
            step, started = previous
            self.step_seconds.labels(step=step).observe(now - started)

    def throttled(self, action: str) -> None:
        self.iam_throttled.labels(action=action).inc()

    def iam_call(self, action: str, retries: int, error_code: str | None) -> None:
        """One IAM call as the adapter saw it: its retries, and how it ended."""
        self.iam_calls.labels(action=action, result=error_code or "ok").inc()
        if retries > 0:
            self.iam_retries.labels(action=action).inc(retries)


class MetricsEndpoint:
    """``/metrics`` over HTTP on a loopback address, in a thread of its own."""

    def __init__(self, metrics: DeskMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


__all__ = ["DeskMetrics", "MetricsEndpoint", "STEP_BUCKETS"]
