"""MLflow tracking of a training run: one run per job, written by the driver and rank 0.

The driver creates the run before training starts (params = the flattened config,
``config.json`` as an artifact) and hands its id to the workers, so every attempt of a
job, including one restarted after a worker failure, logs into the same run. Rank 0
logs metrics with their global step through a `MetricLogger`, which never logs a
(metric, step) pair twice: a restarted attempt re-trains the steps after its checkpoint
and skips those already in the run. At the end rank 0 exports the teacher backbone twice
(a timm-loadable state_dict and an MLflow pytorch model) and the driver closes the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from trainer.config import ModelConfig, TrainConfig
from trainer.mlflow_names import (
    BACKBONE_ARTIFACT_DIR,
    BACKBONE_MODEL_NAME,
    BACKBONE_MODEL_URI_TAG,
    BACKBONE_RECIPE,
    BACKBONE_WEIGHTS,
    CHECKPOINTS_ARTIFACT,
    CONFIG_ARTIFACT,
    LATEST_CHECKPOINT_TAG,
)
from trainer.models import backbone_kwargs, is_vit

if TYPE_CHECKING:  # MLflow loads on first use: only rank 0 of a cluster needs it.
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

TRACKING_URI_ENV_VARS = ("KLSSL_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

# MLflow limits: 500 params / 1000 metrics per batch, 6000 characters per param value.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(output_dir: Path | None = None) -> str:
    """The tracking URI from the environment, else a SQLite store under ``output_dir``.

    ``KLSSL_MLFLOW_TRACKING_URI`` wins over ``MLFLOW_TRACKING_URI``; without either the
    store is ``<output_dir>/mlflow.db`` (default output dir: ``runs``).
    """
    for name in TRACKING_URI_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    directory = (output_dir or Path("runs")).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def absolute_tracking_uri(tracking_uri: str) -> str:
    """A local store's URI with an absolute path: Ray workers run in other directories."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path.expanduser().resolve()}"
    if "://" not in tracking_uri and not tracking_uri.startswith("databricks"):
        return Path(tracking_uri).expanduser().resolve().as_uri()  # a plain file store path
    return tracking_uri


@dataclass(frozen=True)
class TrackedRun:
    """Where a run lives: enough for any process to log into it."""

    tracking_uri: str
    run_id: str
    experiment_id: str

    def client(self) -> MlflowClient:
        """A client bound to this run's tracking store."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database, as an absolute URI.

    MLflow's own default for a database store is ``./mlruns`` relative to the current
    directory, which differs between the driver and Ray workers (they run elsewhere).
    Tracking servers choose their artifact store themselves (None).
    """
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.parent / "mlartifacts" / experiment).resolve().as_uri()


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)
    from mlflow.exceptions import MlflowException

    location = default_artifact_location(tracking_uri, name)
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except MlflowException as error:
        # Two runs of a new experiment created at once: the other request won the race.
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return str(existing.experiment_id)


def create_run(
    config: TrainConfig,
    tracking_uri: str,
    *,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    experiment_id: str | None = None,
) -> TrackedRun:
    """Create the MLflow run of a job (driver side, before training starts).

    The experiment is the config's ``name`` unless ``experiment_id`` is given (a sweep's
    trials go into their parent run's experiment); params are the flattened config and
    ``config.json`` is stored as an artifact, so the run says exactly how it was made.
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment_id is None:
        experiment_id = _experiment_id(client, config.name, tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    tracked = TrackedRun(tracking_uri, run.info.run_id, experiment_id)
    params = [Param(key, value[:_MAX_PARAM_LENGTH]) for key, value in sorted(config.flat().items())]
    try:
        for start in range(0, len(params), _PARAMS_PER_BATCH):
            client.log_batch(tracked.run_id, params=params[start : start + _PARAMS_PER_BATCH])
        client.log_text(tracked.run_id, config.to_json(), CONFIG_ARTIFACT)
    except BaseException:
        client.delete_run(tracked.run_id)  # nothing half-created: a run says how it was made
        raise
    return tracked


def attach_run(tracking_uri: str, run_id: str, *, reopen: bool = True) -> TrackedRun:
    """An existing run (a resubmitted job continues its run); an error if it is gone.

    ``reopen`` marks it RUNNING again: for a run this process owns (it created it in an
    earlier attempt). A run owned by someone else (the service's) keeps its status, so a
    cancelled job's KILLED run is not brought back to life.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    if reopen:
        client.update_run(run_id, status="RUNNING")
    return TrackedRun(tracking_uri, run_id, run.info.experiment_id)


def set_tags(tracked: TrackedRun, tags: Mapping[str, str]) -> None:
    """Set run tags in one call."""
    from mlflow.entities import RunTag

    if tags:
        tracked.client().log_batch(
            tracked.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()]
        )


