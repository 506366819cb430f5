"""MLflow is not reachable without credentials, in compose and on Kubernetes.

Both run MLflow's basic-auth app (`mlflow server --app-name basic-auth`): every route but
``/health`` asks for a login. The api and the jobs (through the Ray nodes' environment)
log in as the admin account the server creates on its first start; people get their own
accounts. Checked here: the wiring, with the same parsers as the other deploy tests; the
start command the files give the server, run for real with a stand-in ``mlflow`` that
records its arguments; and that the installed MLflow has the app and the image installs
what the app needs.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import stat
import subprocess
from importlib.metadata import entry_points, requires
from pathlib import Path

import mlflow
import pytest
from packaging.requirements import Requirement

from tests.deploy.stack import (
    ROOT,
    Json,
    compose,
    compose_raw,
    containers,
    env_example,
    find,
    references,
    render,
    service_environment,
)

CLIENTS = ("api", "ray-head", "ray-worker", "ray-worker-gpu")
Completed = subprocess.CompletedProcess[str]
AUTH_APP = "--app-name basic-auth"


def real_env() -> dict[str, str]:
    """.env.example with every placeholder replaced by a value of the same shape."""
    return {name: value.replace("change-me-", "3f9c1e0d-") for name, value in env_example().items()}


def k8s_env(container: Json) -> dict[str, Json]:
    return {item["name"]: item for item in container.get("env", [])}


def test_the_installed_mlflow_has_the_app_and_the_image_installs_its_requirements() -> None:
    assert "basic-auth" in {entry.name for entry in entry_points(group="mlflow.app")}
    needed = [
        Requirement(line.split(";")[0])
        for line in requires("mlflow") or []
        if 'extra == "auth"' in line
    ]
    assert needed, "mlflow[auth] names no requirement: check the basic-auth app by hand"
    pinned = {}
    for line in (ROOT / "deploy" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            pinned[requirement.name.lower()] = requirement
    for requirement in needed:
        assert requirement.name.lower() in pinned, f"deploy/requirements.txt: add {requirement}"
        (version,) = [spec.version for spec in pinned[requirement.name.lower()].specifier]
        assert requirement.specifier.contains(version), f"{requirement} vs {version}"


def test_compose_runs_mlflow_behind_a_login_that_the_api_and_the_jobs_hold() -> None:
    services = compose()
    mlflow = services["services"]["mlflow"]
    assert AUTH_APP in mlflow["command"][-1]
    server = service_environment(mlflow)
    required = {name for name, op in references(compose_raw()) if op == ":?"}
    assert {"MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"} <= required
    assert server["MLFLOW_AUTH_ADMIN_PASSWORD"] == env_example()["MLFLOW_ADMIN_PASSWORD"]
    assert server["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env_example()["MLFLOW_SECRET_KEY"]
    assert server["MLFLOW_AUTH_DATABASE_URI"].endswith("@postgres:5432/mlflow_auth")
    init_sql = (ROOT / "deploy" / "compose" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow_auth" in init_sql
    for name in CLIENTS:
        client = service_environment(services["services"][name])
        assert client["MLFLOW_TRACKING_USERNAME"] == server["MLFLOW_AUTH_ADMIN_USERNAME"], name
        assert client["MLFLOW_TRACKING_PASSWORD"] == server["MLFLOW_AUTH_ADMIN_PASSWORD"], name
    # The healthcheck uses the one route the app leaves open.
    assert "/health'" in mlflow["healthcheck"]["test"][-1]


def test_kubernetes_runs_mlflow_behind_a_login_that_the_api_and_the_jobs_hold() -> None:
    objects = render()
    deployment = find(objects, "Deployment", "mlflow")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert AUTH_APP in server["args"][0]
    env = k8s_env(server)
    password = env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]
    username = env["MLFLOW_AUTH_ADMIN_USERNAME"]["valueFrom"]["configMapKeyRef"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["key"]
    assert env["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"]["key"]
    settings = find(objects, "ConfigMap", username["name"])["data"]
    ray = find(objects, "RayCluster", "klssl-ray")
    clients = [*containers(find(objects, "Deployment", "api")), *containers(ray)]
    assert {c["name"] for c in clients} == {"api", "ray-head", "ray-worker"}
    for client in clients:
        assert k8s_env(client)["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
        from_settings = {s["configMapRef"]["name"] for s in client["envFrom"]}
        assert username["name"] in from_settings, client["name"]
    assert settings[username["key"]] and username["key"] == "MLFLOW_TRACKING_USERNAME"
    # Inside the cluster only: no NodePort, LoadBalancer or Ingress; the probes use /health.
    service = find(objects, "Service", "mlflow")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not [o for o in objects if o["kind"] == "Ingress"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"


def start_commands(env: dict[str, str]) -> dict[str, list[str]]:
    """The mlflow server's start command in compose (interpolated with ``env``) and in
    Kubernetes."""
    mlflow = compose(env)["services"]["mlflow"]
    (server,) = containers(find(render(), "Deployment", "mlflow"))
    return {"compose": mlflow["command"], "kubernetes": [*server["command"], *server["args"]]}


@pytest.fixture
def fake_mlflow(tmp_path: Path) -> Path:
    """A stand-in ``mlflow`` on PATH that writes its arguments to ``args`` and exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "mlflow"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "args"}\n')
    script.chmod(0o755)
    return tmp_path


