"""Environment checks of a config: what `TrainConfig` validation deliberately does not do.

Validation (`trainer.config`) checks shapes and ranges only, so any process can validate
a config without touching a disk or importing torch. Whether the config can run *here*
is this module's question, asked at admission on the API and again on every worker
before it opens anything (the two hosts need not see the same files):

- every path the job reads (``data.path``, ``eval.data.path``, a ``model.init`` file)
  resolves, symlinks followed, inside an allowed root (when roots are given) and
  exists; a path outside gets the same message whether or not it exists, so the answer
  never reveals what is on the host;
- every object-store URI (``s3://...`` as ``data.path``) lies under an allowed prefix
  (when prefixes are given);
- the backbone is a model timm can build (a registry lookup: no download).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

from trainer.config import ConfigError, TrainConfig
from trainer.init_weights import is_mlflow_uri
from trainer.object_store import is_object_uri

ALLOWED_URIS_ENV_VAR = "KLSSL_ALLOWED_DATA_URIS"
"""Object-store prefixes (``s3://bucket/prefix``) a worker confines data URIs to, as the
service's setting of the same name (a JSON list). Unset: no confinement."""
ALLOWED_ROOTS_ENV_VAR = "KLSSL_ALLOWED_DATA_ROOTS"
"""Roots a worker confines data paths to, as the service's setting of the same name
spells them (a JSON list; ``os.pathsep``-separated paths are accepted too). Unset: no
confinement (a user's own machine)."""


class PreflightError(ConfigError):
    """A config that validates but cannot run here; ``problems`` are ``field: reason``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config") -> None:
        self.fields = problems
        super().__init__([f"{field}: {reason}" for field, reason in problems], source)


@functools.cache
def timm_model_names() -> frozenset[str]:
    """Every architecture timm can build (no network access: a registry lookup)."""
    import timm  # heavy (it imports torch): paid only where a backbone must be checked

    return frozenset(timm.list_models())


def backbone_problem(name: str) -> str | None:
    """Why timm cannot build ``name`` (with the closest names), or None when it can."""
    known = timm_model_names()
    if name in known:
        return None
    close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
    hint = f"close timm names: {', '.join(close)}" if close else "see timm.list_models()"
    return f"unknown backbone {name!r}; {hint}"


def allowed_roots_from_env() -> list[Path] | None:
    """The roots of ``KLSSL_ALLOWED_DATA_ROOTS`` (None when unset: paths not confined)."""
    value = os.environ.get(ALLOWED_ROOTS_ENV_VAR, "").strip()
    if not value:
        return None
    if value.startswith("["):
        try:
            parts = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{ALLOWED_ROOTS_ENV_VAR} is not a JSON list: {error}") from None
        return [Path(str(part)) for part in parts]
    return [Path(part) for part in value.split(os.pathsep) if part.strip()]


def confined_path(path: Path, roots: Sequence[Path] | None) -> Path:
    """``path`` resolved (symlinks followed), inside one of ``roots`` and present.

    Args:
        path: the path as the user wrote it (``~`` expanded here).
        roots: allowed roots; None means any path (a user's own machine).

    Raises:
        ValueError: the path escapes every root, or does not exist (checked in that
            order, so a path outside gets one message whether or not it exists).
    """
    try:
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as error:  # loops, NUL bytes, too long
        raise ValueError(f"path {str(path)!r} cannot be resolved: {error}") from None
    if roots is not None:
        inside = any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots)
        if not inside:
            allowed = ", ".join(str(root) for root in roots) or "none configured"
            raise ValueError(
                f"path {str(path)!r} resolves outside the allowed data roots ({allowed})"
            )
    try:
        exists = resolved.exists()
    except OSError as error:
        raise ValueError(f"path {str(path)!r} cannot be read: {error}") from None
    if not exists:
        raise ValueError(f"path {str(path)!r} does not exist")
    return resolved


def confined_uri(uri: str, prefixes: Sequence[str] | None) -> str:
    """``uri`` when it lies under one of ``prefixes`` (None: any URI).

    A prefix matches whole path segments (``s3://data/cats`` admits
    ``s3://data/cats/x`` but not ``s3://data/catsup``); ``..`` segments are refused, as
    they would read as an escape whatever the store makes of them.

    Raises:
        ValueError: the URI lies outside every prefix, or has ``..`` segments.
    """
    if ".." in uri.split("/"):
        raise ValueError(f"URI {uri!r} has '..' segments")
    if prefixes is not None:
        inside = any(
            uri.rstrip("/") == prefix.rstrip("/") or uri.startswith(prefix.rstrip("/") + "/")
            for prefix in prefixes
        )
        if not inside:
            allowed = ", ".join(prefixes) or "none configured"
            raise ValueError(f"URI {uri!r} is outside the allowed data URIs ({allowed})")
    return uri


def confined_location(
    location: str | Path, roots: Sequence[Path] | None, uri_prefixes: Sequence[str] | None
) -> str | Path:
    """A data location checked by its kind: an object-store URI or a local path."""
    if isinstance(location, str) and is_object_uri(location):
        return confined_uri(location, uri_prefixes)
    return confined_path(Path(location), roots)


def allowed_uris_from_env() -> list[str] | None:
    """The prefixes of ``KLSSL_ALLOWED_DATA_URIS`` (a JSON list; None when unset)."""
    value = os.environ.get(ALLOWED_URIS_ENV_VAR, "").strip()
    if not value:
        return None
    try:
        parts = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"{ALLOWED_URIS_ENV_VAR} is not a JSON list: {error}") from None
    if not isinstance(parts, list):
        raise ValueError(f"{ALLOWED_URIS_ENV_VAR} is not a JSON list")
    return [str(part) for part in parts]


def preflight(
    config: TrainConfig,
    *,
    allowed_roots: Sequence[Path] | None = None,
    allowed_uris: Sequence[str] | None = None,
    source: str = "config",
) -> TrainConfig:
    """Check that ``config`` can run on this host; return it with its paths resolved.

    Args:
        config: a validated config.
        allowed_roots: roots every data path must resolve inside (None: any path).
        allowed_uris: prefixes every object-store URI must lie under (None: any URI).
        source: what the config is, for the error message.

    Raises:
        PreflightError: every problem found, as ``field: reason``.
    """
    problems: list[tuple[str, str]] = []
    if config.data.path is not None:
        try:
            location = confined_location(config.data.path, allowed_roots, allowed_uris)
        except ValueError as error:
            problems.append(("data.path", str(error)))
        else:
            data = config.data.model_copy(update={"path": location})
            config = config.model_copy(update={"data": data})
    labelled = config.eval.data
    if labelled is not None and labelled.path is not None:
        try:
            resolved = confined_location(labelled.path, allowed_roots, allowed_uris)
        except ValueError as error:
            problems.append(("eval.data.path", str(error)))
        else:
            evaluation = config.eval.model_copy(
                update={"data": labelled.model_copy(update={"path": resolved})}
            )
            config = config.model_copy(update={"eval": evaluation})
    init = config.model.init
    if init is not None and not is_mlflow_uri(init):
        try:
            resolved = confined_path(Path(init), allowed_roots)
            if not resolved.is_file():
                raise ValueError(f"path {init!r} is not a file")
        except ValueError as error:
            problems.append(("model.init", str(error)))
        else:
            model = config.model.model_copy(update={"init": str(resolved)})
            config = config.model_copy(update={"model": model})
    problem = backbone_problem(config.model.backbone)
    if problem is not None:
        problems.append(("model.backbone", problem))
    if problems:
        raise PreflightError(problems, source)
    return config
