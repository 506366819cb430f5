"""Data-parallel training on a Ray cluster with Ray Train (V2) and MLflow tracking.

`launch_training` is the driver: it checks that the cluster can ever hold the workers
and that the storage path is writable, creates the MLflow run, then runs a
`TorchTrainer` whose workers each call the core loop unchanged (`build_run` and
`run_training` with DDP from Ray's ``prepare_model``, a distributed sampler, the
cluster statistics all-reduced over the global batch). Every rank reports once per
epoch; rank 0 writes the MLflow metrics and, every ``runtime.checkpoint_every_epochs``
epochs, the checkpoint directory of `trainer.checkpoint`, which Ray persists under
``storage_path/run_name``. A worker failure restarts the group from the newest
checkpoint (``ray.train.get_checkpoint``) up to ``runtime.max_failures`` times, logging
into the same MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Both settings must be in place before Ray is imported (it reads them then). Ray Train
# V2 is the default from Ray 2.5x: pinning it makes an environment that still says 0
# fail loudly (`require_train_v2`) instead of running the removed V1 code path. A
# cluster token given to a job means token authentication: Ray sends the token only
# in RAY_AUTH_MODE=token.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
    os.environ.setdefault("RAY_AUTH_MODE", "token")

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from pydantic import BaseModel, ConfigDict
from ray.train.v2._internal.constants import is_v2_enabled

from trainer.checkpoint import (
    checkpoint_due,
    checkpoint_name,
    load_checkpoint_config,
    load_payload,
    rng_state,
    save_checkpoint,
)
from trainer.config import TrainConfig, validate_config
from trainer.engine import TrainingState
from trainer.health import Verdict
from trainer.loop import LoopHooks, Run, backbone_of, build_run, run_training
from trainer.tracking import (
    MetricLogger,
    TrackedRun,
    absolute_tracking_uri,
    attach_run,
    create_run,
    export_backbone,
    finish_run,
    log_checkpoint_uris,
    set_tags,
)

RNG_DIR = "rng"
STORAGE_ENV_VAR = "KLSSL_STORAGE_PATH"
S3_ENDPOINT_ENV_VARS = ("KLSSL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


TrainingFailedError = ray.train.TrainingFailedError
"""Training failed more often than ``runtime.max_failures`` allows."""


class LaunchError(RuntimeError):
    """A run that cannot start: bad resources, storage or Ray connection."""


class InsufficientResourcesError(LaunchError):
    """The cluster can never hold the requested workers (it would wait forever)."""


class StorageUnavailableError(LaunchError):
    """The storage path for checkpoints is not writable or not reachable."""


def require_train_v2() -> None:
    """Raise when Ray Train V2 is disabled (``RAY_TRAIN_V2_ENABLED=0``)."""
    if not is_v2_enabled():
        raise LaunchError(
            "klssl needs Ray Train V2, but RAY_TRAIN_V2_ENABLED is set to "
            f"{os.environ.get('RAY_TRAIN_V2_ENABLED')!r}; unset it or set it to 1"
        )


# --------------------------------------------------------------------------- Ray


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Connect to the cluster at ``address`` or ``RAY_ADDRESS``, else start a local Ray.

    Token authentication (Ray >= 2.52) is read by Ray itself from ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token``; this
    module sets that mode when a token is in the environment as it is imported, so
    import it before ``ray`` (or set ``RAY_AUTH_MODE`` yourself).

    Returns:
        The address connected to (``local`` for a Ray started here).
    """
    if ray.is_initialized():
        return "existing"
    target = address or os.environ.get("RAY_ADDRESS", "").strip() or None
    try:
        if target is None:
            ray.init(num_cpus=num_cpus, log_to_driver=True)
            return "local"
        ray.init(address=target, log_to_driver=True)
    except ray.exceptions.AuthenticationError as error:
        raise LaunchError(
            f"the Ray cluster at {target} refused the connection: {error}. "
            "Set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token."
        ) from error
    except ConnectionError as error:
        hint = (
            "check the address and, for a cluster with token authentication, "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
        )
        raise LaunchError(
            f"cannot connect to the Ray cluster at {target}: {error}; {hint}"
        ) from error
    return target


