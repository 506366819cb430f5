"""The control plane end to end over HTTP: uvicorn, a real Ray head, a real MLflow server.

One Ray head (``ray start --head`` on loopback, token authentication on, 2 CPUs) and one
MLflow tracking server (SQLite backend) serve the whole module; the API runs in its own
uvicorn process so it can be restarted mid-job. Every process started here is stopped
by its pid (or its own process group), never by name.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from service.processes import clean_env, free_port, spawn, stop_tree, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY_TOKEN = "klssl-e2e-ray-token-8c1d6f2a9b3e4d7f0a5c"
API_TOKEN = "klssl-e2e-api-token-alice-3f9a"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def tiny_config(name: str, epochs: int = 1) -> dict[str, Any]:
    """A digits run that trains in well under a minute on two cores."""
    return {
        "name": name,
        "data": {
            "kind": "digits", "max_samples": 96, "global_crop_size": 16, "local_crop_size": 8,
            "num_local_crops": 2, "batch_size": 32,
        },
        "model": {
            "backbone": "vit_tiny_patch16_224", "patch_size": 4, "backbone_kwargs": {"depth": 1},
            "head_hidden_dim": 32, "head_bottleneck_dim": 16, "head_layers": 2,
        },
        "objective": {"num_clusters": 32},
        "schedule": {"epochs": epochs, "warmup_epochs": 0},
        "eval": {"knn_k": [5]},
        "runtime": {"device": "cpu", "log_every_steps": 1},
    }  # fmt: skip


@dataclass
class Stack:
    """The processes of the module and how to reach them."""

    base: Path
    ray_ports: dict[str, int]
    dashboard_url: str
    mlflow_url: str
    api_url: str
    api_env: dict[str, str]
    data_root: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.processes[name] = spawn(args, env=env, cwd=self.base, log=self.base / f"{name}.log")

    def start_ray(self) -> None:
        ports = self.ray_ports
        self.start(
            "ray",
            [
                str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
                "--ray-client-server-port", str(ports["client"]),
                "--dashboard-agent-listen-port", str(ports["agent_http"]),
                "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
                "--runtime-env-agent-port", str(ports["runtime_env"]),
                "--metrics-export-port", str(ports["metrics"]),
                "--num-cpus", "2", "--temp-dir", str(self.base / "ray"),
                "--include-dashboard", "true",
            ],
            clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN),
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {RAY_TOKEN}"}
        wait_for(
            "Ray dashboard",
            lambda: httpx.get(f"{self.dashboard_url}/api/jobs/", headers=headers).is_success,
            timeout=120,
        )

    def stop(self, name: str) -> None:
        stop_tree(self.processes.pop(name))

    def start_api(self) -> None:
        port = self.api_url.rsplit(":", 1)[1]
        self.start(
            "api",
            [
                str(BIN / "uvicorn"), "--factory", "service.app:app_from_env",
                "--host", "127.0.0.1", "--port", port, "--app-dir", str(REPO),
            ],
            self.api_env,
        )  # fmt: skip
        wait_for("API", lambda: httpx.get(f"{self.api_url}/healthz").is_success, timeout=60)

    def ray_client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(
            self.dashboard_url, headers={"Authorization": f"Bearer {RAY_TOKEN}"}
        )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="klssl-e2e-", dir="/tmp"))  # short: Ray's sockets
    names = ("gcs", "dashboard", "client", "agent_http", "agent_grpc", "runtime_env", "metrics")
    ray_ports = {name: free_port() for name in names}
    mlflow_port, api_port = free_port(), free_port()
    data_root = base / "data"
    (data_root / "images" / "a").mkdir(parents=True)
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    dashboard_url = f"http://127.0.0.1:{ray_ports['dashboard']}"
    api_env = clean_env(
        KLSSL_DATABASE_URL=f"sqlite:///{base / 'jobs.db'}",
        KLSSL_RAY_ADDRESS=dashboard_url,
        KLSSL_RAY_AUTH_TOKEN=RAY_TOKEN,
        KLSSL_MLFLOW_TRACKING_URI=mlflow_url,
        KLSSL_STORAGE_PATH=str(base / "storage"),
        KLSSL_API_TOKENS=f'{{"{API_TOKEN}": "alice"}}',
        KLSSL_ALLOWED_DATA_ROOTS=f'["{data_root}"]',
        KLSSL_MAX_CONCURRENT_JOBS="2",
        KLSSL_DISPATCH_INTERVAL_S="1",
    )
    stack = Stack(
        base, ray_ports, dashboard_url, mlflow_url, f"http://127.0.0.1:{api_port}", api_env,
        data_root,
    )  # fmt: skip
    try:
        stack.start(
            "mlflow",
            [
                str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                "--artifacts-destination", str(base / "mlartifacts"), "--workers", "1",
            ],
            clean_env(),
        )  # fmt: skip
        stack.start_ray()
        wait_for("MLflow", lambda: httpx.get(f"{mlflow_url}/health").is_success, timeout=120)
        stack.start_api()
        yield stack
    finally:
        for name in list(stack.processes):
            stack.stop(name)
        shutil.rmtree(base, ignore_errors=True)


def api(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.api_url, headers=AUTH, timeout=30)


def wait_state(http: httpx.Client, job_id: str, states: set[str], timeout: float) -> dict[str, Any]:
    job: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal job
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job["state"] in states

    try:
        wait_for(f"job {job_id} in {states}", reached, timeout, every=1.0)
    except TimeoutError:
        raise AssertionError(f"job stuck: {job}") from None
    return job


def test_ready_with_every_dependency(stack: Stack) -> None:
    with api(stack) as http:
        ready = http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert {name: check["ok"] for name, check in ready.json()["checks"].items()} == {
        "database": True,
        "ray": True,
        "mlflow": True,
    }


def test_a_job_survives_an_api_restart_and_succeeds_with_mlflow_metrics(stack: Stack) -> None:
    with api(stack) as http:
        created = http.post("/v1/jobs", json={"config": tiny_config("e2e-success")})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        run_id = created.json()["mlflow_run_id"]
        assert run_id and created.headers["Location"] == f"/v1/jobs/{job_id}"
        wait_state(http, job_id, {"RUNNING"} | FINAL, timeout=90)
    stack.stop("api")  # mid-job: the record is in the database, the job in Ray
    stack.start_api()
    with api(stack) as http:
        job = wait_state(http, job_id, FINAL, timeout=150)
        assert job["state"] == "SUCCEEDED", job
        assert job["progress"]["epoch"] == 1
        assert "effective_clusters" in job["progress"]["metrics"]
        assert job["checkpoint_uris"] and job["checkpoint_uris"][0].endswith("epoch_0001")
        history = http.get(f"/v1/jobs/{job_id}/metrics").json()["metrics"]
        assert len(history["loss"]) >= 3
        logs = http.get(f"/v1/jobs/{job_id}/logs").text
        assert "k-NN top-1" in logs
        with http.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as stream:
            events = stream.read().decode()
        assert "event: log" in events and '"state": "SUCCEEDED"' in events
    run = MlflowClient(stack.mlflow_url).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["klssl.job_id"] == job_id
    assert "knn_top1" in run.data.metrics
    assert stack.ray_client().get_job_status(f"klssl-{job_id}").value == "SUCCEEDED"


def test_cancel_a_running_job_stops_it_in_ray(stack: Stack) -> None:
    with api(stack) as http:
        body = {"config": tiny_config("e2e-cancel", epochs=500)}
        headers = {"Idempotency-Key": "e2e-cancel-1"}
        first = http.post("/v1/jobs", json=body, headers=headers)
        second = http.post("/v1/jobs", json=body, headers=headers)
        assert first.status_code == second.status_code == 202
        job_id = first.json()["id"]
        assert second.json()["id"] == job_id  # the retry is the same job
        wait_state(http, job_id, {"RUNNING"}, timeout=90)
        cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    ray = stack.ray_client()
    wait_for(
        "Ray to stop the job",
        lambda: ray.get_job_status(f"klssl-{job_id}").value == "STOPPED",
        timeout=60,
    )
    submissions = [job for job in ray.list_jobs() if job.submission_id == f"klssl-{job_id}"]
    assert len(submissions) == 1
    run = MlflowClient(stack.mlflow_url).get_run(first.json()["mlflow_run_id"])
    assert run.info.status == "KILLED"


def test_bad_input_is_a_422_and_creates_nothing(stack: Stack) -> None:
    outside = stack.base / "outside"
    outside.mkdir(exist_ok=True)
    cases = {
        "objective.teacher_temp": ("objective", {"teacher_temp": -0.04}),
        "schedule.teacher_momentum": ("schedule", {"teacher_momentum": 1.5}),
        "model.backbone": ("model", {"backbone": "vit_tiny_patch16_2240"}),
        "data.path": ("data", {"kind": "imagefolder", "path": str(stack.base / "missing")}),
    }
    ray_jobs_before = len(stack.ray_client().list_jobs())
    with api(stack) as http:
        total = http.get("/v1/jobs").json()["total"]
        bodies = []
        for section, fields in cases.values():
            config = tiny_config("e2e-bad")
            config[section].update(fields)
            bodies.append(config)
        outside_config = tiny_config("e2e-bad")
        outside_config["data"].update(kind="imagefolder", path=str(outside))
        bodies.append(outside_config)
        for field_path, config in zip([*cases, "data.path"], bodies, strict=True):
            response = http.post("/v1/jobs", json={"config": config})
            assert response.status_code == 422, response.text
            locations = [".".join(map(str, item["loc"][2:])) for item in response.json()["detail"]]
            assert field_path in locations
        assert http.get("/v1/jobs").json()["total"] == total
        assert http.post("/v1/jobs", json={"config": tiny_config("x")}, headers={
            "Authorization": "Bearer wrong"}).status_code == 401  # fmt: skip
        assert http.get("/v1/jobs/job-unknown").status_code == 404
    assert MlflowClient(stack.mlflow_url).get_experiment_by_name("e2e-bad") is None
    assert len(stack.ray_client().list_jobs()) == ray_jobs_before


def test_without_ray_readiness_fails_and_jobs_wait_queued_until_it_returns(stack: Stack) -> None:
    stack.stop("ray")
    with api(stack) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert not checks["ray"]["ok"] and checks["database"]["ok"] and checks["mlflow"]["ok"]
        job_id = http.post("/v1/jobs", json={"config": tiny_config("e2e-queued")}).json()["id"]
        time.sleep(3)  # several dispatcher rounds
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "QUEUED"
        stack.start_ray()
        wait_state(http, job_id, {"PENDING", "RUNNING"} | FINAL, timeout=60)
        assert http.get("/readyz").status_code == 200
        http.post(f"/v1/jobs/{job_id}/cancel")
