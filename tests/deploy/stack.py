"""Readers of the deployment files, shared by the tests in tests/deploy.

Nothing here talks to Docker or Kubernetes: the files are parsed (PyYAML, python-dotenv),
interpolated the way ``docker compose`` does, and the kustomization is rendered for the
features it uses (resources, namespace, labels, images).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S_DIR = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

Json = dict[str, Any]


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is unset or empty, or a malformed reference."""


# Compose's interpolation syntax: $$ (a literal $), $VAR, ${VAR}, ${VAR:-default},
# ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, ${VAR+alt}.
_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<invalid>))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """``value`` with every variable reference replaced from ``env``, as Compose does."""

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("bare"):
            return env.get(match.group("bare"), "")
        name = match.group("name")
        if name is None:
            raise InterpolationError(f"invalid interpolation in {value!r}")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if unset else str(current)
        if op in ("?", ":?"):
            if unset:
                raise InterpolationError(f"{name}: {arg}")
            return str(current)
        if op in ("+", ":+"):
            return "" if unset else arg
        return "" if current is None else current

    return _REFERENCE.sub(substitute, value)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """A copy of a loaded YAML tree with every string interpolated."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(item, env) for key, item in node.items()}
    return node


def references(node: Any) -> Iterator[tuple[str, str | None]]:
    """Every ``(name, operator)`` referenced by interpolation anywhere in the tree."""
    if isinstance(node, str):
        for match in _REFERENCE.finditer(node):
            if match.group("bare"):
                yield match.group("bare"), None
            elif match.group("name"):
                yield match.group("name"), match.group("op")
    elif isinstance(node, list):
        for item in node:
            yield from references(item)
    elif isinstance(node, dict):
        for item in node.values():
            yield from references(item)


def references_with_defaults(node: Any) -> Iterator[tuple[str, str]]:
    """``(name, default)`` of every ``${NAME:-default}`` in the tree."""
    if isinstance(node, str):
        for match in _REFERENCE.finditer(node):
            if match.group("name") and match.group("op") in ("-", ":-"):
                yield match.group("name"), match.group("arg") or ""
    elif isinstance(node, list | dict):
        for item in node.values() if isinstance(node, dict) else node:
            yield from references_with_defaults(item)


def compose_raw() -> Json:
    """docker-compose.yml as YAML (anchors and merge keys resolved), not interpolated."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_example() -> dict[str, str]:
    """The variables .env.example sets (parsed by python-dotenv, as Compose reads .env)."""
    return {key: value or "" for key, value in dotenv_values(ENV_EXAMPLE).items()}


_COMMENTED = re.compile(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$")


def env_example_optional() -> dict[str, str]:
    """The commented-out ``# NAME=default`` lines of .env.example (documented defaults)."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _COMMENTED.match(line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def compose(env: Mapping[str, str] | None = None) -> Json:
    """docker-compose.yml interpolated with ``env`` (default: .env.example)."""
    return interpolate_tree(compose_raw(), env_example() if env is None else env)


def service_environment(service: Json) -> dict[str, str]:
    """A compose service's ``environment`` as a mapping (both Compose forms)."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        pairs = (item.partition("=") for item in environment)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in environment.items()}


# ----------------------------------------------------------------------- kubernetes

# Not resources of the kustomization: examples of what the operator creates (the Secret).
EXAMPLES = ("secret.example.yaml",)
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


def kustomization() -> Json:
    return yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())


def _pod_specs(obj: Json) -> Iterator[Json]:
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield spec["template"]["spec"]
    elif obj["kind"] == "RayCluster":
        yield spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["template"]["spec"]


def containers(obj: Json) -> Iterator[Json]:
    """Every container (init containers too) of the pod templates in ``obj``."""
    for pod in _pod_specs(obj):
        yield from pod.get("initContainers", [])
        yield from pod.get("containers", [])


def pod_specs(obj: Json) -> list[Json]:
    return list(_pod_specs(obj))


@cache
def _rendered() -> tuple[Json, ...]:
    kustomize = kustomization()
    objects: list[Json] = []
    for name in [*kustomize["resources"], *EXAMPLES]:
        for document in yaml.safe_load_all((K8S_DIR / name).read_text()):
            if document:
                objects.append(document)
    labels: dict[str, str] = {}
    for entry in kustomize.get("labels", []):
        labels.update(entry["pairs"])
    images = {image["name"]: image for image in kustomize.get("images", [])}
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if obj["kind"] not in _CLUSTER_SCOPED and "namespace" in kustomize:
            metadata["namespace"] = kustomize["namespace"]
        metadata.setdefault("labels", {}).update(labels)
        for container in containers(obj):
            image = images.get(container["image"])
            if image is not None:
                container["image"] = f"{image['newName']}:{image['newTag']}"
    return tuple(objects)


def render() -> list[Json]:
    """``kustomize build deploy/k8s`` for the features the base uses (a fresh copy), plus
    the `EXAMPLES`, which stand in for the objects the operator creates by hand."""
    return copy.deepcopy(list(_rendered()))


def find(objects: list[Json], kind: str, name: str) -> Json:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


# --------------------------------------------------------------------------- schemas


def compose_spec_schema() -> Json:
    """The Compose Specification JSON schema that check-jsonschema vendors."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def kubernetes_schema_dir(version: str) -> Path:
    """kubernetes-validate's strict schemas for one Kubernetes version (e.g. 1.30.0)."""
    root = resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    return Path(str(root.joinpath(f"v{version}-local-strict")))
