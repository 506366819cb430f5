"""`TrainJobSpec`: everything a training job needs, in one typed file.

The service writes a job's spec once, when it accepts the job; the job store keeps it
typed; the Ray job receives it as its only input (``python -m trainer.run --spec
FILE``), and the driver hands its config to every worker. The config inside is validated
once per process boundary and is never re-serialised into a string inside another model.
A sweep's spec is `tuning.spec.SweepJobSpec`; the service's union of both is
`service.job_kinds.JobSpec`.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from trainer.bounds import MAX_CAPACITY_WAIT_S
from trainer.config import ConfigError, TrainConfig, describe_errors

SPEC_FILE = "spec.json"
"""The file name a job's spec has in the Ray job's working directory."""


def _model_name(name: str) -> str:
    # MLflow's own rules (mlflow.utils.validation), checked before anything is created.
    if not name.strip() or "/" in name or ":" in name or posixpath.normpath(name) != name:
        raise ValueError(
            f"model name {name!r}: not blank, no '/' or ':', no '.' or '..' segments "
            "(MLflow's rules)"
        )
    return name


def _model_alias(alias: str) -> str:
    if not re.fullmatch(r"[\w-]+", alias) or alias.lower() == "latest":
        raise ValueError(f"alias {alias!r}: letters, digits, _ and - only, not 'latest'")
    if re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"alias {alias!r}: v<number> names a version, not an alias")
    return alias


ModelName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_model_name)]
"""A registered model name MLflow accepts."""
ModelAlias = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_model_alias)]
"""A model version alias MLflow accepts (not ``latest``, not ``v<N>``)."""


class JobSpecBase(BaseModel):
    """What every job kind's spec holds besides its config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The service's job id: it names the Ray Train run (or the Tune "
        "experiment), so a driver that Ray restarts resumes instead of starting again.",
    )
    owner: str | None = Field(None, max_length=128, description="Who submitted the job.")
    mlflow_run_id: str | None = Field(
        None, max_length=64, description="The MLflow run the service created for the job."
    )
    storage_path: str | None = Field(
        None,
        max_length=4096,
        description="Checkpoint storage: a shared directory or s3://bucket/prefix "
        "(None: KLSSL_STORAGE_PATH, else runs/ray).",
    )
    capacity_wait_s: float = Field(
        0.0,
        ge=0,
        le=MAX_CAPACITY_WAIT_S,
        description="How long the driver waits for an autoscaling cluster to grow to the "
        "job's size before failing it (0: at once).",
    )


class Registration(BaseModel):
    """Where a training job registers its exported backbone in MLflow's model registry
    (in the job's spec, and in the REST body that asks for it)."""

    register_as: ModelName | None = Field(
        None, description="Register the exported backbone under this model name."
    )
    register_alias: ModelAlias | None = Field(
        None, description="Alias of the registered version (needs register_as)."
    )

    @model_validator(mode="after")
    def _alias_needs_a_name(self) -> Self:
        if self.register_alias is not None and self.register_as is None:
            raise ValueError("register_alias needs register_as")
        return self

    def registration(self) -> Registration:
        """Only the registration fields (of a request body or a spec)."""
        return Registration(register_as=self.register_as, register_alias=self.register_alias)


class TrainJobSpec(JobSpecBase, Registration):
    """A training job: its config and where it runs, tracks and registers."""

    kind: Literal["train"] = "train"
    config: TrainConfig
    tags: dict[str, str] = Field(default_factory=dict, description="More MLflow run tags.")

    def to_json(self) -> str:
        """The spec as the Ray job's file."""
        return self.model_dump_json(indent=2)


def read_spec_file(path: Path, model: type[JobSpecBase]) -> JobSpecBase:
    """A spec file validated as ``model``; `ConfigError` with every problem otherwise."""
    from pydantic import ValidationError

    if not path.exists():
        raise ConfigError([f"{path}: no such file"], "job spec")
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as error:
        raise ConfigError(describe_errors(error), f"job spec {path}") from None