def finish_run(tracked: TrackedRun, status: RunStatus = "FINISHED") -> None:
    """Close the run with a terminal status (driver side, after training)."""
    tracked.client().set_terminated(tracked.run_id, status=status)


class MetricLogger:
    """Logs metrics with their global step into one run, each (key, step) at most once.

    On creation it reads, for every metric already in the run, the last step logged:
    a restarted attempt that re-trains steps after its checkpoint then logs only steps
    beyond what the run holds, so metric histories never contain a step twice. The same
    rule drops an epoch-end value whose step the last step's log already covered.

    Args:
        tracked: the run to log into.
        system_metrics: also sample CPU, memory, disk, network (and GPU when the
            monitoring packages are installed) as ``system/*`` metrics; resumed runs
            continue the system-metric steps.
    """

    def __init__(self, tracked: TrackedRun, *, system_metrics: bool = False) -> None:
        self.tracked = tracked
        self.client = tracked.client()
        self.last_step = self._logged_steps()
        self._monitor: Any = None
        if system_metrics:
            self._monitor = _start_system_metrics(tracked)

    def _logged_steps(self) -> dict[str, int]:
        run = self.client.get_run(self.tracked.run_id)
        steps: dict[str, int] = {}
        for key in run.data.metrics:
            if key.startswith("system/"):
                continue
            history = self.client.get_metric_history(self.tracked.run_id, key)
            steps[key] = max(metric.step for metric in history)
        return steps

    def log(self, metrics: Mapping[str, float], step: int) -> int:
        """Log finite ``metrics`` at ``step`` (keys already logged there are skipped).

        Returns:
            How many metrics were written.
        """
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), timestamp, step)
            for key, value in sorted(metrics.items())
            if step > self.last_step.get(key, -1) and math.isfinite(float(value))
        ]
        for start in range(0, len(batch), _METRICS_PER_BATCH):
            self.client.log_batch(
                self.tracked.run_id, metrics=batch[start : start + _METRICS_PER_BATCH]
            )
        for metric in batch:
            self.last_step[metric.key] = step
        return len(batch)

    def close(self) -> None:
        """Stop the system-metrics sampler, if any."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def _start_system_metrics(tracked: TrackedRun) -> Any:
    """MLflow's system-metrics sampler for this run, or None when psutil is missing."""
    try:
        import psutil  # noqa: F401  (MLflow's sampler needs it)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(
        tracked.run_id, resume_logging=True, tracking_uri=tracked.tracking_uri
    )
    monitor.start()
    return monitor


def log_checkpoint_uris(tracked: TrackedRun, checkpoints: Iterable[Mapping[str, Any]]) -> None:
    """Record the kept checkpoints (URI, epoch, step) as an artifact and the newest as a tag."""
    records = list(checkpoints)
    client = tracked.client()
    client.log_text(tracked.run_id, json.dumps(records, indent=2), CHECKPOINTS_ARTIFACT)
    if records:
        client.set_tag(tracked.run_id, LATEST_CHECKPOINT_TAG, str(records[-1]["uri"]))


def timm_recipe(config: ModelConfig, image_size: int) -> dict[str, Any]:
    """The ``timm.create_model`` call that rebuilds a backbone of ``config``.

    Uses the same keyword arguments as `trainer.models.build_backbone`;
    ``small_image_stem`` says that the
    ResNet-style 3x3 stride-1 stem without max-pool replaces timm's stem.
    """
    return {
        "model_name": config.backbone,
        "pretrained": False,
        "num_classes": 0,
        "kwargs": backbone_kwargs(config, image_size),
        "small_image_stem": config.small_images and not is_vit(config),
    }


