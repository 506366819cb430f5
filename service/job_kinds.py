"""The kinds of job the service runs, and `JobSpec`, the one contract it hands Ray.

A job is a training run or a sweep. Everything that differs between them is in the table
`KINDS` (the config type, the entry point on the cluster, the run the service creates in
MLflow, the display name), so no other module needs ``isinstance`` chains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from service.store import Job, JobKind
from service.tracking import Progress, Tracking
from trainer.config import TrainConfig
from trainer.init_weights import is_mlflow_uri
from trainer.mlflow_names import ROLE_TAG, SWEEP_ID_TAG
from trainer.object_store import is_object_uri
from trainer.spec import TrainJobSpec
from tuning.config import SweepConfig
from tuning.spec import SweepJobSpec

JobSpec = Annotated[TrainJobSpec | SweepJobSpec, Field(discriminator="kind")]
"""What a job is: its kind, typed config, ids, storage and registration (one JSON file)."""
JOB_SPEC: TypeAdapter[TrainJobSpec | SweepJobSpec] = TypeAdapter(JobSpec)


@dataclass(frozen=True)
class KindInfo:
    """How the service handles one kind of job."""

    kind: JobKind
    config_type: type[TrainConfig] | type[SweepConfig]
    module: str
    """``python -m MODULE --spec FILE`` runs the job on the cluster."""
    run_config: Callable[[Any], TrainConfig]
    """The config the job's MLflow run is created from (a sweep's: its trials' base)."""
    name: Callable[[Any], str]
    """The default display name of a job of this config."""
    spec_type: type[TrainJobSpec] | type[SweepJobSpec]
    base: Callable[[Any], TrainConfig]
    """The training config a job of this kind runs (every trial's base for a sweep)."""
    with_base: Callable[[Any, TrainConfig], Any]
    """The config with its training config replaced (after preflight resolved paths)."""
    base_loc: tuple[str, ...]
    """Where that training config is in the request body (for 422 locations)."""
    run_tags: Callable[[str], dict[str, str]]
    """Tags of the job's MLflow run besides job id and owner, from the job id."""
    has_child_runs: bool
    """Whether the run is a parent whose children end with it."""
    progress: Callable[[Tracking, str, Any], Progress]
    """Read how far the job got from its MLflow run id and its config."""
    sampled_paths: Callable[[Any], list[tuple[tuple[str, ...], str | Path]]] = lambda config: []
    """Paths a job may read besides its base config's, with their request locations
    (a sweep's ``data.path`` or ``model.init`` choices): confined at admission like
    the base's."""


KINDS: dict[JobKind, KindInfo] = {
    JobKind.TRAIN: KindInfo(
        JobKind.TRAIN,
        TrainConfig,
        "trainer.run",
        run_config=lambda config: config,
        name=lambda config: config.name,
        spec_type=TrainJobSpec,
        base=lambda config: config,
        with_base=lambda config, base: base,
        base_loc=("body", "config"),
        run_tags=lambda job_id: {},
        has_child_runs=False,
        progress=lambda tracking, run_id, config: tracking.progress(run_id),
    ),
    JobKind.SWEEP: KindInfo(
        JobKind.SWEEP,
        SweepConfig,
        "tuning.run",
        run_config=lambda config: config.trial_base(),
        name=lambda config: config.sweep_name,
        spec_type=SweepJobSpec,
        base=lambda config: config.base,
        with_base=lambda config, base: config.model_copy(update={"base": base}),
        base_loc=("body", "config", "base"),
        run_tags=lambda job_id: {SWEEP_ID_TAG: job_id, ROLE_TAG: "sweep"},
        has_child_runs=True,
        progress=lambda tracking, run_id, config: tracking.sweep_progress(
            run_id, *config.objective
        ),
        sampled_paths=lambda config: sweep_paths(config),
    ),
}


PATH_FIELDS = ("data.path", "eval.data.path", "model.init")
"""TrainConfig fields that name something on disk (``model.init`` unless an MLflow URI)."""


def sweep_paths(sweep: SweepConfig) -> list[tuple[tuple[str, ...], str | Path]]:
    """Every path or object-store URI a sweep's space can give a trial, with its location
    in the request."""
    found: list[tuple[tuple[str, ...], str | Path]] = []
    for field, distribution in sweep.space.items():
        if field in PATH_FIELDS:
            for index, value in enumerate(getattr(distribution, "values", ())):
                if is_mlflow_uri(str(value)):
                    continue  # read from the tracking server, not from a disk
                loc = ("body", "config", "space", field, "values", str(index))
                found.append((loc, str(value) if is_object_uri(str(value)) else Path(str(value))))
    return found


def kind_of(config: TrainConfig | SweepConfig) -> KindInfo:
    """The table row of a config's kind."""
    return next(info for info in KINDS.values() if isinstance(config, info.config_type))


def kind_of_job(job: Job) -> KindInfo:
    """The table row of a stored job."""
    return KINDS[JobKind(job.kind)]


def parse_spec(raw: dict[str, Any]) -> TrainJobSpec | SweepJobSpec:
    """A stored spec, validated (the store's own column; a process boundary)."""
    return JOB_SPEC.validate_python(raw)
