"""Dispatcher and reconciler: the loop that moves records along with Ray.

Ray's Jobs API has no queue, so jobs wait QUEUED in the store until fewer than
``max_concurrent_jobs`` are PENDING or RUNNING, their owner's quota (`service.quotas`)
has room and Ray answers; they are taken by priority, then age, and submitted under a
submission id derived from the job id (a retry never makes a second Ray job). A job
left waiting carries the reason on its record (``queue_reason``).
Every round also asks Ray for the state of each active job, copies it into the record,
and reads progress from MLflow. A job Ray no longer knows (the head node restarted)
becomes FAILED with that reason instead of staying RUNNING forever.

Several API processes may share one store (uvicorn ``--workers``, replicas): each has a
dispatcher, but only the holder of the store's ``dispatcher`` lease runs rounds, so the
deployment has one dispatcher and ``max_concurrent_jobs`` holds across processes. A
holder that dies loses the lease when it expires (``dispatcher_lease_s``) and another
process takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from service.job_kinds import KINDS, kind_of_job
from service.leases import Leadership
from service.quotas import Demand, Usage, demand_of, over_quota, quota_for, usage_by_owner
from service.ray_jobs import (
    RayJobNotFoundError,
    RayJobsClient,
    RayUnavailableError,
    job_environment,
)
from service.settings import Settings
from service.store import ACTIVE_STATES, Job, JobKind, JobState, JobStore
from service.tracking import Tracking, TrackingUnavailableError

log = logging.getLogger(__name__)

LOST_BY_RAY = "Ray no longer knows this job (the cluster was restarted or the job was removed)"
MLFLOW_FINAL = {
    JobState.SUCCEEDED: "FINISHED",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "KILLED",
}


LEASE = "dispatcher"
"""The store lease whose holder is the deployment's one dispatcher."""


def submission_id(job_id: str, attempt: int = 1) -> str:
    """The Ray submission id of a job's attempt (deterministic: resubmitting an attempt
    is idempotent; a later attempt is a new Ray job)."""
    return f"klssl-{job_id}" if attempt <= 1 else f"klssl-{job_id}-a{attempt}"


