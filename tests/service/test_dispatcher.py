"""The dispatcher / reconciler against a fake Ray cluster (our own logic only)."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.deps import Services
from service.dispatcher import LOST_BY_RAY, Dispatcher, submission_id
from service.ray_jobs import job_environment
from service.settings import Settings
from service.store import JobState
from tests.service.conftest import ALICE, BOB, FakeRay, job_body
from trainer.spec import TrainJobSpec


def submit(client: TestClient, count: int) -> list[str]:
    return [
        client.post("/v1/jobs", json=job_body("svc-dispatch"), headers=ALICE).json()["id"]
        for _ in range(count)
    ]


def states(services: Services, ids: list[str]) -> list[str]:
    return [services.store.get(job_id).state for job_id in ids]  # type: ignore[union-attr]


def test_jobs_wait_queued_for_capacity_then_follow_ray(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    ids = submit(client, 3)  # max_concurrent_jobs = 2
    services.dispatcher.run_once()
    assert states(services, ids) == ["PENDING", "PENDING", "QUEUED"]
    first = submission_id(ids[0])
    fake_ray.set(first, JobState.RUNNING)
    services.dispatcher.run_once()
    job = services.store.get(ids[0])
    assert job is not None and job.state == "RUNNING" and job.started_at is not None
    fake_ray.set(first, JobState.SUCCEEDED)
    services.dispatcher.run_once()  # reconcile frees the slot, dispatch fills it
    assert states(services, ids) == ["SUCCEEDED", "PENDING", "PENDING"]
    run = services.tracking.client().get_run(job.mlflow_run_id)  # type: ignore[arg-type]
    assert run.info.status == "FINISHED"


def test_the_submission_carries_the_job_spec_and_the_deployment_environment(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    (job_id,) = submit(client, 1)
    services.dispatcher.run_once()
    (submitted,) = fake_ray.submissions
    job = services.store.get(job_id)
    assert job is not None
    assert submitted["id"] == f"klssl-{job_id}" == job.ray_submission_id
    # One channel: the spec file holds the typed config and every id the driver needs.
    assert submitted["module"] == "trainer.run"
    spec = TrainJobSpec.model_validate_json(submitted["spec_json"])
    assert spec == job.spec
    assert spec.config == job.config
    assert (spec.job_id, spec.mlflow_run_id, spec.owner) == (job_id, job.mlflow_run_id, job.owner)
    assert spec.storage_path is not None and spec.storage_path.startswith("/")
    assert spec.capacity_wait_s == services.settings.capacity_wait_s == 90
    # The environment holds only the deployment's settings.
    assert submitted["env"]["KLSSL_MLFLOW_TRACKING_URI"] == services.settings.mlflow_tracking_uri
    assert "KLSSL_STORAGE_PATH" not in submitted["env"]
    roots = json.loads(submitted["env"]["KLSSL_ALLOWED_DATA_ROOTS"])
    assert roots == [str(root.resolve()) for root in services.settings.allowed_data_roots]


def test_a_job_cancelled_during_its_submission_leaves_no_ray_job(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    (job_id,) = submit(client, 1)
    real_submit = fake_ray.submit

    def submit_while_user_cancels(*args: object, **kwargs: object) -> None:
        real_submit(*args, **kwargs)  # type: ignore[arg-type]
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE).status_code == 200

    fake_ray.submit = submit_while_user_cancels  # type: ignore[method-assign]
    services.dispatcher.run_once()
    # The cancel found it SUBMITTING: CANCELLING, stopped, until Ray confirms the end.
    assert states(services, [job_id]) == ["CANCELLING"]
    assert set(fake_ray.stopped) == {submission_id(job_id)}
    assert fake_ray.jobs[submission_id(job_id)].state == JobState.CANCELLED
    services.dispatcher.run_once()
    assert states(services, [job_id]) == ["CANCELLED"]


def test_a_cancel_holds_until_ray_reports_the_job_ended(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    """Ray can miss a stop (a job still starting): the record stays CANCELLING, holding
    its slot, and the reconciler asks again until Ray reports the job ended."""
    (job_id,) = submit(client, 1)
    services.dispatcher.run_once()
    sid = submission_id(job_id)
    missed: list[str] = []
    fake_ray.stop = missed.append  # type: ignore[method-assign]
    cancel = client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)
    assert cancel.status_code == 200 and cancel.json()["state"] == "CANCELLING"
    run = services.tracking.client().get_run(cancel.json()["mlflow_run_id"])
    assert run.info.status == "KILLED"  # the driver's own signal to stop
    for _ in range(2):
        services.dispatcher.run_once()
    assert states(services, [job_id]) == ["CANCELLING"] and missed == [sid] * 3
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=ALICE).status_code == 200
    (other,) = submit(client, 1)
    services.dispatcher.run_once()
    assert states(services, [other]) == ["PENDING"]  # max 2: CANCELLING holds a slot
    fake_ray.set(sid, JobState.FAILED)  # the driver saw its KILLED run and exited
    services.dispatcher.run_once()
    assert states(services, [job_id]) == ["CANCELLED"]


def test_ray_down_keeps_jobs_queued_until_it_returns(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    fake_ray.available = False
    ids = submit(client, 1)
    services.dispatcher.run_once()
    assert states(services, ids) == ["QUEUED"]
    assert services.dispatcher.ray_reachable is False
    fake_ray.available = True
    services.dispatcher.run_once()
    assert states(services, ids) == ["PENDING"]


def test_a_job_ray_forgot_runs_again_as_its_next_attempt_up_to_max_attempts(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    (job_id,) = submit(client, 1)  # max_attempts = 3 (the default)
    for attempt in (1, 2, 3):
        services.dispatcher.run_once()
        sid = submission_id(job_id, attempt)
        assert fake_ray.submissions[-1]["id"] == sid  # every attempt a new Ray job
        fake_ray.set(sid, JobState.RUNNING)
        services.dispatcher.run_once()
        fake_ray.jobs.clear()  # the head node restarted
        services.dispatcher.reconcile()  # (a whole round would also submit the next attempt)
        job = services.store.get(job_id)
        assert job is not None and job.attempts == min(attempt + 1, 3)
        run = services.tracking.client().get_run(job.mlflow_run_id)  # type: ignore[arg-type]
        if attempt < 3:
            # Back in the queue, its MLflow run still open for the next attempt's driver.
            assert job.state == "QUEUED" and job.ray_submission_id is None
            assert (
                job.queue_reason is not None and f"attempt {attempt + 1} of 3" in job.queue_reason
            )
            assert run.info.status == "RUNNING"
        else:
            assert job.state == "FAILED" and job.error is not None
            assert job.error.startswith(LOST_BY_RAY) and "3 of 3 attempts" in job.error
            assert run.info.status == "FAILED"
    assert [entry["id"] for entry in fake_ray.submissions] == [
        f"klssl-{job_id}",
        f"klssl-{job_id}-a2",
        f"klssl-{job_id}-a3",
    ]


def test_a_failed_ray_job_keeps_rays_message(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    ids = submit(client, 1)
    services.dispatcher.run_once()
    fake_ray.set(submission_id(ids[0]), JobState.FAILED, "exit code 3: cluster too small")
    services.dispatcher.run_once()
    job = services.store.get(ids[0])
    assert job is not None and job.state == "FAILED"
    assert job.error == "exit code 3: cluster too small"


def test_progress_and_checkpoints_are_read_from_mlflow(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    ids = submit(client, 1)
    services.dispatcher.run_once()
    job = services.store.get(ids[0])
    assert job is not None and job.mlflow_run_id is not None
    mlflow = services.tracking.client()
    mlflow.log_metric(job.mlflow_run_id, "loss", 2.0, step=7)
    mlflow.log_metric(job.mlflow_run_id, "effective_clusters", 12.5, step=7)
    mlflow.log_metric(job.mlflow_run_id, "epoch", 1.0, step=7)
    mlflow.set_tag(job.mlflow_run_id, "klssl.latest_checkpoint", "file:///ckpt/epoch_0001")
    fake_ray.set(submission_id(ids[0]), JobState.RUNNING)
    services.dispatcher.run_once()
    body = client.get(f"/v1/jobs/{ids[0]}", headers=ALICE).json()
    assert body["state"] == "RUNNING"
    assert body["progress"] == {
        "epoch": 1,
        "step": 7,
        "metrics": {"loss": 2.0, "effective_clusters": 12.5, "epoch": 1.0},
        "health": None,  # the trainer has not judged the run yet
        "collapse_step": None,
    }
    assert body["checkpoint_uris"] == ["file:///ckpt/epoch_0001"]

    # The trainer's verdict travels as tags (trainer.health.Verdict.tags()).
    mlflow.set_tag(job.mlflow_run_id, "klssl.health", "collapsed")
    mlflow.set_tag(job.mlflow_run_id, "klssl.collapse_step", "40")
    services.dispatcher.run_once()
    progress = client.get(f"/v1/jobs/{ids[0]}", headers=ALICE).json()["progress"]
    assert (progress["health"], progress["collapse_step"]) == ("collapsed", 40)


def test_a_resubmission_after_a_crash_makes_no_second_ray_job(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    ids = submit(client, 1)
    services.dispatcher.run_once()
    # The service died after Ray accepted the job but before the record said so.
    services.store.update(ids[0], state=JobState.QUEUED.value, ray_submission_id=None)
    services.dispatcher.run_once()
    assert len(fake_ray.submissions) == 1
    assert states(services, ids) == ["PENDING"]


def test_the_ray_token_reaches_jobs_only_when_asked(settings: Settings) -> None:
    with_token = settings.model_copy(update={"ray_auth_token": SecretStr("ray-secret-123")})
    assert "RAY_AUTH_TOKEN" not in job_environment(with_token)  # drivers inherit the node's
    passed = with_token.model_copy(update={"pass_ray_token_to_jobs": True})
    assert job_environment(passed)["RAY_AUTH_TOKEN"] == "ray-secret-123"


def test_two_dispatchers_on_one_store_dispatch_as_one(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    """Two API processes share the store: only the lease holder dispatches, so
    max_concurrent_jobs (2) holds for the deployment; the other takes over on release."""
    ids = submit(client, 5)
    first = services.dispatcher
    second = Dispatcher(services.store, fake_ray, services.tracking, services.settings)
    for _ in range(3):
        first.run_once()
        second.run_once()
    assert (first.leadership.leading, second.leadership.leading) == (True, False)
    assert len(fake_ray.submissions) == 2
    assert states(services, ids).count("PENDING") == 2
    first.resign()  # its process stops
    for job_id in ids[:2]:
        fake_ray.set(submission_id(job_id), JobState.SUCCEEDED)
    second.run_once()
    assert second.leadership.leading and len(fake_ray.submissions) == 4
    first.run_once()
    assert first.leadership.leading is False and len(fake_ray.submissions) == 4


def test_a_failed_or_cancelled_job_is_retried_into_its_mlflow_run(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    failed, running = submit(client, 2)
    services.dispatcher.run_once()
    fake_ray.set(submission_id(failed), JobState.FAILED, "out of memory")
    fake_ray.set(submission_id(running), JobState.RUNNING)
    services.dispatcher.run_once()
    busy = client.post(f"/v1/jobs/{running}/retry", headers=ALICE)
    assert busy.status_code == 409 and "RUNNING" in busy.text
    assert client.post(f"/v1/jobs/{failed}/retry", headers=BOB).status_code == 404

    retried = client.post(f"/v1/jobs/{failed}/retry", headers=ALICE)
    assert retried.status_code == 200, retried.text
    record = retried.json()
    assert (record["state"], record["attempts"], record["error"]) == ("QUEUED", 2, None)
    assert record["finished_at"] is None
    run = services.tracking.client().get_run(record["mlflow_run_id"])
    assert run.info.status == "RUNNING"  # the next attempt's driver logs into it
    again = client.post(f"/v1/jobs/{failed}/retry", headers=ALICE)
    assert again.status_code == 409  # queued already
    services.dispatcher.run_once()
    assert fake_ray.submissions[-1]["id"] == submission_id(failed, 2)
    assert states(services, [failed]) == ["PENDING"]

    cancelled = client.post(f"/v1/jobs/{running}/cancel", headers=ALICE).json()
    services.dispatcher.run_once()  # Ray reports it stopped
    assert states(services, [cancelled["id"]]) == ["CANCELLED"]
    revived = client.post(f"/v1/jobs/{running}/retry", headers=ALICE).json()
    assert revived["state"] == "QUEUED" and revived["attempts"] == 2
    assert services.tracking.client().get_run(revived["mlflow_run_id"]).info.status == "RUNNING"
