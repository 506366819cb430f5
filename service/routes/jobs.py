"""The job routes (thin: the work is in `service.jobs` and `service.dispatcher`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from service.deps import (
    DispatcherDep,
    Owner,
    RayDep,
    Reader,
    ServicesDep,
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
    retry_owned,
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
    accepted = await accept(body, owner.owner, store, tracking, settings, idempotency_key)
    if isinstance(accepted, JSONResponse):
        return accepted
    announce(accepted, response, dispatcher, "/v1/jobs")
    job = accepted.job
    return JobOut.of(job, settings, store.notifications(job.id) if accepted.replayed else [])


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
    """A job's state, progress, links, checkpoints and notifications."""
    job = find_job(store, job_id, reader)
    return JobOut.of(job, settings, store.notifications(job.id))


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
    job = cancel_owned(find_job(store, job_id, owner), store, ray, tracking)
    return JobOut.of(job, settings, store.notifications(job.id))


@router.post(
    "/jobs/{job_id}/retry",
    response_model=JobOut,
    responses={**NOT_FOUND, 409: {"description": "The job is not FAILED or CANCELLED."}},
)
def retry(
    job_id: str,
    owner: Owner,
    store: StoreDep,
    tracking: TrackingDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
) -> JobOut:
    """Run a FAILED or CANCELLED job again: QUEUED as its next attempt, resuming from its
    last checkpoint into the same MLflow run; 409 for any other state."""
    job = retry_owned(find_job(store, job_id, owner), store, tracking)
    dispatcher.wakeup.set()
    return JobOut.of(job, settings)


@router.get(
    "/jobs/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={
        **NOT_FOUND,
        200: {"content": {"text/plain": {}, "text/event-stream": {}}},
        429: {"description": "The owner already holds max_log_streams_per_owner streams."},
    },
)
def logs(
    job_id: str,
    reader: Reader,
    services: ServicesDep,
    follow: Annotated[bool, Query(description="Stream as server-sent events.")] = False,
) -> Response:
    """The driver's log; with ``follow=true`` a stream of ``log`` events and a final ``end``."""
    store, ray = services.store, services.ray
    job = find_job(store, job_id, reader)
    if follow:
        slots = services.log_streams
        if not slots.take(reader.owner):
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"at most {slots.per_owner} live log streams per owner",
            )
        stream = follow_logs(store, ray, job.id, services.settings.max_log_stream_s)
        return StreamingResponse(
            released(stream, lambda: slots.give_back(reader.owner)),
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


async def released(stream: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    """``stream``, then ``release()`` however it ends (finished, timed out, disconnected)."""
    try:
        async for event in stream:
            yield event
    finally:
        release()


def sse(event: str, data: str) -> str:
    """One server-sent event (multi-line data split over data fields)."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n"


class LogLines:
    """Chunks of a log as whole lines: a partial last line waits for its end."""

    def __init__(self) -> None:
        self.pending = ""

    def add(self, chunk: str) -> str:
        """The complete lines so far (without the final newline), or ``""``."""
        complete, _, self.pending = (self.pending + chunk).rpartition("\n")
        return complete

    def rest(self) -> str:
        """What is left once the log has ended."""
        rest, self.pending = self.pending, ""
        return rest


async def follow_logs(
    store: JobStore, ray: RayJobsClient, job_id: str, max_s: float
) -> AsyncIterator[str]:
    """The job's log as ``log`` events while it runs, then an ``end`` event.

    Ray pushes only new text (`RayJobsClient.tail`); when the connection drops, a comment
    says so and the stream reconnects, skipping what it already sent. The stream ends
    when the record is final, or after ``max_s`` seconds (``end`` with a reason).
    """
    sent = 0
    lines = LogLines()
    job = None
    deadline = asyncio.get_running_loop().time() + max_s
    try:
        async with asyncio.timeout_at(deadline):
            while True:
                job = await asyncio.to_thread(store.get, job_id)
                if job is None:
                    return
                if job.ray_submission_id is None:  # not on Ray (yet, or ever)
                    if job.job_state.final:
                        break
                    await asyncio.sleep(LOG_POLL_S)
                    continue
                seen = 0
                try:
                    async for chunk in ray.tail(job.ray_submission_id):
                        new = chunk[max(0, sent - seen) :]  # after a reconnect: skip the sent
                        seen += len(chunk)
                        sent += len(new)
                        complete = lines.add(new)
                        if complete:
                            yield sse("log", complete)
                except RayUnavailableError as error:
                    yield f": log source unavailable, retrying ({type(error).__name__})\n\n"
                    if not job.job_state.final:
                        await asyncio.sleep(LOG_POLL_S)
                        continue
                except RayJobNotFoundError as error:  # Ray forgot it: nothing more comes
                    yield f": log source unavailable ({type(error).__name__})\n\n"
                # Ray's job ended: its record follows within a dispatcher round.
                while not job.job_state.final:
                    await asyncio.sleep(LOG_POLL_S)
                    job = await asyncio.to_thread(store.get, job_id)
                    if job is None:
                        return
                break
    except TimeoutError:
        if lines.pending:
            yield sse("log", lines.rest())
        state = job.state if job is not None else None
        reason = f"stream time limit ({max_s:g} s): reconnect to follow on"
        yield sse("end", json.dumps({"state": state, "error": None, "reason": reason}))
        return
    if lines.pending:
        yield sse("log", lines.rest())
    assert job is not None
    yield sse("end", json.dumps({"state": job.state, "error": job.error}))


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
