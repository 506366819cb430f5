"""The training loop shared by every runner: build, (resume,) train epochs, evaluate.

`run_training` is written once for one process or many: the caller says which rank it
is and passes ``wrap_student`` (identity locally, Ray's ``prepare_model`` under Ray
Train) and hooks that decide what happens to metrics and checkpoints (a progress bar and
a local directory for `klssl train`, ``ray.train.report`` on a cluster).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from trainer.acceleration import accelerate, pin_memory_wanted
from trainer.augment_device import DeviceMultiCrop, augmentation_device
from trainer.checkpoint import restore_state, step_checkpoint_due
from trainer.config import Precision, TrainConfig
from trainer.data import (
    DataSplits,
    EncodedImages,
    EpochSampler,
    build_splits,
    make_eval_loader,
    make_train_loader,
)
from trainer.engine import (
    TrainingState,
    build_optimizer,
    resolve_precision,
    train_one_epoch,
)
from trainer.evaluation import (
    extract_features,
    knn_report,
    linear_probe_top1,
    pixel_features,
    recalibrate_batchnorm,
)
from trainer.init_weights import apply_init, load_init_state
from trainer.models import (
    as_network,
    build_backbone,
    build_network,
    build_teacher,
    synchronise_batchnorm,
)
from trainer.schedules import Schedules
from trainer.statistics import ClusterStatistics


class TrainLoader(Protocol):
    """Batches ``(views, labels)`` of one epoch per iteration, ``len`` of them.

    A torch `DataLoader` (`make_train_loader`, sampled per epoch with ``set_epoch``)
    or a Ray Data shard (`trainer.distributed.ray_data.ShardLoader`).
    """

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


LoaderFactory = Callable[[DataSplits], TrainLoader]
"""Builds a worker's training loader from its data splits."""


class LoopHooks(Protocol):
    """What a runner does with progress; every method is called on every rank."""

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """Diagnostics every ``runtime.log_every_steps`` steps."""

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """After every epoch, with the epoch metrics (and k-NN when it ran)."""


@dataclass
class Run:
    """The built pieces of one run on one worker."""

    config: TrainConfig
    state: TrainingState
    splits: DataSplits
    evaluation: DataSplits | None
    """Labelled images to evaluate on: ``eval.data``'s splits, else the training data's
    own when it has labels; None for unlabelled data without ``eval.data``."""
    train_loader: TrainLoader
    schedules: Schedules
    device: torch.device
    precision: Precision
    rank: int
    world_size: int
    augment: DeviceMultiCrop | None = None
    """Makes the views on the device from the loader's images (``data.augment_device``);
    None: the loader yields views."""


def select_device(config: TrainConfig) -> torch.device:
    """The device of a config: ``auto`` is CUDA when available, else the CPU."""
    wanted = config.runtime.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every rank the same: models start identical)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_run(
    config: TrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap_student: Callable[[nn.Module], nn.Module] = lambda module: module,
    tracking_uri: str | None = None,
    make_loader: LoaderFactory | None = None,
) -> Run:
    """Build data, networks, optimiser and schedules for one worker.

    ``tracking_uri`` is where a ``model.init`` of ``runs:/`` or ``models:/`` is read from
    (None: the environment's, as `trainer.tracking.resolve_tracking_uri`).
    ``make_loader`` builds the training loader (default: a torch DataLoader over this
    rank's part of the training split).
    """
    device = device or select_device(config)
    precision = resolve_precision(config.runtime.precision, device)
    # Denormal floats (weights and gradients decaying towards zero) are 10-100x slower on
    # CPUs; flushing them to zero changes no result that matters and keeps steps steady.
    torch.set_flush_denormal(True)
    seed_everything(config.runtime.seed)
    splits = build_splits(config.data, seed=config.runtime.seed)
    if config.eval.data is not None:
        evaluation: DataSplits | None = build_splits(config.eval.data, seed=config.runtime.seed)
    else:
        evaluation = splits if splits.num_classes > 0 else None
    augment_on = None  # a loader of make_loader yields views (Ray Data makes them in its tasks)
    if make_loader is not None:
        loader = make_loader(splits)
    else:
        augment_on = augmentation_device(config.data.augment_device, device)
        loader = make_train_loader(
            splits.train,
            config.data,
            seed=config.runtime.seed,
            rank=rank,
            world_size=world_size,
            augment_on=augment_on,
            pin_memory=pin_memory_wanted(device),
        )
    student = build_network(
        config.model, config.objective.num_clusters, config.data.global_crop_size
    ).to(device)
    if config.model.init is not None:  # before the teacher is built from the student
        weights = load_init_state(config.model.init, tracking_uri=tracking_uri)
        apply_init(student.backbone, weights, config.model.init)
    teacher = build_teacher(
        config.model, student, config.objective.num_clusters, config.data.global_crop_size
    )
    student = synchronise_batchnorm(student, device, world_size)
    teacher = synchronise_batchnorm(teacher, device, world_size)
    # channels_last and torch.compile (trainer/acceleration.py), before the DDP wrap.
    accelerate(student, config, device)
    accelerate(teacher, config, device)
    optimizer = build_optimizer(student, config)
    state = TrainingState(
        student=wrap_student(student),
        teacher=teacher,
        statistics=ClusterStatistics(
            config.objective.num_clusters, config.objective.prior_momentum
        ).to(device),
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
    )
    # Different ranks must draw different augmentations from here on.
    torch.manual_seed(config.runtime.seed + 1000 * (rank + 1))
    schedules = Schedules(
        config, steps_per_epoch=len(loader), global_batch=config.data.batch_size * world_size
    )
    run = Run(
        config, state, splits, evaluation, loader, schedules, device, precision, rank, world_size
    )
    run.augment = None if augment_on is None else DeviceMultiCrop(config.data, augment_on)
    return run


