"""Pretrained starts: ``model.init`` loads backbone weights before the first step.

A start is a backbone state_dict, from one of:

- a local file: ``.pt`` / ``.pth`` (a state_dict, read with ``torch.load(weights_only=True)``)
  or ``.safetensors``; keys may carry one ``module.`` or ``backbone.`` prefix, as DDP or a
  whole-network save writes them;
- ``runs:/<run id>``: the ``backbone/`` artifact an earlier klssl run logged;
- ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (a registered model), or
  ``models:/<model id>`` (a logged model, as the run's ``klssl.backbone_model_uri`` tag
  gives it): read through the run that logged it (its ``backbone/`` artifact, not the
  pickled MLflow model, which would run code on load).

Nothing is downloaded from a model hub. Every tensor must fit the configured backbone:
a mismatch is an `InitError` naming the tensors, raised before training starts. The
student is loaded before the teacher is built from it, so both start from the same
weights. Whether a local file is allowed and present is `trainer.preflight`'s question;
the URI forms are checked here, where the tracking server is reachable.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.mlflow_names import BACKBONE_ARTIFACT_DIR, BACKBONE_WEIGHTS

if TYPE_CHECKING:  # the form check (`init_problem`) runs in config validation: no torch
    import torch
    from mlflow.tracking import MlflowClient
    from torch import nn

RUN_URI = re.compile(r"^runs:/(?P<run_id>[A-Za-z0-9]{1,64})(?:/(?P<path>[A-Za-z0-9_./-]*))?$")
MODEL_URI = re.compile(
    r"^models:/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,255})"
    r"(?:@(?P<alias>[A-Za-z0-9_-]{1,255})|/(?P<version>[0-9]{1,9}))?$"
)
FILE_SUFFIXES = (".pt", ".pth", ".safetensors")
STRIPPED_PREFIXES = ("module.", "backbone.")
SHOWN = 5  # tensors named per kind of mismatch; the rest are counted


class InitError(ValueError):
    """``model.init`` cannot be read, or its tensors do not fit the backbone."""


def is_mlflow_uri(init: str) -> bool:
    """Whether ``init`` names MLflow (``runs:/`` or ``models:/``) rather than a file."""
    return init.startswith(("runs:/", "models:/"))


def init_problem(init: str) -> str | None:
    """Why ``init`` is not a valid start (a pure check of its form), or None."""
    if is_mlflow_uri(init):
        if RUN_URI.match(init) or MODEL_URI.match(init):
            return None
        return (
            f"{init!r} is not runs:/<run id>, models:/<name>@<alias>, "
            "models:/<name>/<version> or models:/<model id>"
        )
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", init):
        return (
            f"{init!r}: only local files and MLflow runs:/ or models:/ URIs are read "
            "(nothing is downloaded from a hub)"
        )
    if not init.endswith(FILE_SUFFIXES):
        return f"{init!r}: expected a {', '.join(FILE_SUFFIXES)} file of backbone weights"
    return None


def load_init_state(init: str, *, tracking_uri: str | None = None) -> dict[str, torch.Tensor]:
    """The backbone state_dict ``init`` names (weights only; nothing runs on load)."""
    if not is_mlflow_uri(init):
        return read_state_file(Path(init))
    with tempfile.TemporaryDirectory() as tmp:
        return read_state_file(_download_backbone_weights(init, tracking_uri, Path(tmp)))


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` or ``torch.save`` file, prefixes stripped."""
    import torch

    if not path.is_file():
        raise InitError(f"model.init: {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same user-facing problem
        raise InitError(f"model.init: cannot read {path} as weights only: {error}") from error
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in raw.items()
    ):
        raise InitError(f"model.init: {path} does not hold a state_dict (names to tensors)")
    return _strip_prefixes(dict(raw))


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIPPED_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def apply_init(backbone: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``backbone`` strictly, or say which tensors do not fit.

    Raises:
        InitError: missing, unexpected or differently shaped tensors (named, counted).
    """
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key} {tuple(state[key].shape)} (the backbone's: {tuple(expected[key].shape)})"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(names)} {kind}: {', '.join(names[:SHOWN])}{', ...' if len(names) > SHOWN else ''}"
        for kind, names in (
            ("with another shape", mismatched),
            ("missing from the file", missing),
            ("not in the backbone", unexpected),
        )
        if names
    ]
    if problems:
        raise InitError(
            f"model.init {source} does not fit the configured backbone: " + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=True)


def _download_backbone_weights(init: str, tracking_uri: str | None, folder: Path) -> Path:
    """The ``backbone/`` weights file of the run ``init`` names, downloaded into ``folder``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from trainer.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri or resolve_tracking_uri())
    try:
        run_id = _run_of(client, init)
        local = client.download_artifacts(
            run_id, f"{BACKBONE_ARTIFACT_DIR}/{BACKBONE_WEIGHTS}", str(folder)
        )
    except MlflowException as error:
        raise InitError(
            f"model.init {init}: no klssl backbone there ({BACKBONE_ARTIFACT_DIR}/"
            f"{BACKBONE_WEIGHTS} of its run): {error.message}"
        ) from error
    return Path(local)


def _run_of(client: MlflowClient, init: str) -> str:
    """The id of the run whose ``backbone/`` artifact ``init`` stands for."""
    run = RUN_URI.match(init)
    if run is not None:
        path = (run["path"] or "").strip("/")
        allowed = ("", BACKBONE_ARTIFACT_DIR, f"{BACKBONE_ARTIFACT_DIR}/{BACKBONE_WEIGHTS}")
        if path not in allowed:
            raise InitError(
                f"model.init {init}: a run's start is its {BACKBONE_ARTIFACT_DIR}/ artifact "
                f"(runs:/<run id> or runs:/<run id>/{BACKBONE_ARTIFACT_DIR})"
            )
        return str(run["run_id"])
    model = MODEL_URI.match(init)
    if model is None:
        raise InitError(f"model.init: {init_problem(init)}")
    if model["alias"] is not None:
        run_id = client.get_model_version_by_alias(model["name"], model["alias"]).run_id
    elif model["version"] is not None:
        run_id = client.get_model_version(model["name"], model["version"]).run_id
    else:
        run_id = client.get_logged_model(model["name"]).source_run_id
    if not run_id:
        raise InitError(f"model.init {init}: the model was not logged by a run")
    return str(run_id)
