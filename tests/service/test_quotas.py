"""Priorities and per-owner quotas: the order and the room in which queued jobs start.

The API over HTTP, a real SQLite store and MLflow store, and the dispatcher against a
fake Ray (our own logic).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.deps import Services
from service.dispatcher import submission_id
from service.quotas import Demand, Quota, Usage, demand_of, over_quota
from service.settings import Settings
from service.store import JobState
from tests.factories import tiny_config
from tests.service.conftest import ALICE, BOB, FakeRay, job_body

CAROL = {"Authorization": "Bearer token-carol-0123456789"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Three slots; alice may run one job at a time, bob two CPUs' worth, carol nothing."""
    return settings.model_copy(
        update={
            "max_concurrent_jobs": 3,
            "api_tokens": {**settings.api_tokens, "token-carol-0123456789": "carol"},
            "quotas": {
                "alice": Quota(jobs=1),
                "bob": Quota(cpus=2),
                "carol": Quota(jobs=0),
            },
        }
    )


def submit(client: TestClient, headers: dict[str, str], **fields: Any) -> str:
    body = {**job_body("svc-quotas"), **fields}
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def job(client: TestClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    found: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    return found


def finish(services: Services, fake_ray: FakeRay, job_id: str) -> None:
    fake_ray.set(submission_id(job_id), JobState.SUCCEEDED)
    services.dispatcher.run_once()


def test_priorities_order_admissions_then_age(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    services.settings.max_concurrent_jobs = 1
    services.settings.quotas = {}
    low = submit(client, BOB, priority=-5)
    first_normal = submit(client, BOB)
    high = submit(client, BOB, priority=10)
    second_normal = submit(client, BOB)
    order = []
    for _ in range(4):
        services.dispatcher.run_once()
        (running,) = services.store.in_states([JobState.PENDING])
        order.append(running.id)
        finish(services, fake_ray, running.id)
    assert order == [high, first_normal, second_normal, low]
    assert job(client, low, BOB)["priority"] == -5


def test_a_job_waits_with_a_slot_reason_until_one_frees(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    services.settings.max_concurrent_jobs = 1
    services.settings.quotas = {}
    first, second = submit(client, BOB), submit(client, BOB)
    services.dispatcher.run_once()
    waiting = job(client, second, BOB)
    assert waiting["state"] == "QUEUED" and "no free slot" in waiting["queue_reason"]
    finish(services, fake_ray, first)
    started = job(client, second, BOB)
    assert started["state"] == "PENDING" and started["queue_reason"] is None


def test_a_job_quota_queues_the_excess_with_its_reason_and_lets_others_pass(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    first = submit(client, ALICE, priority=5)
    second = submit(client, ALICE, priority=5)
    other = submit(client, BOB)  # lower priority, another owner: passes alice's second
    services.dispatcher.run_once()
    assert job(client, first, ALICE)["state"] == "PENDING"
    waiting = job(client, second, ALICE)
    assert waiting["state"] == "QUEUED"
    assert waiting["queue_reason"] == "owner 'alice' is at its quota of 1 concurrent job(s)"
    assert job(client, other, BOB)["state"] == "PENDING"
    finish(services, fake_ray, first)
    started = job(client, second, ALICE)
    assert started["state"] == "PENDING" and started["queue_reason"] is None


def test_a_cpu_quota_counts_the_workers_resources(
    client: TestClient, services: Services, fake_ray: FakeRay
) -> None:
    two_cpus = {"runtime": {"num_workers": 2, "cpus_per_worker": 1.0}}
    first = submit(client, BOB, **job_body("svc-quotas", **two_cpus))
    second = submit(client, BOB)
    services.dispatcher.run_once()
    assert job(client, first, BOB)["state"] == "PENDING"
    waiting = job(client, second, BOB)
    assert waiting["state"] == "QUEUED"
    assert waiting["queue_reason"] == ("owner 'bob' holds 2 of its 2 CPUs and this job asks for 1")


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        (CAROL, job_body("svc-quota-refused"), "the owner's quota allows no jobs"),
        (
            BOB,
            job_body("svc-quota-refused", runtime={"num_workers": 3}),
            "asks for 3 CPUs, more than the owner's quota of 2",
        ),
        (BOB, {**job_body("svc-quota-refused"), "priority": 1001}, "less than or equal to 1000"),
    ],
)
def test_a_job_that_could_never_fit_is_a_422_and_leaves_nothing(
    headers: dict[str, str],
    body: dict[str, Any],
    reason: str,
    client: TestClient,
    services: Services,
) -> None:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 422, response.text
    assert reason in response.text
    assert services.store.in_states([JobState.QUEUED]) == []
    experiment = services.tracking.client().get_experiment_by_name("svc-quota-refused")
    assert experiment is None or not services.tracking.client().search_runs(
        [experiment.experiment_id]
    )


def test_a_sweep_under_a_resource_quota_must_cap_its_trials(client: TestClient) -> None:
    sweep = {
        "base": tiny_config("svc-quota-sweep").model_dump(mode="json"),
        "space": {"objective.teacher_temp": {"type": "choice", "values": [0.04, 0.07]}},
    }
    refused = client.post("/v1/sweeps", json={"config": sweep}, headers=BOB)
    assert refused.status_code == 422 and "max_concurrent_trials" in refused.text
    capped = {**sweep, "max_concurrent_trials": 2}
    accepted = client.post("/v1/sweeps", json={"config": capped}, headers=BOB)
    assert accepted.status_code == 202, accepted.text


def test_demand_counts_workers_gpus_and_ray_data() -> None:
    config = tiny_config(runtime={"num_workers": 2, "cpus_per_worker": 4.0})
    assert demand_of(config, cluster_has_gpus=False) == Demand(8.0, 0.0)
    assert demand_of(config, cluster_has_gpus=True) == Demand(8.0, 2.0)  # device auto
    cpu_only = tiny_config(runtime={"num_workers": 2, "device": "cpu"})
    assert demand_of(cpu_only, cluster_has_gpus=True) == Demand(2.0, 0.0)
    streamed = tiny_config(data={"loader": "ray"}, runtime={"device": "cpu"})
    assert demand_of(streamed, cluster_has_gpus=False) == Demand(2.0, 0.0)
    gpus = Quota(gpus=2)
    assert over_quota(gpus, "x", Usage(1, Demand(4.0, 2.0)), Demand(4.0, 1.0)) is not None
    assert over_quota(gpus, "x", Usage(1, Demand(4.0, 1.0)), Demand(4.0, 1.0)) is None
    assert over_quota(None, "x", Usage(99, Demand(1e6, 1e6)), Demand(1.0, 1.0)) is None
