"""Job lifecycle operations behind the routes: accept, cancel, describe.

A request that is rejected leaves nothing behind: the config and the dataset path are
checked first, then the MLflow run is created, then the record; if the record cannot be
written the run is deleted again. Submission to Ray is the dispatcher's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from service.job_kinds import kind_of, kind_of_job
from service.quotas import demand_of, never_fits, quota_for
from service.ray_jobs import RayJobNotFoundError, RayJobsClient, RayUnavailableError
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
from service.tracking import Tracking, TrackingRejectedError
from service.webhooks import destination_problem
from trainer.config import TrainConfig
from trainer.mlflow_names import JOB_ID_TAG, OWNER_TAG
from trainer.preflight import PreflightError, confined_location, preflight
from trainer.spec import Registration
from tuning.config import SweepConfig

log = logging.getLogger(__name__)


class InvalidJobError(ValueError):
    """A request that is valid JSON but not an acceptable job (a 422).

    ``problems`` are ``(loc, message)`` pairs, ``loc`` as FastAPI's validation errors
    spell it (``("body", "config", "data", "path")``).
    """

    def __init__(self, problems: Sequence[tuple[tuple[str, ...], str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(loc)}: {message}" for loc, message in problems))
        self.problems = list(problems)


class JobFinishedError(RuntimeError):
    """The job already reached a final state (cancel -> 409)."""


class NotRetryableError(RuntimeError):
    """Only a FAILED or CANCELLED job is retried (retry -> 409)."""


RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class Accepted:
    """A job accepted by `submit_job`; ``replayed`` when an Idempotency-Key matched."""

    job: Job
    replayed: bool


def request_hash(
    kind: JobKind,
    config: TrainConfig | SweepConfig,
    name: str | None,
    tags: dict[str, str],
    registration: Registration | None = None,
    priority: int = 0,
    notify: Sequence[str] = (),
) -> str:
    """SHA-256 of what a request asks for (kind, validated config, name, tags, priority,
    the model registration of a training job, and its webhooks when it has any: a
    request without is hashed as before they existed)."""
    canonical = json.dumps(
        {"kind": kind.value, "config": config.model_dump(mode="json"), "name": name,
         "tags": tags, "priority": priority,
         **(registration.model_dump() if registration else {}),
         **({"notify": list(notify)} if notify else {})},
        sort_keys=True, separators=(",", ":"),
    )  # fmt: skip
    return hashlib.sha256(canonical.encode()).hexdigest()


def replay_of(existing: Job, kind: JobKind, fingerprint: str) -> Job:
    """The record an Idempotency-Key already names, if this request is the same one.

    Raises:
        InvalidJobError: the key names a record of another kind or another request.
    """
    loc = ("header", "Idempotency-Key")
    if existing.kind != kind.value:
        raise InvalidJobError(
            [(loc, f"this key was used for a {existing.kind} job ({existing.id}), not a "
              f"{kind.value}; use a new key")]
        )  # fmt: skip
    if existing.request_hash is not None and existing.request_hash != fingerprint:
        raise InvalidJobError(
            [(loc, f"this key was used for another request (job {existing.id}); a retry "
              "must repeat the same body, a new request needs a new key")]
        )  # fmt: skip
    return existing


def checked(
    config: TrainConfig | SweepConfig, roots: list[Path], uri_prefixes: list[str]
) -> TrainConfig | SweepConfig:
    """The config (or the sweep's base) after `trainer.preflight`: paths resolved inside
    the allowed roots and present, object-store URIs under the allowed prefixes, the
    backbone known to timm.

    Raises:
        InvalidJobError: every problem, located in the request body.
    """
    info = kind_of(config)
    problems: list[tuple[tuple[str, ...], str]] = []
    for loc, location in info.sampled_paths(config):
        try:
            confined_location(location, roots, uri_prefixes)
        except ValueError as error:
            problems.append((loc, str(error)))
    try:
        ready = preflight(info.base(config), allowed_roots=roots, allowed_uris=uri_prefixes)
    except PreflightError as error:
        problems += [
            ((*info.base_loc, *field.split(".")), reason) for field, reason in error.fields
        ]
    if problems:
        raise InvalidJobError(problems)
    return info.with_base(config, ready)


def checked_webhooks(notify: Sequence[str], settings: Settings) -> list[str]:
    """The webhooks, when each may be reached from here (`service.webhooks`).

    Raises:
        InvalidJobError: every URL that may not, located in the request body.
    """
    problems = [
        (("body", "notify", str(index)), problem)
        for index, url in enumerate(notify)
        if (problem := destination_problem(url, settings)) is not None
    ]
    if problems:
        raise InvalidJobError(problems)
    return list(notify)


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
    registration: Registration | None = None,
    priority: int = 0,
    notify: Sequence[str] = (),
) -> Accepted:
    """Record a QUEUED job (or sweep) with its MLflow run, or the job of a repeated key.

    ``registration`` (training jobs) travels in the spec to the driver, which registers
    the exported backbone under that name when the run ends. ``priority`` orders the
    queue; a job that could never fit its owner's quota (`service.quotas`) is refused.
    ``notify`` (webhook URLs) stays in the record: the driver never sees it.

    A sweep's run is the parent run of its trials, tagged with the sweep id (the job id).
    An Idempotency-Key is bound to its owner, the kind of job and the request: the same
    key with another body or on the other route is refused.

    Raises:
        InvalidJobError: the config cannot run here, or the key was used for another request.
    """
    info = kind_of(config)
    fingerprint = request_hash(info.kind, config, name, tags, registration, priority, notify)
    if idempotency_key is not None:
        existing = store.by_idempotency_key(owner, idempotency_key)
        if existing is not None:
            return Accepted(replay_of(existing, info.kind, fingerprint), replayed=True)
    webhooks = checked_webhooks(notify, settings)
    config = checked(config, settings.allowed_data_roots, settings.allowed_data_uris)
    quota = quota_for(settings.quotas, owner)
    refused = never_fits(quota, config, demand_of(config, settings.cluster_has_gpus))
    if refused is not None:
        raise InvalidJobError([(("body", "config"), f"beyond the owner's quota: {refused}")])
    job_id = new_job_id()
    run_tags = {**tags, JOB_ID_TAG: job_id, OWNER_TAG: owner}
    run_tags |= info.run_tags(job_id)
    try:
        run_id, experiment_id = tracking.create_run(
            info.run_config(config), job_id=job_id, tags=run_tags
        )
    except TrackingRejectedError as error:
        raise InvalidJobError([(("body",), f"MLflow refused the job's run: {error}")]) from None
    spec = info.spec_type.model_validate(
        {
            "config": config,
            "job_id": job_id,
            "owner": owner,
            "mlflow_run_id": run_id,
            "storage_path": settings.resolved_storage_path(),
            "capacity_wait_s": settings.capacity_wait_s,
            **(registration.model_dump(exclude_none=True) if registration else {}),
        }
    )
    now = utcnow()
    job = Job(
        id=job_id,
        kind=info.kind.value,
        name=name or info.name(config),
        owner=owner,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        spec=spec,
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
        priority=priority,
        notify=webhooks or None,
    )
    try:
        store.add(job)
    except IdempotencyConflictError:
        tracking.delete_run(run_id)  # a concurrent retry won: its job is the one
        assert idempotency_key is not None
        winner = store.by_idempotency_key(owner, idempotency_key)
        assert winner is not None
        return Accepted(replay_of(winner, info.kind, fingerprint), replayed=True)
    except Exception:
        tracking.delete_run(run_id)
        raise
    return Accepted(job, replayed=False)


def cancel_job(store: JobStore, ray: RayJobsClient, tracking: Tracking, job: Job) -> Job:
    """Cancel a job: a queued one never reaches Ray; one on Ray becomes CANCELLING.

    A QUEUED record becomes CANCELLED at once (compare-and-set: if the dispatcher claimed
    it first, it is on its way to Ray and is treated as such). For a job on Ray the
    record becomes CANCELLING; its MLflow run is closed as KILLED, which its driver
    watches for (it stops itself even if Ray misses the stop of a job still starting);
    Ray is asked to stop it; the dispatcher makes it CANCELLED once Ray reports the job
    ended, asking again until then. Asking twice is harmless.

    Raises:
        JobFinishedError: the job already ended.
    """
    if job.job_state.final:
        raise JobFinishedError(f"job {job.id} is already {job.state}")
    reason = "cancelled by the user"
    if job.job_state is JobState.QUEUED:
        job = store.transition(job.id, JobState.CANCELLED, expected={JobState.QUEUED}, error=reason)
        if job.job_state is JobState.CANCELLED:
            close_run(tracking, job)
            return job
    if job.job_state is not JobState.CANCELLING:
        job = store.transition(
            job.id,
            JobState.CANCELLING,
            expected={JobState.SUBMITTING, JobState.PENDING, JobState.RUNNING},
            cancel_requested=True,
            error=reason,
        )
    if job.job_state.final:
        raise JobFinishedError(f"job {job.id} is already {job.state}")
    close_run(tracking, job)  # the driver's signal to stop
    if job.ray_submission_id is not None:
        # Ray down or the job gone: the dispatcher's next rounds stop it or confirm.
        with contextlib.suppress(RayJobNotFoundError, RayUnavailableError):
            ray.stop(job.ray_submission_id)
    return job


def close_run(tracking: Tracking, job: Job) -> None:
    """Close a cancelled job's MLflow run (and a sweep's trials) as KILLED."""
    if job.mlflow_run_id is None:
        return
    try:
        tracking.terminate(job.mlflow_run_id, "KILLED", children=kind_of_job(job).has_child_runs)
    except Exception as error:  # the record is what counts; the dispatcher closes it later
        log.warning("could not close MLflow run %s: %s", job.mlflow_run_id, error)


def retry_job(store: JobStore, tracking: Tracking, job: Job) -> Job:
    """Queue a FAILED or CANCELLED job again as its next attempt.

    Its MLflow run is reopened (RUNNING) first, so that the new driver logs into it
    instead of stopping as for a cancelled run; the attempt resumes from the job's last
    checkpoint (the Ray Train run is named after the job), and metric steps already in
    the run are not logged twice.

    Raises:
        NotRetryableError: the job is not FAILED or CANCELLED (or was retried meanwhile).
    """
    if job.job_state not in RETRYABLE:
        raise NotRetryableError(
            f"job {job.id} is {job.state}: only a FAILED or CANCELLED job can be retried"
        )
    if job.mlflow_run_id is not None:
        tracking.reopen(job.mlflow_run_id)
    requeued = store.requeue(
        job.id,
        expected=RETRYABLE,
        error=None,
        queue_reason=f"retried by its owner: attempt {job.attempts + 1}",
    )
    if requeued.job_state is not JobState.QUEUED:
        raise NotRetryableError(f"job {job.id} is {requeued.state}: it was retried already")
    return requeued
