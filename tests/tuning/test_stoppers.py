"""The collapse rule, the stopper and the driver's pure helpers, without a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.factories import tiny_config
from trainer.distributed.cluster import Placement
from tuning.config import CollapseConfig, validate_sweep
from tuning.driver import (
    expected_trials,
    max_concurrent_trials,
    param_space,
    sampled_values,
    settle_stopped_trials,
)
from tuning.report import TrialRecord, best_trial
from tuning.stoppers import CollapseHistory, CollapseStopper, collapse_epoch

RULE = {"metric": "mutual_info", "threshold": 0.05, "patience": 2, "grace_epochs": 1}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.9, 0.6, 0.4, 0.3], None),  # healthy
        ([0.01, 0.01, 0.01, 0.01], 3.0),  # collapsed from the start: judged after the grace
        ([0.9, 0.01, 0.6, 0.01, 0.01], 5.0),  # a recovery resets the streak
        ([0.9, 0.04, 0.05, 0.04], None),  # at the threshold is not below it
        ([0.01], None),  # still in the grace epoch
    ],
)
def test_collapse_needs_patience_consecutive_low_reports(
    values: list[float], expected: float | None
) -> None:
    reports = [(float(epoch), value) for epoch, value in enumerate(values, start=1)]
    rule = {key: RULE[key] for key in ("threshold", "patience", "grace_epochs")}
    assert collapse_epoch(reports, **rule) == expected


def test_by_default_the_stopper_follows_the_trainers_verdict() -> None:
    """The same rule as klssl.health: `healthy` is 1 or 0, whatever the temperature."""
    settings = CollapseConfig(patience=2, grace_epochs=0)
    assert settings.metric == "healthy"
    stopper = CollapseStopper(settings, max_epochs=10)
    # A raw mutual information this low would once have stopped a trial; it is healthy.
    assert not stopper("t", {"epoch": 1, "healthy": 1.0, "mutual_info": 0.001})
    assert not stopper("t", {"epoch": 2, "healthy": 1.0, "mutual_info": 0.001})
    assert not stopper("t", {"epoch": 3, "healthy": 0.0, "mutual_info": 0.9})
    assert stopper("t", {"epoch": 4, "healthy": 0.0, "mutual_info": 0.9})


def test_the_stopper_stops_only_the_collapsed_trial() -> None:
    stopper = CollapseStopper(CollapseConfig(**RULE), max_epochs=10)
    decisions: dict[str, list[bool]] = {"healthy": [], "collapsed": []}
    for epoch in range(1, 5):
        decisions["healthy"].append(stopper("healthy", {"epoch": epoch, "mutual_info": 0.5}))
        decisions["collapsed"].append(stopper("collapsed", {"epoch": epoch, "mutual_info": 0.0}))
    assert decisions["healthy"] == [False] * 4
    assert decisions["collapsed"] == [False, False, True, True]
    assert not stopper.stop_all()


def test_the_stopper_ignores_results_without_the_metric_and_the_last_epoch() -> None:
    stopper = CollapseStopper(CollapseConfig(**RULE), max_epochs=3)
    assert not stopper("t", {"epoch": 2, "loss": 1.0})  # no mutual_info: not judged
    assert not stopper("t", {"epoch": 2, "mutual_info": 0.0})
    # Collapsed, but at its last epoch the trial is exporting its backbone: let it end.
    assert not stopper("t", {"epoch": 3, "mutual_info": 0.0})
    assert stopper.history.collapsed("t")


def test_a_restarted_trial_keeps_one_report_per_epoch() -> None:
    history = CollapseHistory(CollapseConfig(**RULE), max_epochs=10)
    history.observe("t", {"epoch": 2, "mutual_info": 0.0})
    history.observe("t", {"epoch": 2, "mutual_info": 0.5})  # the same epoch, re-trained
    history.observe("t", {"epoch": 3, "mutual_info": 0.0})
    assert not history.collapsed("t")


def test_a_disabled_rule_never_stops() -> None:
    stopper = CollapseStopper(CollapseConfig(enabled=False, **RULE), max_epochs=10)
    assert not any(stopper("t", {"epoch": e, "mutual_info": 0.0}) for e in range(1, 6))


def test_effective_clusters_can_be_the_collapse_metric() -> None:
    stopper = CollapseStopper(
        CollapseConfig(metric="effective_clusters", threshold=1.5, patience=1, grace_epochs=0),
        max_epochs=10,
    )
    assert not stopper("t", {"epoch": 1, "effective_clusters": 12.0, "mutual_info": 0.0})
    assert stopper("t", {"epoch": 2, "effective_clusters": 1.1, "mutual_info": 0.9})


def record(trial_id: str, value: float | None, state: str = "FINISHED") -> TrialRecord:
    metrics = {} if value is None else {"knn_top1": value}
    return TrialRecord(
        trial_id=trial_id, run_id=f"run-{trial_id}", params={}, state=state,
        stop_reason=None, metrics=metrics, config={},
    )  # fmt: skip


def test_best_trial_by_latest_metric() -> None:
    records = [
        record("a", 40.0),
        record("b", 55.0),
        record("c", 90.0, state="FAILED"),  # failed trials never win
        record("d", None),  # nor do trials without the metric
        record("e", 55.0),
    ]
    assert best_trial(records, "knn_top1", "max") == records[1]  # ties: smaller trial id
    assert best_trial(records, "knn_top1", "min") == records[0]
    assert best_trial([record("d", None)], "knn_top1", "max") is None
    with pytest.raises(ValueError, match="mode must be"):
        best_trial(records, "knn_top1", "maximum")


def test_concurrency_is_what_the_cluster_holds() -> None:
    cpu = Placement(workers=2, use_gpu=False, resources_per_worker={"CPU": 1.0}, strategy="PACK")
    assert max_concurrent_trials(cpu, {"CPU": 8.0, "GPU": 0.0}) == 4
    assert max_concurrent_trials(cpu, {"CPU": 1.0}) == 1  # at least one
    gpu = Placement(2, True, {"CPU": 4.0, "GPU": 1.0}, "PACK")
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # the GPUs limit
    assert max_concurrent_trials(gpu, {"CPU": 12.0, "GPU": 8.0}) == 1  # the CPUs limit
    streamed = Placement(2, False, {"CPU": 1.0}, "PACK", loader_cpus=1.0)
    assert max_concurrent_trials(streamed, {"CPU": 8.0}) == 2  # 3 CPUs per trial


def test_the_tune_space_follows_the_sweep() -> None:
    base: dict[str, Any] = tiny_config().model_dump(mode="json")
    sweep = validate_sweep(
        {
            "base": base,
            "space": {
                "objective.teacher_temp": {"type": "loguniform", "low": 0.02, "high": 0.1},
                "objective.mode": {"type": "grid", "values": ["prior", "center"]},
                "data.batch_size": {"type": "uniform", "low": 8, "high": 32},
            },
            "num_samples": 3,
        }
    )
    space = param_space(sweep)
    assert set(space) == {"objective", "data"}
    assert space["objective"]["mode"] == {"grid_search": ["prior", "center"]}
    assert expected_trials(sweep) == 6
    for _ in range(20):  # integer fields sample integers within the range
        size = space["data"]["batch_size"].sample()
        assert isinstance(size, int) and 8 <= size <= 32
    config = {"objective": {"teacher_temp": 0.05, "mode": "center"}, "data": {"batch_size": 16}}
    assert sampled_values(list(sweep.space), config) == {
        "objective.teacher_temp": 0.05,
        "objective.mode": "center",
        "data.batch_size": 16,
    }


def test_trials_tune_stopped_end_killed_whatever_their_workers_did_after(tmp_path: Path) -> None:
    """A trial stopped by ASHA whose workers trained on and exported (reopening the run)
    is settled KILLED; a trial that ran its budget keeps FINISHED."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("settle")
    stopped, finished = (client.create_run(experiment).info.run_id for _ in range(2))
    for run_id in (stopped, finished):
        client.set_terminated(run_id, "FINISHED")
    stopped_later = client.create_run(experiment).info.run_id  # left RUNNING, mid-export

    def record(run_id: str, state: str, reason: str | None) -> TrialRecord:
        return TrialRecord(
            trial_id=run_id[:8], run_id=run_id, params={}, state=state, stop_reason=reason,
            metrics={}, config={},
        )  # fmt: skip

    settled = settle_stopped_trials(
        uri,
        [
            record(stopped, "FINISHED", "asha"),
            record(finished, "FINISHED", None),
            record(stopped_later, "RUNNING", "collapse"),
        ],
    )
    assert [trial.state for trial in settled] == ["KILLED", "FINISHED", "KILLED"]
    statuses = [client.get_run(run_id).info.status for run_id in (stopped, finished, stopped_later)]
    assert statuses == ["KILLED", "FINISHED", "KILLED"]
