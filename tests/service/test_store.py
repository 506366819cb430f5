"""The job store: migrations match the models, idempotency keys are unique per owner."""

from __future__ import annotations

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
    new_job_id,
    utcnow,
)


def record(owner: str = "alice", key: str | None = None) -> Job:
    now = utcnow()
    return Job(
        id=new_job_id(), name="n", owner=owner, idempotency_key=key, config={}, tags={},
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
        assert context.get_current_revision() == "0003"
        assert compare_metadata(context, Base.metadata) == []


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
