"""The job store: one table of job records, SQLite by default, PostgreSQL by URL.

The schema is kept by Alembic migrations (``service/migrations``), applied at startup by
`JobStore.create_schema` (``alembic upgrade head`` on the store's engine). Every method
opens its own short session, so the store can be shared by request handlers (worker
threads) and the dispatcher.

A job's webhook notifications (``notify``) are written to the ``notifications`` outbox
in the transaction that records their event (a final state in `JobStore.transition`,
the collapse verdict in `JobStore.update`), one row per (job, attempt, event, URL): a restart
neither loses nor repeats one. `service.notifications` delivers them.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from trainer.config import TrainConfig
from trainer.spec import TrainJobSpec
from tuning.config import SweepConfig
from tuning.spec import SweepJobSpec

log = logging.getLogger(__name__)

StoredSpec = TrainJobSpec | SweepJobSpec


class JobState(enum.StrEnum):
    """Lifecycle of a job; the last three are final.

    ``QUEUED -> SUBMITTING -> PENDING -> RUNNING -> SUCCEEDED | FAILED``; a cancel turns
    QUEUED into CANCELLED at once, and anything on Ray into CANCELLING, which becomes
    CANCELLED once Ray reports the job ended. Every move is a compare-and-set
    (`JobStore.transition` with ``expected``), so the dispatcher and a cancel never
    overwrite each other.
    """

    QUEUED = "QUEUED"  # recorded, waiting for cluster capacity (not yet in Ray)
    SUBMITTING = "SUBMITTING"  # the dispatcher is handing it to Ray
    PENDING = "PENDING"  # submitted, Ray has not started the driver yet
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"  # stop asked of Ray (and of the driver, through MLflow)
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def final(self) -> bool:
        """Whether the job can change state no more."""
        return self in FINAL_STATES


class JobKind(enum.StrEnum):
    """What a record runs on the cluster."""

    TRAIN = "train"  # python -m trainer.run: one training run
    SWEEP = "sweep"  # python -m tuning.run: a Ray Tune sweep of training runs


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset(
    {JobState.SUBMITTING, JobState.PENDING, JobState.RUNNING, JobState.CANCELLING}
)
"""States that may have a Ray job: they hold a slot of ``max_concurrent_jobs``."""

COLLAPSED = "COLLAPSED"
"""The notification event of a job whose health verdict became ``collapsed`` (the other
events are the final states)."""


def utcnow() -> datetime:
    """Timezone-aware now (stored as UTC)."""
    return datetime.now(UTC)


def new_job_id() -> str:
    """A short, URL-safe, unique job id."""
    return f"job-{uuid.uuid4().hex[:16]}"


class SpecColumn(TypeDecorator[StoredSpec]):
    """A job's spec: JSON in the database, the typed `service.job_kinds.JobSpec` in Python."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: StoredSpec | None, dialect: Any) -> Any:
        return None if value is None else value.model_dump(mode="json")

    def process_result_value(self, value: Any, dialect: Any) -> StoredSpec | None:
        from service.job_kinds import parse_spec  # the table of kinds imports this module

        return None if value is None else parse_spec(value)


class Base(DeclarativeBase):
    """Declarative base of the service tables."""


