"""The config and sweep bounds over HTTP: absurd values and infinities are a 422 naming the field.

The bounds live in `trainer.config` and `tuning.config`; these requests go through the
real app (a fake Ray cluster, SQLite stores) as a client's would, raw JSON text included
(``1e999`` and ``Infinity`` are what a hostile client sends, not Python floats).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ALICE, TOKENS, FakeRay, job_body


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    (tmp_path / "data").mkdir()
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage_path=str(tmp_path / "storage"),
        api_tokens=TOKENS,
        allowed_data_roots=[tmp_path / "data"],
        max_concurrent_jobs=2,
        ray_address="http://127.0.0.1:1",
    )
    app = create_app(settings, ray_client=FakeRay(), run_dispatcher=False)
    with TestClient(app) as test_client:
        yield test_client


def post_text(client: TestClient, route: str, text: str) -> Any:
    headers = {**ALICE, "Content-Type": "application/json"}
    return client.post(route, content=text, headers=headers)


def with_token(body: dict[str, Any], path: list[str], token: str) -> str:
    """``body`` as JSON text with the value at ``path`` replaced by a raw JSON token."""
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "__RAW__"
    return json.dumps(body).replace('"__RAW__"', token)


@pytest.mark.parametrize(
    ("path", "token", "reason"),
    [
        (["optim", "lr"], "1e999", "finite number"),
        (["runtime", "cpus_per_worker"], "Infinity", "finite number"),
        (["objective", "num_clusters"], "1000000000", "less than or equal to 1048576"),
        (["runtime", "max_failures"], "-1", "greater than or equal to 0"),
        (["model", "backbone_kwargs"], '{"checkpoint_path": "/etc/passwd"}', "names a file"),
    ],
)
def test_absurd_job_configs_are_a_422_naming_the_field(
    client: TestClient, path: list[str], token: str, reason: str
) -> None:
    text = with_token(job_body("bounds"), ["config", *path], token)
    response = post_text(client, "/v1/jobs", text)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "config", *path]
    assert reason in problem["msg"]


def test_absurd_sweeps_are_a_422_naming_the_field(client: TestClient) -> None:
    base = job_body("bounds")["config"]
    grid = {"type": "grid", "values": list(range(1, 1001))}
    huge_grid = {"base": base, "space": {"runtime.seed": grid, "data.batch_size": grid}}
    response = post_text(client, "/v1/sweeps", json.dumps({"config": huge_grid}))
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "config", "space"]
    assert "1000000 trials, more than 10000" in problem["msg"]
    temp = {"type": "loguniform", "low": 0.02, "high": 0.1}
    many = {"base": base, "space": {"objective.teacher_temp": temp}, "num_samples": 10**12}
    response = post_text(client, "/v1/sweeps", json.dumps({"config": many}))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "config", "num_samples"]
