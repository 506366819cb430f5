"""Sweep routes, with a fake Ray cluster and a real SQLite MLflow store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.deps import Services
from service.store import JobState
from tests.factories import tiny_config
from tests.service.conftest import ALICE, BOB, FakeRay, job_body
from tuning.spec import SweepJobSpec


def sweep_body(name: str = "svc-sweep", **changes: Any) -> dict[str, Any]:
    """A request body: a tiny digits base and a 2-parameter space."""
    config: dict[str, Any] = {
        "base": tiny_config(name).model_dump(mode="json"),
        "space": {
            "objective.teacher_temp": {"type": "uniform", "low": 0.03, "high": 0.07},
            "objective.prior_momentum": {"type": "choice", "values": [0.9, 0.99]},
        },
        "num_samples": 4,
    }
    config.update(changes)
    return {"config": config}


def test_a_sweep_is_recorded_with_a_parent_run_and_submitted_as_tuning_run(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    response = client.post("/v1/sweeps", json=sweep_body("svc-sweep-ok"), headers=ALICE)
    assert response.status_code == 202, response.text
    sweep = response.json()
    assert response.headers["Location"] == f"/v1/sweeps/{sweep['id']}"
    assert sweep["state"] == "QUEUED" and sweep["trials"] == [] and sweep["best_trial"] is None
    assert (sweep["metric"], sweep["mode"]) == ("knn_top1", "max")  # digits have labels
    run = services.tracking.client().get_run(sweep["mlflow_run_id"])
    assert run.data.tags["klssl.role"] == "sweep"
    assert run.data.tags["klssl.sweep_id"] == sweep["id"]

    services.dispatcher.run_once()
    (submitted,) = fake_ray.submissions
    assert submitted["module"] == "tuning.run"
    spec = SweepJobSpec.model_validate_json(submitted["spec_json"])
    assert (spec.job_id, spec.mlflow_run_id) == (sweep["id"], sweep["mlflow_run_id"])
    assert spec.config.model_dump(mode="json") == sweep["config"]

    listed = client.get("/v1/sweeps", headers=ALICE).json()
    assert [item["id"] for item in listed["items"]] == [sweep["id"]]
    jobs = client.get("/v1/jobs", headers=ALICE).json()
    assert sweep["id"] not in [item["id"] for item in jobs["items"]]
    shown = client.get(f"/v1/sweeps/{sweep['id']}", headers=ALICE).json()
    assert shown["state"] == "PENDING" and shown["trials"] == []


def test_a_training_job_is_not_a_sweep(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=job_body("svc-not-sweep"), headers=ALICE).json()
    assert client.get(f"/v1/sweeps/{job['id']}", headers=ALICE).status_code == 404
    assert client.get("/v1/sweeps/job-unknown", headers=ALICE).status_code == 404


@pytest.mark.parametrize(
    ("changes", "location", "reason"),
    [
        (
            {"space": {"objective.teacher_tmp": {"type": "uniform", "low": 0.03, "high": 0.07}}},
            "space.objective.teacher_tmp",
            "objective.teacher_temp",  # the close name is suggested
        ),
        (
            {"space": {"objective.teacher_temp": {"type": "uniform", "low": -0.1, "high": 0.07}}},
            "space.objective.teacher_temp",
            "greater than 0",
        ),
        (
            {"space": {"objective.teacher_temp": {"type": "uniform", "low": 0.07, "high": 0.03}}},
            "space.objective.teacher_temp",
            "low",
        ),
        ({"space": {}}, "space", "empty"),
    ],
    ids=["unknown-field", "negative-range", "reversed-range", "empty-space"],
)
def test_an_invalid_sweep_is_a_422_and_creates_nothing(
    client: TestClient,
    services: Services,
    fake_ray: FakeRay,
    changes: dict[str, Any],
    location: str,
    reason: str,
) -> None:
    body = sweep_body("svc-sweep-bad", **changes)
    response = client.post("/v1/sweeps", json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    details = response.json()["detail"]
    found = [
        item
        for item in details
        if ".".join(str(part) for part in item["loc"][2:] if part not in ("uniform",)) == location
    ]
    assert found, details
    assert reason in found[0]["msg"], found[0]
    assert client.get("/v1/sweeps", headers=ALICE).json()["total"] == 0
    assert services.tracking.client().get_experiment_by_name("svc-sweep-bad") is None
    services.dispatcher.run_once()
    assert fake_ray.submissions == []


def test_a_sweep_path_outside_the_data_roots_is_a_422(client: TestClient, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    body = sweep_body("svc-sweep-path")
    body["config"]["base"]["data"].update(kind="imagefolder", path=str(outside))
    response = client.post("/v1/sweeps", json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "config", "base", "data", "path"]


@pytest.mark.parametrize(
    ("field", "inside"),
    [
        ("data.path", "images"),  # finding 3: only the base's path was checked
        ("model.init", "runs:/abc123"),  # init files are paths too; MLflow URIs are not
    ],
)
def test_a_swept_path_outside_the_data_roots_is_a_422(
    field: str, inside: str, client: TestClient, data_root: Path
) -> None:
    """A space's choices reach the trials: each is confined like the base's path."""
    body = sweep_body(f"svc-sweep-space-{field}")
    if field == "data.path":
        inside = str(data_root / inside)
        body["config"]["base"]["data"].update(kind="imagefolder", path=inside)
    body["config"]["space"] = {field: {"type": "choice", "values": [inside, "/etc/x.pt"]}}
    response = client.post("/v1/sweeps", json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "config", "space", field, "values", "1"]
    assert "outside the allowed data roots" in problem["msg"]
    assert client.get("/v1/sweeps", headers=ALICE).json()["total"] == 0


def trial_run(
    services: Services, sweep: dict[str, Any], trial_id: str, owner: str, **tags: str
) -> Any:
    """A child run as the sweep's driver tags a trial (`tuning.driver.trial_run`)."""
    mlflow = services.tracking.client()
    return mlflow.create_run(
        mlflow.get_run(sweep["mlflow_run_id"]).info.experiment_id,
        tags={
            "mlflow.parentRunId": sweep["mlflow_run_id"],
            "klssl.sweep_id": sweep["id"],
            "klssl.role": "trial",
            "klssl.owner": owner,
            "klssl.trial_id": trial_id,
            "klssl.sampled": '{"objective.teacher_temp": 0.04}',
            **tags,
        },
    )


