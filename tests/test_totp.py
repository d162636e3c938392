import pytest

from provisioner.core.secret import Seed
from provisioner.core.totp import code_at, plan_window, time_step

RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]


@pytest.mark.parametrize(("timestamp", "expected"), RFC6238_SHA1)
def test_rfc6238_sha1_vectors(timestamp: int, expected: str) -> None:
    seed = Seed(b"12345678901234567890")
    assert code_at(seed, timestamp, digits=8) == expected
    assert code_at(seed, timestamp) == expected[-6:]


def test_time_step_boundaries() -> None:
    assert time_step(0) == 0
    assert time_step(29.999) == 0
    assert time_step(30) == 1
    assert time_step(59) == 1


def test_plenty_left_uses_previous_and_current_step() -> None:
    plan = plan_window(1000 * 30 + 2.0, margin=5)
    assert plan.wait == 0
    assert plan.first_step == 999
    assert plan.seconds_left == pytest.approx(28.0)
    t1, t2 = plan.timestamps
    assert time_step(t1) == 999 and time_step(t2) == 1000


def test_exactly_at_margin_does_not_wait() -> None:
    plan = plan_window(1000 * 30 + 25.0, margin=5)
    assert plan.wait == 0
    assert plan.first_step == 999


def test_too_little_left_waits_for_next_step_only() -> None:
    plan = plan_window(1000 * 30 + 26.0, margin=5)
    assert plan.wait == pytest.approx(4.0)
    assert plan.first_step == 1000  # steps 1000 and 1001, submitted during 1001


def test_uncertainty_counts_against_the_time_left_and_the_wait() -> None:
    plan = plan_window(1000 * 30 + 24.0, margin=5, uncertainty=1.5)
    # 6 s left, but 1.5 s of it may already be gone: wait past the boundary plus 1.5 s
    assert plan.wait == pytest.approx(7.5)
    assert plan.first_step == 1000
    calm = plan_window(1000 * 30 + 23.0, margin=5, uncertainty=1.5)
    assert calm.wait == 0 and calm.first_step == 999


def test_wait_never_exceeds_margin_plus_uncertainty() -> None:
    for tenth in range(0, 300):
        now = 5000 * 30 + tenth / 10
        plan = plan_window(now, margin=5, uncertainty=1)
        assert plan.wait <= 5 + 2 + 1e-9
        after = now + plan.wait
        # submitted during the pair's second step, with at least the margin of it left
        assert time_step(after) == plan.first_step + 1
        assert (plan.first_step + 2) * 30 - after >= 5
        # ... and that step has surely begun on AWS's clock: no code of a future step
        assert after - 1 >= (plan.first_step + 1) * 30


def test_early_in_a_step_waits_until_it_has_surely_begun_on_aws_clock() -> None:
    # 0.3 s into step 1000 by the best estimate, give or take 1 s: AWS may still be in
    # step 999, where the code of step 1000 is one of the future, and refused.
    plan = plan_window(1000 * 30 + 0.3, margin=5, uncertainty=1.0)
    assert plan.wait == pytest.approx(0.7)
    assert plan.first_step == 999
    assert plan.seconds_left == pytest.approx(28.0)
    sure = plan_window(1000 * 30 + 1.0, margin=5, uncertainty=1.0)
    assert (sure.wait, sure.first_step) == (0, 999)


def test_timestamps_are_never_zero() -> None:
    plan = plan_window(31.0, margin=0)
    assert plan.first_step == 0
    assert all(t > 0 for t in plan.timestamps)


def test_margin_must_be_below_a_period() -> None:
    with pytest.raises(ValueError):
        plan_window(0, margin=30)
