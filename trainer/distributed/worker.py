"""The body of every Ray Train worker: the core loop, reports, checkpoints, MLflow.

Every worker calls the core loop unchanged (`build_run` and `run_training` with DDP from
Ray's ``prepare_model``, a distributed sampler, the cluster statistics all-reduced over
the global batch). Every rank reports once per epoch; rank 0 writes the MLflow metrics
and, every ``runtime.checkpoint_every_epochs`` epochs (and every
``runtime.checkpoint_every_steps`` steps within one), the checkpoint directory of
`trainer.checkpoint`, which Ray persists under ``storage_path/run_name``. A restarted
worker group resumes from the newest checkpoint (``ray.train.get_checkpoint``), at its
step: the loader skips the images of the epoch that the checkpoint had trained on.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from pydantic import BaseModel, ConfigDict

from trainer.checkpoint import (
    checkpoint_due,
    checkpoint_name,
    config_changes,
    load_checkpoint_config,
    load_payload,
    load_rng,
    rng_state,
    save_checkpoint,
    save_rng,
)
from trainer.config import TrainConfig
from trainer.data import DataSplits
from trainer.distributed.ray_data import TRAIN_DATASET, ShardLoader
from trainer.engine import TrainingState
from trainer.health import Verdict
from trainer.loop import LoaderFactory, LoopHooks, Run, backbone_of, build_run, run_training
from trainer.mlflow_names import (
    LATEST_CHECKPOINT_TAG,
    RESUMED_FROM_EPOCH_TAG,
    RESUMED_FROM_STEP_TAG,
)
from trainer.preflight import allowed_roots_from_env, allowed_uris_from_env, preflight
from trainer.tracking import MetricLogger, TrackedRun, export_backbone, set_tags

RNG_DIR = "rng"

log = logging.getLogger(__name__)


class WorkerSetup(BaseModel):
    """What the driver sends to every worker (re-validated there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: TrainConfig
    use_gpu: bool = False
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    experiment_id: str | None = None
    checkpoint_root_uri: str | None = None
    system_metrics: bool = True
    register_as: str | None = None
    register_alias: str | None = None

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
        if self.logger is not None:
            self.logger.log(metrics, step=state.step)
        report = {**metrics, "epoch": float(state.epoch), "step": float(state.step)}
        due = checkpoint_due(self.run.config, state.epoch)
        self._report(state, report, checkpoint_name(state.epoch) if due else None)

    def save_mid_epoch(self, state: TrainingState) -> None:
        """A checkpoint within an epoch (``runtime.checkpoint_every_steps``), on every rank."""
        report = {"epoch": float(state.epoch), "step": float(state.step)}
        self._report(state, report, checkpoint_name(state.epoch, state.step))

    def _report(self, state: TrainingState, report: dict[str, float], name: str | None) -> None:
        """``ray.train.report`` on every rank, with the checkpoint ``name`` when given."""
        if name is None:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / name
            if self.run.rank == 0:
                save_checkpoint(directory, state, self.run.config)
            (directory / RNG_DIR).mkdir(parents=True, exist_ok=True)
            save_rng(directory / RNG_DIR / f"rank_{self.run.rank}.pt")
            # Synchronous upload: when this returns, the checkpoint is on the storage.
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                checkpoint_dir_name=name,
            )
        if self.logger is not None and self.checkpoint_root_uri is not None:
            self.logger.client.set_tag(
                self.logger.tracked.run_id,
                LATEST_CHECKPOINT_TAG,
                f"{self.checkpoint_root_uri}/{name}",
            )


def _resume_payload(rank: int, config: TrainConfig) -> dict[str, Any] | None:
    """The payload of Ray's latest checkpoint, with this rank's own RNG states.

    ``payload["rng"]`` is None for a rank the checkpoint has no RNG file for (it was
    taken with fewer workers): that rank keeps the stream `build_run` seeded for it.
    Rank 0 logs every field in which ``config`` differs from the checkpoint's own.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        directory = Path(folder)
        changes = config_changes(load_checkpoint_config(directory), config)
        if changes and rank == 0:
            log.warning("resuming with a changed config: %s", ", ".join(changes))
        payload = load_payload(directory)
        own = directory / RNG_DIR / f"rank_{rank}.pt"
        if own.exists():
            payload["rng"] = load_rng(own)  # weights_only=True, as the state itself
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
    # The worker's host may not see what the driver's saw: check again before opening.
    config = preflight(
        setup.config,
        allowed_roots=allowed_roots_from_env(),
        allowed_uris=allowed_uris_from_env(),
        source="config on the worker",
    )
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if setup.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=False)

    run = build_run(
        config,
        rank=rank,
        world_size=world_size,
        device=device,
        wrap_student=wrap,
        tracking_uri=setup.tracking_uri,
        make_loader=ray_data_loader(config, world_size) if config.data.loader == "ray" else None,
    )
    payload = _resume_payload(rank, config)
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
                    RESUMED_FROM_EPOCH_TAG: str(payload["epoch"]),
                    RESUMED_FROM_STEP_TAG: str(payload["step"]),
                },
            )
        metrics = run_training(
            run, hooks, resume=payload, evaluates=rank == 0, checkpoint=hooks.save_mid_epoch
        )
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


def ray_data_loader(config: TrainConfig, world_size: int) -> LoaderFactory:
    """This worker's shard of the Ray Dataset the driver passed (``data.loader: ray``)."""

    def make(splits: DataSplits) -> ShardLoader:
        shard = ray.train.get_dataset_shard(TRAIN_DATASET)
        if shard is None:
            raise RuntimeError(
                f"data.loader is 'ray' but the trainer has no {TRAIN_DATASET!r} dataset"
            )
        return ShardLoader(shard, config.data, len(splits.train), world_size)

    return make


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry point on every worker: `worker_main` with the driver's setup."""
    # Validated again here: this is a process boundary (the config crossed it as a dict).
    return worker_main(WorkerSetup.model_validate(loop_config))
