"""Request and response bodies of the REST API (they are the OpenAPI documentation)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from service.settings import Settings
from service.store import Job, JobState, Notification
from service.webhooks import NotifyUrls, redacted
from trainer.config import TrainConfig
from trainer.mlflow_names import RESERVED_TAG_PREFIXES
from trainer.spec import Registration, TrainJobSpec
from tuning.config import SweepConfig
from tuning.report import TrialRecord, best_trial

MAX_TAGS = 50
"""User tags per job (each is also an MLflow tag)."""


def _unreserved(tags: dict[str, str]) -> dict[str, str]:
    reserved = sorted(key for key in tags if key.startswith(RESERVED_TAG_PREFIXES))
    if reserved:
        prefixes = " and ".join(repr(prefix) for prefix in RESERVED_TAG_PREFIXES)
        raise ValueError(f"tags {reserved} use a reserved prefix ({prefixes} belong to klssl)")
    return tags


def unencodable_string(value: Any, path: str = "") -> str | None:
    """The path of the first string (key or value) that UTF-8 cannot encode or that
    holds a NUL character, if any.

    JSON's ``\\ud800`` escapes decode to lone surrogates and ``\\u0000`` to NUL, which
    no database, MLflow or file system takes: they are refused at the door instead of
    failing deep inside.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "<root>"
        if "\x00" in value:
            return path or "<root>"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = unencodable_string(key, f"{path}.{key!r}".lstrip(".")) or unencodable_string(
                item, f"{path}.{key}".lstrip(".")
            )
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = unencodable_string(item, f"{path}.{index}".lstrip("."))
            if found:
                return found
    return None


class RequestBody(BaseModel):
    """Base of request bodies: unknown fields are errors; every string is valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, raw: Any) -> Any:
        where = unencodable_string(raw)
        if where is not None:
            raise ValueError(f"{where}: not valid text (a lone surrogate or a NUL character)")
        return raw


UserTags = Annotated[
    dict[
        Annotated[str, Field(min_length=1, max_length=250)],  # MLflow's limit on tag keys
        Annotated[str, Field(max_length=5000)],
    ],
    Field(max_length=MAX_TAGS),
    AfterValidator(_unreserved),
]
"""Free-form tags: bounded, and never one of klssl's or MLflow's own."""

NOTIFY_DESCRIPTION = (
    "Webhook URLs (http or https, at most 5) that receive one JSON POST when the job ends "
    "(SUCCEEDED, FAILED, CANCELLED) and when its health becomes collapsed: Slack-compatible "
    "(`text`) with the record's fields. Addresses must be public unless the deployment "
    "allows more (notify_private_networks); no user:password@ in the URL."
)


Priority = Annotated[
    int,
    Field(
        ge=-1000,
        le=1000,
        description="Higher runs first among queued jobs and sweeps; equal priorities run "
        "oldest first.",
    ),
]


class Submission(RequestBody):
    """What a job and a sweep request carry besides their config, name and tags."""

    priority: Priority = 0
    notify: NotifyUrls = Field(default_factory=list, description=NOTIFY_DESCRIPTION)


class JobCreate(Submission, Registration):
    """A training job to run: a TrainConfig plus an optional display name, tags and the
    model name (and alias) to register its backbone under."""

    name: str | None = Field(
        None, min_length=1, max_length=256, description="Display name (default: config.name)."
    )
    config: TrainConfig = Field(description="The training config (the TrainConfig schema).")
    tags: UserTags = Field(
        default_factory=dict,
        description="Free-form tags, also set on the MLflow run (not klssl.* or mlflow.*).",
    )


class JobProgress(BaseModel):
    """How far the job got, as last read from MLflow."""

    epoch: int | None = Field(None, description="Last completed (or current) epoch.")
    step: int | None = Field(None, description="Last logged global step.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Latest value of every metric."
    )
    health: Literal["ok", "collapsed"] | None = Field(
        None,
        description="The trainer's collapse verdict: ok, or collapsed (targets constant or "
        "uniform across images for several log intervals); null before the first log.",
    )
    collapse_step: int | None = Field(None, description="Step at which the collapse started.")


def utc(moment: datetime) -> datetime:
    """A stored timestamp as UTC (SQLite returns them without a zone)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class NotificationOut(BaseModel):
    """The delivery of one webhook notification."""

    url: str = Field(description="The webhook, redacted as in `notify`.")
    event: Literal["SUCCEEDED", "FAILED", "CANCELLED", "COLLAPSED"]
    status: Literal["pending", "delivered", "gave_up"]
    attempts: int = Field(description="POSTs made so far.")
    delivered_at: datetime | None = None
    next_attempt_at: datetime | None = Field(None, description="When it is tried (again).")
    last_error: str | None = Field(None, description="Why the last attempt failed.")

    @classmethod
    def of(cls, row: Notification) -> NotificationOut:
        """The response body of an outbox row."""
        status: Literal["pending", "delivered", "gave_up"] = (
            "delivered" if row.delivered_at else "pending" if row.next_attempt_at else "gave_up"
        )
        return cls(
            url=redacted(row.url),
            event=row.event,
            status=status,
            attempts=row.attempts,
            delivered_at=utc(row.delivered_at) if row.delivered_at else None,
            next_attempt_at=utc(row.next_attempt_at) if row.next_attempt_at else None,
            last_error=row.last_error,
        )


