"""One training step and one epoch of the KL clustering method.

These functions are what every runner calls unchanged: the in-process `klssl train`
and the per-worker loop of Ray Train. The only distributed pieces are the DDP-wrapped
student (gradients) and `ClusterStatistics.update` (pi and c), both of which work in a
single process too.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trainer.acceleration import fused_optimizer_wanted
from trainer.config import Precision, TrainConfig
from trainer.health import HealthMonitor
from trainer.models import as_network, update_teacher
from trainer.objective import cross_view_loss, entropy, teacher_targets
from trainer.schedules import Schedules, StepSchedule
from trainer.statistics import BatchStatistics, ClusterStatistics, all_reduce_sum

Batch = tuple[list[Tensor], Tensor]
"""(views, labels): V tensors (B, 3, h, w), global views first, and (B,) labels."""


@dataclass
class TrainingState:
    """Everything that changes during training (and so goes into checkpoints)."""

    student: nn.Module
    """The student network, possibly wrapped in DistributedDataParallel."""
    teacher: nn.Module
    statistics: ClusterStatistics
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    """Only for fp16; bf16 and fp32 need no loss scaling."""
    step: int = 0
    """Optimiser steps taken so far (the global step of metrics)."""
    epoch: int = 0
    """Completed epochs."""
    epoch_samples: int = 0
    """Images of the current epoch trained on so far over all workers: the first ones of
    its permutation (`trainer.data.EpochSampler`), where a mid-epoch checkpoint resumes."""
    health: HealthMonitor = field(default_factory=HealthMonitor)
    """The collapse verdict, fed every log interval."""


@dataclass(frozen=True)
class StepResult:
    """Outputs of one step; tensors stay on the device until someone logs them."""

    loss: Tensor
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``auto`` means bf16 on a GPU and fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The mixed-precision context of a resolved precision."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def parameter_groups(model: nn.Module) -> list[dict[str, object]]:
    """Two groups: weights get weight decay, biases and norm parameters do not (as DINO)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of the student; lr and weight decay are set every step."""
    groups = parameter_groups(model)
    if config.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    # One fused kernel for every tensor on CUDA; elsewhere the multi-tensor path, whose
    # updates are bit-identical to the per-tensor loop (tests/trainer/test_acceleration.py).
    if fused_optimizer_wanted(model.parameters()):
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    return torch.optim.AdamW(groups, lr=0.0, foreach=True)


def _apply_schedule(optimizer: torch.optim.Optimizer, schedule: StepSchedule) -> None:
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = schedule.lr
        if index == 0:  # the regularised group
            group["weight_decay"] = schedule.weight_decay


def _clip_per_tensor(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: each tensor's gradient norm is capped separately."""
    for parameter in parameters:
        if parameter.grad is not None:
            torch.nn.utils.clip_grad_norm_(parameter, max_norm)


def train_step(
    state: TrainingState,
    views: Sequence[Tensor],
    schedule: StepSchedule,
    config: TrainConfig,
    *,
    precision: Precision,
    with_diagnostics: bool = False,
) -> StepResult:
    """One optimisation step on a batch of multi-crop views.

    Order within the step (docs/design.md section 1.5): teacher forward -> statistics update
    with this global batch -> targets -> loss (``statistics_order='previous'`` takes the
    targets before the update, as DINO does) -> student update -> teacher EMA.

    Args:
        state: the training state; updated in place (not ``step``: the caller counts).
        views: V_s tensors (B, 3, h, w) on the device, the V_t global views first.
        schedule: the scheduled values of this step.
        config: the run's config.
        precision: a resolved precision (fp32, bf16 or fp16).
        with_diagnostics: also compute the collapse diagnostics (one more small
            all-reduce; every rank must pass the same value).

    Returns:
        The loss and, when asked, the diagnostics, as detached scalar tensors.
    """
    objective = config.objective
    teacher_views = config.data.num_global_crops
    device = views[0].device
    _apply_schedule(state.optimizer, schedule)

    with autocast(precision, device):
        with torch.no_grad():
            teacher_logits = state.teacher(views[:teacher_views]).float()  # (V_t, B, K)
        student_logits = state.student(views)  # (V_s, B, K)

    def targets_now() -> Tensor:
        return teacher_targets(
            teacher_logits,
            mode=objective.mode,
            teacher_temp=schedule.teacher_temp,
            prior=state.statistics.prior,
            center=state.statistics.center,
            prior_power=objective.prior_power,
            sinkhorn_iters=objective.sinkhorn_iters,
            reduce=all_reduce_sum,
        )

    if objective.effective_statistics_order == "previous":
        targets = targets_now()
        batch_stats = state.statistics.update(teacher_logits, schedule.teacher_temp)
    else:
        batch_stats = state.statistics.update(teacher_logits, schedule.teacher_temp)
        targets = targets_now()
    loss = cross_view_loss(student_logits, targets, student_temp=objective.student_temp)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at step {state.step}; stopping")

    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    student = as_network(state.student)
    if config.optim.clip_grad > 0:
        _clip_per_tensor(student.parameters(), config.optim.clip_grad)
    if state.epoch < config.optim.freeze_last_layer_epochs:
        # DINO: keeping the prototypes fixed at first stabilises the start of training.
        for parameter in student.head.prototypes.parameters():
            parameter.grad = None
    if state.scaler is not None:
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        state.optimizer.step()
    update_teacher(state.teacher, student, schedule.teacher_momentum)

    diagnostics = (
        collapse_diagnostics(loss.detach(), targets, batch_stats, state.statistics)
        if with_diagnostics
        else {}
    )
    return StepResult(loss=loss.detach(), diagnostics=diagnostics)


