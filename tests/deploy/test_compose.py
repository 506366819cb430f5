"""docker-compose.yml: the Compose Specification schema, two parsers, and the wiring.

Schema: the compose-spec JSON schema vendored by the check-jsonschema package. Parser: the
`compose-spec` package (Python bindings of the Rust compose_spec crate, a typed parser of
the specification). Neither needs Docker; no engine runs on the development machines.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml
from compose_spec import PyCompose

from service.settings import PLACEHOLDER_SECRETS
from tests.deploy.stack import (
    COMPOSE_FILE,
    InterpolationError,
    compose,
    compose_raw,
    compose_spec_schema,
    env_example,
    env_example_optional,
    interpolate,
    references,
    references_with_defaults,
    service_environment,
)

SCALABLE = ("ray-worker", "ray-worker-gpu")
# Service -> the host ports it may publish (host IP, host port).
PUBLISHED = {
    "api": {("", "8000")},
    "mlflow": {("127.0.0.1", "5000")},
    "ray-head": {("127.0.0.1", "8265")},
    "minio": {("127.0.0.1", "9001")},
}


def schema_errors(document: Any) -> list[str]:
    schema = compose_spec_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_the_file_validates_against_the_compose_specification() -> None:
    assert schema_errors(compose_raw()) == []
    assert schema_errors(compose()) == []


def test_the_schema_catches_mistakes() -> None:
    """The check is not vacuous: a misspelt key and a bad condition are errors."""
    broken = compose()
    broken["services"]["api"]["dependson"] = ["postgres"]
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "healthy"
    errors = schema_errors(broken)
    assert any("dependson" in error for error in errors)
    assert any("healthy" in error for error in errors)


def test_the_compose_spec_parser_reads_the_interpolated_file() -> None:
    parsed = PyCompose.from_yaml(yaml.safe_dump(compose(), sort_keys=False))
    assert set(parsed.service_names()) == set(compose()["services"])
    with pytest.raises(ValueError, match="imagex"):
        PyCompose.from_yaml("services:\n  web:\n    imagex: nginx\n")


def test_a_missing_secret_stops_compose_with_its_name() -> None:
    env = env_example()
    for name in ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "KLSSL_API_TOKENS"):
        missing = {key: value for key, value in env.items() if key != name}
        with pytest.raises(InterpolationError, match=name):
            compose(missing)
        with pytest.raises(InterpolationError, match=name):
            compose({**env, name: ""})


def test_secrets_are_required_and_never_defaulted_or_inlined() -> None:
    raw = compose_raw()
    required = {name for name, op in references(raw) if op == ":?"}
    assert {
        "POSTGRES_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "S3_ACCESS_KEY_ID",
        "S3_SECRET_ACCESS_KEY",
        "RAY_AUTH_TOKEN",
        "KLSSL_API_TOKENS",
    } <= required
    defaulted = {name for name, op in references(raw) if op in (":-", "-")}
    assert required & defaulted == set(), "a secret with a default would never be missed"
    text = COMPOSE_FILE.read_text()
    assert not [secret for secret in PLACEHOLDER_SECRETS if secret in text]


def test_every_variable_is_documented_in_the_env_example() -> None:
    raw = compose_raw()
    used = {name for name, _ in references(raw)}
    required = {name for name, op in references(raw) if op in (":?", "?")}
    documented = set(env_example()) | set(env_example_optional())
    assert used - documented == set(), "add these to .env.example"
    assert documented - used == set(), ".env.example documents variables compose never reads"
    assert required - set(env_example()) == set(), "required variables must be set, not commented"


def test_documented_defaults_match_the_compose_defaults() -> None:
    optional = env_example_optional()
    for name, default in references_with_defaults(compose_raw()):
        assert optional.get(name) == default, f"{name}: .env.example says {optional.get(name)!r}"


def test_dependencies_exist_and_their_conditions_can_be_met() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for target, dependency in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = dependency["condition"]
            target_service = services[target]
            if condition == "service_healthy":
                check = target_service.get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{target}: no healthcheck"
            if condition == "service_completed_successfully":
                assert target_service.get("restart") == "no", f"{target} must be one-shot"
                assert "profiles" not in target_service


def test_the_dependency_graph_has_no_cycle() -> None:
    services = compose()["services"]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for target in services[name].get("depends_on", {}):
            visit(target, (*path, name))
        done.add(name)

    for name in services:
        visit(name, ())


def parse_port(entry: Any) -> tuple[str, str]:
    """(host IP, host port) of a short-syntax port mapping."""
    parts = str(entry).split(":")
    assert len(parts) in (2, 3), f"publish container ports explicitly: {entry!r}"
    return ("", parts[0]) if len(parts) == 2 else (parts[0], parts[1])


def test_ports_are_published_only_where_intended() -> None:
    services = compose()["services"]
    published = {
        name: {parse_port(port) for port in service["ports"]}
        for name, service in services.items()
        if service.get("ports")
    }
    assert published == PUBLISHED


def test_ray_workers_scale() -> None:
    services = compose()["services"]
    for name in SCALABLE:
        service = services[name]
        assert "container_name" not in service
        assert "ports" not in service
        command = service["command"]
        assert command[:2] == ["ray", "start"] and "--address=ray-head:6379" in command
        assert "--block" in command
    head = services["ray-head"]["command"]
    assert {"--head", "--block", "--dashboard-host=0.0.0.0"} <= set(head)


def test_the_gpu_worker_reserves_nvidia_devices_in_the_gpu_profile() -> None:
    services = compose()["services"]
    gpu = services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    others = [name for name, service in services.items() if "profiles" in service]
    assert others == ["ray-worker-gpu"], "everything else starts without a profile"


def test_ray_nodes_run_with_token_authentication_and_s3_access() -> None:
    services = compose()["services"]
    env = env_example()
    for name in ("ray-head", *SCALABLE):
        environment = service_environment(services[name])
        assert environment["RAY_AUTH_MODE"] == "token"
        assert environment["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]
        assert environment["KLSSL_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert environment["AWS_ACCESS_KEY_ID"] == env["S3_ACCESS_KEY_ID"]
        assert environment["AWS_SECRET_ACCESS_KEY"] == env["S3_SECRET_ACCESS_KEY"]
        assert int(services[name]["shm_size"].rstrip("gb")) >= 1
    api = service_environment(services["api"])
    assert api["KLSSL_RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]


def test_the_api_is_wired_to_the_stack() -> None:
    services = compose()["services"]
    api = services["api"]
    environment = service_environment(api)
    assert environment["KLSSL_ENVIRONMENT"] == "production"
    assert environment["KLSSL_RAY_ADDRESS"] == "http://ray-head:8265"
    assert environment["KLSSL_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert environment["KLSSL_DATABASE_URL"].startswith("postgresql+psycopg://klssl:")
    assert environment["KLSSL_DATABASE_URL"].endswith("@postgres:5432/klssl")
    assert environment["KLSSL_STORAGE_PATH"].startswith("s3://klssl-checkpoints/")
    assert json.loads(environment["KLSSL_ALLOWED_DATA_ROOTS"]) == ["/data"]
    assert json.loads(environment["KLSSL_API_TOKENS"])
    assert api["build"]["dockerfile"] == "deploy/Dockerfile"
    assert api["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # Every node and the api see the datasets at the same path, read-only.
    for name in ("api", "ray-head", *SCALABLE):
        assert any(v.endswith(":/data:ro") for v in services[name]["volumes"]), name


def test_the_buckets_minio_init_creates_are_the_ones_in_use() -> None:
    services = compose()["services"]
    script = services["minio-init"]["command"][0]
    policy_mount = services["minio-init"]["volumes"][0].split(":")[0]
    policy = json.loads((COMPOSE_FILE.parent / policy_mount).read_text())
    allowed = {
        resource.removeprefix("arn:aws:s3:::").split("/")[0]
        for statement in policy["Statement"]
        for resource in statement["Resource"]
    }
    storage = service_environment(services["api"])["KLSSL_STORAGE_PATH"]
    artifacts = services["mlflow"]["command"][-1]
    for bucket in ("klssl-checkpoints", "klssl-mlflow"):
        assert f"local/{bucket}" in script
        assert bucket in allowed
    assert storage.startswith("s3://klssl-checkpoints/")
    assert "--artifacts-destination s3://klssl-mlflow" in artifacts


def test_postgres_holds_a_database_each_for_klssl_and_mlflow() -> None:
    services = compose()["services"]
    init_sql = services["postgres"]["volumes"][1].split(":")[0]
    assert "CREATE DATABASE mlflow" in (COMPOSE_FILE.parent / init_sql).read_text()
    mlflow_url = service_environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert mlflow_url.endswith("@postgres:5432/mlflow")


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$$HOME ${SET} $SET", env) == "$HOME x x"
    assert interpolate("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d}", env) == "d d "
    assert interpolate("${SET:?boom}", env) == "x"
    with pytest.raises(InterpolationError, match="EMPTY: boom"):
        interpolate("${EMPTY:?boom}", env)


def test_python_healthchecks_compile() -> None:
    for name, service in compose()["services"].items():
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")