def evaluate(run: Run, backbone: nn.Module | None = None) -> dict[str, float]:
    """k-NN (and linear probe) top-1 of a backbone on the held-out split.

    The training split, without augmentation, is the k-NN bank and the probe's
    training set; the held-out split is the queries.

    Args:
        run: the run (data, config, device).
        backbone: what to evaluate (default: the teacher's backbone, which DINO ships).
    """
    backbone = backbone or as_network(run.state.teacher).backbone
    splits, data, pinned = labelled(run), run.config.data, pin_memory_wanted(run.device)
    bank = extract_features(
        backbone, make_eval_loader(splits.train, data, pin_memory=pinned), run.device
    )
    queries = extract_features(
        backbone, make_eval_loader(splits.holdout, data, pin_memory=pinned), run.device
    )
    return score_features(run, bank, queries)


def labelled(run: Run) -> DataSplits:
    """The run's labelled evaluation splits.

    Raises:
        ValueError: the training data has no labels and no ``eval.data`` is given.
    """
    if run.evaluation is None:
        raise ValueError(
            "the training data has no labels: give eval.data (a labelled set) to evaluate"
        )
    return run.evaluation


def score_features(
    run: Run, bank: tuple[torch.Tensor, torch.Tensor], queries: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """The k-NN report of features, plus ``linear_top1`` when the config asks for it."""
    evaluation = run.config.eval
    report = knn_report(
        bank, queries, evaluation.knn_k, evaluation.knn_temperature, labelled(run).num_classes
    )
    if evaluation.linear_probe and labelled(run).num_classes >= 2:
        report["linear_top1"] = linear_probe_top1(bank, queries)
    return report


def evaluate_baselines(run: Run) -> dict[str, float]:
    """The baselines every result is read against, measured before training.

    ``random_init_*``: the same network at random initialisation (a copy of the teacher
    before its first step, so exactly the weights training starts from), with its
    BatchNorm statistics recomputed on the training images (`recalibrate_batchnorm`:
    trained networks get theirs from the data, so must the baseline); ``pixels_*``: k-NN
    on the raw, normalised pixels of the evaluation views. A run started from
    ``model.init`` gets a freshly built network as its random init, and ``init_*``: its
    starting weights as they are.
    """
    if run.state.step != 0:
        raise RuntimeError("baselines are measured before the first step")
    config, data, evaluation = run.config, run.config.data, run.config.eval
    splits = labelled(run)
    report: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):  # data loaders draw seeds: keep the stream
        if config.model.init is None:
            backbone = copy.deepcopy(as_network(run.state.teacher).backbone)
        else:
            report |= {f"init_{key}": value for key, value in evaluate(run).items()}
            torch.manual_seed(config.runtime.seed)
            backbone = build_backbone(config.model, data.global_crop_size).to(run.device)
        pinned = pin_memory_wanted(run.device)
        recalibrate_batchnorm(
            backbone, make_eval_loader(splits.train, data, pin_memory=pinned), run.device
        )
        report |= {f"random_init_{key}": value for key, value in evaluate(run, backbone).items()}
    pixels = knn_report(
        pixel_features(make_eval_loader(splits.train, data)),
        pixel_features(make_eval_loader(splits.holdout, data)),
        evaluation.knn_k,
        evaluation.knn_temperature,
        splits.num_classes,
    )
    return report | {f"pixels_{key}": value for key, value in pixels.items()}