@torch.no_grad()
def collapse_diagnostics(
    loss: Tensor, targets: Tensor, batch: BatchStatistics, statistics: ClusterStatistics
) -> dict[str, Tensor]:
    """The label-free diagnostics of docs/design.md, over the global batch.

    Teacher side (the raw teacher P_t = softmax(t / tau_t) and the EMA prior):
    - prior_entropy H(pi) and effective_clusters exp(H(pi)) of the EMA prior;
    - teacher_entropy E_x[H(P_t(.|x))];
    - mutual_info H(pi_batch) - E_x[H(P_t(.|x))], with the batch marginal, so it is a
      true (non-negative) mutual information of this batch.

    Target side (Q, what the student is trained on; the same measures):
    - target_entropy E_x[H(Q(.|x))], target_effective_clusters exp(H(E_x[Q])),
      target_mutual_info H(E_x[Q]) - E_x[H(Q)], and target_mutual_info_norm, the
      same divided by its ceiling log(min(K, N)) for N targets in the global batch, so
      that one threshold fits every K and batch size; target_cluster_usage, the
      entropy of E_x[Q] over the same ceiling (near 0 when one cluster takes all).

    And temperature-free: logit_spread, sqrt(mean_k Var_x t_k), 0 when every image gets
    the same logits. Mutual information is bounded by log N and, for small differences
    between images, grows as Var(t) / tau^2: a low value at a low temperature and a high
    one at a high temperature can describe the same teacher. logit_spread cannot.

    Finally kl = E[KL(Q || P_s)] = loss - target_entropy (every target view enters the
    pair average equally often).
    """
    # Q's marginal, entropies and the loss are summed over the global batch in one
    # all-reduce (the loss weighted by each rank's count): every rank reports the same.
    flat = targets.reshape(-1, targets.shape[-1]).float()
    count = torch.tensor([float(flat.shape[0])], device=flat.device)
    sums = all_reduce_sum(
        torch.cat(
            [
                flat.sum(dim=0),
                entropy(flat).sum().reshape(1),
                count,
                (loss.float() * count[0]).reshape(1),
            ]
        )
    )
    num_clusters = flat.shape[-1]
    total = sums[num_clusters + 1]
    target_marginal = sums[:num_clusters] / total
    target_entropy = sums[num_clusters] / total
    global_loss = sums[num_clusters + 2] / total
    target_mutual_info = (entropy(target_marginal) - target_entropy).clamp_min(0)
    ceiling = math.log(min(num_clusters, max(int(total.item()), 2)))
    prior_entropy = entropy(statistics.prior.float())
    return {
        "loss": global_loss,
        "kl": global_loss - target_entropy,
        "teacher_entropy": batch.teacher_entropy,
        "prior_entropy": prior_entropy,
        "effective_clusters": prior_entropy.exp(),
        "mutual_info": entropy(batch.prior) - batch.teacher_entropy,
        "target_entropy": target_entropy,
        "target_effective_clusters": entropy(target_marginal).exp(),
        "target_mutual_info": target_mutual_info,
        "target_mutual_info_norm": target_mutual_info / ceiling,
        "target_cluster_usage": entropy(target_marginal) / ceiling,
        "logit_spread": batch.logit_spread,
    }


