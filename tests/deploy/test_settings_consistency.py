"""Every variable the deployment files set is one that something actually reads.

A ``KLSSL_*`` name must be a field of `service.settings.Settings` or a name the trainer
reads (found as a string literal in trainer/ or tuning/); any other name must be in
`THIRD_PARTY`, which says who reads it. A typo (KLSSL_RAY_ADRESS) or a setting that was
renamed in the code then fails here instead of being silently ignored in production.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from service.settings import Settings
from tests.deploy.stack import (
    ROOT,
    Json,
    compose,
    compose_raw,
    containers,
    env_example,
    env_example_optional,
    find,
    references,
    render,
    service_environment,
)

# Read by third-party software in the containers, not by klssl.
THIRD_PARTY = {
    "POSTGRES_USER": "postgres image: superuser created on first start",
    "POSTGRES_DB": "postgres image: database created on first start",
    "POSTGRES_PASSWORD": "postgres image: the superuser's password",
    "MINIO_ROOT_USER": "MinIO server (and minio-init's mc alias)",
    "MINIO_ROOT_PASSWORD": "MinIO server (and minio-init's mc alias)",
    "S3_ACCESS_KEY_ID": "minio-init: the service account it creates",
    "S3_SECRET_ACCESS_KEY": "minio-init: the service account it creates",
    "AWS_ACCESS_KEY_ID": "boto3 (MLflow artifacts), pyarrow S3 (Ray Train checkpoints)",
    "AWS_SECRET_ACCESS_KEY": "boto3 (MLflow artifacts), pyarrow S3 (Ray Train checkpoints)",
    "AWS_DEFAULT_REGION": "boto3 and pyarrow S3",
    "AWS_EC2_METADATA_DISABLED": "AWS SDKs: no instance-metadata lookups",
    "MLFLOW_S3_ENDPOINT_URL": "MLflow's S3 artifact repository (MinIO endpoint)",
    "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow server: accepted Host headers",
    "MLFLOW_BACKEND_STORE_URI": "the mlflow server command line (--backend-store-uri)",
    "MLFLOW_AUTH_DATABASE_URI": "the mlflow server command: its basic-auth config's database",
    "MLFLOW_AUTH_CONFIG_PATH": "mlflow server: where the basic-auth app's config is",
    "MLFLOW_AUTH_ADMIN_USERNAME": "mlflow server: the admin account made on the first start",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "mlflow server: the admin account made on the first start",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "mlflow server: the key of the basic-auth CSRF tokens",
    "MLFLOW_TRACKING_USERNAME": "MLflow's client (api, job drivers, workers): its login",
    "MLFLOW_TRACKING_PASSWORD": "MLflow's client (api, job drivers, workers): its login",
    "RAY_AUTH_MODE": "Ray: token authentication",
    "RAY_AUTH_TOKEN": "Ray: the cluster token",
}

# Variables of docker-compose.yml itself (interpolation only, never a container's env).
COMPOSE_VARIABLES = {
    "IMAGE",
    "GPU_IMAGE",
    "GPUS_PER_WORKER",
    "DATA_DIR",
    "API_PORT",
    "MLFLOW_PUBLIC_URL",
    "RAY_HEAD_NUM_CPUS",
    "RAY_SHM_SIZE",
    "POSTGRES_IMAGE",
    "MINIO_IMAGE",
    "MC_IMAGE",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_SECRET_KEY",
}

PRODUCTION_REQUIRED = {
    "KLSSL_ENVIRONMENT",
    "KLSSL_DATABASE_URL",
    "KLSSL_RAY_ADDRESS",
    "KLSSL_RAY_AUTH_TOKEN",
    "KLSSL_MLFLOW_TRACKING_URI",
    "KLSSL_STORAGE_PATH",
    "KLSSL_API_TOKENS",
}


def settings_variables() -> set[str]:
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def code_variables() -> set[str]:
    """Names the trainer (and the sweep driver) read, as literals in their source."""
    names: set[str] = set()
    for package in ("trainer", "tuning"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(re.findall(r"[\"'](KLSSL_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def compose_variables() -> dict[str, set[str]]:
    """Where each container variable is set: service name per variable."""
    where: dict[str, set[str]] = {}
    for name, service in compose()["services"].items():
        for variable in service_environment(service):
            where.setdefault(variable, set()).add(name)
    return where


def k8s_container_env(obj: Json, objects: list[Json]) -> Iterator[tuple[str, str]]:
    for container in containers(obj):
        for item in container.get("env", []):
            yield container["name"], item["name"]
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source["secretRef"]
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            data = find(objects, kind, ref["name"])
            for name in {**data.get("data", {}), **data.get("stringData", {})}:
                yield container["name"], name


def k8s_variables() -> set[str]:
    objects = render()
    names: set[str] = set()
    for obj in objects:
        if obj["kind"] in ("ConfigMap",):
            names.update(obj.get("data", {}))
        names.update(name for _, name in k8s_container_env(obj, objects))
        if obj["kind"] == "RayCluster":
            names.update(item["name"] for item in obj["spec"]["autoscalerOptions"]["env"])
    return names


def check_known(names: set[str], where: str) -> None:
    known = settings_variables() | code_variables()
    unknown_klssl = {n for n in names if n.startswith("KLSSL_") and n not in known}
    assert unknown_klssl == set(), f"{where}: no Settings field or trainer variable"
    others = {n for n in names if not n.startswith("KLSSL_")}
    assert others - THIRD_PARTY.keys() == set(), f"{where}: not in the documented allowlist"


def test_the_trainer_variables_are_found() -> None:
    assert {"KLSSL_STORAGE_PATH", "KLSSL_S3_ENDPOINT_URL", "KLSSL_MLFLOW_TRACKING_URI"} <= (
        code_variables()
    )
    assert "KLSSL_ENVIRONMENT" in settings_variables()


def test_compose_sets_only_known_variables() -> None:
    check_known(set(compose_variables()), "docker-compose.yml")


def test_the_env_example_sets_only_known_variables() -> None:
    names = set(env_example()) | set(env_example_optional())
    check_known(names - COMPOSE_VARIABLES, ".env.example")
    used = {name for name, _ in references(compose_raw())}
    assert used >= COMPOSE_VARIABLES, "a compose variable that compose does not read"


def test_kubernetes_sets_only_known_variables() -> None:
    check_known(k8s_variables(), "deploy/k8s")


def test_the_api_gets_every_production_setting_in_compose_and_kubernetes() -> None:
    where = compose_variables()
    missing = {name for name in PRODUCTION_REQUIRED if "api" not in where.get(name, set())}
    assert missing == set(), "docker-compose.yml api"
    objects = render()
    api = find(objects, "Deployment", "api")
    k8s_api = {name for _, name in k8s_container_env(api, objects)}
    assert PRODUCTION_REQUIRED - k8s_api == set(), "deploy/k8s api"


def test_ray_nodes_get_what_the_trainer_needs_for_s3() -> None:
    needs = {"KLSSL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    needs |= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    where = compose_variables()
    for service in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert {n for n in needs if service not in where.get(n, set())} == set(), service
    objects = render()
    ray = find(objects, "RayCluster", "klssl-ray")
    per_container: dict[str, set[str]] = {}
    for container, name in k8s_container_env(ray, objects):
        per_container.setdefault(container, set()).add(name)
    assert set(per_container) == {"ray-head", "ray-worker"}
    for container, names in per_container.items():
        assert needs <= names, container
