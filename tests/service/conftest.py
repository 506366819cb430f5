"""Fixtures of the service unit tests: a fake Ray cluster, a real (SQLite) MLflow store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.deps import Services
from service.ray_jobs import RayJobNotFoundError, RayJobStatus, RayUnavailableError
from service.settings import Settings
from service.store import JobState
from service.tracking import Tracking
from tests.factories import tiny_config

TOKENS = {"token-alice-0123456789": "alice", "token-bob-9876543210": "bob"}
ALICE = {"Authorization": "Bearer token-alice-0123456789"}
BOB = {"Authorization": "Bearer token-bob-9876543210"}


class FakeRay:
    """An in-memory stand-in for Ray's Jobs API (our logic's tests only)."""

    def __init__(self) -> None:
        self.jobs: dict[str, RayJobStatus] = {}
        self.submissions: list[dict[str, Any]] = []
        self.stopped: list[str] = []
        self.log_text: dict[str, str] = {}
        self.available = True

    def _check(self) -> None:
        if not self.available:
            raise RayUnavailableError("connection refused")

    def ping(self) -> None:
        self._check()

    def submit(
        self, submission_id: str, *, module: str, spec_json: str, env: dict[str, str]
    ) -> None:
        self._check()
        if submission_id in self.jobs:
            return
        self.submissions.append(
            {"id": submission_id, "module": module, "spec_json": spec_json, "env": env}
        )
        self.jobs[submission_id] = RayJobStatus(JobState.PENDING)

    def status(self, submission_id: str) -> RayJobStatus:
        self._check()
        if submission_id not in self.jobs:
            raise RayJobNotFoundError(submission_id)
        return self.jobs[submission_id]

    def logs(self, submission_id: str) -> str:
        self._check()
        if submission_id not in self.jobs:
            raise RayJobNotFoundError(submission_id)
        return self.log_text.get(submission_id, "")

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        """What Ray's websocket does: the log from its start, then what is new, until the
        job is final; `available = False` drops the connection."""
        sent = 0
        while True:
            self._check()
            if submission_id not in self.jobs:
                raise RayJobNotFoundError(submission_id)
            text = self.log_text.get(submission_id, "")
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if self.jobs[submission_id].state.final:
                return
            await asyncio.sleep(0.01)

    def stop(self, submission_id: str) -> None:
        self._check()
        if submission_id not in self.jobs:
            raise RayJobNotFoundError(submission_id)
        self.stopped.append(submission_id)
        self.jobs[submission_id] = RayJobStatus(JobState.CANCELLED)

    def set(self, submission_id: str, state: JobState, message: str | None = None) -> None:
        """What the cluster does on its own: move a job to ``state``."""
        self.jobs[submission_id] = RayJobStatus(state, message)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store for the whole session (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """An allowed data root holding one dataset folder."""
    root = tmp_path / "data"
    (root / "images" / "class0").mkdir(parents=True)
    return root


@pytest.fixture
def settings(tmp_path: Path, mlflow_uri: str, data_root: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        mlflow_tracking_uri=mlflow_uri,
        storage_path=str(tmp_path / "storage"),
        api_tokens=TOKENS,
        allowed_data_roots=[data_root],
        max_concurrent_jobs=2,
        ray_address="http://127.0.0.1:1",
        capacity_wait_s=90,
    )


@pytest.fixture
def fake_ray() -> FakeRay:
    return FakeRay()


@pytest.fixture
def app(settings: Settings, fake_ray: FakeRay) -> FastAPI:
    return create_app(settings, ray_client=fake_ray, run_dispatcher=False)


@pytest.fixture
def services(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


@pytest.fixture
def tracking(services: Services) -> Tracking:
    return services.tracking


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:  # runs the lifespan (without the dispatcher loop)
        yield test_client


def job_body(name: str = "svc-test", **sections: dict[str, Any]) -> dict[str, Any]:
    """A request body with a tiny digits config."""
    return {"config": tiny_config(name, **sections).model_dump(mode="json")}
