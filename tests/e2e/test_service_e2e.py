"""The control plane end to end over HTTP: uvicorn, a real Ray head, a real MLflow server.

The module's stack is the local stack of ``klssl up`` (`service.localstack.stack.LocalStack`): a Ray
head on loopback with token authentication and 2 CPUs, an MLflow tracking server (SQLite
backend) and the API in its own uvicorn process, so that each can be stopped and started
again mid-job. Every process is stopped by its pid (and process group), never by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from service.localstack.processes import wait_for
from service.localstack.stack import API, HEAD, LocalStack, StackInfo, StackOptions

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

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
    """The running local stack and how to reach it."""

    local: LocalStack
    info: StackInfo
    base: Path

    @property
    def api_url(self) -> str:
        return self.info.api_url

    @property
    def mlflow_url(self) -> str:
        return self.info.mlflow_url

    def restart(self, name: str, *, stopped_for: float = 0.0) -> None:
        """Stop ``name``, keep it down ``stopped_for`` seconds, start it, wait until healthy."""
        self.local.stop(name)
        time.sleep(stopped_for)
        self.local.start(name, self.info)
        self.local.wait_healthy(name, self.info)

    def ray_client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.info.ray_token}"}
        return JobSubmissionClient(self.info.dashboard_url, headers=headers)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="klssl-e2e-", dir="/tmp"))  # short: Ray's sockets
    data_root = base / "data"
    (data_root / "images" / "a").mkdir(parents=True)
    options = StackOptions.on_free_ports(
        base / "state",
        head_cpus=2,
        data_roots=(data_root,),
        max_concurrent_jobs=2,
        dispatch_interval_s=1.0,
    )
    local = LocalStack(options)
    try:
        info = local.up(report=lambda _: None)
        yield Stack(local, info, base)
    finally:
        local.down()
        shutil.rmtree(base, ignore_errors=True)


def api(stack: Stack) -> httpx.Client:
    headers = {"Authorization": f"Bearer {stack.info.api_token}"}
    return httpx.Client(base_url=stack.api_url, headers=headers, timeout=30)


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
        body = {
            "config": tiny_config("e2e-success"),
            "register_as": "e2e-backbone",
            "register_alias": "champion",
        }
        created = http.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        run_id = created.json()["mlflow_run_id"]
        assert run_id and created.headers["Location"] == f"/v1/jobs/{job_id}"
        wait_state(http, job_id, {"RUNNING"} | FINAL, timeout=90)
    stack.restart(API)  # mid-job: the record is in the database, the job in Ray
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
    client = MlflowClient(stack.mlflow_url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # Registered over REST as --register-as does: the version is this run's backbone.
    assert client.get_model_version_by_alias("e2e-backbone", "champion").run_id == run_id
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
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLING"
        # CANCELLED only once Ray reports the job ended.
        wait_state(http, job_id, {"CANCELLED"}, timeout=90)
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    ray = stack.ray_client()
    assert ray.get_job_status(f"klssl-{job_id}").value in ("STOPPED", "FAILED")
    submissions = [job for job in ray.list_jobs() if job.submission_id == f"klssl-{job_id}"]
    assert len(submissions) == 1
    run = MlflowClient(stack.mlflow_url).get_run(first.json()["mlflow_run_id"])
    assert run.info.status == "KILLED"


def test_a_cancel_right_after_submit_stops_the_run(stack: Stack) -> None:
    """Finding 5 of issue 11: immediate cancels once let training run to its end."""
    with api(stack) as http:
        job_ids = []
        for index in range(3):
            body = {"config": tiny_config(f"e2e-quick-cancel-{index}", epochs=50)}
            job_id = http.post("/v1/jobs", json=body).json()["id"]
            assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
            job_ids.append(job_id)
        for job_id in job_ids:
            job = wait_state(http, job_id, {"CANCELLED"}, timeout=180)
            run = MlflowClient(stack.mlflow_url).get_run(job["mlflow_run_id"])
            assert run.info.status == "KILLED"
            # It never trained to its end: no final evaluation was logged.
            assert "knn_top1" not in run.data.metrics, run.data.metrics


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


def test_a_ray_head_restart_requeues_its_job_which_resumes_from_its_checkpoint(
    stack: Stack,
) -> None:
    """Ray loses a running job with its head: the job runs again as attempt 2, resumes
    from its last (mid-epoch) checkpoint into the same MLflow run (each metric step once)
    and succeeds; a job submitted while Ray is down waits QUEUED until it returns."""
    config = tiny_config("e2e-lost", epochs=3)
    config["data"]["max_samples"] = 640  # 20 steps per epoch: the head stops mid-run
    config["runtime"]["checkpoint_every_steps"] = 4
    with api(stack) as http:
        lost = http.post("/v1/jobs", json={"config": config})
        lost_id, run_id = lost.json()["id"], lost.json()["mlflow_run_id"]

        def checkpointed() -> bool:
            # Two: Ray Train's controller records a checkpoint (what a new driver resumes
            # from) a moment after the worker reported it; by the second, the first is.
            return len(http.get(f"/v1/jobs/{lost_id}").json()["checkpoint_uris"]) >= 2

        wait_for("two checkpoints", checkpointed, 180, every=0.5)
        stack.local.stop(HEAD)  # the head, its job table and the job's driver go away
        ready = http.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert not checks["ray"]["ok"] and checks["database"]["ok"] and checks["mlflow"]["ok"]
        job_id = http.post("/v1/jobs", json={"config": tiny_config("e2e-queued")}).json()["id"]
        time.sleep(3)  # several dispatcher rounds
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "QUEUED"
        assert http.get(f"/v1/jobs/{lost_id}").json()["state"] == "RUNNING"  # unknown yet
        stack.restart(HEAD)
        resumed = wait_state(http, lost_id, FINAL, timeout=300)
        assert resumed["state"] == "SUCCEEDED" and resumed["attempts"] == 2, resumed
        assert resumed["progress"]["epoch"] == 3
        wait_state(http, job_id, {"PENDING", "RUNNING"} | FINAL, timeout=60)
        assert http.get("/readyz").status_code == 200
        http.post(f"/v1/jobs/{job_id}/cancel")
    client = MlflowClient(stack.mlflow_url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["klssl.resumed_from_step"]) >= 4  # not started over
    steps = [metric.step for metric in client.get_metric_history(run_id, "loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 3 * 20  # 640 // 32 steps an epoch


def sweep_config(name: str, epochs: int, samples: int) -> dict[str, Any]:
    """A grid-free random sweep of the tiny digits run over the teacher temperature."""
    return {
        "base": tiny_config(name, epochs=epochs),
        "space": {
            "objective.teacher_temp": {"type": "uniform", "low": 0.03, "high": 0.07},
            "objective.prior_momentum": {"type": "choice", "values": [0.9, 0.99]},
        },
        "num_samples": samples,
        "seed": 0,
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    }


def klssl(stack: Stack, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The ``klssl`` CLI against the stack's API."""
    command = [str(Path(sys.executable).parent / "klssl"), *args]
    command += ["--url", stack.api_url, "--token", stack.info.api_token]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_a_sweep_from_the_cli_records_every_trial_and_the_best(stack: Stack) -> None:
    path = stack.base / "sweep.json"
    path.write_text(json.dumps(sweep_config("e2e-sweep", epochs=1, samples=2)))
    done = klssl(stack, "sweep", str(path), "--follow")
    assert done.returncode == 0, done.stdout + done.stderr
    sweep_id = done.stdout.splitlines()[0]
    assert "best trial" in done.stdout
    with api(stack) as http:
        sweep = http.get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["state"] == "SUCCEEDED", sweep
    trials = sweep["trials"]
    assert len(trials) == 2 and all(trial["state"] == "FINISHED" for trial in trials)
    best = max(trials, key=lambda trial: trial["metrics"]["knn_top1"])
    assert sweep["best_trial"]["trial_id"] == best["trial_id"]
    mlflow = MlflowClient(stack.mlflow_url)
    for trial in trials:
        run = mlflow.get_run(trial["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == sweep["mlflow_run_id"]
        assert float(run.data.params["objective.teacher_temp"]) == pytest.approx(
            trial["params"]["objective.teacher_temp"]
        )
    parent = mlflow.list_artifacts(sweep["mlflow_run_id"], "report")
    assert "report/trials.json" in [artifact.path for artifact in parent]

    bad = sweep_config("e2e-sweep-bad", epochs=1, samples=2)
    bad["space"]["objective.teacher_tmp"] = bad["space"].pop("objective.teacher_temp")
    path.write_text(json.dumps(bad))
    refused = klssl(stack, "sweep", str(path))
    assert refused.returncode == 2
    assert "space.objective.teacher_tmp" in refused.stderr and "teacher_temp" in refused.stderr


def test_cancelling_a_sweep_stops_its_trials_in_ray(stack: Stack) -> None:
    with api(stack) as http:
        body = {"config": sweep_config("e2e-sweep-cancel", epochs=200, samples=2)}
        sweep_id = http.post("/v1/sweeps", json=body).json()["id"]

        def trial_running() -> bool:
            trials = http.get(f"/v1/sweeps/{sweep_id}").json()["trials"]
            return any(
                trial["state"] == "RUNNING" and "loss" in trial["metrics"] for trial in trials
            )

        wait_for("a running trial", trial_running, timeout=180, every=2.0)
        cancelled = http.post(f"/v1/sweeps/{sweep_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLING"
        wait_state(http, sweep_id, {"CANCELLED"}, timeout=120)  # once Ray reports the end
    ray = stack.ray_client()
    assert ray.get_job_status(f"klssl-{sweep_id}").value in ("STOPPED", "FAILED")
    headers = {"Authorization": f"Bearer {stack.info.ray_token}"}

    def no_training_workers() -> bool:
        actors = httpx.get(
            f"{stack.info.dashboard_url}/api/v0/actors?limit=10000&detail=1", headers=headers
        ).json()["data"]["result"]["result"]
        return not [
            a for a in actors if "RayTrainWorker" in a["class_name"] and a["state"] == "ALIVE"
        ]

    wait_for("the trials' workers to stop", no_training_workers, timeout=60)
    mlflow = MlflowClient(stack.mlflow_url)
    with api(stack) as http:
        trials = http.get(f"/v1/sweeps/{sweep_id}").json()["trials"]
    assert trials and all(mlflow.get_run(t["run_id"]).info.status != "RUNNING" for t in trials)
