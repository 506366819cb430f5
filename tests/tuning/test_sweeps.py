"""Real sweeps: Ray Tune over Ray Train on a local Ray cluster, tracked in a SQLite MLflow.

One Ray cluster (one node, two CPUs) serves the module. Trials are tiny digits runs of
one worker each, so two trials run at once. Nothing is mocked: trials train, report to
Tune, get stopped by ASHA or the collapse stopper, and write their MLflow child runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

# isort: split

from tests import factories
from tuning.config import optuna_available, validate_sweep
from tuning.driver import run_sweep
from tuning.report import trials_from_mlflow

pytestmark = pytest.mark.slow

BASE_FIELDS: dict[str, dict[str, Any]] = {
    "data": {"max_samples": 128, "batch_size": 16},
    "model": {"head_layers": 2},
    "schedule": {"epochs": 3, "warmup_epochs": 0},
    "eval": {"knn_k": [5]},
    # Every step logged: an epoch has 6 steps, and the health verdict needs 3 collapsed
    # log intervals in a row, so a collapse from the start is judged within epoch 1.
    "runtime": {"device": "cpu", "log_every_steps": 1},
}


def base_config(name: str) -> dict[str, Any]:
    """The tiny digits config, as JSON, for a sweep's ``base``."""
    return factories.tiny_config(name=name, **BASE_FIELDS).model_dump(mode="json")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One Ray node with two CPUs: two one-worker trials at once."""
    with factories.ray_cluster(2) as nodes:
        yield nodes


def children(client: MlflowClient, parent_id: str) -> list[Any]:
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def test_asha_sweep_with_a_collapsing_half(cluster: Any, tmp_path: Path) -> None:
    """4 trials (teacher_temp x prior_momentum), two of them at a temperature that collapses.

    A teacher temperature of 40 makes every teacher output uniform: the trainer judges
    the trial collapsed within its first epoch, and the collapse stopper, which follows
    that verdict, stops it after one epoch. ASHA
    (rung at epoch 2) may stop the worse healthy trial; the first to reach it finishes.
    """
    sweep = validate_sweep(
        {
            "base": base_config("sweep-test"),
            "space": {
                "objective.teacher_temp": {"type": "grid", "values": [0.05, 40.0]},
                "objective.prior_momentum": {"type": "grid", "values": [0.5, 0.9]},
            },
            "asha": {"grace_period": 2},
            "collapse": {"grace_epochs": 0, "patience": 1},  # the trainer's verdict
        }
    )
    assert sweep.objective == ("knn_top1", "max")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(
        sweep, tracking_uri=tracking_uri, storage_path=str(tmp_path / "ray"), sweep_id="s1"
    )
    client = MlflowClient(tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["klssl.sweep_id"] == "s1"
    assert not result.interrupted

    runs = children(client, result.parent_run_id)
    assert len(runs) == 4
    samples = sorted(
        (json.loads(run.data.tags["klssl.sampled"])["objective.teacher_temp"],
         json.loads(run.data.tags["klssl.sampled"])["objective.prior_momentum"])
        for run in runs
    )  # fmt: skip
    assert samples == [(0.05, 0.5), (0.05, 0.9), (40.0, 0.5), (40.0, 0.9)]
    trial_ids = {run.data.tags["klssl.trial_id"] for run in runs}
    assert len(trial_ids) == 4
    for run in runs:
        tags, params = run.data.tags, run.data.params
        assert tags["klssl.sweep_id"] == "s1"
        assert run.info.experiment_id == parent.info.experiment_id
        sampled = json.loads(tags["klssl.sampled"])
        # Params are the flattened config, holding the sampled values.
        assert float(params["objective.teacher_temp"]) == sampled["objective.teacher_temp"]
        assert float(params["objective.prior_momentum"]) == sampled["objective.prior_momentum"]
        # The workers logged the trial's metrics into its child run.
        assert "mutual_info" in run.data.metrics and "knn_top1" in run.data.metrics
        if sampled["objective.teacher_temp"] == 40.0:
            assert run.info.status == "KILLED"
            assert tags["klssl.stopped"] == "collapse"
            assert float(tags["klssl.stopped_at_epoch"]) == 1.0
            assert run.data.metrics["epoch"] < sweep.epochs  # before its epoch budget
            assert run.data.metrics["mutual_info"] < 0.05
            assert run.data.metrics["healthy"] == 0.0
            assert tags["klssl.health"] == "collapsed"
        elif run.info.status == "KILLED":
            assert tags["klssl.stopped"] == "asha"
        else:
            assert run.info.status == "FINISHED"
            assert "klssl.stopped" not in tags
            assert run.data.metrics["epoch"] == sweep.epochs
            assert "klssl.backbone_model_uri" in tags
            assert tags["klssl.done"] == "true"
    assert sum(run.info.status == "FINISHED" for run in runs) >= 1

    # The best trial is the argmax of the latest objective over the child runs.
    best_value = max(run.data.metrics["knn_top1"] for run in runs)
    best_run_id = parent.data.tags["klssl.best_run_id"]
    best_run = client.get_run(best_run_id)
    assert best_run.data.metrics["knn_top1"] == best_value
    assert best_run.data.tags["klssl.best"] == "true"
    assert [run.info.run_id for run in runs if "klssl.best" in run.data.tags] == [best_run_id]
    assert parent.data.tags["klssl.best_trial_id"] == best_run.data.tags["klssl.trial_id"]
    assert parent.data.metrics["best_knn_top1"] == best_value
    assert result.best is not None and result.best.run_id == best_run_id

    # The service's readers see the same.
    records = trials_from_mlflow(tracking_uri, result.parent_run_id)
    assert {record.run_id for record in records} == {run.info.run_id for run in runs}
    for trial in records:
        assert trial.config["objective"]["teacher_temp"] == trial.params["objective.teacher_temp"]
        assert trial.stop_reason in (None, "asha", "collapse")

    # The report: one row per trial and one plot per swept parameter.
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert artifacts == {
        "report/trials.json",
        "report/objective.teacher_temp.png",
        "report/objective.prior_momentum.png",
    }
    folder = Path(client.download_artifacts(result.parent_run_id, "report", str(tmp_path)))
    report = json.loads((folder / "trials.json").read_text())
    assert report["best_run_id"] == best_run_id
    assert len(report["trials"]) == 4
    for row in report["trials"]:
        assert set(row) == {
            "trial_id", "run_id", "params", "state", "stop_reason", "epochs_done",
            "final_objective", "best_objective",
        }  # fmt: skip
        assert row["best_objective"] >= row["final_objective"]
    assert (folder / "objective.teacher_temp.png").read_bytes()[:4] == b"\x89PNG"


RESUME_SWEEP = {
    "space": {
        "objective.teacher_temp": {"type": "uniform", "low": 0.04, "high": 0.1},
        "objective.prior_momentum": {"type": "uniform", "low": 0.5, "high": 0.95},
    },
    "num_samples": 2,
    "seed": 3,
    "max_concurrent_trials": 1,
    "asha": {"enabled": False},
    "collapse": {"enabled": False},
}


def start_sweep(cluster: Any, tmp_path: Path, sweep_file: Path) -> subprocess.Popen[str]:
    """``python -m tuning.run`` as a job process connected to the test's cluster."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_AUTH", "MLFLOW_", "KLSSL_"))
    }
    env |= {"RAY_ADDRESS": cluster.address, "KLSSL_TUNE_VERBOSE": "0"}
    command = [sys.executable, "-m", "tuning.run", str(sweep_file), "--sweep-id", "r1"]
    return subprocess.Popen(
        [*command, "--output", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )


def trial_runs(client: MlflowClient) -> list[Any]:
    experiment = client.get_experiment_by_name("resume-test")
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id], filter_string="tags.`klssl.role` = 'trial'"
    )


