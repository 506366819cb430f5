"""The sweep routes: a sweep is a record like a job, run by ``python -m tuning.run``.

Sweeps share the jobs' store, queue, auth, validation and cancellation
(`service.routes.common`); their trials are read from MLflow, where each trial is a child
run of the sweep's run.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.deps import (
    Caller,
    DispatcherDep,
    Owner,
    RayDep,
    Reader,
    SettingsDep,
    StoreDep,
    TrackingDep,
)
from service.routes.common import (
    MAX_OFFSET,
    IdempotencyKey,
    accept,
    announce,
    body_off_the_loop,
    cancel_owned,
    documented_body,
    find_job,
    list_page,
    retry_owned,
    unavailable,
)
from service.schemas import JobList, SweepCreate, SweepOut
from service.store import Job, JobKind, JobState, JobStore
from service.tracking import Tracking

router = APIRouter(prefix="/v1", tags=["sweeps"])
SWEEP_NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"description": "No such sweep."}}


def find_sweep(store: JobStore, sweep_id: str, caller: Caller) -> Job:
    """The sweep's record, or 404 (a training job's id is not a sweep)."""
    job = find_job(store, sweep_id, caller)
    if job.kind != JobKind.SWEEP:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no sweep {sweep_id!r}")
    return job


async def with_trials(
    job: Job, store: JobStore, tracking: Tracking, settings: SettingsDep
) -> SweepOut:
    """The sweep with its trials from MLflow (503 when MLflow does not answer) and its
    notifications."""
    trials = []
    if job.mlflow_run_id is not None:
        try:
            trials = await run_in_threadpool(tracking.trials, job.mlflow_run_id)
        except Exception as error:
            raise unavailable("MLflow", error) from None
    notifications = await run_in_threadpool(store.notifications, job.id)
    return SweepOut.of_sweep(job, settings, trials, notifications)


@router.post(
    "/sweeps",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepOut,
    responses={422: {"description": "Invalid sweep: field path and reason."}},
    openapi_extra=documented_body(SweepCreate),
)
async def create_sweep(
    body: Annotated[SweepCreate, Depends(body_off_the_loop(SweepCreate))],
    response: Response,
    owner: Owner,
    store: StoreDep,
    tracking: TrackingDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: IdempotencyKey = None,
) -> SweepOut | JSONResponse:
    """Accept a sweep: recorded QUEUED with its parent MLflow run, then dispatched to Ray."""
    accepted = await accept(body, owner.owner, store, tracking, settings, idempotency_key)
    if isinstance(accepted, JSONResponse):
        return accepted
    announce(accepted, response, dispatcher, "/v1/sweeps")
    job = accepted.job
    notifications = (
        await run_in_threadpool(store.notifications, job.id) if accepted.replayed else []
    )
    return SweepOut.of_sweep(job, settings, [], notifications)


@router.get("/sweeps", response_model=JobList)
def list_sweeps(
    reader: Reader,
    store: StoreDep,
    settings: SettingsDep,
    state: Annotated[list[JobState] | None, Query(description="Only these states.")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """Sweeps newest first (their progress counts trials), optionally filtered by state."""
    return list_page(store, settings, JobKind.SWEEP, reader, state, offset, limit)


@router.get("/sweeps/{sweep_id}", response_model=SweepOut, responses=SWEEP_NOT_FOUND)
async def get_sweep(
    sweep_id: str, reader: Reader, store: StoreDep, tracking: TrackingDep, settings: SettingsDep
) -> SweepOut:
    """A sweep's state and its trials: configs, metrics, states and the best trial."""
    job = await run_in_threadpool(find_sweep, store, sweep_id, reader)
    return await with_trials(job, store, tracking, settings)


@router.post(
    "/sweeps/{sweep_id}/cancel",
    response_model=SweepOut,
    responses={**SWEEP_NOT_FOUND, 409: {"description": "The sweep already ended."}},
)
async def cancel_sweep(
    sweep_id: str,
    owner: Owner,
    store: StoreDep,
    ray: RayDep,
    tracking: TrackingDep,
    settings: SettingsDep,
) -> SweepOut:
    """Cancel a sweep: its Ray job stops, and with it every running trial; 409 when ended."""
    job = await run_in_threadpool(find_sweep, store, sweep_id, owner)
    cancelled = await run_in_threadpool(cancel_owned, job, store, ray, tracking)
    return await with_trials(cancelled, store, tracking, settings)


@router.post(
    "/sweeps/{sweep_id}/retry",
    response_model=SweepOut,
    responses={**SWEEP_NOT_FOUND, 409: {"description": "The sweep is not FAILED or CANCELLED."}},
)
async def retry_sweep(
    sweep_id: str,
    owner: Owner,
    store: StoreDep,
    tracking: TrackingDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
) -> SweepOut:
    """Run a FAILED or CANCELLED sweep again: QUEUED as its next attempt, which restores
    its Tune experiment (finished trials are not redone); 409 for any other state."""
    job = await run_in_threadpool(find_sweep, store, sweep_id, owner)
    retried = await run_in_threadpool(retry_owned, job, store, tracking)
    dispatcher.wakeup.set()
    return await with_trials(retried, store, tracking, settings)
