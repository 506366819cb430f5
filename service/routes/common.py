"""What the job and sweep routes share (no routes here): headers, errors, accept, cancel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Header, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from service.deps import Caller
from service.dispatcher import Dispatcher
from service.jobs import (
    Accepted,
    InvalidJobError,
    JobFinishedError,
    NotRetryableError,
    cancel_job,
    retry_job,
    submit_job,
)
from service.ray_jobs import RayJobsClient, RayUnavailableError
from service.schemas import JobCreate, JobList, JobOut, SweepCreate
from service.settings import Settings
from service.store import Job, JobKind, JobState, JobStore
from service.tracking import Tracking, TrackingUnavailableError
from trainer.spec import Registration

BodyModel = TypeVar("BodyModel", bound=BaseModel)

MAX_OFFSET = 10**9
"""Largest list offset (beyond any store's row count; larger ones would overflow it)."""

IdempotencyKey = Annotated[
    str | None,
    Header(max_length=256, description="A retry with the same key returns the same record."),
]


def invalid(error: InvalidJobError) -> JSONResponse:
    """A 422 shaped like FastAPI's own validation errors."""
    detail = [
        {"loc": list(loc), "msg": message, "type": "value_error"} for loc, message in error.problems
    ]
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def unavailable(what: str, error: Exception) -> HTTPException:
    """A 503 naming the dependency that is down."""
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{what} unavailable: {error}")


def find_job(store: JobStore, job_id: str, caller: Caller) -> Job:
    """The record, or 404: also for another owner's record (its existence is not told)."""
    job = store.get(job_id)
    if job is None or not caller.may_see(job.owner):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


async def accept(
    body: JobCreate | SweepCreate,
    owner: str,
    store: JobStore,
    tracking: Tracking,
    settings: Settings,
    idempotency_key: str | None,
) -> Accepted | JSONResponse:
    """Record the job or sweep of a request (`submit_job`), or the 422 / 503 that says
    why not."""
    try:
        return await run_in_threadpool(
            submit_job,
            store,
            tracking,
            settings,
            owner=owner,
            config=body.config,
            name=body.name,
            tags=body.tags,
            idempotency_key=idempotency_key,
            registration=body.registration() if isinstance(body, Registration) else None,
            priority=body.priority,
            notify=body.notify,
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


def list_page(
    store: JobStore,
    settings: Settings,
    kind: JobKind,
    caller: Caller,
    states: list[JobState] | None,
    offset: int,
    limit: int,
) -> JobList:
    """One page of the caller's records of ``kind`` (everyone's for an admin), newest first."""
    page = store.page(
        states=states or [], kind=kind, owner=caller.only_owner, offset=offset, limit=limit
    )
    return JobList(
        items=[JobOut.of(job, settings) for job in page.items],
        total=page.total,
        offset=offset,
        limit=limit,
    )


def cancel_owned(job: Job, store: JobStore, ray: RayJobsClient, tracking: Tracking) -> Job:
    """`cancel_job` of a record `find_job` gave the caller; 409 when it already ended."""
    try:
        return cancel_job(store, ray, tracking, job)
    except JobFinishedError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except RayUnavailableError as error:
        raise unavailable("Ray", error) from None


def retry_owned(job: Job, store: JobStore, tracking: Tracking) -> Job:
    """`retry_job` of a record `find_job` gave the caller; 409 unless it FAILED or was
    CANCELLED."""
    try:
        return retry_job(store, tracking, job)
    except NotRetryableError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except TrackingUnavailableError as error:
        raise unavailable("MLflow", error) from None


def body_off_the_loop(model: type[BodyModel]) -> Callable[[Request], Awaitable[BodyModel]]:
    """A dependency that validates the request body as ``model`` in the thread pool.

    FastAPI validates declared bodies on the event loop; a sweep's validation substitutes
    every value of its space into the base config (seconds for a large space), which
    would stall every other request meanwhile. Errors are FastAPI's own 422s. Document
    the body with `documented_body`.
    """

    async def validated(request: Request) -> BodyModel:
        raw = await request.body()
        try:
            return await run_in_threadpool(model.model_validate_json, raw)
        except ValidationError as error:
            raise RequestValidationError(
                [{**item, "loc": ("body", *item["loc"])} for item in error.errors()]
            ) from None

    return validated


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a route whose body `body_off_the_loop` reads (the
    model's schema is added to the components by `service.app`)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