def run_training(
    run: Run,
    hooks: LoopHooks,
    *,
    resume: dict[str, Any] | None = None,
    evaluates: bool = True,
    until_epoch: int | None = None,
    checkpoint: Callable[[TrainingState], None] | None = None,
) -> dict[str, float]:
    """Train from the run's current state (or ``resume`` payload) to the last epoch.

    Args:
        run: what `build_run` built.
        hooks: the runner's reactions to logs and epoch ends.
        resume: a checkpoint payload to continue from (next step, same schedules).
        evaluates: whether this worker runs the k-NN evaluation (rank 0 on a cluster).
        until_epoch: stop after this many completed epochs (default: the config's
            ``schedule.epochs``); the schedules still span the whole run.
        checkpoint: takes a mid-epoch checkpoint of the state; called every
            ``runtime.checkpoint_every_steps`` steps (never at an epoch's last step, which
            the epoch end covers).

    Returns:
        The metrics of the last epoch, with k-NN accuracy when evaluated.
    """
    config = run.config
    # Unlabelled data without eval.data: the label-free diagnostics are the whole report.
    evaluates = evaluates and run.evaluation is not None
    # Measured on the freshly built (random-init) network, before a resume replaces it.
    baselines = evaluate_baselines(run) if evaluates and config.eval.baselines else {}
    if resume is not None:
        restore_state(run.state, resume)
    metrics: dict[str, float] = {}

    def between_steps(state: TrainingState) -> None:
        if checkpoint is not None and step_checkpoint_due(config, state.step):
            checkpoint(state)

    for epoch in range(run.state.epoch, until_epoch or config.schedule.epochs):
        if isinstance(run.train_loader, DataLoader):
            # After a mid-epoch checkpoint, past the images its steps trained on.
            sampler: EpochSampler = run.train_loader.sampler  # type: ignore[assignment]
            sampler.set_position(epoch, run.state.epoch_samples)
        metrics = train_one_epoch(
            run.state,
            run.train_loader,
            run.schedules,
            config,
            device=run.device,
            precision=run.precision,
            world_size=run.world_size,
            on_log=hooks.on_log,
            augment=None if run.augment is None else run.augment.batch_views,
            between_steps=between_steps,
        )
        last_epoch = epoch + 1 == config.schedule.epochs
        every = config.eval.every_epochs
        if evaluates and (last_epoch or (every > 0 and (epoch + 1) % every == 0)):
            metrics |= evaluate(run) | baselines
        unreadable = unreadable_images(run)
        if unreadable is not None:  # replaced, never silently dropped
            metrics["unreadable_images"] = float(unreadable)
        hooks.on_epoch_end(run.state, metrics)
    if run.state.epoch >= (until_epoch or config.schedule.epochs) and not metrics:
        # Resumed from the checkpoint of the last epoch (the workers restarted after it,
        # an elastic resize came too late): nothing is left to train, but the run's
        # result still says where it ended and how good it is.
        metrics = {"epoch": float(run.state.epoch)}
        if evaluates:
            metrics |= evaluate(run) | baselines
    return metrics


def unreadable_images(run: Run) -> int | None:
    """Training images found unreadable (and replaced) so far; None for in-memory data.

    A Ray Data loader counts them itself (per epoch, over the workers); a DataLoader's
    dataset of files counts them over the run.
    """
    counted = getattr(run.train_loader, "unreadable_count", None)
    if counted is not None:
        return int(counted)
    if isinstance(run.splits.train, EncodedImages):
        return run.splits.train.unreadable_count
    return None


def backbone_of(run: Run) -> nn.Module:
    """The backbone to export: the teacher's, which DINO evaluates and ships."""
    return as_network(run.state.teacher).backbone