def create_from_recipe(recipe: Mapping[str, Any]) -> nn.Module:
    """A fresh timm model built from a `timm_recipe` (random weights)."""
    import timm

    from trainer.models import build_backbone

    if recipe["small_image_stem"]:
        # The stem change is ours, not a timm argument: rebuild through our builder.
        config = ModelConfig(
            backbone=recipe["model_name"], small_images=True, backbone_kwargs=recipe["kwargs"]
        )
        return build_backbone(config, image_size=0)
    model: nn.Module = timm.create_model(
        recipe["model_name"],
        pretrained=False,
        num_classes=recipe["num_classes"],
        **recipe["kwargs"],
    )
    return model


def export_backbone(
    tracked: TrackedRun,
    backbone: nn.Module,
    config: TrainConfig,
    *,
    register_as: str | None = None,
    alias: str | None = None,
) -> str | None:
    """Log the backbone as ``backbone/`` (state_dict + timm recipe) and an MLflow model.

    The state_dict is checked to load strictly into a fresh model built from the
    recipe before it is logged. With ``register_as`` the MLflow model is registered
    under that name, and ``alias`` (e.g. ``champion``) points at the new version.

    Returns:
        The URI of the logged MLflow pytorch model; None when the run had been stopped
        (KILLED) before the export, which then logs nothing.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import timm
    import torch
    from mlflow.models import infer_signature

    client = tracked.client()
    if str(client.get_run(tracked.run_id).info.status) == "KILLED":
        # Cancelled, or a sweep trial Tune stopped while its workers went on: logging a
        # model would reopen the run (start_run below) and undo that verdict.
        log.warning("run %s was stopped: its backbone is not exported", tracked.run_id)
        return None
    recipe = timm_recipe(config.model, config.data.global_crop_size)
    state = {key: value.detach().cpu() for key, value in backbone.state_dict().items()}
    create_from_recipe(recipe).load_state_dict(state, strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / BACKBONE_ARTIFACT_DIR
        folder.mkdir()
        torch.save(state, folder / BACKBONE_WEIGHTS)
        (folder / BACKBONE_RECIPE).write_text(json.dumps(recipe, indent=2))
        client.log_artifacts(tracked.run_id, str(folder), BACKBONE_ARTIFACT_DIR)

    model = backbone.cpu().eval()
    size = config.data.global_crop_size
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy().astype(np.float32))
    mlflow.set_tracking_uri(tracked.tracking_uri)
    # Inside the run, so that MLflow 3 files the logged model under the run's experiment
    # (otherwise: the default experiment, with artifacts in the current directory).
    # Leaving the context marks the run FINISHED; the driver sets the final status after.
    with mlflow.start_run(run_id=tracked.run_id, log_system_metrics=False):
        info = mlflow.pytorch.log_model(
            model,
            name=BACKBONE_MODEL_NAME,
            signature=signature,
            serialization_format="pickle",
            # Explicit requirements: inferring them would load the model in a subprocess.
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"timm=={timm.__version__}",
            ],
        )
    model_uri = str(info.model_uri)
    client.set_tag(tracked.run_id, BACKBONE_MODEL_URI_TAG, model_uri)
    if register_as is not None:
        version = mlflow.register_model(model_uri, register_as)
        if alias is not None:
            client.set_registered_model_alias(register_as, alias, version.version)
    return model_uri


def load_backbone(tracked: TrackedRun) -> nn.Module:
    """The exported backbone of a run: a fresh timm model with the logged state_dict."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            tracked.client().download_artifacts(tracked.run_id, BACKBONE_ARTIFACT_DIR, tmp)
        )
        recipe = json.loads((local / BACKBONE_RECIPE).read_text())
        state = torch.load(local / BACKBONE_WEIGHTS, map_location="cpu", weights_only=True)
    model = create_from_recipe(recipe)
    model.load_state_dict(state, strict=True)
    return model
