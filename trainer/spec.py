"""`TrainJobSpec`: everything a training job needs, in one typed file.

The service writes a job's spec once, when it accepts the job; the job store keeps it
typed; the Ray job receives it as its only input (``python -m trainer.run --spec
FILE``), and the driver hands its config to every worker. The config inside is validated
once per process boundary and is never re-serialised into a string inside another model.
A sweep's spec is `tuning.spec.SweepJobSpec`; the service's union of both is
`service.job_kinds.JobSpec`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainer.config import ConfigError, TrainConfig, describe_errors

SPEC_FILE = "spec.json"
"""The file name a job's spec has in the Ray job's working directory."""


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


class TrainJobSpec(JobSpecBase):
    """A training job: its config and where it runs, tracks and registers."""

    kind: Literal["train"] = "train"
    config: TrainConfig
    tags: dict[str, str] = Field(default_factory=dict, description="More MLflow run tags.")
    register_as: str | None = Field(
        None, min_length=1, max_length=256, description="Register the backbone under this name."
    )
    register_alias: str | None = Field(
        None, min_length=1, max_length=256, description="Alias of the registered version."
    )

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
