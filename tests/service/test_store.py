"""The job store: migrations match the models, idempotency keys are unique per owner."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.store import (
    Base,
    IdempotencyConflictError,
    Job,
    JobState,
    JobStore,
    migrate,
    migrate_down,
    new_job_id,
    utcnow,
)
from trainer.config import TrainConfig
from trainer.spec import TrainJobSpec


def record(owner: str = "alice", key: str | None = None) -> Job:
    now = utcnow()
    return Job(
        id=new_job_id(), name="n", owner=owner, idempotency_key=key,
        spec=TrainJobSpec(config=TrainConfig(), owner=owner), tags={},
        state=JobState.QUEUED.value, created_at=now, updated_at=now, progress_metrics={},
        checkpoint_uris=[], cancel_requested=False,
    )  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    store = JobStore.from_url(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    return store


def test_migrations_build_exactly_the_models_schema(store: JobStore) -> None:
    migrate(store.engine)  # a second upgrade is a no-op
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == "0008"
        assert compare_metadata(context, Base.metadata) == []


def test_the_job_spec_migration_keeps_every_record_typed(tmp_path: Path) -> None:
    """0004 turns a stored bare config into the typed spec and back (downgrade)."""
    from sqlalchemy import text

    from service.store import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    migrate(engine, "0003")
    config = TrainConfig(name="old").model_dump(mode="json")
    now = utcnow().isoformat()
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (id, name, kind, owner, config, tags, state, created_at,"
                " updated_at, mlflow_run_id, progress_metrics, checkpoint_uris,"
                " cancel_requested) VALUES ('job-1', 'old', 'train', 'alice', :config, '{}',"
                " 'QUEUED', :now, :now, 'run-1', '{}', '[]', 0)"
            ),
            {"config": json.dumps(config), "now": now},
        )
    migrate(engine)
    job = JobStore(engine).get("job-1")
    assert job is not None and isinstance(job.spec, TrainJobSpec)
    assert job.config == TrainConfig(name="old")
    assert (job.spec.job_id, job.spec.owner, job.spec.mlflow_run_id) == ("job-1", "alice", "run-1")
    migrate_down(engine, "0003")
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT config FROM jobs")).scalar_one()
    assert json.loads(stored) == config


def test_idempotency_keys_are_unique_per_owner(store: JobStore) -> None:
    store.add(record(key="k"))
    store.add(record(owner="bob", key="k"))
    store.add(record(key=None))
    store.add(record(key=None))
    with pytest.raises(IdempotencyConflictError):
        store.add(record(key="k"))


def test_final_states_are_never_left(store: JobStore) -> None:
    job = store.add(record())
    store.transition(job.id, JobState.RUNNING)
    done = store.transition(job.id, JobState.SUCCEEDED)
    assert done.finished_at is not None and done.started_at is not None
    assert store.transition(job.id, JobState.FAILED).state == "SUCCEEDED"
    assert store.count_by_state()[JobState.SUCCEEDED] == 1


def test_a_lease_has_one_holder_until_it_expires_or_is_released(store: JobStore) -> None:
    assert store.acquire_lease("dispatcher", "a", ttl_s=60)
    assert not store.acquire_lease("dispatcher", "b", ttl_s=60)
    assert store.acquire_lease("dispatcher", "a", ttl_s=60)  # renewal
    store.release_lease("dispatcher", "b")  # not b's to release: nothing happens
    assert not store.acquire_lease("dispatcher", "b", ttl_s=60)
    store.release_lease("dispatcher", "a")
    assert store.acquire_lease("dispatcher", "b", ttl_s=0.2)
    assert not store.acquire_lease("dispatcher", "a", ttl_s=60)
    time.sleep(0.4)  # b's lease expires: b died, a takes over
    assert store.acquire_lease("dispatcher", "a", ttl_s=60)
    assert not store.acquire_lease("dispatcher", "b", ttl_s=60)


def test_the_notifications_migration_upgrades_a_v0006_store(tmp_path: Path) -> None:
    """0007 adds ``jobs.notify`` (NULL for older records) and the outbox table; a
    downgrade removes both and keeps the records."""
    from sqlalchemy import inspect, text

    from service.store import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'v6.db'}")
    migrate(engine, "0006")
    spec = TrainJobSpec(config=TrainConfig(name="old"), owner="alice")
    now = utcnow().isoformat()
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO jobs (id, name, kind, owner, spec, tags, state, created_at,"
                " updated_at, progress_metrics, checkpoint_uris, cancel_requested)"
                " VALUES ('job-6', 'old', 'train', 'alice', :spec, '{}', 'RUNNING', :now,"
                " :now, '{}', '[]', 0)"
            ),
            {"spec": spec.model_dump_json(), "now": now},
        )
    migrate(engine)
    store = JobStore(engine)
    job = store.get("job-6")
    assert job is not None and job.notify is None and job.config.name == "old"
    assert store.transition("job-6", JobState.SUCCEEDED).state == "SUCCEEDED"
    assert store.notifications("job-6") == []  # it asked for none
    migrate_down(engine, "0006")
    tables = inspect(engine).get_table_names()
    assert "notifications" not in tables
    assert "notify" not in {column["name"] for column in inspect(engine).get_columns("jobs")}
    with engine.connect() as connection:
        assert connection.execute(text("SELECT state FROM jobs")).scalar_one() == "SUCCEEDED"


def test_each_event_of_a_job_is_queued_once_per_url(store: JobStore) -> None:
    job = record()
    job.notify = ["https://hooks.example.com/a", "https://hooks.example.com/b"]
    store.add(job)
    store.update(job.id, progress_health="ok")
    assert store.notifications(job.id) == []
    for _ in range(2):
        store.update(job.id, progress_health="collapsed", progress_collapse_step=40)
    store.update(job.id, progress_health="ok")
    store.update(job.id, progress_health="collapsed")  # collapsed again: already told
    store.transition(job.id, JobState.RUNNING)
    store.transition(job.id, JobState.FAILED, error="boom")
    store.transition(job.id, JobState.CANCELLED)  # a final state is never left: no event
    rows = store.notifications(job.id)
    assert [(row.event, row.url[-1]) for row in rows] == [
        ("COLLAPSED", "a"), ("COLLAPSED", "b"), ("FAILED", "a"), ("FAILED", "b"),
    ]  # fmt: skip
    failed = rows[2].payload
    assert (failed["event"], failed["state"], failed["error"]) == ("FAILED", "FAILED", "boom")
    assert failed["mlflow_run_url"] is None  # a store without settings has no links
    assert all(row.next_attempt_at is not None and row.attempts == 0 for row in rows)
