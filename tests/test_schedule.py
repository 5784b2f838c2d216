"""trace.schedule: Eq. 2 at the paper's break points, and when the teacher forward can stop."""

import math

import pytest

from trace.schedule import LAMBDA_SCHEDULES, LambdaSchedule, teacher_sync_due


@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.5), (9, 0.5), (10, 0.5), (25, 0.5 * 15 / 30), (39, 0.5 / 30), (40, 0.0), (300, 0.0)],
)
def test_warmup_linear_decay_by_hand(step, expected):
    schedule = LambdaSchedule()  # w0 0.5, warm-up 10, zero at 40
    assert math.isclose(schedule(step), expected)


def test_rho_and_strength():
    schedule = LambdaSchedule()
    assert schedule.rho(0) == 0.0 and schedule.rho(40) == 1.0
    assert math.isclose(schedule.rho(25), 0.5) and math.isclose(schedule.strength(25), 0.5)
    assert LambdaSchedule(w0=0.0).rho(0) == 1.0


def test_teacher_forward_needed():
    schedule = LambdaSchedule()
    assert schedule.teacher_forward_needed(0) and schedule.teacher_forward_needed(39)
    assert not schedule.teacher_forward_needed(40) and not schedule.teacher_forward_needed(300)
    assert LambdaSchedule(kind="constant").teacher_forward_needed(10_000)
    assert not LambdaSchedule(kind="constant", w0=0.0).teacher_forward_needed(0)
    assert not LambdaSchedule(kind="none").teacher_forward_needed(0)


def test_needed_is_exactly_any_future_lambda_positive():
    for schedule in (LambdaSchedule(), LambdaSchedule(warmup=5, end=5), LambdaSchedule(kind="none")):
        for step in range(60):
            assert schedule.teacher_forward_needed(step) == any(schedule(k) > 0 for k in range(step, 200))


def test_other_schedules():
    assert LambdaSchedule(kind="constant", w0=0.3)(123) == 0.3
    assert LambdaSchedule(kind="none")(0) == 0.0
    assert set(LAMBDA_SCHEDULES) == {"warmup_linear_decay", "constant", "none"}
    with pytest.raises(ValueError):
        LambdaSchedule(kind="cosine")
    with pytest.raises(ValueError):
        LambdaSchedule(warmup=50, end=40)


def test_teacher_sync_every_10_steps():
    assert [s for s in range(35) if teacher_sync_due(s)] == [0, 10, 20, 30]
    assert not teacher_sync_due(5, every=0)