class JobOut(BaseModel):
    """A job record."""

    id: str = Field(description="Job id.")
    name: str
    owner: str = Field(description="Identity of the token that submitted it.")
    state: JobState
    config: dict[str, Any] = Field(description="The validated TrainConfig, as JSON.")
    tags: dict[str, str]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = Field(None, description="When Ray reported it RUNNING.")
    finished_at: datetime | None = Field(None, description="When it reached a final state.")
    ray_submission_id: str | None = Field(None, description="Ray job submission id.")
    ray_dashboard_url: str | None = Field(None, description="The job in the Ray dashboard.")
    mlflow_run_id: str | None = Field(None, description="Its MLflow run.")
    mlflow_run_url: str | None = Field(None, description="The run in the MLflow UI.")
    progress: JobProgress
    error: str | None = Field(None, description="Why it failed or was cancelled.")
    checkpoint_uris: list[str] = Field(description="Checkpoints kept, oldest first.")
    priority: int = Field(0, description="Higher runs first among queued jobs.")
    attempts: int = Field(
        1, description="Submissions to Ray so far: a job Ray lost, or a retried one, runs again."
    )
    queue_reason: str | None = Field(
        None, description="Why a QUEUED job still waits: no free slot, or its owner's quota."
    )
    register_as: str | None = Field(
        None, description="The model name its backbone is registered under when it succeeds."
    )
    register_alias: str | None = Field(None, description="The registered version's alias.")
    notify: list[str] = Field(
        default_factory=list,
        description="Its webhooks, redacted (scheme, host and first path segment: the "
        "rest of a webhook URL is often its secret).",
    )
    notifications: list[NotificationOut] | None = Field(
        None,
        description="Delivery of its notifications, oldest first (in the responses about "
        "one record; null in lists).",
    )

    @classmethod
    def of(
        cls, job: Job, settings: Settings, notifications: Sequence[Notification] | None = None
    ) -> JobOut:
        """The response body of a record (with ``notifications``: their delivery)."""
        mlflow_base = settings.mlflow_base_url()
        run_url = None
        if mlflow_base and job.mlflow_run_id and job.mlflow_experiment_id:
            run_url = (
                f"{mlflow_base}/#/experiments/{job.mlflow_experiment_id}/runs/{job.mlflow_run_id}"
            )
        ray_url = None
        if job.ray_submission_id:
            ray_url = f"{settings.ray_address.rstrip('/')}/#/jobs/{job.ray_submission_id}"
        return cls(
            id=job.id,
            name=job.name,
            owner=job.owner,
            state=job.job_state,
            config=job.config.model_dump(mode="json"),
            tags=dict(job.tags or {}),
            created_at=utc(job.created_at),
            updated_at=utc(job.updated_at),
            started_at=utc(job.started_at) if job.started_at else None,
            finished_at=utc(job.finished_at) if job.finished_at else None,
            ray_submission_id=job.ray_submission_id,
            ray_dashboard_url=ray_url,
            mlflow_run_id=job.mlflow_run_id,
            mlflow_run_url=run_url,
            progress=JobProgress(
                epoch=job.progress_epoch,
                step=job.progress_step,
                metrics=dict(job.progress_metrics or {}),
                health=job.progress_health,
                collapse_step=job.progress_collapse_step,
            ),
            error=job.error,
            checkpoint_uris=list(job.checkpoint_uris or []),
            priority=job.priority or 0,
            attempts=job.attempts or 1,
            queue_reason=job.queue_reason if job.job_state is JobState.QUEUED else None,
            notify=[redacted(url) for url in job.notify or []],
            notifications=(
                None if notifications is None else [NotificationOut.of(n) for n in notifications]
            ),
            **(
                job.spec.registration() if isinstance(job.spec, TrainJobSpec) else Registration()
            ).model_dump(),
        )