@dataclass
class Dispatcher:
    """One round at a time (`run_once`), or forever in the background (`run`)."""

    store: JobStore
    ray: RayJobsClient
    tracking: Tracking
    settings: Settings

    def __post_init__(self) -> None:
        self.wakeup = asyncio.Event()
        self.ray_reachable: bool | None = None
        self.mlflow_reachable = True
        self.leadership = Leadership(
            self.store, LEASE, self.settings.dispatcher_lease_s, working="dispatches"
        )

    def lead(self) -> bool:
        """Take or renew the deployment's dispatcher lease; whether this one works."""
        return self.leadership.lead()

    def resign(self) -> None:
        """Give the lease up (at shutdown), so another process takes over at once."""
        self.leadership.resign()

    def run_once(self) -> None:
        """Reconcile the active jobs, then dispatch queued ones into the free slots
        (only while this dispatcher holds the deployment's lease)."""
        if not self.lead():
            return
        self.reconcile()
        self.dispatch()

    def dispatch(self) -> int:
        """Submit queued jobs, highest priority first, then oldest, while there are free
        slots; a job whose owner is at its quota is passed over (lower priorities of other
        owners may go first). Every job left waiting gets the reason on its record.
        Returns how many were submitted."""
        queued = self.store.queued_in_order()
        if not queued:
            return 0
        active = self.store.in_states(list(ACTIVE_STATES))
        usage = usage_by_owner((job.owner, self._demand(job)) for job in active)
        free = self.settings.max_concurrent_jobs - len(active)
        submitted = 0
        for job in queued:
            if free <= 0:
                self._wait(job, f"no free slot: {self.settings.max_concurrent_jobs} job(s) "
                           "run at once (max_concurrent_jobs)")  # fmt: skip
                continue
            demand = self._demand(job)
            owner_usage = usage.setdefault(job.owner, Usage())
            reason = over_quota(
                quota_for(self.settings.quotas, job.owner), job.owner, owner_usage, demand
            )
            if reason is not None:
                self._wait(job, reason)
                continue
            try:
                self._submit(job)
            except RayUnavailableError as error:
                self._ray_down(f"{len(queued)} job(s) stay queued: {error}")
                break
            except Exception as error:  # the job cannot run at all: say why
                log.exception("submitting job %s failed", job.id)
                self._finish(job, JobState.FAILED, f"submission to Ray failed: {error}")
                continue
            self.ray_reachable = True
            owner_usage.add(demand)
            free -= 1
            submitted += 1
        return submitted

    def _demand(self, job: Job) -> Demand:
        return demand_of(job.config, self.settings.cluster_has_gpus)

    def _wait(self, job: Job, reason: str) -> None:
        """Record why a queued job waits (written only when it changes)."""
        if job.queue_reason != reason:
            self.store.update(job.id, queue_reason=reason)

    def _ray_down(self, message: str) -> None:
        """Remember that Ray is down; warn once per outage, not every round."""
        if self.ray_reachable is not False:
            log.warning("Ray unavailable, %s", message)
        self.ray_reachable = False

    def _submit(self, job: Job) -> None:
        """QUEUED -> SUBMITTING -> PENDING, each a compare-and-set against a cancel."""
        sid = submission_id(job.id, job.attempts)
        claimed = self.store.transition(
            job.id,
            JobState.SUBMITTING,
            expected={JobState.QUEUED},
            ray_submission_id=sid,
            queue_reason=None,
        )
        if claimed.job_state is not JobState.SUBMITTING:
            return  # cancelled between our read of the queue and now: never reaches Ray
        try:
            self.ray.submit(
                sid,
                module=KINDS[JobKind(job.kind)].module,
                spec_json=job.spec.to_json(),
                env=job_environment(self.settings),
            )
        except Exception:
            back = self.store.transition(
                job.id, JobState.QUEUED, expected={JobState.SUBMITTING}, ray_submission_id=None
            )
            if back.job_state is JobState.CANCELLING:  # cancelled while Ray refused it
                self.store.transition(job.id, JobState.CANCELLED, expected={JobState.CANCELLING})
            raise
        recorded = self.store.transition(job.id, JobState.PENDING, expected={JobState.SUBMITTING})
        if recorded.job_state is JobState.CANCELLING:
            # Cancelled while being submitted: stop it now (the reconciler confirms).
            log.info("job %s was cancelled while being submitted; stopping %s", job.id, sid)
            with contextlib.suppress(RayJobNotFoundError):
                self.ray.stop(sid)

    def reconcile(self) -> None:
        """Copy Ray's state and MLflow's progress into every active record."""
        active = self.store.in_states(list(ACTIVE_STATES))
        if not active:
            return
        try:
            self.tracking.ping()
            self.mlflow_reachable = True
        except TrackingUnavailableError as error:
            self.mlflow_reachable = False  # states still follow Ray; progress waits
            log.warning("%s", error)
        for job in active:
            assert job.ray_submission_id is not None
            try:
                status = self.ray.status(job.ray_submission_id)
            except RayUnavailableError as error:
                self._ray_down(f"cannot reconcile: {error}")
                return
            except RayJobNotFoundError:
                if job.job_state is JobState.SUBMITTING:  # a submission that died with us
                    self.store.transition(
                        job.id, JobState.QUEUED, expected={JobState.SUBMITTING},
                        ray_submission_id=None,
                    )  # fmt: skip
                elif job.job_state is JobState.CANCELLING:  # nothing of it is left on Ray
                    self._finish(job, JobState.CANCELLED, job.error)
                else:
                    self._lost(job)
                continue
            self.ray_reachable = True
            self._record_progress(job)
            if job.job_state is JobState.CANCELLING:
                if status.state.final:  # Ray reports the job ended: the cancel is done
                    self._finish(job, JobState.CANCELLED, job.error)
                else:  # Ray may not have taken the first stop (a job still starting)
                    with contextlib.suppress(RayJobNotFoundError, RayUnavailableError):
                        self.ray.stop(job.ray_submission_id)
                continue
            if status.state.final:
                message = status.message if status.state is JobState.FAILED else None
                self._finish(job, status.state, message)
            elif status.state is not job.job_state:
                self.store.transition(
                    job.id,
                    status.state,
                    expected={JobState.SUBMITTING, JobState.PENDING, JobState.RUNNING},
                )

    def _lost(self, job: Job) -> None:
        """Ray lost a job it ran: queue its next attempt (which resumes from the last
        checkpoint into the same MLflow run), or fail it after ``max_attempts``."""
        limit = self.settings.max_attempts
        if job.attempts >= limit:
            self._finish(job, JobState.FAILED, f"{LOST_BY_RAY}; {job.attempts} of {limit} attempts")
            return
        reason = (
            f"{LOST_BY_RAY}; attempt {job.attempts + 1} of {limit} resumes from the last checkpoint"
        )
        log.warning("job %s: %s", job.id, reason)
        self.store.requeue(
            job.id, expected={JobState.PENDING, JobState.RUNNING}, queue_reason=reason
        )

    def _record_progress(self, job: Job) -> None:
        if job.mlflow_run_id is None or not self.mlflow_reachable:
            return
        try:
            info = kind_of_job(job)
            progress = info.progress(self.tracking, job.mlflow_run_id, job.config)
        except Exception as error:  # MLflow down: progress waits, states do not
            log.warning("no progress for %s from MLflow: %s", job.id, error)
            return
        fields: dict[str, object] = {
            "progress_epoch": progress.epoch,
            "progress_step": progress.step,
            "progress_metrics": progress.metrics,
            "progress_health": progress.health,
            "progress_collapse_step": progress.collapse_step,
        }
        if progress.latest_checkpoint and progress.latest_checkpoint not in job.checkpoint_uris:
            fields["checkpoint_uris"] = [*job.checkpoint_uris, progress.latest_checkpoint]
        self.store.update(job.id, **fields)

    def _finish(self, job: Job, state: JobState, error: str | None) -> None:
        fields: dict[str, Any] = {"error": error}
        if job.mlflow_run_id is not None and self.mlflow_reachable:
            try:
                uris = self.tracking.checkpoint_uris(job.mlflow_run_id)
                if uris:
                    fields["checkpoint_uris"] = uris
                self.tracking.terminate(
                    job.mlflow_run_id,
                    MLFLOW_FINAL[state],
                    children=kind_of_job(job).has_child_runs,
                )
            except Exception as err:
                log.warning("could not finish MLflow run of %s: %s", job.id, err)
        self.store.transition(job.id, state, **fields)

    async def run(self) -> None:
        """Rounds every ``dispatch_interval_s`` (sooner when `wakeup` is set), forever."""
        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception:
                log.exception("dispatcher round failed")
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self.settings.dispatch_interval_s)
