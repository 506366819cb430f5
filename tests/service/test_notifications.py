"""Webhook notifications: real receivers on 127.0.0.1, the real app and SQLite stores,
the dispatcher driven by hand against the fake Ray of `tests.service.conftest`."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.deps import Services
from service.dispatcher import submission_id
from service.notifications import Notifier
from service.schemas import utc
from service.settings import Settings
from service.store import JobState, utcnow
from service.webhooks import (
    DeliveryError,
    destination_problem,
    post_json,
    resolved_address,
    webhook_client,
)
from tests.service.conftest import ALICE, FakeRay, job_body
from tests.service.test_api import run_count, sweep_of

SECRET = "T0001/B0002/s3cr3t-token"
"""The part of a webhook URL that is its secret (as in Slack's)."""


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every POST and answers ``status``;
    while ``hold`` is set it answers only once ``release`` is (a slow receiver)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.hosts: list[str] = []
        self.status = 200
        self.hold = False
        self.release = threading.Event()
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.posts.append(json.loads(self.rfile.read(length)))
                receiver.hosts.append(self.headers["Host"])
                receiver.arrived.set()
                if receiver.hold:
                    receiver.release.wait(30)
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/{SECRET}"

    def events(self) -> list[tuple[str, str]]:
        return [(post["job_id"], post["event"]) for post in self.posts]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def refused_url() -> str:
    """A URL whose port nothing listens on (a receiver that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks/down"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The tests' receivers are on loopback: allowed here, as a deployment would allow
    an in-cluster receiver's network."""
    return settings.model_copy(
        update={
            "notify_private_networks": [ipaddress.ip_network("127.0.0.0/8")],
            "notify_timeout_s": 10.0,
            "notify_backoff_s": 10.0,
            "notify_max_attempts": 3,
        }
    )


def submit(client: TestClient, notify: list[str], name: str = "svc-notify") -> str:
    response = client.post("/v1/jobs", json={**job_body(name), "notify": notify}, headers=ALICE)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def rounds(services: Services, count: int = 3) -> None:
    """Several dispatcher rounds and delivery passes, interleaved."""
    for _ in range(count):
        services.dispatcher.run_once()
        services.notifier.deliver_due()


def test_a_receiver_gets_one_post_per_final_state(
    client: TestClient, services: Services, fake_ray: FakeRay, receiver: Receiver
) -> None:
    good = submit(client, [receiver.url], name="svc-notify-ok")
    bad = submit(client, [receiver.url], name="svc-notify-failed")
    rounds(services)
    job = services.store.get(good)
    assert job is not None and job.mlflow_run_id is not None
    mlflow = services.tracking.client()
    for key, value in {"knn_top1": 93.5, "random_init_knn_top1": 85.25, "loss": 2.0}.items():
        mlflow.log_metric(job.mlflow_run_id, key, value, step=7)
    sweep = client.post(
        "/v1/sweeps",
        json={**sweep_of(job_body("svc-notify-sweep")), "notify": [receiver.url],
              "name": "<!channel> & co"},
        headers=ALICE,
    ).json()  # fmt: skip
    assert client.post(f"/v1/sweeps/{sweep['id']}/cancel", headers=ALICE).status_code == 200
    fake_ray.set(submission_id(good), JobState.SUCCEEDED)
    fake_ray.set(submission_id(bad), JobState.FAILED, "exit code 3: cluster too small")
    rounds(services, 4)

    assert sorted(receiver.events()) == sorted(
        [(good, "SUCCEEDED"), (bad, "FAILED"), (sweep["id"], "CANCELLED")]
    )
    posts = {post["job_id"]: post for post in receiver.posts}
    succeeded = posts[good]
    assert {key: succeeded[key] for key in ("kind", "name", "owner", "state", "event")} == {
        "kind": "train", "name": "svc-notify-ok", "owner": "alice", "state": "SUCCEEDED",
        "event": "SUCCEEDED",
    }  # fmt: skip
    assert succeeded["metrics"] == {"knn_top1": 93.5, "random_init_knn_top1": 85.25, "loss": 2.0}
    assert succeeded["ray_dashboard_url"].endswith(f"/#/jobs/{submission_id(good)}")
    assert succeeded["error"] is None and succeeded["health"] is None
    text = succeeded["text"]
    assert "\n" not in text and good in text and "succeeded" in text
    assert "93.50% " in text and "random init 85.25%" in text  # beside its baseline
    failed = posts[bad]
    assert failed["error"] == "exit code 3: cluster too small" and failed["state"] == "FAILED"
    assert "cluster too small" in failed["text"]
    cancelled = posts[sweep["id"]]
    assert (cancelled["kind"], cancelled["state"]) == ("sweep", "CANCELLED")
    assert cancelled["ray_dashboard_url"] is None  # it never reached Ray
    # A name cannot ping a Slack channel.
    assert (
        "<!channel>" not in cancelled["text"] and "&lt;!channel&gt; &amp; co" in cancelled["text"]
    )

    # The record says what was delivered; the URL's secret is never shown.
    for path in (f"/v1/jobs/{good}", f"/v1/sweeps/{sweep['id']}"):
        response = client.get(path, headers=ALICE)
        assert SECRET not in response.text
        body = response.json()
        assert body["notify"] == [f"http://127.0.0.1:{receiver.port}/hooks/…"]
        (notification,) = body["notifications"]
        assert notification["status"] == "delivered" and notification["attempts"] == 1
        assert notification["last_error"] is None and notification["delivered_at"] is not None
    listed = client.get("/v1/jobs", headers=ALICE).json()["items"]
    assert all(item["notifications"] is None for item in listed)  # only about one record


def test_a_collapse_verdict_is_notified_once(
    client: TestClient, services: Services, fake_ray: FakeRay, receiver: Receiver
) -> None:
    job_id = submit(client, [receiver.url])
    rounds(services)
    fake_ray.set(submission_id(job_id), JobState.RUNNING)
    rounds(services, 1)
    job = services.store.get(job_id)
    assert job is not None and job.mlflow_run_id is not None
    mlflow = services.tracking.client()
    mlflow.set_tag(job.mlflow_run_id, "klssl.health", "collapsed")
    mlflow.set_tag(job.mlflow_run_id, "klssl.collapse_step", "40")
    rounds(services)
    (post,) = receiver.posts
    assert (post["event"], post["state"], post["health"], post["collapse_step"]) == (
        "COLLAPSED", "RUNNING", "collapsed", 40,
    )  # fmt: skip
    assert "collapsed at step 40" in post["text"]
    # It recovers and collapses again: the verdict was told once.
    mlflow.set_tag(job.mlflow_run_id, "klssl.health", "ok")
    rounds(services, 2)
    mlflow.set_tag(job.mlflow_run_id, "klssl.health", "collapsed")
    rounds(services, 2)
    fake_ray.set(submission_id(job_id), JobState.SUCCEEDED)
    rounds(services)
    assert receiver.events() == [(job_id, "COLLAPSED"), (job_id, "SUCCEEDED")]


def test_deliveries_never_hold_the_dispatcher(
    client: TestClient, services: Services, fake_ray: FakeRay, receiver: Receiver
) -> None:
    """A slow receiver holds its delivery pass, in its own thread as in the app: the
    dispatcher's rounds meanwhile finish jobs and dispatch the queue."""
    receiver.hold = True
    first = submit(client, [receiver.url])
    others = [submit(client, []) for _ in range(3)]
    services.dispatcher.run_once()
    fake_ray.set(submission_id(first), JobState.SUCCEEDED)
    services.dispatcher.run_once()
    delivering = threading.Thread(target=services.notifier.deliver_due)
    delivering.start()
    assert receiver.arrived.wait(20)  # the POST is in flight, unanswered
    for job_id in others[:2]:
        fake_ray.set(submission_id(job_id), JobState.SUCCEEDED)
    services.dispatcher.run_once()
    assert [services.store.get(job_id).state for job_id in others] == [  # type: ignore[union-attr]
        "SUCCEEDED", "SUCCEEDED", "PENDING",
    ]  # fmt: skip
    assert delivering.is_alive()  # still waiting for the receiver
    receiver.release.set()
    delivering.join(30)
    (notification,) = services.store.notifications(first)
    assert notification.delivered_at is not None and len(receiver.posts) == 1


def test_a_failed_notification_is_retried_with_backoff_then_given_up(
    client: TestClient,
    services: Services,
    fake_ray: FakeRay,
    receiver: Receiver,
    refused_url: str,
    settings: Settings,
) -> None:
    """A receiver that is down (refused) and one too slow to answer (timed out) are
    tried at most notify_max_attempts (3) times, 10 s then 20 s apart, then given up."""
    receiver.hold = True
    notifier = Notifier(services.store, settings.model_copy(update={"notify_timeout_s": 0.3}))
    job_id = submit(client, [refused_url, receiver.url])
    services.dispatcher.run_once()
    fake_ray.set(submission_id(job_id), JobState.SUCCEEDED)
    services.dispatcher.run_once()

    start = utcnow()
    assert notifier.deliver_due(start) == 0
    rows = services.store.notifications(job_id)
    assert [row.attempts for row in rows] == [1, 1]
    assert all(utc(row.next_attempt_at) == start + timedelta(seconds=10) for row in rows)  # type: ignore[arg-type]
    down, slow = rows
    assert "ConnectError" in (down.last_error or "")
    assert "Timeout" in (slow.last_error or "")
    notifier.deliver_due(start + timedelta(seconds=9))  # not due yet
    assert [row.attempts for row in services.store.notifications(job_id)] == [1, 1]
    later = start + timedelta(seconds=10)
    notifier.deliver_due(later)
    rows = services.store.notifications(job_id)
    assert [row.attempts for row in rows] == [2, 2]
    assert all(utc(row.next_attempt_at) == later + timedelta(seconds=20) for row in rows)  # type: ignore[arg-type]
    for hours in (1, 2, 3):  # the third attempt was the last
        notifier.deliver_due(start + timedelta(hours=hours))
    rows = services.store.notifications(job_id)
    assert [(row.attempts, row.next_attempt_at, row.delivered_at) for row in rows] == [
        (3, None, None), (3, None, None),
    ]  # fmt: skip
    assert len(receiver.posts) == 3
    body = client.get(f"/v1/jobs/{job_id}", headers=ALICE).json()
    assert [n["status"] for n in body["notifications"]] == ["gave_up", "gave_up"]
    assert "ConnectError" in body["notifications"][0]["last_error"]


def test_after_a_restart_what_was_not_delivered_is_delivered_once(
    settings: Settings, fake_ray: FakeRay, receiver: Receiver
) -> None:
    """A new app on the same database delivers what the old one had not (queued, or
    failed once), and never again what it had."""
    fast = settings.model_copy(update={"notify_backoff_s": 0.05, "dispatch_interval_s": 0.05})
    flaky = Receiver()
    try:
        flaky.status = 503
        first = create_app(fast, ray_client=fake_ray, run_dispatcher=False)
        services: Services = first.state.services
        with TestClient(first) as client:
            delivered = submit(client, [receiver.url, flaky.url])
            queued_only = submit(client, [receiver.url])
            services.dispatcher.run_once()
            fake_ray.set(submission_id(delivered), JobState.SUCCEEDED)
            services.dispatcher.run_once()
            services.notifier.deliver_due()
            assert receiver.events() == [(delivered, "SUCCEEDED")]
            assert len(flaky.posts) == 1  # answered 503: due again after the backoff
            fake_ray.set(submission_id(queued_only), JobState.SUCCEEDED)
            services.dispatcher.run_once()  # queued, and the process stops before a pass
        services.notifier.resign()  # as its shutdown does (else the lease expires first)

        flaky.status = 200
        second = create_app(fast, ray_client=fake_ray, run_dispatcher=True)
        with TestClient(second):  # its notifier loop runs
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (len(flaky.posts) < 2 or len(receiver.posts) < 2):
                time.sleep(0.05)
            for _ in range(3):
                second.state.services.notifier.deliver_due()
        assert len(flaky.posts) == 2 and flaky.posts[-1]["job_id"] == delivered
        assert sorted(receiver.events()) == sorted(
            [(delivered, "SUCCEEDED"), (queued_only, "SUCCEEDED")]
        )
    finally:
        flaky.close()


def test_notify_is_part_of_the_idempotent_request(client: TestClient, receiver: Receiver) -> None:
    headers = {**ALICE, "Idempotency-Key": "notify-1"}
    body = {**job_body("svc-notify-idem"), "notify": [receiver.url]}
    first = client.post("/v1/jobs", json=body, headers=headers)
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.json()["notifications"] == []
    other = client.post("/v1/jobs", json={**body, "notify": []}, headers=headers)
    assert other.status_code == 422
    assert other.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/sweeps"])
@pytest.mark.parametrize(
    ("notify", "field", "reason"),
    [
        (["ftp://hooks.example.com/x"], "notify.0", "only http and https"),
        (["https://user:pw@hooks.example.com/x"], "notify.0", "no user name or password"),
        (["https://hooks.example.com/" + "a" * 2048], "notify.0", "at most 2048 characters"),
        ([f"https://h{i}.example.com/x" for i in range(6)], "notify", "at most 5 items"),
        (["https://a.example.com/x"] * 2, "notify", "more than once"),
        (["http://2130706433/x"], "notify.0", "four decimal numbers"),
        (["https://hooks.example.com/\u00e9"], "notify.0", "printable ASCII"),
        (["http://10.0.0.5/hook"], "notify.0", "not a public address"),
        (["http://169.254.169.254/latest/meta-data/"], "notify.0", "not a public address"),
        (["http://[::ffff:192.168.1.1]/x"], "notify.0", "not a public address"),
        (["https://ok.example.com/x", "http://[fd00::1]/x"], "notify.1", "not a public address"),
    ],
)
def test_hostile_notify_is_a_422_naming_the_field_and_leaves_nothing(
    route: str,
    notify: list[str],
    field: str,
    reason: str,
    client: TestClient,
    services: Services,
) -> None:
    body = {**job_body("svc-notify-hostile"), "notify": notify}
    if route == "/v1/sweeps":
        body = sweep_of(body)
    response = client.post(route, json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    problems = {
        ".".join(map(str, item["loc"][1:])): item["msg"] for item in response.json()["detail"]
    }
    assert field in problems and reason in problems[field], problems
    assert client.get(route, headers=ALICE).json()["total"] == 0
    assert run_count(services, "svc-notify-hostile") == 0


def test_a_name_is_sent_to_the_address_that_was_checked(
    settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's addresses are checked when it is resolved, and the POST goes to that
    address under the URL's own host name (no second lookup to rebind)."""
    answers = {"hooks.example.com": "127.0.0.1", "rebound.example.com": "10.1.2.3"}
    real = socket.getaddrinfo

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host in answers:
            return real(answers[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    url = f"http://hooks.example.com:{receiver.port}/hooks/x"
    with webhook_client(settings) as client:
        post_json(client, url, {"text": "hi"}, settings)
        assert receiver.hosts == [f"hooks.example.com:{receiver.port}"]
        assert receiver.posts == [{"text": "hi"}]
        with pytest.raises(
            DeliveryError, match=r"resolves to 10\.1\.2\.3 is not a public"
        ) as refused:
            post_json(client, "http://rebound.example.com/x", {}, settings)
        assert refused.value.permanent
        strict = settings.model_copy(update={"notify_private_networks": []})
        with pytest.raises(DeliveryError, match="not a public address") as loopback:
            post_json(client, receiver.url, {}, strict)  # allowed when queued, not now
        assert loopback.value.permanent and len(receiver.posts) == 1
        assert "not a public address" in str(
            destination_problem("http://metadata.localhost/x", strict)
        )
        hosts = settings.model_copy(update={"notify_allowed_hosts": [".slack.com"]})
        with pytest.raises(DeliveryError, match="not one of notify_allowed_hosts"):
            post_json(client, url, {}, hosts)
    assert str(resolved_address(url, settings)) == "127.0.0.1"


@pytest.mark.parametrize(
    ("status", "permanent"), [(302, True), (404, True), (429, False), (503, False)]
)
def test_what_an_answer_means(
    status: int, permanent: bool, settings: Settings, receiver: Receiver
) -> None:
    receiver.status = status
    with webhook_client(settings) as client, pytest.raises(DeliveryError) as failed:
        post_json(client, receiver.url, {}, settings)
    assert failed.value.permanent is permanent
    assert ("redirect" if status == 302 else f"HTTP {status}") in str(failed.value)
    assert len(receiver.posts) == 1  # not followed, not repeated


def test_a_retried_job_that_fails_again_is_told_of_again(
    client: TestClient, services: Services, fake_ray: FakeRay, receiver: Receiver
) -> None:
    job_id = submit(client, [receiver.url], name="svc-notify-retry")
    rounds(services)
    fake_ray.set(submission_id(job_id), JobState.FAILED, "out of memory")
    rounds(services)
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=ALICE).status_code == 200
    rounds(services)
    fake_ray.set(submission_id(job_id, 2), JobState.FAILED, "out of memory again")
    rounds(services, 4)
    assert receiver.events() == [(job_id, "FAILED"), (job_id, "FAILED")]
    assert [post["error"] for post in receiver.posts] == ["out of memory", "out of memory again"]