class JobList(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobOut]
    total: int = Field(description="Jobs matching the filter, over all pages.")
    offset: int
    limit: int


class MetricPointOut(BaseModel):
    """One logged value."""

    step: int
    value: float
    timestamp: int = Field(description="Milliseconds since the epoch.")


class JobMetrics(BaseModel):
    """Every metric's history from the job's MLflow run."""

    job_id: str
    mlflow_run_id: str | None
    metrics: dict[str, list[MetricPointOut]]


class Check(BaseModel):
    """One dependency's readiness."""

    ok: bool
    error: str | None = None


class Readiness(BaseModel):
    """Readiness of the service and each dependency."""

    ready: bool
    checks: dict[str, Check]


class SweepCreate(Submission):
    """A sweep to run: a SweepConfig plus an optional display name and tags."""

    name: str | None = Field(
        None, min_length=1, max_length=256, description="Display name (default: config.name)."
    )
    config: SweepConfig = Field(description="The sweep (the SweepConfig schema).")
    tags: UserTags = Field(
        default_factory=dict,
        description="Free-form tags, also set on the parent MLflow run (not klssl.* or mlflow.*).",
    )


class TrialOut(BaseModel):
    """One trial of a sweep (a child run of the sweep's MLflow run)."""

    trial_id: str = Field(description="Ray Tune's trial id.")
    run_id: str = Field(description="The trial's MLflow run.")
    params: dict[str, Any] = Field(description="The sampled values, by config field path.")
    state: str = Field(description="MLflow run status: RUNNING, FINISHED, KILLED, FAILED.")
    stop_reason: str | None = Field(None, description="collapse or asha when stopped early.")
    metrics: dict[str, float] = Field(description="Latest value of every metric.")
    config: dict[str, Any] = Field(description="The trial's full TrainConfig.")


class SweepOut(JobOut):
    """A sweep: its record (as a job) plus its trials and the best one so far."""

    metric: str = Field(description="The objective the sweep optimises.")
    mode: str = Field(description="max or min.")
    trials: list[TrialOut] = Field(description="Every trial so far, by trial id.")
    best_trial: TrialOut | None = Field(None, description="The best trial so far.")

    @classmethod
    def of_sweep(
        cls,
        job: Job,
        settings: Settings,
        trials: list[TrialRecord],
        notifications: Sequence[Notification] | None = None,
    ) -> SweepOut:
        """The response body of a sweep record and its trials."""
        assert isinstance(job.config, SweepConfig)
        metric, mode = job.config.objective
        best = best_trial(trials, metric, mode)
        return cls(
            **JobOut.of(job, settings, notifications).model_dump(),
            metric=metric,
            mode=mode,
            trials=[TrialOut(**record.model_dump()) for record in trials],
            best_trial=TrialOut(**best.model_dump()) if best is not None else None,
        )
