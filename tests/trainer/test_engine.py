"""The training step, the epoch loop, checkpoints and resume, on tiny digits runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.factories import tiny_config
from tests.trainer.test_objective import DinoLossReference
from trainer.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_config,
    load_payload,
    prune_checkpoints,
    save_checkpoint,
)
from trainer.config import TrainConfig
from trainer.engine import DIAGNOSTICS, TrainingState, parameter_groups, train_step
from trainer.loop import build_run, run_training
from trainer.models import unwrap


class RecordingHooks:
    """Keeps every log and epoch-end record, checkpointing into ``root`` when given."""

    def __init__(self, config: TrainConfig, root: Path | None = None) -> None:
        self.config = config
        self.root = root
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.epochs: list[tuple[int, dict[str, float]]] = []

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        self.logs.append((state.step, metrics))

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        self.epochs.append((state.epoch, metrics))
        if self.root is not None:
            save_checkpoint(self.root / checkpoint_name(state.epoch), state, self.config)


def first_batch_views(config: TrainConfig) -> tuple[TrainingState, list[torch.Tensor]]:
    run = build_run(config)
    views, _ = next(iter(run.train_loader))
    return run.state, views


def test_step_updates_student_and_teacher_and_reports_diagnostics(tiny: TrainConfig) -> None:
    run = build_run(tiny)
    views, _ = next(iter(run.train_loader))
    student = unwrap(run.state.student)
    backbone_before = [p.detach().clone() for p in student.backbone.parameters()]
    teacher_before = [p.detach().clone() for p in run.state.teacher.parameters()]
    prototypes_before = student.head.prototypes.parametrizations.weight.original1.clone()
    schedule = run.schedules.at(5)  # past warm-up start: lr > 0
    result = train_step(run.state, views, schedule, tiny, precision="fp32", with_diagnostics=True)
    assert set(result.diagnostics) == set(DIAGNOSTICS)
    values = {k: float(v) for k, v in result.diagnostics.items()}
    assert math.isfinite(values["loss"])
    k = tiny.objective.num_clusters
    for name in ("effective_clusters", "target_effective_clusters"):
        assert 1.0 - 1e-4 <= values[name] <= k + 1e-3
    for name in ("teacher_entropy", "target_entropy"):
        assert 0.0 <= values[name] <= math.log(k) + 1e-4
    assert values["mutual_info"] >= -1e-5
    assert 0.0 <= values["target_mutual_info_norm"] <= 1.0
    assert values["logit_spread"] > 0
    assert values["kl"] == pytest.approx(values["loss"] - values["target_entropy"], abs=1e-5)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(backbone_before, student.backbone.parameters(), strict=True)
    )
    # Epoch 0 freezes the prototypes (freeze_last_layer_epochs = 1).
    torch.testing.assert_close(
        student.head.prototypes.parametrizations.weight.original1, prototypes_before
    )
    momentum = schedule.teacher_momentum
    for old, new, s in zip(
        teacher_before, run.state.teacher.parameters(), student.parameters(), strict=True
    ):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * s.detach())


@pytest.mark.parametrize("order", ["auto", "current"])
def test_center_mode_steps_equal_dino_loss_in_dinos_order(order: str) -> None:
    """`center` by default takes targets from the previous center, then updates it."""
    config = tiny_config(objective={"mode": "center", "statistics_order": order})
    assert config.objective.effective_statistics_order == (
        "previous" if order == "auto" else "current"
    )
    run = build_run(config)
    k, views_per_image = config.objective.num_clusters, config.data.num_views
    reference = DinoLossReference(k, views_per_image, config.data.num_global_crops)
    assert reference.center.shape[-1] == k
    gaps = []
    for step, (views, _) in zip(range(3), run.train_loader, strict=False):
        schedule = run.schedules.at(step + 3)  # lr > 0: the networks change between steps
        with torch.no_grad():  # the same forward passes train_step makes
            teacher = run.state.teacher(views[: config.data.num_global_crops])
            student = unwrap(run.state.student)(views)
        expected = reference(student.reshape(-1, k), teacher.reshape(-1, k), schedule.teacher_temp)
        result = train_step(run.state, views, schedule, config, precision="fp32")
        gaps.append(abs(float(result.loss) - float(expected)))
        torch.testing.assert_close(run.state.statistics.center, reference.center.squeeze(0))
    if order == "auto":
        assert max(gaps) < 1e-5, gaps  # DINOLoss to float precision
    else:
        assert max(gaps) > 1e-4, gaps  # the other order is measurably different


def test_effective_statistics_order_is_logged_with_the_params() -> None:
    for mode, order in [("center", "previous"), ("prior", "current"), ("sinkhorn", "current")]:
        flat = tiny_config(objective={"mode": mode}).flat()
        assert flat["objective.statistics_order"] == "auto"
        assert flat["objective.effective_statistics_order"] == order


def test_teacher_never_receives_gradients(tiny: TrainConfig) -> None:
    run = build_run(tiny)
    views, _ = next(iter(run.train_loader))
    train_step(run.state, views, run.schedules.at(3), tiny, precision="fp32")
    assert all(p.grad is None for p in run.state.teacher.parameters())


def test_biases_and_norms_get_no_weight_decay(tiny: TrainConfig) -> None:
    run = build_run(tiny)
    decay, no_decay = parameter_groups(unwrap(run.state.student))
    assert all(p.ndim > 1 for p in decay["params"])  # type: ignore[attr-defined]
    assert all(p.ndim <= 1 for p in no_decay["params"])  # type: ignore[attr-defined]
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("mode", ["prior", "center", "sinkhorn", "none"])
def test_every_mode_trains_an_epoch(mode: str) -> None:
    config = tiny_config(objective={"mode": mode}, schedule={"epochs": 1})
    run = build_run(config)
    hooks = RecordingHooks(config)
    metrics = run_training(run, hooks, evaluates=False)
    assert math.isfinite(metrics["epoch_loss"])
    assert run.state.epoch == 1
    assert run.state.step == run.schedules.steps_per_epoch
    assert [epoch for epoch, _ in hooks.epochs] == [1]
    # Logged every log_every_steps steps and at the last step of the epoch.
    logged_steps = [step for step, _ in hooks.logs]
    assert logged_steps[-1] == run.state.step
    assert all(step % 2 == 0 or step == run.state.step for step in logged_steps)


def test_resume_continues_at_the_next_step_with_identical_results(
    tmp_path: Path, tiny: TrainConfig
) -> None:
    # Reference: two epochs in one go.
    straight = build_run(tiny)
    straight_hooks = RecordingHooks(tiny)
    run_training(straight, straight_hooks, evaluates=False)

    # Interrupted after epoch 1 of the same 2-epoch schedule, then rebuilt and resumed.
    root = tmp_path / "checkpoints"
    first = build_run(tiny)
    run_training(first, RecordingHooks(tiny, root), evaluates=False, until_epoch=1)
    checkpoint = latest_checkpoint(root)
    assert checkpoint is not None and checkpoint.name == "epoch_0001"
    payload = load_payload(checkpoint)
    assert payload["epoch"] == 1
    assert payload["step"] == first.schedules.steps_per_epoch
    assert load_checkpoint_config(checkpoint) == tiny

    resumed = build_run(tiny)
    resumed_hooks = RecordingHooks(tiny)
    run_training(resumed, resumed_hooks, resume=payload, evaluates=False)
    assert resumed.state.step == straight.state.step
    assert [e for e, _ in resumed_hooks.epochs] == [2]
    # The resumed run logs only steps after the checkpoint, the same ones as straight.
    resumed_steps = [s for s, _ in resumed_hooks.logs]
    assert min(resumed_steps) > payload["step"]
    assert resumed_steps == [s for s, _ in straight_hooks.logs if s > payload["step"]]
    for a, b in zip(
        straight.state.teacher.state_dict().values(),
        resumed.state.teacher.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(straight.state.statistics.prior, resumed.state.statistics.prior)


class PreemptedError(Exception):
    """Stands for a worker killed in the middle of an epoch."""


def test_a_run_stopped_mid_epoch_resumes_at_its_step_with_identical_results(
    tmp_path: Path,
) -> None:
    """``runtime.checkpoint_every_steps``: checkpoints within epochs hold the loader's
    position; a run stopped after one resumes at its step, skips the images the epoch
    had trained on, and ends with the weights of a run that never stopped."""
    config = tiny_config(runtime={"log_every_steps": 1, "checkpoint_every_steps": 5})
    straight = build_run(config)
    straight_hooks = RecordingHooks(config)
    run_training(straight, straight_hooks, evaluates=False)
    steps_per_epoch = straight.schedules.steps_per_epoch
    assert steps_per_epoch == 8  # so that step 10 falls inside the second epoch

    root = tmp_path / "checkpoints"
    first = build_run(config)

    def checkpoint_then_die(state: TrainingState) -> None:
        save_checkpoint(root / checkpoint_name(state.epoch, state.step), state, config)
        if state.step == 10:
            raise PreemptedError

    with pytest.raises(PreemptedError):
        run_training(first, RecordingHooks(config), evaluates=False, checkpoint=checkpoint_then_die)
    assert [path.name for path in list_checkpoints(root)] == [
        "epoch_0000_step_00000005",
        "epoch_0001_step_00000010",
    ]
    payload = load_payload(latest_checkpoint(root) or root)
    assert (payload["epoch"], payload["step"]) == (1, 10)
    assert payload["epoch_samples"] == 2 * config.data.batch_size

    resumed = build_run(config)
    resumed_hooks = RecordingHooks(config)
    run_training(resumed, resumed_hooks, resume=payload, evaluates=False)
    assert resumed.state.step == straight.state.step == 2 * steps_per_epoch
    assert resumed.state.epoch_samples == 0
    assert [step for step, _ in resumed_hooks.logs] == list(range(11, 17))
    # The fractional epoch counts the steps the checkpoint had taken in its epoch.
    assert [metrics["epoch"] for _, metrics in resumed_hooks.logs] == pytest.approx(
        [1 + step / steps_per_epoch for step in range(3, 9)]
    )
    for step, metrics in resumed_hooks.logs:
        assert metrics["loss"] == pytest.approx(dict(straight_hooks.logs)[step]["loss"], abs=1e-6)
    for a, b in zip(
        straight.state.teacher.state_dict().values(),
        resumed.state.teacher.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_an_epoch_resumed_with_less_than_a_batch_left_ends_at_once(tiny: TrainConfig) -> None:
    """An elastic run that resumes with more workers can find less than one global batch
    left of its epoch: that epoch ends without a step, the next one runs whole."""
    run = build_run(tiny)
    steps_per_epoch = run.schedules.steps_per_epoch
    run.state.epoch_samples = len(run.splits.train) - tiny.data.batch_size // 2
    hooks = RecordingHooks(tiny)
    run_training(run, hooks, evaluates=False)
    assert [epoch for epoch, _ in hooks.epochs] == [1, 2]
    assert "epoch_loss" not in hooks.epochs[0][1] and "epoch_loss" in hooks.epochs[1][1]
    assert run.state.step == steps_per_epoch  # the second epoch's steps only


def test_a_run_resumed_from_its_last_checkpoint_still_reports_its_result(
    tiny: TrainConfig, tmp_path: Path
) -> None:
    """Workers restarted after the last epoch's checkpoint have nothing left to train;
    the run's metrics still hold its epoch and its evaluation."""
    finished = build_run(tiny)
    run_training(finished, RecordingHooks(tiny, tmp_path), evaluates=False)
    payload = load_payload(latest_checkpoint(tmp_path) or tmp_path)
    resumed = build_run(tiny)
    hooks = RecordingHooks(tiny)
    metrics = run_training(resumed, hooks, resume=payload)
    assert hooks.epochs == [] and hooks.logs == []
    assert metrics["epoch"] == float(tiny.schedule.epochs)
    assert 0.0 <= metrics["knn_top1"] <= 100.0 and "random_init_knn_top1" in metrics


def test_checkpoint_names_sort_in_the_order_they_were_taken() -> None:
    names = [checkpoint_name(3), checkpoint_name(3, 450), checkpoint_name(3, 1200)]
    names.append(checkpoint_name(4))
    assert (
        sorted(names)
        == names
        == [
            "epoch_0003",
            "epoch_0003_step_00000450",
            "epoch_0003_step_00001200",
            "epoch_0004",
        ]
    )


def test_checkpoints_are_atomic_listed_and_pruned(tmp_path: Path, tiny: TrainConfig) -> None:
    run = build_run(tiny)
    for epoch in (1, 2, 3):
        run.state.epoch = epoch
        save_checkpoint(tmp_path / checkpoint_name(epoch), run.state, tiny)
    (tmp_path / "epoch_0004.tmp").mkdir()  # a crash mid-write leaves only a staging dir
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch_0001",
        "epoch_0002",
        "epoch_0003",
    ]
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0002", "epoch_0003"]
    with pytest.raises(FileNotFoundError, match="not a klssl checkpoint"):
        load_payload(tmp_path / "epoch_0004.tmp")
