"""The one launcher of a `TorchTrainer`, and the driver of a training job.

`fit_run` builds and fits the TorchTrainer of one run and collects its checkpoints; a
training job (`launch_training`) and every sweep trial (`tuning.driver.trial_main`, which
adds only its Tune report callback) launch through it. `launch_training` checks that the
cluster can ever hold the workers and that the storage is writable, creates or attaches
the MLflow run, and fits. Whoever creates an MLflow run closes it: a run this driver
created it closes (FINISHED or FAILED); a run it was given (``mlflow_run_id``, the
service's) it only logs into, and the service closes it from the job's final state.
A worker failure restarts the group from the newest checkpoint up to
``runtime.max_failures`` times, logging into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs
import ray
import ray.train
import ray.train.torch

from trainer.config import TrainConfig
from trainer.distributed.cancel import CancelWatch, refuse_if_cancelled
from trainer.distributed.cluster import Placement, plan_placement, wait_for_capacity
from trainer.distributed.environment import connect_ray, require_train_v2
from trainer.distributed.ray_data import TRAIN_DATASET, train_dataset
from trainer.distributed.storage import check_storage, default_storage_path, storage_uri
from trainer.distributed.worker import WorkerSetup, train_loop_per_worker
from trainer.mlflow_names import RUN_NAME_TAG, STORAGE_TAG, WORKERS_TAG
from trainer.preflight import preflight
from trainer.tracking import (
    TrackedRun,
    absolute_tracking_uri,
    attach_run,
    create_run,
    finish_run,
    log_checkpoint_uris,
    set_tags,
)

TrainingFailedError = ray.train.TrainingFailedError
"""Training failed more often than ``runtime.max_failures`` allows."""

CheckpointRecord = dict[str, Any]
"""``{"uri", "epoch", "step"}`` of one persisted checkpoint."""


@dataclass
class LaunchResult:
    """What a finished run produced."""

    metrics: dict[str, float]
    run_name: str
    storage_uri: str
    mlflow_run_id: str | None = None
    backbone_model_uri: str | None = None
    checkpoints: list[CheckpointRecord] = field(default_factory=list)


@dataclass
class FitOutcome:
    """Rank 0's return value and the run's checkpoints, oldest first."""

    value: dict[str, Any]
    checkpoints: list[CheckpointRecord]


def default_run_name(config: TrainConfig) -> str:
    """A run name unique per job: the config name, a UTC timestamp and a random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{config.name}-{stamp}-{uuid.uuid4().hex[:6]}"


def build_trainer(
    setup: WorkerSetup,
    placement: Placement,
    *,
    run_name: str,
    storage_path: str,
    filesystem: pyarrow.fs.FileSystem | None,
    train_loop: Callable[[dict[str, Any]], Any] = train_loop_per_worker,
    callbacks: Sequence[Any] = (),
) -> ray.train.torch.TorchTrainer:
    """The `TorchTrainer` of a run (nothing starts until ``fit``).

    ``callbacks`` are Ray Train user callbacks of the run (a Tune trial passes
    ``TuneReportCallback`` so that every report reaches Tune).
    """
    require_train_v2()
    runtime = setup.config.runtime
    streamed = setup.config.data.loader == "ray"
    workers: Any = placement.workers  # V2 also takes (min, max); V1's stubs do not
    if placement.min_workers is not None:
        workers = (placement.min_workers, placement.workers)
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=setup.model_dump(),
        datasets={TRAIN_DATASET: train_dataset(setup.config)} if streamed else None,
        # V2's ScalingConfig at run time (RAY_TRAIN_V2_ENABLED); mypy sees V1's, which
        # has neither the (min, max) form nor the resize interval.
        scaling_config=ray.train.ScalingConfig(  # type: ignore[call-arg]
            # Elastic, (min, max): Ray Train restarts the group at a new size from the
            # latest checkpoint when room appears (looked for every resize_check_s).
            num_workers=workers,
            elastic_resize_monitor_interval_s=runtime.resize_check_s,
            use_gpu=placement.use_gpu,
            resources_per_worker=placement.resources_per_worker,
            placement_strategy=placement.strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=runtime.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=runtime.keep_checkpoints),
            callbacks=list(callbacks) or None,
        ),
    )


def fit_run(
    setup: WorkerSetup,
    placement: Placement,
    *,
    run_name: str,
    storage_path: str,
    filesystem: pyarrow.fs.FileSystem | None,
    train_loop: Callable[[dict[str, Any]], Any] = train_loop_per_worker,
    callbacks: Sequence[Any] = (),
) -> FitOutcome:
    """Fit one run's TorchTrainer and record its checkpoints on its MLflow run.

    Raises:
        ray.train.TrainingFailedError: training failed more than ``max_failures``.
    """
    trainer = build_trainer(
        setup,
        placement,
        run_name=run_name,
        storage_path=storage_path,
        filesystem=filesystem,
        train_loop=train_loop,
        callbacks=callbacks,
    )
    result = trainer.fit()
    # V2's Result carries rank 0's return value (the V1 type that mypy sees does not).
    returned = getattr(result, "return_value", None)
    checkpoints: list[CheckpointRecord] = [
        {
            "uri": storage_uri(checkpoint.path, filesystem),
            "epoch": int(metrics.get("epoch", -1)),
            "step": int(metrics.get("step", -1)),
        }
        for checkpoint, metrics in (result.best_checkpoints or [])
    ]
    checkpoints.sort(key=lambda record: int(record["step"]))
    tracked = setup.tracked_run()
    if tracked is not None:
        log_checkpoint_uris(tracked, checkpoints)
    return FitOutcome(returned if isinstance(returned, dict) else {}, checkpoints)


