"""The native mirror of the compose topology: two Ray nodes, PostgreSQL, shared storage.

Like ``docker compose up --scale ray-worker=1``, but with native processes: a Ray head
and a second Ray node (one CPU each), MLflow and the job store both on a PostgreSQL
server (Debian's package, started here), checkpoints on a directory both nodes share.
A 2-worker job goes through the REST API and must run one worker on each node.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from service.localstack.processes import wait_for
from service.localstack.stack import LocalStack, StackInfo, StackOptions
from tests.e2e.postgres import Postgres, postgres_server
from tests.e2e.test_service_e2e import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[StackInfo, Postgres, Path]]:
    base = Path(tempfile.mkdtemp(prefix="klssl-mn-", dir="/tmp"))
    try:
        with postgres_server(base, databases=("klssl", "mlflow")) as postgres:
            options = StackOptions.on_free_ports(
                base / "state",
                head_cpus=1,
                extra_nodes=1,
                node_cpus=1,
                database_url=postgres.url("klssl"),
                mlflow_backend_uri=postgres.url("mlflow"),
                storage_path=str(base / "shared-checkpoints"),
                dispatch_interval_s=1.0,
            )
            stack = LocalStack(options)
            try:
                yield stack.up(report=lambda _: None), postgres, base
            finally:
                stack.down()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def ray_get(info: StackInfo, path: str) -> Any:
    headers = {"Authorization": f"Bearer {info.ray_token}"}
    response = httpx.get(f"{info.dashboard_url}{path}", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()


def test_a_two_worker_job_spreads_over_both_nodes(
    cluster: tuple[StackInfo, Postgres, Path],
) -> None:
    info, postgres, base = cluster
    nodes = ray_get(info, "/nodes?view=summary")["data"]["summary"]
    assert len([node for node in nodes if node["raylet"]["state"] == "ALIVE"]) == 2

    config = tiny_config("e2e-multinode")
    config["runtime"].update(num_workers=2, placement_strategy="STRICT_SPREAD")
    headers = {"Authorization": f"Bearer {info.api_token}"}
    with httpx.Client(base_url=info.api_url, headers=headers, timeout=30) as http:
        created = http.post("/v1/jobs", json={"config": config})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        job: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal job
            job = http.get(f"/v1/jobs/{job_id}").json()
            return job["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}

        wait_for(f"job {job_id}", finished, timeout=300, every=2.0)
    assert job["state"] == "SUCCEEDED", job

    actors = ray_get(info, "/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    workers = [actor for actor in actors if "RayTrainWorker" in actor["class_name"]]
    assert len({actor["node_id"] for actor in workers}) == 2, workers

    # Records and runs are in PostgreSQL; the checkpoint is on the shared storage.
    with psycopg.connect(f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/klssl") as db:
        row = db.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("SUCCEEDED",)
    with psycopg.connect(f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/mlflow") as db:
        runs = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (job["mlflow_run_id"],))
        assert runs.fetchone() == ("FINISHED",)
    run = MlflowClient(info.mlflow_url).get_run(job["mlflow_run_id"])
    assert run.data.tags["klssl.workers"] == "2" and "knn_top1" in run.data.metrics
    assert job["checkpoint_uris"]
    checkpoint = Path(job["checkpoint_uris"][-1].removeprefix("file://"))
    assert checkpoint.is_relative_to(base / "shared-checkpoints") and checkpoint.is_dir()