def test_only_the_sweeps_own_well_formed_trials_are_its_trials(
    client: TestClient, services: Services
) -> None:
    """A run that names the sweep as parent without being its trial is no trial (finding 2),
    and a malformed trial is skipped, never a 5xx."""
    sweep = client.post("/v1/sweeps", json=sweep_body("svc-sweep-forge"), headers=ALICE).json()
    trial_run(services, sweep, "t1", owner="alice")
    trial_run(services, sweep, "forged-owner", owner="bob")
    trial_run(services, sweep, "forged-sweep", owner="alice", **{"klssl.sweep_id": "job-other"})
    trial_run(services, sweep, "no-role", owner="alice", **{"klssl.role": "sweep"})
    trial_run(services, sweep, "malformed", owner="alice", **{"klssl.sampled": "{not json"})
    shown = client.get(f"/v1/sweeps/{sweep['id']}", headers=ALICE)
    assert shown.status_code == 200, shown.text
    assert [trial["trial_id"] for trial in shown.json()["trials"]] == ["t1"]


def test_cancelling_a_sweep_stops_its_ray_job_and_closes_its_runs(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    sweep = client.post("/v1/sweeps", json=sweep_body("svc-sweep-cancel"), headers=ALICE).json()
    services.dispatcher.run_once()
    fake_ray.set(f"klssl-{sweep['id']}", JobState.RUNNING)
    services.dispatcher.run_once()
    mlflow = services.tracking.client()
    child = trial_run(services, sweep, "t1", owner="alice")
    assert client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=BOB).status_code == 404
    cancelled = client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=ALICE)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "CANCELLING"  # on Ray: CANCELLED once it stopped
    assert [trial["trial_id"] for trial in cancelled.json()["trials"]] == ["t1"]
    assert fake_ray.stopped == [f"klssl-{sweep['id']}"]
    assert mlflow.get_run(sweep["mlflow_run_id"]).info.status == "KILLED"
    assert mlflow.get_run(child.info.run_id).info.status == "KILLED"
    services.dispatcher.run_once()
    assert client.get(f"/v1/sweeps/{sweep['id']}", headers=ALICE).json()["state"] == "CANCELLED"
    assert client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=ALICE).status_code == 409


def test_a_large_sweep_is_validated_off_the_event_loop(app: Any) -> None:
    """10,000 choice values take seconds to validate (each is substituted into the base
    config): meanwhile the API answers other requests (finding 6: /healthz waited 10 s)."""
    space = {
        path: {"type": "choice", "values": [0.01 + index * 1e-6 for index in range(1000)]}
        for path in (
            "objective.teacher_temp", "objective.student_temp", "optim.lr",
            "optim.weight_decay", "optim.min_lr", "objective.warmup_teacher_temp",
            "objective.prior_momentum", "schedule.teacher_momentum", "objective.prior_power",
        )
    }  # fmt: skip
    space["data.holdout_fraction"] = {"type": "choice", "values": [0.1] * 999 + [7.0]}
    body = {"config": {"base": job_body("svc-big")["config"], "space": space, "num_samples": 1}}

    async def scenario() -> tuple[bool, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            sweep = asyncio.create_task(client.post("/v1/sweeps", json=body, headers=ALICE))
            await asyncio.sleep(0.05)  # the sweep's body is being validated
            health = await client.get("/healthz")
            answered_first = not sweep.done()
            return answered_first, health.status_code, (await sweep).status_code

    answered_first, health, sweep = asyncio.run(scenario())
    assert health == 200 and answered_first
    assert sweep == 422  # 7.0 is no holdout fraction