DIAGNOSTICS = (
    "loss",
    "kl",
    "teacher_entropy",
    "prior_entropy",
    "effective_clusters",
    "mutual_info",
    "target_entropy",
    "target_effective_clusters",
    "target_mutual_info",
    "target_mutual_info_norm",
    "target_cluster_usage",
    "logit_spread",
)
"""The names `collapse_diagnostics` reports (every one a statistic of the global batch)."""

StepCallback = Callable[[TrainingState, dict[str, float]], None]


def train_one_epoch(
    state: TrainingState,
    loader: Iterable[Batch],
    schedules: Schedules,
    config: TrainConfig,
    *,
    device: torch.device,
    precision: Precision,
    world_size: int = 1,
    on_log: StepCallback | None = None,
    augment: Callable[[Any], list[Tensor]] | None = None,
    between_steps: Callable[[TrainingState], None] | None = None,
) -> dict[str, float]:
    """Train one epoch; returns the epoch's mean loss and its last diagnostics.

    ``on_log`` is called every ``runtime.log_every_steps`` steps (and at the last step)
    with the diagnostics, lr, teacher temperature, images/s and ``healthy`` (the
    verdict of ``state.health`` after this interval), keyed by metric name.

    ``augment`` (`trainer.augment_device.DeviceMultiCrop.batch_views`) turns the first
    element of each batch, the loader's images, into the views on ``device``; without
    it that element is the views, copied to ``device``.

    ``between_steps`` is called after every step but the epoch's last (whose state the
    epoch end reports): where a runner takes mid-epoch checkpoints. The fractional
    ``epoch`` metric is the run's position in its data (`Schedules.position`), so an
    epoch resumed mid-way counts the steps its checkpoint had taken.
    """
    state.student.train()
    state.teacher.train()
    loss_sum = torch.zeros((), device=device)
    steps = 0
    last: dict[str, float] = {}
    window_start, window_images = time.perf_counter(), 0
    for is_last, (views, _labels) in _flag_last(loader):
        if augment is not None:
            views = augment(views)
        else:
            views = [view.to(device, non_blocking=True) for view in views]
        schedule = schedules.at(schedules.position(state.epoch, state.epoch_samples))
        log_now = is_last or (state.step + 1) % config.runtime.log_every_steps == 0
        result = train_step(
            state, views, schedule, config, precision=precision, with_diagnostics=log_now
        )
        state.step += 1
        steps += 1
        loss_sum += result.loss
        window_images += views[0].shape[0] * world_size
        state.epoch_samples += views[0].shape[0] * world_size
        if log_now:
            elapsed = time.perf_counter() - window_start
            last = {name: float(value) for name, value in result.diagnostics.items()}
            last |= {
                "lr": schedule.lr,
                "weight_decay": schedule.weight_decay,
                "teacher_temp": schedule.teacher_temp,
                "teacher_momentum": schedule.teacher_momentum,
                "images_per_s": window_images / max(elapsed, 1e-9),
                "epoch": schedules.position(state.epoch, state.epoch_samples)
                / schedules.steps_per_epoch,
            }
            last |= state.health.observe(state.step, last).metrics()
            if on_log is not None:
                on_log(state, last)
            window_start, window_images = time.perf_counter(), 0
        if not is_last and between_steps is not None:
            between_steps(state)
    resumed_at_its_end = steps == 0 and state.epoch_samples > 0
    if steps == 0 and not resumed_at_its_end:
        raise RuntimeError("the training loader yielded no batch: dataset smaller than a batch?")
    state.epoch += 1
    state.epoch_samples = 0
    if resumed_at_its_end:
        # An elastic run resumed with more workers: what was left of the epoch does not
        # fill one global batch, so the epoch ends here (as drop_last ends every epoch).
        return {"epoch": float(state.epoch)}
    return last | {"epoch_loss": float(loss_sum) / steps, "epoch": float(state.epoch)}


def _flag_last(items: Iterable[Batch]) -> Iterator[tuple[bool, Batch]]:
    """Pairs (is_last, item), so the last step of an epoch is always logged."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield False, previous
        previous = item
    yield True, previous