@dataclass(frozen=True)
class Placement:
    """How the workers are placed: their count and each one's resources."""

    workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    strategy: str


def plan_placement(
    config: TrainConfig,
    workers: int | None = None,
    *,
    cluster_has_gpus: bool | None = None,
    extra_resources: Mapping[str, float] | None = None,
) -> Placement:
    """Resources of each worker from the config (``device: auto`` uses GPUs if any)."""
    count = workers if workers is not None else config.runtime.num_workers
    if count < 1:
        raise LaunchError(f"workers must be >= 1, got {count}")
    device = config.runtime.device
    if cluster_has_gpus is None:
        cluster_has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    use_gpu = device == "cuda" or (device == "auto" and cluster_has_gpus)
    resources = {"CPU": float(config.runtime.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    resources.update({key: float(value) for key, value in (extra_resources or {}).items()})
    return Placement(count, use_gpu, resources, config.runtime.placement_strategy)


def check_cluster_capacity(placement: Placement, nodes: Sequence[Mapping[str, Any]]) -> None:
    """Fail fast when the cluster's total resources can never hold the workers.

    Ray would otherwise wait forever for a placement group that cannot be placed.
    Each worker must fit on one node; ``STRICT_SPREAD`` needs a node per worker and
    ``STRICT_PACK`` all workers on one node. Resources in use by other jobs are not
    counted against the request (those free up).

    Args:
        placement: what the run asks for.
        nodes: ``ray.nodes()`` entries (``Alive`` and total ``Resources``).
    """
    need = {key: value for key, value in placement.resources_per_worker.items() if value > 0}
    alive = [node for node in nodes if node.get("Alive", False)]
    fits = []
    for node in alive:
        total = node.get("Resources", {})
        fits.append(
            min(math.floor(total.get(key, 0.0) / value + 1e-9) for key, value in need.items())
        )
    if placement.strategy == "STRICT_SPREAD":
        slots = sum(1 for fit in fits if fit >= 1)
    elif placement.strategy == "STRICT_PACK":
        slots = max(fits, default=0)
    else:
        slots = sum(fits)
    if slots >= placement.workers:
        return
    totals: dict[str, float] = {}
    for node in alive:
        for key, value in node.get("Resources", {}).items():
            if key in need:
                totals[key] = totals.get(key, 0.0) + value
    wanted = ", ".join(f"{key}={value:g}" for key, value in sorted(need.items()))
    have = ", ".join(f"{key}={totals.get(key, 0.0):g}" for key in sorted(need)) or "nothing"
    raise InsufficientResourcesError(
        f"the run asks for {placement.workers} workers with {{{wanted}}} each "
        f"({placement.strategy}), but the Ray cluster ({len(alive)} alive node(s), "
        f"{have} in total) can place at most {slots}; lower --workers or "
        "runtime.cpus_per_worker, use a CPU device, or add nodes"
    )


# ----------------------------------------------------------------------- storage


def resolve_storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """The (filesystem, path) pair Ray Train should use for ``storage_path``.

    ``s3://`` paths get an S3 filesystem with the endpoint override of
    ``KLSSL_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL[_S3]``) for MinIO; other URIs are
    left to Ray; a local path is made absolute.
    """
    if storage_path.startswith("s3://"):
        endpoint = next(
            (os.environ[name] for name in S3_ENDPOINT_ENV_VARS if os.environ.get(name)), None
        )
        if endpoint is None:
            return None, storage_path
        scheme, _, host = endpoint.partition("://")
        filesystem = pyarrow.fs.S3FileSystem(
            endpoint_override=host or scheme,
            scheme=scheme if host else "https",
            connect_timeout=5,
            request_timeout=20,
        )
        return filesystem, storage_path.removeprefix("s3://").rstrip("/")
    if "://" in storage_path:
        return None, storage_path
    return None, str(Path(storage_path).expanduser().resolve())


def check_storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """Resolve ``storage_path`` and prove it writable, before anything starts.

    Writes, reads back and deletes a marker file (Ray Train does the same, but only
    once the workers are up).

    Returns:
        `resolve_storage`'s (filesystem, path) for the `RunConfig`.

    Raises:
        StorageUnavailableError: with the path and the filesystem's reason.
    """
    filesystem, path = resolve_storage(storage_path)
    marker_name = f".klssl-storage-check-{uuid.uuid4().hex}"
    try:
        checked = filesystem
        if checked is None:
            checked, path_on_fs = pyarrow.fs.FileSystem.from_uri(
                path if "://" in path else Path(path).as_uri()
            )
        else:
            path_on_fs = path
        checked.create_dir(path_on_fs, recursive=True)
        marker = f"{path_on_fs.rstrip('/')}/{marker_name}"
        with checked.open_output_stream(marker) as stream:
            stream.write(b"ok")
        with checked.open_input_stream(marker) as stream:
            if stream.read() != b"ok":
                raise OSError("the marker read back differs from what was written")
        checked.delete_file(marker)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise StorageUnavailableError(
            f"checkpoint storage {storage_path!r} is not writable or not reachable: {error}"
        ) from error
    return filesystem, path


def storage_uri(storage_path: str, filesystem: pyarrow.fs.FileSystem | None) -> str:
    """A URI for a path on the run's storage (for MLflow and the REST API)."""
    if filesystem is not None and filesystem.type_name == "s3":
        return f"s3://{storage_path}"
    if "://" in storage_path:
        return storage_path
    return Path(storage_path).as_uri()


# ------------------------------------------------------------------------ worker


class WorkerSetup(BaseModel):
    """What the driver sends to every worker (re-validated there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config_json: str
    use_gpu: bool = False
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    experiment_id: str | None = None
    checkpoint_root_uri: str | None = None
    system_metrics: bool = True
    register_as: str | None = None
    register_alias: str | None = None

    def train_config(self) -> TrainConfig:
        """The run's config, validated again on this worker."""
        return validate_config(json.loads(self.config_json), "config from the driver")

    def tracked_run(self) -> TrackedRun | None:
        """The MLflow run to log into, when tracking is on."""
        if self.tracking_uri is None or self.mlflow_run_id is None:
            return None
        return TrackedRun(self.tracking_uri, self.mlflow_run_id, self.experiment_id or "")


class RayHooks:
    """Reports every epoch on every rank; rank 0 logs to MLflow and writes checkpoints.

    Every rank also stores its own RNG states in the checkpoint (``rng/rank_N.pt``;
    Ray merges the ranks' directories), so a resumed rank continues its own random
    stream instead of rank 0's.
    """

    def __init__(
        self,
        run: Run,
        logger: MetricLogger | None,
        checkpoint_root_uri: str | None,
        extra: Sequence[LoopHooks] = (),
    ) -> None:
        self.run = run
        self.logger = logger
        self.checkpoint_root_uri = checkpoint_root_uri
        self.extra = list(extra)
        self.tagged_verdict: Verdict | None = None

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step=state.step)
            self._tag_health(state.health.verdict)
        for hooks in self.extra:
            hooks.on_log(state, metrics)

    def _tag_health(self, verdict: Verdict) -> None:
        """``klssl.health`` (and the collapse step) on the run whenever the verdict changes."""
        if self.logger is not None and verdict != self.tagged_verdict:
            set_tags(self.logger.tracked, verdict.tags())
            self.tagged_verdict = verdict

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        for hooks in self.extra:
            hooks.on_epoch_end(state, metrics)
        config = self.run.config
        if self.logger is not None:
            self.logger.log(metrics, step=state.step)
        report = {**metrics, "epoch": float(state.epoch), "step": float(state.step)}
        if not checkpoint_due(config, state.epoch):
            ray.train.report(report)
            return
        name = checkpoint_name(state.epoch)
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / name
            if self.run.rank == 0:
                save_checkpoint(directory, state, config)
            (directory / RNG_DIR).mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), directory / RNG_DIR / f"rank_{self.run.rank}.pt")
            # Synchronous upload: when this returns, the checkpoint is on the storage.
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                checkpoint_dir_name=name,
            )
        if self.logger is not None and self.checkpoint_root_uri is not None:
            self.logger.client.set_tag(
                self.logger.tracked.run_id,
                "klssl.latest_checkpoint",
                f"{self.checkpoint_root_uri}/{name}",
            )


