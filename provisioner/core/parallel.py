"""Calls that wait on the network, run side by side: the wall time of the slowest, not
the sum (an enrollment's checks, each account's steps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from provisioner.core.errors import ProvisionerError

T = TypeVar("T")


def side_by_side(calls: Sequence[Callable[[], T]]) -> list[T | ProvisionerError]:
    """Run ``calls`` at once and wait for all of them (so that an undo knows everything
    that was done); a ProvisionerError is returned in its place, anything else raised.
    The first call runs on this thread (a token's session stays on the thread that
    opened it), the others each on a thread of their own."""
    if len(calls) <= 1:
        return [_caught(call) for call in calls]
    with ThreadPoolExecutor(max_workers=len(calls) - 1, thread_name_prefix="side") as pool:
        futures = [pool.submit(_caught, call) for call in calls[1:]]
        here = _caught(calls[0])
        return [here, *(f.result() for f in futures)]


def all_or_first_error(outcomes: Sequence[T | ProvisionerError]) -> list[T]:
    """The values of ``side_by_side``, or the first error in the order of the calls."""
    for outcome in outcomes:
        if isinstance(outcome, ProvisionerError):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


def _caught(call: Callable[[], T]) -> T | ProvisionerError:
    try:
        return call()
    except ProvisionerError as e:
        return e
