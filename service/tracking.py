"""The service's side of MLflow: create a job's run, read its progress and history.

The run is created when the job is accepted, so a record has its MLflow run id at once;
the training driver then logs into that run (``trainer.run --mlflow-run-id``).
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from trainer.config import TrainConfig
from trainer.mlflow_names import (
    CHECKPOINTS_ARTIFACT,
    COLLAPSE_STEP_TAG,
    HEALTH_TAG,
    LATEST_CHECKPOINT_TAG,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from tuning.report import TrialRecord

STEP_METRIC = "loss"


@dataclass(frozen=True)
class Progress:
    """How far a run got, from its latest metrics."""

    epoch: int | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    latest_checkpoint: str | None = None
    health: str | None = None
    """The trainer's verdict, ``ok`` or ``collapsed`` (None before the first log)."""
    collapse_step: int | None = None


@dataclass(frozen=True)
class MetricPoint:
    """One logged value of a metric."""

    step: int
    value: float
    timestamp: int


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store does not answer."""


class TrackingRejectedError(ValueError):
    """MLflow refused what the request would record (a client's error: a 422)."""


class Tracking:
    """MLflow operations of the control plane, against one tracking URI."""

    def __init__(
        self, tracking_uri: str, *, timeout_s: float = 5.0, max_parallel_creates: int = 4
    ) -> None:
        self.tracking_uri = tracking_uri
        self.timeout_s = timeout_s
        # A burst of submissions must not exhaust the connection pool of a database-backed
        # store (MLflow's own pool: 5 + 10): run creations beyond this many wait their turn.
        self._creating = threading.BoundedSemaphore(max_parallel_creates)

    def client(self) -> MlflowClient:
        """A client of the tracking store."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def ping(self) -> None:
        """Raise `TrackingUnavailableError` when the tracking store does not answer.

        A quick probe with a timeout: MLflow's own client retries a dead server for
        minutes, which must not hold a request or a dispatcher round.
        """
        try:
            if self.tracking_uri.startswith(("http://", "https://")):
                url = f"{self.tracking_uri.rstrip('/')}/health"
                httpx.get(url, timeout=self.timeout_s).raise_for_status()
            else:
                self.client().search_experiments(max_results=1)
        except Exception as error:
            raise TrackingUnavailableError(f"MLflow at {self.tracking_uri}: {error}") from None

    def create_run(
        self, config: TrainConfig, *, job_id: str, tags: dict[str, str]
    ) -> tuple[str, str]:
        """Create the job's run (params, config.json); returns (run id, experiment id).

        Raises:
            TrackingUnavailableError: MLflow is down (nothing was created).
        """
        from trainer.tracking import create_run

        self.ping()
        from mlflow.exceptions import MlflowException

        try:
            with self._creating:
                tracked = create_run(config, self.tracking_uri, run_name=job_id, tags=tags)
        except MlflowException as error:
            if error.error_code == "INVALID_PARAMETER_VALUE":  # the request's fault, not MLflow's
                raise TrackingRejectedError(str(error.message)) from None
            raise TrackingUnavailableError(f"MLflow could not create the run: {error}") from None
        except Exception as error:
            raise TrackingUnavailableError(f"MLflow could not create the run: {error}") from None
        return tracked.run_id, tracked.experiment_id

    def delete_run(self, run_id: str) -> None:
        """Delete a run whose job could not be recorded."""
        self.client().delete_run(run_id)

    def terminate(self, run_id: str, status: str, *, children: bool = False) -> None:
        """Close a job's run with the job's final state: the service created the run,
        so the service closes it (the driver only logs into it).

        With ``children``, also the open runs below it (the trials of a sweep, which the
        sweep's driver closes itself unless the driver was stopped).
        """
        from tuning.report import child_runs

        client = self.client()
        runs = [client.get_run(run_id), *(child_runs(client, run_id) if children else [])]
        for run in runs:
            if run.info.status in ("RUNNING", "SCHEDULED"):
                client.set_terminated(run.info.run_id, status=status)

    def reopen(self, run_id: str) -> None:
        """Mark a closed run RUNNING again (a retried job's next attempt logs into it).

        Raises:
            TrackingUnavailableError: MLflow did not answer (nothing changed).
        """
        try:
            self.client().update_run(run_id, status="RUNNING")
        except Exception as error:
            raise TrackingUnavailableError(f"MLflow could not reopen the run: {error}") from None

    def trials(self, parent_run_id: str) -> list[TrialRecord]:
        """The trials of a sweep (the child runs of its parent run), by trial id."""
        from tuning.report import trials_from_mlflow

        return trials_from_mlflow(self.tracking_uri, parent_run_id)

    def sweep_progress(self, parent_run_id: str, metric: str, mode: str) -> Progress:
        """A sweep's progress: its trials by state and the best value of its objective."""
        from tuning.report import best_trial

        records = self.trials(parent_run_id)
        states = Counter(record.state for record in records)
        metrics = {
            "trials": float(len(records)),
            "trials_running": float(states["RUNNING"]),
            "trials_finished": float(states["FINISHED"]),
            "trials_stopped_early": float(
                sum(record.stop_reason is not None for record in records)
            ),
            "trials_failed": float(states["FAILED"]),
        }
        best = best_trial(records, metric, mode)
        if best is not None:
            metrics[f"best_{metric}"] = best.metrics[metric]
        return Progress(metrics=metrics)

    def progress(self, run_id: str) -> Progress:
        """Latest metrics, epoch, step and newest checkpoint of a run."""
        client = self.client()
        run = client.get_run(run_id)
        metrics = {
            key: float(value)
            for key, value in run.data.metrics.items()
            if not key.startswith("system/")
        }
        step = None
        if STEP_METRIC in metrics:
            history = client.get_metric_history(run_id, STEP_METRIC)
            step = max(point.step for point in history) if history else None
        epoch = int(metrics["epoch"]) if "epoch" in metrics else None
        tags = run.data.tags
        collapse_step = tags.get(COLLAPSE_STEP_TAG, "")
        return Progress(
            epoch=epoch,
            step=step,
            metrics=metrics,
            latest_checkpoint=tags.get(LATEST_CHECKPOINT_TAG),
            health=tags.get(HEALTH_TAG),
            collapse_step=int(collapse_step) if collapse_step.isdigit() else None,
        )

    def history(self, run_id: str) -> dict[str, list[MetricPoint]]:
        """Every metric's full history, by name."""
        client = self.client()
        run = client.get_run(run_id)
        return {
            key: [
                MetricPoint(point.step, float(point.value), point.timestamp)
                for point in sorted(client.get_metric_history(run_id, key), key=_by_step)
            ]
            for key in sorted(run.data.metrics)
        }

    def checkpoint_uris(self, run_id: str) -> list[str]:
        """The kept checkpoints the driver recorded at the end (empty when none)."""
        client = self.client()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = client.download_artifacts(run_id, CHECKPOINTS_ARTIFACT, tmp)
            except Exception:  # no such artifact: the run ended before recording any
                return []
            records: list[dict[str, Any]] = json.loads(Path(local).read_text())
        return [str(record["uri"]) for record in records]


def _by_step(point: Any) -> tuple[int, int]:
    return int(point.step), int(point.timestamp)
