"""Schedules are pure functions of the step: warm-ups, cosines and their end points."""

from __future__ import annotations

import itertools

import pytest

from trainer.config import TrainConfig
from trainer.schedules import Schedules, cosine, linear_warmup, warmup_cosine


def test_cosine_end_points_and_midpoint() -> None:
    assert cosine(0, 100, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(100, 100, 1.0, 0.0) == pytest.approx(0.0)
    assert cosine(500, 100, 1.0, 0.0) == pytest.approx(0.0)


def test_warmup_cosine_rises_linearly_then_decays() -> None:
    values = [warmup_cosine(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5)
    assert values[10] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))
    # A warm-up longer than the run is cut to the run.
    assert warmup_cosine(99, 100, 500, 1.0, 0.1) == pytest.approx(0.99)


def test_linear_warmup_holds_its_end() -> None:
    assert linear_warmup(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(3, 0, 0.04, 0.07) == pytest.approx(0.07)


def test_run_schedules_follow_the_config() -> None:
    config = TrainConfig.model_validate(
        {
            "schedule": {"epochs": 10, "warmup_epochs": 2, "teacher_momentum": 0.99},
            "objective": {
                "teacher_temp": 0.07,
                "warmup_teacher_temp": 0.04,
                "warmup_teacher_temp_epochs": 5,
            },
            "optim": {"lr": 1e-3, "min_lr": 1e-6, "weight_decay": 0.04, "weight_decay_end": 0.4},
        }
    )
    schedules = Schedules(config, steps_per_epoch=10, global_batch=512)
    assert schedules.total_steps == 100
    assert schedules.peak_lr == pytest.approx(2e-3)  # linear scaling with batch / 256
    start, peak, end = schedules.at(0), schedules.at(20), schedules.at(100)
    assert start.lr == 0.0 and peak.lr == pytest.approx(2e-3) and end.lr == pytest.approx(1e-6)
    assert start.weight_decay == pytest.approx(0.04) and end.weight_decay == pytest.approx(0.4)
    assert start.teacher_momentum == pytest.approx(0.99)
    assert end.teacher_momentum == pytest.approx(1.0)
    assert start.teacher_temp == pytest.approx(0.04)
    assert schedules.at(25).teacher_temp == pytest.approx(0.055)
    assert schedules.at(50).teacher_temp == pytest.approx(0.07)
    # Pure: asking twice, or out of order, gives the same values.
    assert schedules.at(37) == schedules.at(37)
