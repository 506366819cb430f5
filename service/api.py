"""The REST routes (thin: the work is in `service.jobs` and `service.dispatcher`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from service.deps import (
    ANONYMOUS,
    DispatcherDep,
    Owner,
    RayDep,
    Reader,
    SettingsDep,
    StoreDep,
    TrackingDep,
)
from service.dispatcher import Dispatcher
from service.jobs import Accepted, InvalidJobError, JobFinishedError, cancel_job, submit_job
from service.ray_jobs import RayJobNotFoundError, RayJobsClient, RayUnavailableError
from service.schemas import (
    Check,
    JobCreate,
    JobList,
    JobMetrics,
    JobOut,
    MetricPointOut,
    Readiness,
)
from service.settings import Settings
from service.store import Job, JobKind, JobState, JobStore
from service.tracking import Tracking, TrackingUnavailableError
from trainer.config import TrainConfig
from tuning.config import SweepConfig

router = APIRouter(prefix="/v1", tags=["jobs"])
health = APIRouter(tags=["health"])

LOG_POLL_S = 1.0
IdempotencyKey = Annotated[
    str | None,
    Header(max_length=256, description="A retry with the same key returns the same record."),
]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No job with this id."}}


def invalid(error: InvalidJobError) -> JSONResponse:
    """A 422 shaped like FastAPI's own validation errors."""
    detail = [{"loc": list(error.loc), "msg": error.message, "type": "value_error"}]
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def unavailable(what: str, error: Exception) -> HTTPException:
    """A 503 naming the dependency that is down."""
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{what} unavailable: {error}")


def find_job(store: JobStore, job_id: str) -> Job:
    """The record, or 404."""
    job = store.get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


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
        body.config, body.name, body.tags, owner, store, tracking, settings, idempotency_key
    )
    if isinstance(accepted, JSONResponse):
        return accepted
    announce(accepted, response, dispatcher, "/v1/jobs")
    return JobOut.of(accepted.job, settings)


async def accept(
    config: TrainConfig | SweepConfig,
    name: str | None,
    tags: dict[str, str],
    owner: str,
    store: JobStore,
    tracking: Tracking,
    settings: Settings,
    idempotency_key: str | None,
) -> Accepted | JSONResponse:
    """Record a job or sweep (`submit_job`), or the 422 / 503 that says why not."""
    try:
        return await run_in_threadpool(
            submit_job,
            store,
            tracking,
            settings,
            owner=owner,
            config=config,
            name=name,
            tags=tags,
            idempotency_key=idempotency_key,
        )
    except InvalidJobError as error:
        return invalid(error)
    except TrackingUnavailableError as error:  # nothing was recorded
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(error)) from None


def announce(accepted: Accepted, response: Response, dispatcher: Dispatcher, prefix: str) -> None:
    """Location (and replay) headers; a new record wakes the dispatcher up."""
    response.headers["Location"] = f"{prefix}/{accepted.job.id}"
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        dispatcher.wakeup.set()


@router.get("/jobs", response_model=JobList)
def list_jobs(
    _reader: Reader,
    store: StoreDep,
    settings: SettingsDep,
    state: Annotated[list[JobState] | None, Query(description="Only these states.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """Training jobs newest first, optionally filtered by state (sweeps: ``/v1/sweeps``)."""
    return list_page(store, settings, JobKind.TRAIN, state, offset, limit)


def list_page(
    store: JobStore,
    settings: Settings,
    kind: JobKind,
    states: list[JobState] | None,
    offset: int,
    limit: int,
) -> JobList:
    """One page of the records of ``kind``, newest first."""
    page = store.page(states=states or [], kind=kind, offset=offset, limit=limit)
    return JobList(
        items=[JobOut.of(job, settings) for job in page.items],
        total=page.total,
        offset=offset,
        limit=limit,
    )


@router.get("/jobs/{job_id}", response_model=JobOut, responses=NOT_FOUND)
async def get_job(job_id: str, _reader: Reader, store: StoreDep, settings: SettingsDep) -> JobOut:
    """A job's state, progress, links and checkpoints."""
    return JobOut.of(find_job(store, job_id), settings)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    responses={**NOT_FOUND, 403: {"description": "Another owner's job."}, 409: {}},
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
    return JobOut.of(cancel_owned(find_job(store, job_id), owner, store, ray, tracking), settings)


def cancel_owned(
    job: Job, owner: str, store: JobStore, ray: RayJobsClient, tracking: Tracking
) -> Job:
    """`cancel_job` for the job's owner: 403 for another owner, 409 when it already ended."""
    if owner != ANONYMOUS and job.owner != owner:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"job {job.id!r} belongs to another owner")
    try:
        return cancel_job(store, ray, tracking, job)
    except JobFinishedError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except RayUnavailableError as error:
        raise unavailable("Ray", error) from None


@router.get(
    "/jobs/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={**NOT_FOUND, 200: {"content": {"text/plain": {}, "text/event-stream": {}}}},
)
def logs(
    job_id: str,
    _reader: Reader,
    store: StoreDep,
    ray: RayDep,
    follow: Annotated[bool, Query(description="Stream as server-sent events.")] = False,
) -> Response:
    """The driver's log; with ``follow=true`` a stream of ``log`` events and a final ``end``."""
    job = find_job(store, job_id)
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
    job_id: str, _reader: Reader, store: StoreDep, tracking: TrackingDep
) -> JobMetrics:
    """Every metric's history from the job's MLflow run."""
    job = find_job(store, job_id)
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


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _check(probe: Callable[[], None]) -> Check:
    try:
        probe()
    except Exception as error:
        return Check(ok=False, error=f"{type(error).__name__}: {error}"[:500])
    return Check(ok=True)


@health.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(store: StoreDep, ray: RayDep, tracking: TrackingDep) -> JSONResponse:
    """Database, Ray and MLflow each reachable (503 when one is not)."""
    database, ray_check, mlflow = await asyncio.gather(
        asyncio.to_thread(_check, store.ping),
        asyncio.to_thread(_check, ray.ping),
        asyncio.to_thread(_check, tracking.ping),
    )
    body = Readiness(
        ready=database.ok and ray_check.ok and mlflow.ok,
        checks={"database": database, "ray": ray_check, "mlflow": mlflow},
    )
    code = status.HTTP_200_OK if body.ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body.model_dump(), status_code=code)
