"""deploy/k8s: every rendered object against the Kubernetes schemas, and the wiring.

Schemas: the strict (no unknown fields) Kubernetes JSON schemas that the
kubernetes-validate package bundles, for the oldest and newest versions we support. The
RayCluster custom resource has no published JSON schema in a package: it is checked
against tests/deploy/schemas/raycluster-v1-subset.schema.json (written from KubeRay's
ray.io/v1 API, a subset: see its $comment), and its pod templates against Kubernetes'
own PodTemplateSpec schema.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
from referencing import Registry, Resource

from tests.deploy.stack import (
    EXAMPLES,
    K8S_DIR,
    SCHEMAS,
    Json,
    containers,
    find,
    kubernetes_schema_dir,
    kustomization,
    pod_specs,
    render,
)

VERSIONS = ("1.30.0", "1.37.0")


@cache
def k8s_validator(version: str, schema_file: str) -> jsonschema.protocols.Validator:
    """A validator for one type, its references resolved in the bundled definitions."""
    directory = kubernetes_schema_dir(version)
    schema = json.loads((directory / schema_file).read_text())
    definitions = json.loads((directory / "_definitions.json").read_text())
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(instance)
    ]


def raycluster_schema() -> Json:
    schema: Json = json.loads((SCHEMAS / "raycluster-v1-subset.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def test_the_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - set(EXAMPLES)
    assert not [name for name in listed if "example" in name], "placeholders never deploy"
    assert set(kustomization()) <= {
        "apiVersion",
        "kind",
        "namespace",
        "labels",
        "resources",
        "images",
    }, "tests/deploy/stack.py render() only knows these kustomize features"


@pytest.mark.parametrize("version", VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for obj in render():
        if obj["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = "/".join(map(str, error.path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} {path}: {error.message}")
        checked.append(obj["kind"])
    assert sorted(set(checked)) == [
        "ConfigMap",
        "Deployment",
        "Namespace",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]


def test_the_checks_catch_mistakes() -> None:
    """Not vacuous: an unknown field and a wrong type fail both kinds of check."""
    api = find(render(), "Deployment", "api")
    api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, VERSIONS[-1], strict=True)
    ray = find(render(), "RayCluster", "klssl-ray")
    ray["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    ray["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    found = errors(jsonschema.Draft202012Validator(raycluster_schema()), ray)
    assert any("maxReplica" in error for error in found)
    assert any("num-cpus" in error for error in found)
    head = ray["spec"]["headGroupSpec"]["template"]
    head["spec"]["containers"][0]["ports"][0]["containerPort"] = "6379"
    assert errors(k8s_validator(VERSIONS[-1], "podtemplatespec-v1.json"), head)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_raycluster_validates(version: str) -> None:
    ray = find(render(), "RayCluster", "klssl-ray")
    assert errors(jsonschema.Draft202012Validator(raycluster_schema()), ray) == []
    kubernetes_validate.validate(  # the object metadata, as any object's
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": ray["metadata"]}, version, True
    )
    template = k8s_validator(version, "podtemplatespec-v1.json")
    spec = ray["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        assert errors(template, group["template"]) == [], group.get("groupName", "head")
    options = spec["autoscalerOptions"]
    env_var = k8s_validator(version, "envvar-v1.json")
    for item in options["env"]:
        assert errors(env_var, item) == []
    security = k8s_validator(version, "securitycontext-v1.json")
    assert errors(security, options["securityContext"]) == []


def env_names(container: Json, objects: list[Json]) -> dict[str, str | None]:
    """Name -> literal value (None for a reference) of a container's environment."""
    names: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        ref = source.get("configMapRef") or source["secretRef"]
        obj = find(objects, kind, ref["name"])
        names.update(obj.get("data", {}) | obj.get("stringData", {}))
    for item in container.get("env", []):
        names[item["name"]] = item.get("value")
    return names