def history_length(client: MlflowClient, run_id: str) -> int:
    return len(client.get_metric_history(run_id, "loss"))


def finished_children(client: MlflowClient) -> list[Any]:
    return [run for run in trial_runs(client) if run.info.status == "FINISHED"]


# Liveness bounds only (what is checked does not depend on them), sized for a loaded
# 2-core machine: beside a CPU-heavy benchmark two trials took just over 300 s there.
RESUME_TRIALS_S, STOP_S, SECOND_RUN_S = 720, 300, 600


@pytest.mark.timeout(RESUME_TRIALS_S + STOP_S + SECOND_RUN_S + 120)
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(
    cluster: Any, tmp_path: Path
) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": base_config("resume-test"), **RESUME_SWEEP}))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    first = start_sweep(cluster, tmp_path, sweep_file)
    deadline = time.monotonic() + RESUME_TRIALS_S
    # One trial at a time: once the second trial has its run, Tune is done with one.
    while len(trial_runs(client)) < 2 or len(finished_children(client)) < 1:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "two trials did not finish in time"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and stops
    out, err = first.communicate(timeout=STOP_S)
    assert first.returncode == 1, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] is True
    parent_id = summary["mlflow_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED"
    done = {
        run.info.run_id: (run.info.end_time, history_length(client, run.info.run_id))
        for run in finished_children(client)
    }  # fmt: skip
    assert len(done) >= 1

    second = start_sweep(cluster, tmp_path, sweep_file)
    out, err = second.communicate(timeout=SECOND_RUN_S)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] is False
    assert summary["mlflow_run_id"] == parent_id  # the same parent run, continued
    assert client.get_run(parent_id).info.status == "FINISHED"

    runs = children(client, parent_id)
    assert len(runs) == 2  # no trial ran twice under a new run
    assert all(run.info.status == "FINISHED" for run in runs)
    for run_id, (end_time, logged) in done.items():
        run = client.get_run(run_id)
        assert run.info.end_time == end_time  # not re-run
        assert history_length(client, run_id) == logged
    for run in runs:  # a resumed trial logs each step once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == sorted(set(steps))
    experiment_dir = tmp_path / "ray" / "r1"
    assert len(list(experiment_dir.glob("train_*"))) == 2


@pytest.mark.skipif(not optuna_available(), reason="optuna (the 'tune' extra) is not installed")
def test_an_optuna_sweep_on_a_label_free_objective(cluster: Any, tmp_path: Path) -> None:
    sweep = validate_sweep(
        {
            "base": base_config("optuna-test"),
            "space": {
                "objective.teacher_temp": {"type": "loguniform", "low": 0.03, "high": 0.1},
                "objective.mode": {"type": "choice", "values": ["prior", "center"]},
            },
            "search": "optuna",
            "seed": 0,
            "num_samples": 2,
            "metric": "mutual_info",
            "asha": {"enabled": False},
        }
    )
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(
        sweep, tracking_uri=tracking_uri, storage_path=str(tmp_path / "ray"), sweep_id="o1"
    )
    client = MlflowClient(tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.search"] == "optuna"
    assert len(result.trials) == 2
    for trial in result.trials:
        assert trial.state == "FINISHED"
        assert 0.03 <= trial.params["objective.teacher_temp"] <= 0.1
        assert trial.params["objective.mode"] in ("prior", "center")
    assert result.best is not None
    assert result.best.metrics["mutual_info"] == max(
        trial.metrics["mutual_info"] for trial in result.trials
    )