def _resume_payload(rank: int) -> dict[str, Any] | None:
    """The payload of Ray's latest checkpoint, with this rank's own RNG states.

    ``payload["rng"]`` is None for a rank the checkpoint has no RNG file for (it was
    taken with fewer workers): that rank keeps the stream `build_run` seeded for it.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        directory = Path(folder)
        load_checkpoint_config(directory)  # a checkpoint must still hold a valid config
        payload = load_payload(directory)
        own = directory / RNG_DIR / f"rank_{rank}.pt"
        if own.exists():
            payload["rng"] = torch.load(own, weights_only=False)
        elif rank > 0:
            payload["rng"] = None
    return payload


def worker_main(
    setup: WorkerSetup, extra_hooks: Callable[[Run], Sequence[LoopHooks]] | None = None
) -> dict[str, Any]:
    """The body of every training worker.

    Args:
        setup: what the driver sent.
        extra_hooks: more hooks built from this worker's `Run` (tests use them to
            record what every rank sees).

    Returns:
        On every rank, the final metrics; on rank 0 also the backbone model URI.
    """
    config = setup.train_config()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if setup.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=False)

    run = build_run(config, rank=rank, world_size=world_size, device=device, wrap_student=wrap)
    payload = _resume_payload(rank)
    if payload is not None and payload["rng"] is None:
        payload["rng"] = rng_state()  # keep the stream seeded for this rank by build_run
    tracked = setup.tracked_run() if rank == 0 else None
    logger = MetricLogger(tracked, system_metrics=setup.system_metrics) if tracked else None
    extra = list(extra_hooks(run)) if extra_hooks is not None else []
    hooks = RayHooks(run, logger, setup.checkpoint_root_uri, extra)
    try:
        if logger is not None and payload is not None:
            set_tags(
                logger.tracked,
                {
                    "klssl.resumed_from_epoch": str(payload["epoch"]),
                    "klssl.resumed_from_step": str(payload["step"]),
                },
            )
        metrics = run_training(run, hooks, resume=payload, evaluates=rank == 0)
        result: dict[str, Any] = {"metrics": metrics, "rank": rank}
        if tracked is not None:
            result["backbone_model_uri"] = export_backbone(
                tracked,
                backbone_of(run),
                config,
                register_as=setup.register_as,
                alias=setup.register_alias,
            )
        return result
    finally:
        if logger is not None:
            logger.close()


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point on every worker: `worker_main` with the driver's setup."""
    return worker_main(WorkerSetup.model_validate(loop_config))


