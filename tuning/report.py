"""What a sweep found, read back from MLflow: trial records, the best trial, a report.

Everything here reads the sweep's MLflow runs (a parent run and one child run per
trial, tagged by `tuning.driver`), so the REST service can describe a sweep from the
tracking server alone (`trials_from_mlflow`, `best_trial`), and the driver writes the
same view as the parent run's report: ``report/trials.json`` (one row per trial) and
``report/<param>.png`` (the objective against every swept parameter).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from trainer.mlflow_names import (
    CONFIG_TAG,
    OWNER_TAG,
    PARENT_TAG,
    REPORT_ARTIFACT_DIR,
    ROLE_TAG,
    SAMPLE_TAG,
    STOPPED_TAG,
    SWEEP_ID_TAG,
    TRIAL_ID_TAG,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.json"

_PAGE = 500


class TrialRecord(BaseModel):
    """One trial of a sweep as MLflow holds it.

    Attributes:
        trial_id: Ray Tune's trial id.
        run_id: the trial's MLflow (child) run.
        params: the sampled values, by dotted config field path.
        state: the MLflow run status (RUNNING, FINISHED, KILLED, FAILED).
        stop_reason: ``collapse`` or ``asha`` for a trial stopped early, else None.
        metrics: the latest value of every metric.
        config: the trial's full training config (JSON form, not re-validated: its data
            path need not exist where this is read).
    """

    model_config = ConfigDict(extra="forbid")

    trial_id: str
    run_id: str
    params: dict[str, Any]
    state: str
    stop_reason: str | None
    metrics: dict[str, float]
    config: dict[str, Any]


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def child_runs(client: MlflowClient, parent_run_id: str) -> list[Any]:
    """The trial runs of the sweep whose parent run is ``parent_run_id`` (all pages).

    A trial is a run under the parent (``mlflow.parentRunId``) whose role is ``trial``
    and whose sweep id and owner are the parent's: a run that merely names the parent
    (anyone can set a tag in MLflow) is not one of its trials.
    """
    parent = client.get_run(parent_run_id)
    expected = {
        key: parent.data.tags[key] for key in (SWEEP_ID_TAG, OWNER_TAG) if key in parent.data.tags
    }
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{ROLE_TAG}` = 'trial'"
    runs: list[Any] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            filter_string=query,
            max_results=_PAGE,
            page_token=token,
        )
        # Compared here, not in the filter: the values need no quoting there.
        runs.extend(
            run for run in page if all(run.data.tags.get(k) == v for k, v in expected.items())
        )
        token = page.token
        if not token:
            return runs


def record_of(run: Any) -> TrialRecord:
    """The `TrialRecord` of one child run.

    Raises:
        ValueError: a tag that klssl writes as JSON does not hold JSON.
    """
    tags = run.data.tags
    return TrialRecord(
        trial_id=tags.get(TRIAL_ID_TAG, run.info.run_name or run.info.run_id),
        run_id=run.info.run_id,
        params=json.loads(tags[SAMPLE_TAG]) if SAMPLE_TAG in tags else {},
        state=str(run.info.status),
        stop_reason=tags.get(STOPPED_TAG),
        metrics={key: float(value) for key, value in run.data.metrics.items()},
        config=json.loads(tags[CONFIG_TAG]) if CONFIG_TAG in tags else {},
    )


def trials_from_mlflow(tracking_uri: str, parent_run_id: str) -> list[TrialRecord]:
    """The trials of the sweep whose parent run is ``parent_run_id``, by trial id.

    Args:
        tracking_uri: the MLflow tracking URI.
        parent_run_id: the sweep's parent run.

    Raises:
        mlflow.exceptions.MlflowException: the parent run does not exist.
    """
    records = []
    for run in child_runs(_client(tracking_uri), parent_run_id):
        try:
            records.append(record_of(run))
        except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
            log.warning("skipping malformed trial run %s: %s", run.info.run_id, error)
    return sorted(records, key=lambda record: record.trial_id)


def best_trial(records: Sequence[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The trial with the best latest ``metric`` (``mode``: max or min), or None.

    Failed trials and trials that never reported the metric are left out; ties go to
    the smaller trial id.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    candidates = [
        record
        for record in records
        if record.state != "FAILED"
        and metric in record.metrics
        and math.isfinite(record.metrics[metric])
    ]
    if not candidates:
        return None
    return max(
        sorted(candidates, key=lambda record: record.trial_id),
        key=lambda record: sign * record.metrics[metric],
    )


# ------------------------------------------------------------------------ report


def trial_rows(
    client: MlflowClient, records: Iterable[TrialRecord], metric: str, mode: str
) -> list[dict[str, Any]]:
    """One report row per trial: ids, sampled params, state, epochs, objectives.

    ``final_objective`` is the latest value of ``metric``; ``best_objective`` the best
    over the trial's history (they differ for a trial that got worse before it ended).
    """
    pick = max if mode == "max" else min
    rows = []
    for record in records:
        history = [m.value for m in client.get_metric_history(record.run_id, metric)]
        history = [value for value in history if math.isfinite(value)]
        rows.append(
            {
                "trial_id": record.trial_id,
                "run_id": record.run_id,
                "params": record.params,
                "state": record.state,
                "stop_reason": record.stop_reason,
                "epochs_done": round(record.metrics.get("epoch", 0.0)),
                "final_objective": record.metrics.get(metric),
                "best_objective": pick(history) if history else None,
            }
        )
    return rows


def plot_param(
    rows: Sequence[Mapping[str, Any]],
    param: str,
    metric: str,
    path: Path,
    *,
    log_scale: bool = False,
    best_trial_id: str | None = None,
) -> None:
    """A PNG of the final objective of every trial against one swept parameter.

    Numeric values are placed on their axis (log for a log-uniform parameter); any
    other values (categories) get one position each. Trials stopped early are hollow;
    the best trial is a star.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        (row["params"].get(param), row["final_objective"], row)
        for row in rows
        if row["final_objective"] is not None and param in row["params"]
    ]
    numeric = all(
        isinstance(value, int | float) and not isinstance(value, bool) for value, _, _ in points
    )
    categories = sorted({json.dumps(value) for value, _, _ in points}) if not numeric else []
    figure, axes = plt.subplots(figsize=(5.5, 4.0), dpi=100)
    for value, objective, row in points:
        x = float(value) if numeric else categories.index(json.dumps(value))
        early = row["stop_reason"] is not None
        best = row["trial_id"] == best_trial_id
        axes.scatter(
            [x],
            [objective],
            marker="*" if best else "o",
            s=160 if best else 50,
            facecolors="none" if early and not best else "tab:blue",
            edgecolors="tab:red" if best else "tab:blue",
        )
    if numeric and log_scale:
        axes.set_xscale("log")
    if not numeric:
        axes.set_xticks(range(len(categories)), categories)
    axes.set_xlabel(param)
    axes.set_ylabel(f"final {metric}")
    axes.set_title(f"{metric} vs {param} ({len(points)} trials; hollow: stopped early)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def log_report(
    tracking_uri: str,
    parent_run_id: str,
    *,
    metric: str,
    mode: str,
    log_params: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Write the sweep report into the parent run's ``report/`` artifacts.

    Args:
        tracking_uri: the MLflow tracking URI.
        parent_run_id: the sweep's parent run.
        metric: the sweep objective.
        mode: ``max`` or ``min``.
        log_params: swept parameters plotted on a log axis.

    Returns:
        The rows of ``report/trials.json``.
    """
    client = _client(tracking_uri)
    records = trials_from_mlflow(tracking_uri, parent_run_id)
    rows = trial_rows(client, records, metric, mode)
    best = best_trial(records, metric, mode)
    params = sorted({key for record in records for key in record.params})
    logarithmic = set(log_params)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / REPORT_ARTIFACT_DIR
        folder.mkdir()
        summary = {
            "metric": metric,
            "mode": mode,
            "best_trial_id": best.trial_id if best else None,
            "best_run_id": best.run_id if best else None,
            "trials": rows,
        }
        (folder / TRIALS_FILE).write_text(json.dumps(summary, indent=2))
        for param in params:
            plot_param(
                rows,
                param,
                metric,
                folder / f"{param}.png",
                log_scale=param in logarithmic,
                best_trial_id=best.trial_id if best else None,
            )
        client.log_artifacts(parent_run_id, str(folder), REPORT_ARTIFACT_DIR)
    return rows