class Job(Base):
    """One training job: what was asked, where it runs, how far it got."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("owner", "idempotency_key", name="uq_owner_idempotency"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(
        String(16), index=True, default=JobKind.TRAIN.value, server_default=JobKind.TRAIN.value
    )
    owner: Mapped[str] = mapped_column(String(128), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SHA-256 of the request that created the record (binds its Idempotency-Key)."""
    spec: Mapped[StoredSpec] = mapped_column(SpecColumn)
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ray_submission_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    progress_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    progress_health: Mapped[str | None] = mapped_column(String(16), nullable=True)
    progress_collapse_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_uris: Mapped[list[str]] = mapped_column(JSON, default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0", index=True)
    """Higher runs first; equal priorities run oldest first."""
    queue_reason: Mapped[str | None] = mapped_column(String(512), nullable=True)
    """Why a QUEUED job is still waiting (capacity, its owner's quota); None otherwise."""
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Submissions to Ray so far (or the coming one): a job Ray lost, or that its owner
    retried, runs again as the next attempt, resuming from its last checkpoint."""
    notify: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    """Webhook URLs told of the job's final state and collapse (None: none)."""

    @property
    def config(self) -> TrainConfig | SweepConfig:
        """The job's validated config: a TrainConfig, or a SweepConfig for a sweep."""
        return self.spec.config

    @property
    def job_state(self) -> JobState:
        """The state as the enum."""
        return JobState(self.state)


class Lease(Base):
    """A named lease: at most one holder at a time until it expires (leader election).

    The dispatcher holds ``dispatcher``, so several API processes on one store run one
    dispatcher between them and never exceed ``max_concurrent_jobs`` together.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Notification(Base):
    """One webhook notification of one event of a job: the outbox row its delivery works
    from (`service.notifications.Notifier`).

    ``next_attempt_at`` is when it is due; None once it is delivered or given up.
    """

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint(
            "job_id", "job_attempt", "event", "url", name="uq_notification_job_event_url"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # No foreign key: records are never deleted, and a key would tie every later batch
    # migration of ``jobs`` on SQLite to this table.
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    job_attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """The job's attempt the event belongs to: a retried job that fails again is told of
    again."""
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, index=True
    )
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


PayloadBuilder = Callable[[Job, str], dict[str, Any]]
"""Builds the body of a job's notification of an event (`service.notifications.payload`)."""


class IdempotencyConflictError(Exception):
    """Another request with the same owner and Idempotency-Key won the race."""


@dataclass(frozen=True)
class Page:
    """One page of a job listing."""

    items: list[Job]
    total: int


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the dispatcher
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; a SQLite file's directory is created when missing."""
    if url.startswith("sqlite"):
        database = url.split(":///", 1)[1] if ":///" in url else ""
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


MIGRATIONS = Path(__file__).parent / "migrations"


def migrate(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations on ``engine`` up to ``revision``."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def migrate_down(engine: Engine, revision: str) -> None:
    """Undo the Alembic migrations on ``engine`` down to ``revision`` (a rollback)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


class JobStore:
    """Create, read and update job records (and queue their notifications)."""

    def __init__(self, engine: Engine, payload: PayloadBuilder | None = None) -> None:
        """``payload`` builds notification bodies (default: one without links, which need
        the settings: `create_app` passes the settings' own)."""
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._payload = payload

    @classmethod
    def from_url(cls, url: str, payload: PayloadBuilder | None = None) -> JobStore:
        """A store on a new engine for ``url``."""
        return cls(make_engine(url), payload)

    def create_schema(self) -> None:
        """Bring the schema up to date (Alembic ``upgrade head``; a no-op when current)."""
        migrate(self.engine)

    def ping(self) -> None:
        """Raise when the database cannot answer a trivial query."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def add(self, job: Job) -> Job:
        """Insert a new record.

        Raises:
            IdempotencyConflictError: the owner already has a job with this key.
        """
        with self._sessions() as session:
            session.add(job)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                raise IdempotencyConflictError(job.idempotency_key) from None
        return job

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease ``name`` for ``ttl_s`` seconds; False when another
        holder's lease has not expired. Atomic (one conditional UPDATE, or an INSERT that
        the primary key makes fail for all but one contender)."""
        now = utcnow()
        expires = now + timedelta(seconds=ttl_s)
        with self.engine.begin() as connection:
            renewed = connection.execute(
                update(Lease)
                .where(Lease.name == name)
                .where((Lease.holder == holder) | (Lease.expires_at < now))
                .values(holder=holder, expires_at=expires)
            )
            if renewed.rowcount == 1:
                return True
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    insert(Lease).values(name=name, holder=holder, expires_at=expires)
                )
        except IntegrityError:
            return False  # held by someone else (or they won the race to create it)
        return True

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up now (if ``holder`` has it), so another takes over at once."""
        with self.engine.begin() as connection:
            connection.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))

    def get(self, job_id: str) -> Job | None:
        """The record of ``job_id``, if any."""
        with self._sessions() as session:
            return session.get(Job, job_id)

    def by_idempotency_key(self, owner: str, key: str) -> Job | None:
        """The owner's job created with Idempotency-Key ``key``, if any."""
        with self._sessions() as session:
            query = select(Job).where(Job.owner == owner, Job.idempotency_key == key)
            return session.scalars(query).first()

    def page(
        self, *, states: Sequence[JobState] = (), owner: str | None = None,
        kind: JobKind | None = None, offset: int = 0, limit: int = 50,
    ) -> Page:  # fmt: skip
        """Jobs newest first, optionally only in ``states`` / of ``owner`` / of ``kind``."""
        query = select(Job)
        if kind is not None:
            query = query.where(Job.kind == kind.value)
        if states:
            query = query.where(Job.state.in_([state.value for state in states]))
        if owner is not None:
            query = query.where(Job.owner == owner)
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            items = session.scalars(
                query.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit)
            ).all()
        return Page(list(items), total)

    def in_states(self, states: Sequence[JobState]) -> list[Job]:
        """Every job in ``states``, oldest first (dispatch order)."""
        query = (
            select(Job)
            .where(Job.state.in_([state.value for state in states]))
            .order_by(Job.created_at, Job.id)
        )
        with self._sessions() as session:
            return list(session.scalars(query).all())

    def queued_in_order(self) -> list[Job]:
        """QUEUED jobs in dispatch order: highest priority first, then oldest first."""
        query = (
            select(Job)
            .where(Job.state == JobState.QUEUED.value)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
        )
        with self._sessions() as session:
            return list(session.scalars(query).all())

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, zero included)."""
        with self._sessions() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts = dict.fromkeys(JobState, 0)
        for state, count in rows:
            counts[JobState(state)] = count
        return counts

    def update(self, job_id: str, **fields: Any) -> Job:
        """Set ``fields`` on a record (and ``updated_at``); returns the new record."""
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            collapses = (
                fields.get("progress_health") == "collapsed" and job.progress_health != "collapsed"
            )
            for key, value in fields.items():
                setattr(job, key, value)
            job.updated_at = utcnow()
            if collapses:  # the verdict and its notifications: one transaction
                self._queue_notifications(session.connection(), job, COLLAPSED)
            session.commit()
            return job

    def requeue(self, job_id: str, *, expected: Collection[JobState], **fields: Any) -> Job:
        """Put a job back in the queue as its next attempt: a compare-and-set from a state
        in ``expected`` (final states included: a retry leaves FAILED or CANCELLED).

        Returns the record after the attempt: QUEUED when the move happened.
        """
        values: dict[str, Any] = {
            "state": JobState.QUEUED.value,
            "updated_at": utcnow(),
            "attempts": Job.attempts + 1,
            "ray_submission_id": None,
            "finished_at": None,
            "cancel_requested": False,
            **fields,
        }
        with self.engine.begin() as connection:
            connection.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_([state.value for state in expected]))
                .values(**values)
            )
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def transition(
        self,
        job_id: str,
        state: JobState,
        *,
        expected: Collection[JobState] | None = None,
        **fields: Any,
    ) -> Job:
        """Move a job to ``state`` with its timestamps: a compare-and-set.

        The move happens only from a state in ``expected`` (any non-final state when
        None); a final state is never left. Returns the record after the attempt: the
        caller sees from its state whether the move happened.
        """
        allowed = [
            value.value
            for value in (expected if expected is not None else JobState)
            if not value.final
        ]
        now = utcnow()
        values: dict[str, Any] = {"state": state.value, "updated_at": now, **fields}
        if state is JobState.RUNNING:
            values["started_at"] = func.coalesce(Job.started_at, now)
        if state.final:
            values["finished_at"] = now
        with self.engine.begin() as connection:
            # One conditional UPDATE: atomic on every database, with no read-then-write race.
            moved = connection.execute(
                update(Job).where(Job.id == job_id, Job.state.in_(allowed)).values(**values)
            )
            if state.final and moved.rowcount == 1:  # only the one move into it notifies
                with Session(bind=connection) as session:
                    final = session.get(Job, job_id)
                assert final is not None
                self._queue_notifications(connection, final, state.value)
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def _queue_notifications(self, connection: Connection, job: Job, event: str) -> None:
        """Outbox rows for ``event`` of ``job``, one per URL it has not had one for yet,
        due now (in the caller's transaction)."""
        if not job.notify:
            return
        done = set(
            connection.scalars(
                select(Notification.url).where(
                    Notification.job_id == job.id,
                    Notification.job_attempt == job.attempts,
                    Notification.event == event,
                )
            )
        )
        urls = [url for url in job.notify if url not in done]
        if not urls:
            return
        try:
            if self._payload is None:
                from service.notifications import payload  # it imports this module

                body = payload(job, event, None)
            else:
                body = self._payload(job, event)
        except Exception:  # a bug there must not stop a job from being recorded final
            log.exception("notification payload of %s %s failed", job.id, event)
            body = {"text": f"klssl job {job.id}: {event}", "event": event, "job_id": job.id,
                    "state": job.state}  # fmt: skip
        now = utcnow()
        connection.execute(
            insert(Notification),
            [
                {"job_id": job.id, "job_attempt": job.attempts, "event": event, "url": url,
                 "payload": body,
                 "attempts": 0, "created_at": now, "next_attempt_at": now}
                for url in urls
            ],
        )  # fmt: skip

    def notifications(self, job_id: str) -> list[Notification]:
        """The notifications of a job, in the order they were queued."""
        with self._sessions() as session:
            query = (
                select(Notification).where(Notification.job_id == job_id).order_by(Notification.id)
            )
            return list(session.scalars(query).all())

    def due_notifications(self, now: datetime, limit: int) -> list[Notification]:
        """Up to ``limit`` undelivered notifications due at ``now``, the longest-due first."""
        query = (
            select(Notification)
            .where(Notification.next_attempt_at.is_not(None))
            .where(Notification.next_attempt_at <= now)
            .order_by(Notification.next_attempt_at, Notification.id)
            .limit(limit)
        )
        with self._sessions() as session:
            return list(session.scalars(query).all())

    def claim_notification(self, row: Notification, until: datetime) -> bool:
        """Hold a due notification until ``until`` before sending it: a compare-and-set on
        its ``next_attempt_at``, so no other sender takes it meanwhile (if the sender dies,
        it is due again then). False when another sender claimed or settled it first."""
        with self.engine.begin() as connection:
            claimed = connection.execute(
                update(Notification)
                .where(Notification.id == row.id)
                .where(Notification.next_attempt_at == row.next_attempt_at)
                .values(next_attempt_at=until)
            )
        return claimed.rowcount == 1

    def settle_notification(
        self,
        notification_id: int,
        *,
        attempts: int,
        next_attempt_at: datetime | None,
        delivered_at: datetime | None = None,
        last_error: str | None = None,
    ) -> None:
        """Record an attempt: delivered, due again at ``next_attempt_at``, or (both None)
        given up."""
        with self.engine.begin() as connection:
            connection.execute(
                update(Notification)
                .where(Notification.id == notification_id)
                .values(
                    attempts=attempts,
                    next_attempt_at=next_attempt_at,
                    delivered_at=delivered_at,
                    last_error=last_error,
                )
            )