# ------------------------------------------------------------------------ driver


@dataclass
class LaunchResult:
    """What a finished run produced."""

    metrics: dict[str, float]
    run_name: str
    storage_uri: str
    mlflow_run_id: str | None = None
    backbone_model_uri: str | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """The config with a relative ``data.path`` made absolute (workers run elsewhere)."""
    path = config.data.path
    if path is None or path.is_absolute():
        return config
    data = config.data.model_copy(update={"path": path.resolve()})
    return config.model_copy(update={"data": data})


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
    max_failures: int,
    keep_checkpoints: int,
    train_loop: Callable[[dict[str, Any]], Any] = train_loop_per_worker,
    callbacks: Sequence[Any] = (),
) -> ray.train.torch.TorchTrainer:
    """The `TorchTrainer` of a run (nothing starts until ``fit``).

    ``callbacks`` are Ray Train user callbacks of the run (a Tune trial passes
    ``TuneReportCallback`` so that every report reaches Tune).
    """
    require_train_v2()
    return ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config=setup.model_dump(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=placement.workers,
            use_gpu=placement.use_gpu,
            resources_per_worker=placement.resources_per_worker,
            placement_strategy=placement.strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks) or None,
        ),
    )


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
    train_loop: Callable[[dict[str, Any]], Any] = train_loop_per_worker,
) -> LaunchResult:
    """Train ``config`` on the connected Ray cluster (a local Ray if none) and track it.

    Args:
        config: the validated config.
        workers: data-parallel workers (default: ``runtime.num_workers``).
        storage_path: checkpoint storage, a local/shared directory or ``s3://...``
            (default: ``KLSSL_STORAGE_PATH``, else ``runs/ray``).
        tracking_uri: MLflow tracking URI (None: no MLflow tracking).
        run_name: the Ray Train run name, unique per job; reusing the name of an
            interrupted run resumes it from its newest checkpoint.
        mlflow_run_id: continue this MLflow run instead of creating one.
        tags: MLflow run tags (job id, Ray job id, git sha, ...).
        extra_resources: more Ray resources per worker (custom resources).
        register_as: register the exported backbone under this model name.
        register_alias: alias of the registered version (needs ``register_as``).
        system_metrics: sample system metrics into the run (rank 0's node).
        check_resources: fail fast when the cluster can never place the workers
            (turn off for an autoscaling cluster that grows on demand).
        train_loop: the per-worker function (tests wrap `worker_main`).

    Returns:
        The final metrics (with ``knn_top1`` when the data has labels) and where the
        run's checkpoints, MLflow run and exported backbone are.

    Raises:
        InsufficientResourcesError: before anything starts.
        StorageUnavailableError: before anything starts.
        ray.train.TrainingFailedError: when training failed more than ``max_failures``.
    """
    require_train_v2()
    connect_ray()
    config = with_absolute_paths(config)
    if tracking_uri is not None:
        tracking_uri = absolute_tracking_uri(tracking_uri)
    placement = plan_placement(config, workers, extra_resources=extra_resources)
    if check_resources:
        check_cluster_capacity(placement, ray.nodes())
    storage = storage_path or os.environ.get(STORAGE_ENV_VAR, "").strip() or "runs/ray"
    filesystem, fs_path = check_storage(storage)
    name = run_name or default_run_name(config)
    root_uri = f"{storage_uri(fs_path, filesystem).rstrip('/')}/{name}"

    tracked: TrackedRun | None = None
    if tracking_uri is not None:
        run_tags = {
            "klssl.run_name": name,
            "klssl.storage": root_uri,
            "klssl.workers": str(placement.workers),
            **(tags or {}),
        }
        if mlflow_run_id is not None:
            tracked = attach_run(tracking_uri, mlflow_run_id)
            set_tags(tracked, run_tags)
        else:
            tracked = create_run(config, tracking_uri, run_name=name, tags=run_tags)
    setup = WorkerSetup(
        config_json=config.to_json(),
        use_gpu=placement.use_gpu,
        tracking_uri=tracking_uri,
        mlflow_run_id=tracked.run_id if tracked else None,
        experiment_id=tracked.experiment_id if tracked else None,
        checkpoint_root_uri=root_uri,
        system_metrics=system_metrics,
        register_as=register_as,
        register_alias=register_alias,
    )
    trainer = build_trainer(
        setup,
        placement,
        run_name=name,
        storage_path=fs_path,
        filesystem=filesystem,
        max_failures=config.runtime.max_failures,
        keep_checkpoints=config.runtime.keep_checkpoints,
        train_loop=train_loop,
    )
    try:
        result = trainer.fit()
    except BaseException:
        if tracked is not None:
            finish_run(tracked, "FAILED")
        raise
    # V2's Result carries rank 0's return value (the V1 type that mypy sees does not).
    returned = getattr(result, "return_value", None)
    value: dict[str, Any] = returned if isinstance(returned, dict) else {}
    checkpoints: list[dict[str, Any]] = [
        {
            "uri": storage_uri(checkpoint.path, filesystem),
            "epoch": int(metrics.get("epoch", -1)),
            "step": int(metrics.get("step", -1)),
        }
        for checkpoint, metrics in (result.best_checkpoints or [])
    ]
    checkpoints.sort(key=lambda record: int(record["step"]))
    if tracked is not None:
        log_checkpoint_uris(tracked, checkpoints)
        finish_run(tracked, "FINISHED")
    return LaunchResult(
        metrics={key: float(value) for key, value in value.get("metrics", {}).items()},
        run_name=name,
        storage_uri=root_uri,
        mlflow_run_id=tracked.run_id if tracked else None,
        backbone_model_uri=value.get("backbone_model_uri"),
        checkpoints=checkpoints,
    )