def run_start(
    command: list[str], fake: Path, database_uri: str, secrets: dict[str, str]
) -> Completed:
    env = {
        "PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_AUTH_CONFIG_PATH": str(fake / "auth.ini"),
        "MLFLOW_AUTH_DATABASE_URI": database_uri,
        "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://klssl:x@postgres:5432/mlflow",
        **secrets,
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
@pytest.mark.parametrize("placeholder", ["MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY"])
def test_the_server_refuses_the_placeholders(
    fake_mlflow: Path, where: str, placeholder: str
) -> None:
    command = start_commands(env_example())[where]
    values = {**real_env(), placeholder: env_example()[placeholder]}
    secrets = {
        "MLFLOW_AUTH_ADMIN_PASSWORD": values["MLFLOW_ADMIN_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": values["MLFLOW_SECRET_KEY"],
    }
    done = run_start(command, fake_mlflow, "sqlite:///x.db", secrets)
    assert done.returncode == 1 and "change-me-* placeholders" in done.stderr
    assert not (fake_mlflow / "args").exists() and not (fake_mlflow / "auth.ini").exists()


@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_the_server_starts_the_auth_app_with_its_database(
    fake_mlflow: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = start_commands(real_env())[where]
    database_uri = "postgresql+psycopg://klssl:p%40ss%25word@postgres:5432/mlflow_auth"
    secrets = {"MLFLOW_AUTH_ADMIN_PASSWORD": "3f9c1e0d8a7b", "MLFLOW_FLASK_SERVER_SECRET_KEY": "5b"}
    done = run_start(command, fake_mlflow, database_uri, secrets)
    assert done.returncode == 0, done.stderr
    args = (fake_mlflow / "args").read_text().split()
    assert args[:3] == ["server", "--app-name", "basic-auth"]
    assert "--serve-artifacts" in args
    config = fake_mlflow / "auth.ini"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # Read back by MLflow's own reader, '%' included. Loaded from its file: the package
    # around it imports the auth app's Flask-WTF, which only the image installs.
    module = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", module)
    assert spec is not None and spec.loader is not None
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(config))
    auth = reader.read_auth_config()
    assert auth.database_uri == database_uri
    assert auth.default_permission == "READ"
    parsed = configparser.ConfigParser()
    parsed.read(config)
    assert "admin_password" not in parsed["mlflow"], "the password stays in the environment"
