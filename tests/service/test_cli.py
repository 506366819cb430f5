"""``klssl submit | status | logs | cancel | list`` against the app (fake Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.cli import app as klssl
from service.deps import Services
from service.store import JobState
from tests.service.conftest import FakeRay, job_body

runner = CliRunner()


@pytest.fixture(autouse=True)
def cli_talks_to_the_app(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's HTTP client is the app's test client, with the token from --token."""

    def make(url: str, token: str | None) -> httpx.Client:
        client.headers.clear()
        if token:
            client.headers["Authorization"] = f"Bearer {token}"
        return client

    monkeypatch.setattr("service.cli.client.client", make)
    monkeypatch.setenv("KLSSL_API_TOKEN", "token-alice-0123456789")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(job_body("cli-test")["config"]))
    return path


def test_submit_status_list_logs_and_cancel(
    config_file: Path, services: Services, fake_ray: FakeRay
) -> None:
    submitted = runner.invoke(klssl, ["submit", str(config_file), "--set", "schedule.epochs=3"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    record = services.store.get(job_id)
    assert record is not None and record.config.schedule.epochs == 3

    registering = runner.invoke(
        klssl, ["submit", str(config_file), "--register-as", "cli-backbone", "--alias", "best"]
    )
    assert registering.exit_code == 0, registering.output
    registered = services.store.get(registering.stdout.strip())
    assert registered is not None
    assert registered.spec.registration().model_dump() == {
        "register_as": "cli-backbone",
        "register_alias": "best",
    }
    hook = "https://hooks.example.com/services/klssl"
    urgent = runner.invoke(klssl, ["submit", str(config_file), "--priority", "7", "--notify", hook])
    assert urgent.exit_code == 0, urgent.output
    urgent_record = services.store.get(urgent.stdout.strip())
    assert urgent_record is not None
    assert (urgent_record.priority, urgent_record.notify) == (7, [hook])
    too_high = runner.invoke(klssl, ["submit", str(config_file), "--priority", "1001"])
    assert too_high.exit_code == 2 and "less than or equal to 1000" in too_high.output
    orphan_alias = runner.invoke(klssl, ["submit", str(config_file), "--alias", "best"])
    assert orphan_alias.exit_code != 0 and "register_alias needs register_as" in orphan_alias.output

    status = runner.invoke(klssl, ["status", job_id])
    assert status.exit_code == 0 and json.loads(status.stdout)["state"] == "QUEUED"
    listed = runner.invoke(klssl, ["list", "--state", "queued"])
    assert listed.exit_code == 0 and job_id in listed.stdout

    services.dispatcher.run_once()
    fake_ray.log_text[f"klssl-{job_id}"] = "hello from the driver\n"
    logs = runner.invoke(klssl, ["logs", job_id])
    assert logs.exit_code == 0 and logs.stdout == "hello from the driver\n"

    cancelled = runner.invoke(klssl, ["cancel", job_id])
    assert cancelled.exit_code == 0 and "CANCELLING" in cancelled.stdout  # on Ray: stopping
    services.dispatcher.run_once()  # Ray reports the job stopped
    assert "CANCELLED" in runner.invoke(klssl, ["status", job_id]).stdout
    again = runner.invoke(klssl, ["cancel", job_id])
    assert again.exit_code == 1 and "409" in again.output
    retried = runner.invoke(klssl, ["retry", job_id])
    assert retried.exit_code == 0 and "QUEUED" in retried.stdout, retried.output
    assert runner.invoke(klssl, ["retry", job_id]).exit_code == 1  # queued: a 409


def test_follow_reports_the_final_state(
    config_file: Path, services: Services, fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    def finish_on_poll(seconds: float) -> None:
        services.dispatcher.run_once()
        for submission in fake_ray.submissions:
            fake_ray.set(submission["id"], JobState.SUCCEEDED)
        services.dispatcher.run_once()

    monkeypatch.setattr("service.cli.client.time.sleep", finish_on_poll)
    result = runner.invoke(klssl, ["submit", str(config_file), "--follow"])
    assert result.exit_code == 0, result.output
    assert "SUCCEEDED" in result.stdout


def test_invalid_config_prints_the_field_and_exits_2(config_file: Path) -> None:
    result = runner.invoke(
        klssl, ["submit", str(config_file), "--set", "objective.teacher_temp=-1"]
    )
    assert result.exit_code == 2
    assert "config.objective.teacher_temp" in result.output


def test_a_wrong_token_is_refused(config_file: Path) -> None:
    result = runner.invoke(klssl, ["list", "--token", "nope"])
    assert result.exit_code == 1 and "401" in result.output
