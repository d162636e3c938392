import pytest

from provisioner.core.clock import AwsClock


class Local:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_unseen_uses_local_clock_with_a_second_of_doubt() -> None:
    clock = AwsClock(local=Local(1000.0))
    assert clock.now() == 1000.0
    assert clock.uncertainty() == 1.0


def test_one_answer_bounds_the_offset() -> None:
    # AWS is 42.3 s ahead; Date truncates to the second; the call took 0.1 s.
    clock = AwsClock(local=Local(1000.1))
    clock.observe(server_date=1042.0, sent=1000.0, received=1000.1)
    off = clock.offset
    assert off is not None
    assert off.low == pytest.approx(41.9)
    assert off.high == pytest.approx(43.0)
    assert 41.9 <= clock.now() - 1000.1 <= 43.0


def test_answers_narrow_the_estimate() -> None:
    true_offset = 42.3
    clock = AwsClock(local=Local(0))
    for i in range(20):
        sent = 1000.0 + i * 0.37
        received = sent + 0.01
        server = int(received + true_offset)
        clock.observe(server_date=server, sent=sent, received=received)
    off = clock.offset
    assert off is not None
    assert off.low <= true_offset <= off.high
    assert off.uncertainty < 0.1


def test_a_clock_jump_starts_again_from_the_newest_answer() -> None:
    clock = AwsClock(local=Local(0))
    clock.observe(server_date=1000, sent=1000.0, received=1000.05)
    clock.observe(server_date=1500, sent=1001.0, received=1001.05)
    off = clock.offset
    assert off is not None
    assert off.low == pytest.approx(498.95)


def test_skew_over_threshold_is_reported_once() -> None:
    seen: list[float] = []
    clock = AwsClock(local=Local(0), on_skew=seen.append, skew_warning=3.0)
    clock.observe(server_date=1010, sent=1000.0, received=1000.1)
    clock.observe(server_date=1011, sent=1001.0, received=1001.1)
    assert len(seen) == 1
    assert seen[0] == pytest.approx(10.45, abs=0.1)


def test_small_skew_is_not_reported() -> None:
    seen: list[float] = []
    clock = AwsClock(local=Local(0), on_skew=seen.append, skew_warning=3.0)
    clock.observe(server_date=1001, sent=1000.0, received=1000.1)
    assert seen == []
