"""The token workers' waiting, as plain functions: the pauses between tries at a token
another program holds, and the tries themselves. The workers serving emulated keys are in
test_service.py."""

from __future__ import annotations

from provisioner.core.errors import TokenBusy
from provisioner.daemon.workers import Backoff, retry_while_busy


def test_backoff_doubles_from_half_a_second_to_ten() -> None:
    delays = Backoff().delays()
    assert [next(delays) for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_retry_while_busy_tries_again_after_each_pause_until_it_opens() -> None:
    outcomes: list[object] = [TokenBusy("held"), TokenBusy("held"), TokenBusy("held"), "token"]
    paused: list[float] = []
    told: list[float] = []

    def attempt() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return str(outcome)

    def pause(seconds: float) -> bool:
        paused.append(seconds)
        return True

    got = retry_while_busy(
        attempt, backoff=Backoff(), pause=pause, on_busy=lambda e, delay: told.append(delay)
    )
    assert got == "token"
    assert paused == told == [0.5, 1.0, 2.0]


def test_retry_while_busy_gives_up_when_the_pause_says_the_token_is_gone() -> None:
    attempts = []

    def attempt() -> str:
        attempts.append(1)
        raise TokenBusy("held")

    pauses = iter([True, True, False])
    got = retry_while_busy(
        attempt, backoff=Backoff(), pause=lambda s: next(pauses), on_busy=lambda e, d: None
    )
    assert got is None
    assert len(attempts) == 3
