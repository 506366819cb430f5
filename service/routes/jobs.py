"""The job routes (thin: the work is in `service.jobs` and `service.dispatcher`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from service.deps import (
    DispatcherDep,
    Owner,
    RayDep,
    Reader,
    SettingsDep,
    StoreDep,
    TrackingDep,
)
from service.ray_jobs import RayJobNotFoundError, RayJobsClient, RayUnavailableError
from service.routes.common import (
    MAX_OFFSET,
    IdempotencyKey,
    accept,
    announce,
    cancel_owned,
    find_job,
    list_page,
    unavailable,
)
from service.schemas import JobCreate, JobList, JobMetrics, JobOut, MetricPointOut
from service.store import JobKind, JobState, JobStore

router = APIRouter(prefix="/v1", tags=["jobs"])

LOG_POLL_S = 1.0
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No job with this id."}}


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses={422: {"description": "Invalid config: field path and reason."}},
)
async def create_job(
    body: JobCreate,
    response: Response,
    owner: Owner,
    store: StoreDep,
    tracking: TrackingDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut | JSONResponse:
    """Accept a training job: recorded QUEUED with its MLflow run, then dispatched to Ray."""
    accepted = await accept(
        body.config, body.name, body.tags, owner.owner, store, tracking, settings, idempotency_key
    )
    if isinstance(accepted, JSONResponse):
        return accepted
    announce(accepted, response, dispatcher, "/v1/jobs")
    return JobOut.of(accepted.job, settings)


@router.get("/jobs", response_model=JobList)
def list_jobs(
    reader: Reader,
    store: StoreDep,
    settings: SettingsDep,
    state: Annotated[list[JobState] | None, Query(description="Only these states.")] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """Training jobs newest first, optionally filtered by state (sweeps: ``/v1/sweeps``)."""
    return list_page(store, settings, JobKind.TRAIN, reader, state, offset, limit)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: str, reader: Reader, store: StoreDep, settings: SettingsDep) -> JobOut:
    """A job's state, progress, links and checkpoints."""
    return JobOut.of(find_job(store, job_id, reader), settings)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses={**NOT_FOUND, 409: {"description": "The job already ended."}},
)
def cancel(
    job_id: str,
    owner: Owner,
    store: StoreDep,
    ray: RayDep,
    tracking: TrackingDep,
    settings: SettingsDep,
) -> JobOut:
    """Cancel a job (stops its Ray job); 409 when it already ended."""
    return JobOut.of(cancel_owned(find_job(store, job_id, owner), store, ray, tracking), settings)


@router.get(
    "/jobs/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={**NOT_FOUND, 200: {"content": {"text/plain": {}, "text/event-stream": {}}}},
)
def logs(
    job_id: str,
    reader: Reader,
    store: StoreDep,
    ray: RayDep,
    follow: Annotated[bool, Query(description="Stream as server-sent events.")] = False,
) -> Response:
    """The driver's log; with ``follow=true`` a stream of ``log`` events and a final ``end``."""
    job = find_job(store, job_id, reader)
    if follow:
        return StreamingResponse(
            follow_logs(store, ray, job.id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    if job.ray_submission_id is None:
        return PlainTextResponse("")
    try:
        return PlainTextResponse(ray.logs(job.ray_submission_id))
    except RayJobNotFoundError:
        return PlainTextResponse("")
    except RayUnavailableError as error:
        raise unavailable("Ray", error) from None


def sse(event: str, data: str) -> str:
    """One server-sent event (multi-line data split over data fields)."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n"


async def follow_logs(store: JobStore, ray: RayJobsClient, job_id: str) -> AsyncIterator[str]:
    """Poll Ray for new log text until the job ends; a failed poll is simply retried."""
    sent = 0
    pending = ""
    while True:
        job = await asyncio.to_thread(store.get, job_id)
        if job is None:
            return
        final = job.job_state.final
        fetched = False
        if job.ray_submission_id is not None:
            try:
                text = await asyncio.to_thread(ray.logs, job.ray_submission_id)
                fetched = True
            except (RayUnavailableError, RayJobNotFoundError) as error:
                text = ""
                yield f": log source unavailable, retrying ({type(error).__name__})\n\n"
            if len(text) > sent:
                pending += text[sent:]
                sent = len(text)
        complete, _, rest = pending.rpartition("\n")
        if complete:
            yield sse("log", complete)
            pending = rest
        if final and (fetched or job.ray_submission_id is None):
            if pending:
                yield sse("log", pending)
            yield sse("end", json.dumps({"state": job.state, "error": job.error}))
            return
        await asyncio.sleep(LOG_POLL_S)


@router.get("/jobs/{job_id}/metrics", response_model=JobMetrics, responses=NOT_FOUND)
def metrics_history(
    job_id: str, reader: Reader, store: StoreDep, tracking: TrackingDep
) -> JobMetrics:
    """Every metric's history from the job's MLflow run."""
    job = find_job(store, job_id, reader)
    history: dict[str, list[MetricPointOut]] = {}
    if job.mlflow_run_id is not None:
        try:
            raw = tracking.history(job.mlflow_run_id)
        except Exception as error:
            raise unavailable("MLflow", error) from None
        history = {
            key: [MetricPointOut(step=p.step, value=p.value, timestamp=p.timestamp) for p in points]
            for key, points in raw.items()
        }
    return JobMetrics(job_id=job.id, mlflow_run_id=job.mlflow_run_id, metrics=history)
