"""Routes of the control plane, with a fake Ray cluster and a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.deps import Services
from service.ray_jobs import RayUnavailableError
from service.settings import Settings
from service.store import JobState
from tests.service.conftest import ALICE, BOB, FakeRay, job_body
from trainer.config import TrainConfig


def run_count(services: Services, experiment: str) -> int:
    client = services.tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    return len(client.search_runs([found.experiment_id]))


def test_submit_answers_202_with_location_and_a_queued_record(
    client: TestClient, services: Services
) -> None:
    response = client.post("/v1/jobs", json=job_body("svc-submit"), headers=ALICE)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "QUEUED" and job["owner"] == "alice"
    assert job["ray_submission_id"] is None
    run = services.tracking.client().get_run(job["mlflow_run_id"])
    assert run.data.tags["klssl.job_id"] == job["id"]
    assert run.data.params["schedule.epochs"] == "2"
    again = client.get(f"/v1/jobs/{job['id']}", headers=ALICE)
    assert again.status_code == 200 and again.json()["id"] == job["id"]


def test_same_idempotency_key_returns_the_same_job(client: TestClient, services: Services) -> None:
    headers = {**ALICE, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", json=job_body("svc-idem"), headers=headers)
    second = client.post("/v1/jobs", json=job_body("svc-idem"), headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert run_count(services, "svc-idem") == 1
    # The key is per owner: bob's identical key is another job.
    other = client.post(
        "/v1/jobs", json=job_body("svc-idem"), headers={**BOB, "Idempotency-Key": "retry-1"}
    )
    assert other.json()["id"] != first.json()["id"]


def test_an_idempotency_key_is_bound_to_its_request_and_kind(
    client: TestClient, services: Services
) -> None:
    headers = {**ALICE, "Idempotency-Key": "retry-2"}
    first = client.post("/v1/jobs", json=job_body("svc-idem2"), headers=headers)
    assert first.status_code == 202
    changed = job_body("svc-idem2")
    changed["config"]["schedule"]["epochs"] = 3
    for route, body in (("/v1/jobs", changed), ("/v1/sweeps", sweep_of(job_body("svc-idem2")))):
        response = client.post(route, json=body, headers=headers)
        assert response.status_code == 422, response.text
        (problem,) = response.json()["detail"]
        assert problem["loc"] == ["header", "Idempotency-Key"]
        assert first.json()["id"] in problem["msg"]
    assert run_count(services, "svc-idem2") == 1


def bad_configs(data_root: Path, tmp_path: Path) -> dict[str, tuple[dict[str, Any], str, str]]:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = data_root / "escape"
    os.symlink(outside, link)
    return {
        "negative temperature": (
            {"objective": {"teacher_temp": -0.1}},
            "config.objective.teacher_temp",
            "greater than 0",
        ),
        "momentum 1.5": (
            {"schedule": {"teacher_momentum": 1.5}},
            "config.schedule.teacher_momentum",
            "less than 1",
        ),
        "unknown backbone": (
            {"model": {"backbone": "resnet19"}},
            "config.model.backbone",
            "close timm names: resnet",
        ),
        "missing dataset path": (
            {"data": {"kind": "imagefolder", "path": str(data_root / "nope")}},
            "config.data.path",
            "does not exist",
        ),
        "path outside the roots": (
            {"data": {"kind": "imagefolder", "path": str(outside)}},
            "config.data.path",
            "outside the allowed data roots",
        ),
        "dot-dot escape": (
            {"data": {"kind": "imagefolder", "path": str(data_root / ".." / "outside")}},
            "config.data.path",
            "outside the allowed data roots",
        ),
        "symlink escape": (
            {"data": {"kind": "imagefolder", "path": str(link)}},
            "config.data.path",
            "outside the allowed data roots",
        ),
        "object storage outside the allowed URIs": (
            {"data": {"kind": "files", "path": "s3://someone-elses-bucket/photos"}},
            "config.data.path",
            "outside the allowed data URIs",
        ),
        "evaluation set outside the roots": (
            {"eval": {"data": {"kind": "imagefolder", "path": str(outside)}}},
            "config.eval.data.path",
            "outside the allowed data roots",
        ),
        "init file outside the roots": (
            {"model": {"init": str(outside / "backbone.pt")}},
            "config.model.init",
            "outside the allowed data roots",
        ),
        "init from a hub": (
            {"model": {"init": "hf-hub:timm/resnet18.a1_in1k"}},
            "config.model.init",
            "nothing is downloaded from a hub",
        ),
        "unknown field": ({"schedule": {"epochz": 3}}, "config.schedule.epochz", "not permitted"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "negative temperature",
        "momentum 1.5",
        "unknown backbone",
        "missing dataset path",
        "path outside the roots",
        "dot-dot escape",
        "symlink escape",
        "object storage outside the allowed URIs",
        "evaluation set outside the roots",
        "init file outside the roots",
        "init from a hub",
        "unknown field",
    ],
)
def test_invalid_config_is_a_422_with_the_field_and_leaves_nothing(
    case: str,
    client: TestClient,
    services: Services,
    fake_ray: FakeRay,
    data_root: Path,
    tmp_path: Path,
) -> None:
    sections, field, reason = bad_configs(data_root, tmp_path)[case]
    body = job_body("svc-invalid")
    for section, fields in sections.items():
        body["config"][section].update(fields)
    response = client.post("/v1/jobs", json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    problems = {
        ".".join(map(str, item["loc"][1:])): item["msg"] for item in response.json()["detail"]
    }
    assert field in problems, problems
    assert reason in problems[field]
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 0
    assert run_count(services, "svc-invalid") == 0
    services.dispatcher.run_once()
    assert fake_ray.submissions == []


@pytest.mark.parametrize(
    ("route", "tags", "reason"),
    [
        ("/v1/jobs", {"mlflow.runName": "x"}, "reserved prefix"),
        ("/v1/jobs", {"klssl.health": "ok"}, "reserved prefix"),
        ("/v1/sweeps", {"mlflow.parentRunId": "someone-elses-sweep"}, "reserved prefix"),
        ("/v1/jobs", {"k" * 251: "v"}, "at most 250 characters"),
        ("/v1/jobs", {f"t{i}": "v" for i in range(51)}, "at most 50 items"),
    ],
)
def test_reserved_or_oversized_tags_are_a_422_and_leave_nothing(
    route: str, tags: dict[str, str], reason: str, client: TestClient, services: Services
) -> None:
    body: dict[str, Any] = job_body("svc-tags")
    if route == "/v1/sweeps":
        space = {"objective.teacher_temp": {"type": "uniform", "low": 0.03, "high": 0.06}}
        body["config"] = {"base": body["config"], "space": space, "num_samples": 2}
    response = client.post(route, json={**body, "tags": tags}, headers=ALICE)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"][:2] == ["body", "tags"] and reason in problem["msg"], problem
    assert run_count(services, "svc-tags") == 0


def test_a_path_inside_the_roots_is_accepted_resolved(client: TestClient, data_root: Path) -> None:
    body = job_body("svc-path")
    body["config"]["data"].update(
        kind="imagefolder", path=str(data_root / "images" / ".." / "images")
    )
    response = client.post("/v1/jobs", json=body, headers=ALICE)
    assert response.status_code == 202, response.text
    assert response.json()["config"]["data"]["path"] == str((data_root / "images").resolve())


def test_tokens_are_required_and_owners_are_enforced(client: TestClient) -> None:
    assert client.post("/v1/jobs", json=job_body()).status_code == 401
    wrong = {"Authorization": "Bearer token-alice-0123456780"}
    assert client.post("/v1/jobs", json=job_body(), headers=wrong).status_code == 401
    assert client.get("/v1/jobs").status_code == 401
    job = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()
    assert job["owner"] == "alice"
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=BOB).status_code == 404


def sweep_of(body: dict[str, Any]) -> dict[str, Any]:
    space = {"objective.teacher_temp": {"type": "uniform", "low": 0.03, "high": 0.06}}
    return {**body, "config": {"base": body["config"], "space": space, "num_samples": 2}}


def test_another_owners_records_do_not_exist_for_a_caller(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    job = client.post("/v1/jobs", json=job_body("svc-own"), headers=ALICE).json()
    sweep = client.post("/v1/sweeps", json=sweep_of(job_body("svc-own")), headers=ALICE).json()
    services.dispatcher.run_once()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/sweeps/{sweep['id']}"):
        for suffix in ("", "/logs", "/logs?follow=true", "/metrics"):
            if "sweeps" in path and suffix:
                continue
            response = client.get(path + suffix, headers=BOB)
            assert response.status_code == 404, (path + suffix, response.text)
            # Exactly what an id that never existed answers: nothing is told.
            assert response.json() == {"detail": f"no job {path.rsplit('/', 1)[1]!r}"}
        assert client.post(f"{path}/cancel", headers=BOB).status_code == 404
    assert client.get("/v1/jobs", headers=BOB).json()["total"] == 0
    assert client.get("/v1/sweeps", headers=BOB).json()["total"] == 0
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 1
    assert client.get(f"/v1/jobs/{job['id']}", headers=ALICE).status_code == 200
    assert fake_ray.stopped == []


def test_an_admin_sees_and_cancels_every_owners_records(
    settings: Settings, fake_ray: FakeRay
) -> None:
    tokens = {**settings.api_tokens, "token-root-5555555555": "root"}
    app = create_app(
        settings.model_copy(update={"api_tokens": tokens, "admin_owners": ["root"]}),
        ray_client=fake_ray,
        run_dispatcher=False,
    )
    root = {"Authorization": "Bearer token-root-5555555555"}
    with TestClient(app) as client:
        job = client.post("/v1/jobs", json=job_body("svc-admin"), headers=ALICE).json()
        assert client.get("/v1/jobs", headers=root).json()["total"] == 1
        assert client.get(f"/v1/jobs/{job['id']}", headers=root).status_code == 200
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=root)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"


def test_an_owner_named_anonymous_is_an_ordinary_owner(
    settings: Settings, fake_ray: FakeRay
) -> None:
    """Authentication off is a mode, not an owner name: 'anonymous' gains nothing."""
    tokens = {**settings.api_tokens, "token-anon-4444444444": "anonymous"}
    app = create_app(
        settings.model_copy(update={"api_tokens": tokens}), ray_client=fake_ray,
        run_dispatcher=False,
    )  # fmt: skip
    anonymous = {"Authorization": "Bearer token-anon-4444444444"}
    with TestClient(app) as client:
        job = client.post("/v1/jobs", json=job_body("svc-anon"), headers=ALICE).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=anonymous).status_code == 404
        assert client.get("/v1/jobs", headers=anonymous).json()["total"] == 0


def test_without_tokens_the_one_local_user_owns_everything(
    settings: Settings, fake_ray: FakeRay
) -> None:
    app = create_app(
        settings.model_copy(update={"api_tokens": {}}), ray_client=fake_ray, run_dispatcher=False
    )
    with TestClient(app) as client:
        job = client.post("/v1/jobs", json=job_body("svc-local")).json()
        assert job["owner"] == "local"
        assert client.get("/v1/jobs").json()["total"] == 1
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in ("", "/logs", "/metrics"):
        assert client.get(f"/v1/jobs/job-nope{path}", headers=ALICE).status_code == 404
    assert client.post("/v1/jobs/job-nope/cancel", headers=ALICE).status_code == 404


def test_list_filters_by_state_and_paginates(client: TestClient, services: Services) -> None:
    ids = [client.post("/v1/jobs", json=job_body(), headers=ALICE).json()["id"] for _ in range(3)]
    services.store.transition(ids[0], JobState.FAILED, error="x")
    queued = client.get("/v1/jobs", params={"state": "QUEUED"}, headers=ALICE).json()
    assert queued["total"] == 2 and {job["id"] for job in queued["items"]} == set(ids[1:])
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 2}, headers=ALICE).json()
    assert page["total"] == 3 and len(page["items"]) == 1
    assert client.get("/v1/jobs", params={"state": "BOGUS"}, headers=ALICE).status_code == 422


def test_cancel_queued_running_and_finished_jobs(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    queued = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()["id"]
    cancelled = client.post(f"/v1/jobs/{queued}/cancel", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
    assert client.post(f"/v1/jobs/{queued}/cancel", headers=ALICE).status_code == 409
    run = services.tracking.client().get_run(cancelled.json()["mlflow_run_id"])
    assert run.info.status == "KILLED"

    running = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()["id"]
    services.dispatcher.run_once()
    sid = services.store.get(running).ray_submission_id  # type: ignore[union-attr]
    assert sid is not None
    fake_ray.set(sid, JobState.RUNNING)
    services.dispatcher.run_once()
    cancelling = client.post(f"/v1/jobs/{running}/cancel", headers=ALICE).json()
    assert cancelling["state"] == "CANCELLING" and fake_ray.stopped == [sid]
    services.dispatcher.run_once()  # Ray reports STOPPED: the cancel is done
    assert services.store.get(running).state == "CANCELLED"  # type: ignore[union-attr]
    assert client.post(f"/v1/jobs/{running}/cancel", headers=ALICE).status_code == 409
    assert queued not in {s["id"] for s in fake_ray.submissions}


def test_a_cancel_while_ray_is_down_is_carried_out_when_it_returns(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    job = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()["id"]
    services.dispatcher.run_once()
    fake_ray.available = False
    cancel = client.post(f"/v1/jobs/{job}/cancel", headers=ALICE)
    assert cancel.status_code == 200 and cancel.json()["state"] == "CANCELLING"
    services.dispatcher.run_once()
    assert services.store.get(job).state == "CANCELLING"  # type: ignore[union-attr]
    fake_ray.available = True
    services.dispatcher.run_once()  # asks Ray again
    assert fake_ray.stopped == [f"klssl-{job}"]
    services.dispatcher.run_once()  # Ray reports STOPPED
    assert services.store.get(job).state == "CANCELLED"  # type: ignore[union-attr]


def test_logs_as_text_and_as_server_sent_events(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    job = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()["id"]
    assert client.get(f"/v1/jobs/{job}/logs", headers=ALICE).text == ""
    services.dispatcher.run_once()
    sid = f"klssl-{job}"
    fake_ray.log_text[sid] = "epoch 1\nepoch 2\n"
    assert client.get(f"/v1/jobs/{job}/logs", headers=ALICE).text == "epoch 1\nepoch 2\n"
    fake_ray.set(sid, JobState.SUCCEEDED)
    services.dispatcher.run_once()
    with client.stream("GET", f"/v1/jobs/{job}/logs?follow=true", headers=ALICE) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    assert "event: log\ndata: epoch 1\ndata: epoch 2\n\n" in body
    assert 'event: end\ndata: {"state": "SUCCEEDED", "error": null}' in body


def test_metrics_history_comes_from_mlflow(client: TestClient, services: Services) -> None:
    job = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()
    mlflow = services.tracking.client()
    for step, loss in enumerate([3.0, 2.5, 2.0]):
        mlflow.log_metric(job["mlflow_run_id"], "loss", loss, step=step)
    body = client.get(f"/v1/jobs/{job['id']}/metrics", headers=ALICE).json()
    assert [(p["step"], p["value"]) for p in body["metrics"]["loss"]] == [
        (0, 3.0),
        (1, 2.5),
        (2, 2.0),
    ]


def test_health_readiness_and_prometheus(client: TestClient, fake_ray: FakeRay) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    fake_ray.available = False
    down = client.get("/readyz")
    assert down.status_code == 503
    checks = down.json()["checks"]
    assert checks["ray"]["ok"] is False and checks["database"]["ok"] and checks["mlflow"]["ok"]
    client.post("/v1/jobs", json=job_body(), headers=ALICE)
    text = client.get("/metrics").text
    assert 'klssl_jobs{state="QUEUED"} 1.0' in text
    assert (
        'klssl_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"}' in text
    )


def test_openapi_documents_the_config_fields(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/jobs/{job_id}/cancel" in schema["paths"]
    objective = schema["components"]["schemas"]["ObjectiveConfig"]["properties"]
    assert "description" in objective["prior_momentum"]


def test_mlflow_down_is_a_503_and_records_nothing(settings: Settings, fake_ray: FakeRay) -> None:
    down = settings.model_copy(update={"mlflow_tracking_uri": "http://127.0.0.1:1"})
    app = create_app(down, ray_client=fake_ray, run_dispatcher=False)
    with TestClient(app) as client:
        response = client.post("/v1/jobs", json=job_body(), headers=ALICE)
        assert response.status_code == 503 and "MLflow" in response.json()["detail"]
        assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 0
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["mlflow"]["ok"] is False


def test_following_logs_survives_a_lost_log_source(
    client: TestClient, services: Services, fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.routes.jobs.LOG_POLL_S", 0.01)
    job = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()["id"]
    services.dispatcher.run_once()
    sid = f"klssl-{job}"
    fake_ray.log_text[sid] = "line 1\n"
    real_tail = fake_ray.tail
    connections = 0

    async def flaky_tail(submission_id: str) -> AsyncIterator[str]:
        nonlocal connections
        connections += 1
        if connections == 1:  # the Ray log source drops once, mid-stream
            async for chunk in real_tail(submission_id):
                yield chunk
                raise RayUnavailableError("connection reset")
        fake_ray.log_text[sid] += "line 2\npartial"
        fake_ray.set(sid, JobState.SUCCEEDED)
        services.dispatcher.run_once()
        async for chunk in real_tail(submission_id):  # from the start again
            yield chunk

    monkeypatch.setattr(fake_ray, "tail", flaky_tail)
    with client.stream("GET", f"/v1/jobs/{job}/logs?follow=true", headers=ALICE) as response:
        body = response.read().decode()
    assert connections == 2
    assert body.count("data: line 1") == 1 and body.count("data: line 2") == 1
    assert "data: partial" in body and ": log source unavailable, retrying" in body
    assert body.rstrip().endswith('"error": null}')


def test_live_log_streams_are_capped_per_owner_and_in_time(
    settings: Settings, fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("service.routes.jobs.LOG_POLL_S", 0.05)
    capped = settings.model_copy(update={"max_log_streams_per_owner": 1, "max_log_stream_s": 1})
    app = create_app(capped, ray_client=fake_ray, run_dispatcher=False)
    with TestClient(app) as client:
        job = client.post("/v1/jobs", json=job_body(), headers=ALICE).json()["id"]
        url = f"/v1/jobs/{job}/logs?follow=true"
        with client.stream("GET", url, headers=ALICE) as first:
            assert first.status_code == 200
            second = client.get(url, headers=ALICE)
            assert second.status_code == 429 and "at most 1" in second.json()["detail"]
            started = time.monotonic()
            body = first.read().decode()  # the job stays queued: the time limit ends it
        assert 0.9 < time.monotonic() - started < 30
        assert '"state": "QUEUED"' in body and "stream time limit" in body
        with client.stream("GET", url, headers=ALICE) as again:  # the slot was given back
            assert again.status_code == 200


def test_hostile_inputs_are_4xx_never_5xx(client: TestClient, services: Services) -> None:
    """Each of these was a 500 once (issue 11): they are the client's errors."""
    listed = client.get("/v1/jobs", params={"offset": 2**63}, headers=ALICE)
    assert listed.status_code == 422 and listed.json()["detail"][0]["loc"] == ["query", "offset"]

    body = job_body("svc-hostile")
    body["name"] = "\ud800"
    raw = json.dumps(body)  # JSON escapes the lone surrogate as \ud800
    response = client.post(
        "/v1/jobs", content=raw, headers={**ALICE, "Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "name: not valid text" in response.json()["detail"][0]["msg"]
    body = job_body("svc-hostile")
    body["config"]["name"] = "a\x00b"
    response = client.post("/v1/jobs", json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    assert "config.name: not valid text" in response.json()["detail"][0]["msg"]
    for url in ("/v1/jobs", "/v1/sweeps"):  # not UTF-8 at all (found by the fuzz test)
        headers = {**ALICE, "Content-Type": "application/json"}
        response = client.post(url, content=b"\x80", headers=headers)
        assert response.status_code in (400, 422), response.text  # FastAPI: 400 or json_invalid
        assert response.json()["detail"]

    body = job_body("svc-hostile")
    body["config"]["data"].update(kind="imagefolder", path="a" * 4000)
    response = client.post("/v1/jobs", json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    assert run_count(services, "svc-hostile") == 0


def test_a_body_over_the_limit_is_a_413_before_it_is_read(client: TestClient) -> None:
    limit = client.app.state.services.settings.max_request_bytes  # type: ignore[attr-defined]
    big = b'{"config": {"name": "' + b"a" * limit + b'"}}'
    headers = {**ALICE, "Content-Type": "application/json"}
    announced = client.post("/v1/jobs", content=big, headers=headers)
    assert announced.status_code == 413 and "limited to" in announced.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = client.post("/v1/jobs", content=chunks(), headers=headers)
    assert streamed.status_code == 413, (streamed.text, streamed.request.headers)


def test_what_mlflow_refuses_is_a_422_and_leaves_no_run(
    client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's INVALID_PARAMETER_VALUE is the request's fault: a 422, not a retryable 503,
    and the half-made run is deleted (validation makes this rare: a param key over
    MLflow's 250 characters stands in for whatever a future field lets through)."""
    flat = TrainConfig.flat
    monkeypatch.setattr(TrainConfig, "flat", lambda self: {**flat(self), "k" * 300: "v"})
    response = client.post("/v1/jobs", json=job_body("svc-refused"), headers=ALICE)
    assert response.status_code == 422, response.text
    assert "MLflow refused the job's run" in response.json()["detail"][0]["msg"]
    assert run_count(services, "svc-refused") == 0
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 0


def test_a_job_asks_for_its_backbone_to_be_registered(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    body = {**job_body("svc-register"), "register_as": "team backbone", "register_alias": "next"}
    response = client.post("/v1/jobs", json=body, headers=ALICE)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["register_as"], job["register_alias"]) == ("team backbone", "next")
    services.dispatcher.run_once()
    spec = json.loads(fake_ray.submissions[0]["spec_json"])
    assert (spec["register_as"], spec["register_alias"]) == ("team backbone", "next")
    # The registration is part of the request an Idempotency-Key is bound to.
    headers = {**ALICE, "Idempotency-Key": "register-1"}
    assert client.post("/v1/jobs", json=body, headers=headers).status_code == 202
    other = client.post("/v1/jobs", json={**body, "register_as": "other"}, headers=headers)
    assert other.status_code == 422


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"register_as": "a/b"}, "register_as", "no '/' or ':'"),
        ({"register_as": "../up"}, "register_as", "segments"),
        ({"register_as": "x", "register_alias": "latest"}, "register_alias", "not 'latest'"),
        ({"register_as": "x", "register_alias": "v2"}, "register_alias", "names a version"),
        ({"register_alias": "champion"}, "", "register_alias needs register_as"),
        ({"register_as": "x" * 257}, "register_as", "at most 256 characters"),
    ],
)
def test_a_registration_mlflow_would_refuse_is_a_422_and_leaves_nothing(
    fields: dict[str, str], field: str, reason: str, client: TestClient, services: Services
) -> None:
    response = client.post(
        "/v1/jobs", json={**job_body("svc-register-bad"), **fields}, headers=ALICE
    )
    assert response.status_code == 422, response.text
    problems = {
        ".".join(map(str, item["loc"][1:])): item["msg"] for item in response.json()["detail"]
    }
    assert field in problems and reason in problems[field], problems
    assert run_count(services, "svc-register-bad") == 0
