"""Job lifecycle operations behind the routes: accept, cancel, describe.

A request that is rejected leaves nothing behind: the config and the dataset path are
checked first, then the MLflow run is created, then the record; if the record cannot be
written the run is deleted again. Submission to Ray is the dispatcher's job.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.ray_jobs import RayJobNotFoundError, RayJobsClient
from service.settings import Settings
from service.store import (
    IdempotencyConflictError,
    Job,
    JobKind,
    JobState,
    JobStore,
    new_job_id,
    utcnow,
)
from service.tracking import Tracking
from trainer.config import TrainConfig
from tuning.config import SweepConfig
from tuning.report import ROLE_TAG, SWEEP_ID_TAG

log = logging.getLogger(__name__)


class InvalidJobError(ValueError):
    """A request that is valid JSON but not an acceptable job (a 422)."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(f"{'.'.join(loc)}: {message}")
        self.loc = loc
        self.message = message


class JobFinishedError(RuntimeError):
    """The job already reached a final state (cancel -> 409)."""


@dataclass(frozen=True)
class Accepted:
    """A job accepted by `submit_job`; ``replayed`` when an Idempotency-Key matched."""

    job: Job
    replayed: bool


def check_data_path(
    config: TrainConfig, roots: list[Path], loc_prefix: tuple[str, ...] = ("body", "config")
) -> TrainConfig:
    """The config with ``data.path`` resolved (symlinks too), inside an allowed root.

    Raises:
        InvalidJobError: the path escapes every allowed root (or none is configured).
    """
    path = config.data.path
    if path is None:
        return config
    loc = (*loc_prefix, "data", "path")
    try:
        resolved = path.expanduser().resolve(strict=True)
    except OSError as error:
        raise InvalidJobError(loc, f"dataset path {str(path)!r} cannot be read: {error}") from None
    for root in roots:
        if resolved.is_relative_to(root.expanduser().resolve()):
            data = config.data.model_copy(update={"path": resolved})
            return config.model_copy(update={"data": data})
    allowed = ", ".join(str(root) for root in roots) or "none configured"
    raise InvalidJobError(
        loc, f"dataset path {str(path)!r} resolves outside the allowed data roots ({allowed})"
    )


def checked(config: TrainConfig | SweepConfig, roots: list[Path]) -> TrainConfig | SweepConfig:
    """The training config, or the sweep's base config, with its dataset path checked."""
    if isinstance(config, TrainConfig):
        return check_data_path(config, roots)
    base = check_data_path(config.base, roots, ("body", "config", "base"))
    return config.model_copy(update={"base": base})


def submit_job(
    store: JobStore,
    tracking: Tracking,
    settings: Settings,
    *,
    owner: str,
    config: TrainConfig | SweepConfig,
    name: str | None,
    tags: dict[str, str],
    idempotency_key: str | None,
) -> Accepted:
    """Record a QUEUED job (or sweep) with its MLflow run, or the job of a repeated key.

    A sweep's run is the parent run of its trials, tagged with the sweep id (the job id).
    """
    if idempotency_key is not None:
        existing = store.by_idempotency_key(owner, idempotency_key)
        if existing is not None:
            return Accepted(existing, replayed=True)
    config = checked(config, settings.allowed_data_roots)
    job_id = new_job_id()
    run_tags = {**tags, "klssl.job_id": job_id, "klssl.owner": owner}
    if isinstance(config, SweepConfig):
        kind, run_config = JobKind.SWEEP, config.trial_base()
        run_tags |= {SWEEP_ID_TAG: job_id, ROLE_TAG: "sweep"}
    else:
        kind, run_config = JobKind.TRAIN, config
    run_id, experiment_id = tracking.create_run(run_config, job_id=job_id, tags=run_tags)
    now = utcnow()
    job = Job(
        id=job_id,
        kind=kind.value,
        name=name or (config.sweep_name if isinstance(config, SweepConfig) else config.name),
        owner=owner,
        idempotency_key=idempotency_key,
        config=config.model_dump(mode="json"),
        tags=tags,
        state=JobState.QUEUED.value,
        created_at=now,
        updated_at=now,
        ray_submission_id=None,
        mlflow_run_id=run_id,
        mlflow_experiment_id=experiment_id,
        progress_metrics={},
        checkpoint_uris=[],
        cancel_requested=False,
    )
    try:
        store.add(job)
    except IdempotencyConflictError:
        tracking.delete_run(run_id)  # a concurrent retry won: its job is the one
        assert idempotency_key is not None
        winner = store.by_idempotency_key(owner, idempotency_key)
        assert winner is not None
        return Accepted(winner, replayed=True)
    except Exception:
        tracking.delete_run(run_id)
        raise
    return Accepted(job, replayed=False)


def cancel_job(store: JobStore, ray: RayJobsClient, tracking: Tracking, job: Job) -> Job:
    """Cancel a job: a queued one never reaches Ray, a submitted one is stopped there.

    Raises:
        JobFinishedError: the job already ended.
        RayUnavailableError: the job is on Ray and Ray cannot be reached.
    """
    if job.job_state.final:
        raise JobFinishedError(f"job {job.id} is already {job.state}")
    if job.ray_submission_id is not None:
        store.update(job.id, cancel_requested=True)
        # When Ray lost the job, cancelling it is only bookkeeping.
        with contextlib.suppress(RayJobNotFoundError):
            ray.stop(job.ray_submission_id)
    cancelled = store.transition(job.id, JobState.CANCELLED, error="cancelled by the user")
    if job.mlflow_run_id is not None:
        try:
            tracking.terminate(job.mlflow_run_id, "KILLED", children=job.kind == JobKind.SWEEP)
        except Exception as error:  # the record is what counts; MLflow catches up later
            log.warning("could not close MLflow run %s: %s", job.mlflow_run_id, error)
    return cancelled


def describe_tags(job: Job) -> dict[str, Any]:
    """Tags of the record (a plain dict for responses)."""
    return dict(job.tags or {})