def launch_training(
    config: TrainConfig,
    *,
    workers: int | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    mlflow_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    extra_resources: Mapping[str, float] | None = None,
    register_as: str | None = None,
    register_alias: str | None = None,
    system_metrics: bool = True,
    check_resources: bool = True,
    capacity_wait_s: float = 0.0,
    train_loop: Callable[[dict[str, Any]], Any] = train_loop_per_worker,
) -> LaunchResult:
    """Train ``config`` on the connected Ray cluster (a local Ray if none) and track it.

    Args:
        config: the validated config (checked here by `trainer.preflight` too).
        workers: data-parallel workers (default: ``runtime.num_workers``).
        storage_path: checkpoint storage, a local/shared directory or ``s3://...``
            (default: `trainer.distributed.storage.default_storage_path`).
        tracking_uri: MLflow tracking URI (None: no MLflow tracking).
        run_name: the Ray Train run name, unique per job; reusing the name of an
            interrupted run resumes it from its newest checkpoint.
        mlflow_run_id: log into this MLflow run instead of creating one (its creator
            closes it; the driver closes only a run it created).
        tags: MLflow run tags (job id, Ray job id, git sha, ...).
        extra_resources: more Ray resources per worker (custom resources).
        register_as: register the exported backbone under this model name.
        register_alias: alias of the registered version (needs ``register_as``).
        system_metrics: sample system metrics into the run (rank 0's node).
        check_resources: fail fast when the cluster can never place the workers
            (off: leave the wait to Ray, however long).
        capacity_wait_s: how long to wait for an autoscaling cluster to grow before
            failing that check (0: fail at once; see `wait_for_capacity`).
        train_loop: the per-worker function (tests wrap `worker_main`).

    Returns:
        The final metrics (with ``knn_top1`` when the data has labels) and where the
        run's checkpoints, MLflow run and exported backbone are.

    Raises:
        trainer.preflight.PreflightError: before anything starts.
        InsufficientResourcesError: before anything starts.
        StorageUnavailableError: before anything starts.
        ray.train.TrainingFailedError: when training failed more than ``max_failures``.
    """
    require_train_v2()
    config = preflight(config, source="config on the driver")  # paths made absolute
    connect_ray()
    if tracking_uri is not None:
        tracking_uri = absolute_tracking_uri(tracking_uri)
    placement = plan_placement(config, workers, extra_resources=extra_resources)
    if check_resources:
        wait_for_capacity(placement, capacity_wait_s, nodes=ray.nodes)
    filesystem, fs_path = check_storage(storage_path or default_storage_path())
    name = run_name or default_run_name(config)
    root_uri = f"{storage_uri(fs_path, filesystem).rstrip('/')}/{name}"

    tracked: TrackedRun | None = None
    if tracking_uri is not None:
        run_tags = {
            RUN_NAME_TAG: name,
            STORAGE_TAG: root_uri,
            WORKERS_TAG: str(placement.workers),
            **(tags or {}),
        }
        if mlflow_run_id is not None:
            tracked = attach_run(tracking_uri, mlflow_run_id, reopen=False)
            refuse_if_cancelled(tracked)  # its owner closed it: the job was cancelled
            set_tags(tracked, run_tags)
        else:
            tracked = create_run(config, tracking_uri, run_name=name, tags=run_tags)
    setup = WorkerSetup(
        config=config,
        use_gpu=placement.use_gpu,
        tracking_uri=tracking_uri,
        mlflow_run_id=tracked.run_id if tracked else None,
        experiment_id=tracked.experiment_id if tracked else None,
        checkpoint_root_uri=root_uri,
        system_metrics=system_metrics,
        register_as=register_as,
        register_alias=register_alias,
    )
    watch = CancelWatch(tracked) if tracked is not None else contextlib.nullcontext()
    try:
        with watch:
            outcome = fit_run(
                setup,
                placement,
                run_name=name,
                storage_path=fs_path,
                filesystem=filesystem,
                train_loop=train_loop,
            )
    except BaseException:
        if tracked is not None and mlflow_run_id is None:
            finish_run(tracked, "FAILED")
        raise
    if tracked is not None and mlflow_run_id is None:
        finish_run(tracked, "FINISHED")
    return LaunchResult(
        metrics={key: float(value) for key, value in outcome.value.get("metrics", {}).items()},
        run_name=name,
        storage_uri=root_uri,
        mlflow_run_id=tracked.run_id if tracked else None,
        backbone_model_uri=outcome.value.get("backbone_model_uri"),
        checkpoints=outcome.checkpoints,
    )