def test_every_reference_points_at_an_existing_key() -> None:
    objects = render()
    for obj in objects:
        env_lists = [c.get("env", []) for c in containers(obj)]
        if obj["kind"] == "RayCluster":
            env_lists.append(obj["spec"]["autoscalerOptions"]["env"])
        for env in env_lists:
            for item in env:
                source = item.get("valueFrom", {})
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["key"] in find(objects, "Secret", ref["name"])["stringData"]
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in find(objects, "ConfigMap", ref["name"])["data"]
        for pod in pod_specs(obj):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    find(objects, "PersistentVolumeClaim", claim)


def test_services_select_pods_and_name_their_ports() -> None:
    objects = render()
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            d
            for d in objects
            if d["kind"] == "Deployment"
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in containers(targets[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports


def test_the_api_has_probes_and_every_production_setting() -> None:
    objects = render()
    api = find(objects, "Deployment", "api")
    assert api["spec"]["replicas"] == 1 and api["spec"]["strategy"]["type"] == "Recreate"
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "service.app:app_from_env" in container["command"]
    env = env_names(container, objects)
    assert env["KLSSL_ENVIRONMENT"] == "production"
    for name in (
        "KLSSL_DATABASE_URL",
        "KLSSL_RAY_ADDRESS",
        "KLSSL_RAY_AUTH_TOKEN",
        "KLSSL_MLFLOW_TRACKING_URI",
        "KLSSL_STORAGE_PATH",
        "KLSSL_API_TOKENS",
        "KLSSL_ALLOWED_DATA_ROOTS",
    ):
        assert name in env, name
    ray = find(objects, "RayCluster", "klssl-ray")
    address = urlparse(str(env["KLSSL_RAY_ADDRESS"]))
    assert address.hostname == f"{ray['metadata']['name']}-head-svc" and address.port == 8265
    tracking = urlparse(str(env["KLSSL_MLFLOW_TRACKING_URI"]))
    find(objects, "Service", str(tracking.hostname))
    assert str(env["KLSSL_STORAGE_PATH"]).startswith("s3://")


def test_ray_runs_with_token_auth_and_autoscaled_gpu_workers() -> None:
    objects = render()
    spec = find(objects, "RayCluster", "klssl-ray")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "dashboard", "containerPort": 8265} in head["ports"]
    (gpu,) = (g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    # From zero: the jobs wait for the autoscaler (KLSSL_CAPACITY_WAIT_S) instead of failing.
    assert 0 == gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    settings = find(objects, "ConfigMap", "klssl-settings")["data"]
    assert float(settings["KLSSL_CAPACITY_WAIT_S"]) >= 600
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    api = find(objects, "Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    api_token = next(e for e in api["env"] if e["name"] == "KLSSL_RAY_AUTH_TOKEN")
    for env in (head["env"], worker["env"], spec["autoscalerOptions"]["env"]):
        values = {e["name"]: e for e in env}
        assert values["RAY_AUTH_MODE"]["value"] == "token"
        assert values["RAY_AUTH_TOKEN"]["valueFrom"] == api_token["valueFrom"]
    for container in (head, worker):
        env = env_names(container, objects)
        assert {"KLSSL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/dev/shm", "/data"} <= mounts


def test_pods_run_without_privileges_on_pinned_images() -> None:
    objects = render()
    registry = {image["newName"] for image in kustomization()["images"]}
    for obj in objects:
        for pod in pod_specs(obj):
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 1000
        for container in containers(obj):
            name, _, tag = container["image"].rpartition(":")
            assert name in registry and re.fullmatch(r"[\w.-]+", tag), container["image"]
            assert tag != "latest"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "resources" in container and "memory" in container["resources"]["limits"]


def test_ray_pods_bring_probes_that_need_no_wget() -> None:
    """KubeRay injects wget-based probes unless a container has its own."""
    ray = find(render(), "RayCluster", "klssl-ray")
    for container in containers(ray):
        for probe in ("readinessProbe", "livenessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "-c"], container["name"]
            compile(command[2], f"{container['name']} {probe}", "exec")
