"""Training schedules as pure functions of the global step.

Being pure functions of (step, config), a resumed run recomputes exactly the values the
interrupted run would have used: nothing about schedules needs to be checkpointed. The
step is the run's position in its data (`Schedules.position`), which an elastic run
keeps when its number of workers, and so its steps per epoch, changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import TrainConfig


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step total_steps)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float
) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine to ``final``."""
    warmup_steps = min(warmup_steps, total_steps)  # a warm-up longer than the run is cut
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then constant ``end``."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


@dataclass(frozen=True)
class StepSchedule:
    """The values every schedule takes at one step."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temp: float


@dataclass(frozen=True)
class Schedules:
    """All schedules of a run, fixed by its config, steps per epoch and global batch.

    Args:
        config: the run's config.
        steps_per_epoch: optimiser steps in one epoch (per worker = global).
        global_batch: images per step summed over workers (scales the learning rate
            linearly, lr = optim.lr * global_batch / 256, as in DINO).
    """

    config: TrainConfig
    steps_per_epoch: int
    global_batch: int

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        return self.config.schedule.epochs * self.steps_per_epoch

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up, scaled by the global batch."""
        return self.config.optim.lr * self.global_batch / 256

    def position(self, epoch: int, epoch_samples: int) -> int:
        """The step of this grid at which a run stands after ``epoch`` completed epochs
        and ``epoch_samples`` images of the next (over all workers).

        The same as the run's step count while its number of workers stays the same. An
        elastic run that resumed at another size (another ``global_batch`` and
        ``steps_per_epoch``) continues its schedules from its progress through the
        data, not from a step count made with the old batch.
        """
        return epoch * self.steps_per_epoch + epoch_samples // self.global_batch

    def at(self, step: int) -> StepSchedule:
        """Every scheduled value at global step ``step`` (0-based)."""
        optim, schedule, objective = self.config.optim, self.config.schedule, self.config.objective
        return StepSchedule(
            lr=warmup_cosine(
                step,
                self.total_steps,
                schedule.warmup_epochs * self.steps_per_epoch,
                self.peak_lr,
                optim.min_lr,
            ),
            weight_decay=cosine(step, self.total_steps, optim.weight_decay, optim.weight_decay_end),
            teacher_momentum=cosine(
                step, self.total_steps, schedule.teacher_momentum, schedule.teacher_momentum_end
            ),
            teacher_temp=linear_warmup(
                step,
                objective.warmup_teacher_temp_epochs * self.steps_per_epoch,
                objective.warmup_teacher_temp,
                objective.teacher_temp,
            ),
        )
