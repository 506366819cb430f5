"""Short real trainings: the health verdict tells collapsed runs from healthy ones.

The thresholds come from measured runs documented in docs/benchmarks.md ("Collapse and
learning on the CPU").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import tiny_config
from trainer.config import TrainConfig, load_config
from trainer.engine import TrainingState
from trainer.health import Verdict
from trainer.loop import build_run, run_training

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits-demo.yaml"


class LastLog:
    """Keeps the diagnostics of the last logged step."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        self.last = metrics

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass


def synthetic_config(mode: str) -> TrainConfig:
    """Synthetic images with 10 known clusters; 8 epochs of 20 steps."""
    return tiny_config(
        data={
            "kind": "synthetic",
            "synthetic_samples": 800,
            "synthetic_image_size": 16,
            "max_samples": None,
            "global_crop_scale": [0.5, 1.0],
            "local_crop_scale": [0.2, 0.5],
        },
        model={"backbone_kwargs": {"depth": 2}},
        objective={"mode": mode},
        schedule={"epochs": 8, "warmup_epochs": 1, "teacher_momentum": 0.95},
        optim={"lr": 0.001},
    )


FinalRun = tuple[dict[str, float], Verdict]


class SyntheticRuns:
    """Each mode's last diagnostics and verdict, trained on first use and kept.

    Trained lazily inside the tests that need them, so each test's timeout covers at
    most two short runs, not all three at once.
    """

    def __init__(self) -> None:
        self.finals: dict[str, FinalRun] = {}

    def __getitem__(self, mode: str) -> FinalRun:
        if mode not in self.finals:
            hooks = LastLog()
            run = build_run(synthetic_config(mode))
            run_training(run, hooks, evaluates=False)
            self.finals[mode] = (hooks.last, run.state.health.verdict)
        return self.finals[mode]


@pytest.fixture(scope="module")
def final_runs() -> SyntheticRuns:
    return SyntheticRuns()


@pytest.mark.slow
def test_none_collapses_onto_few_clusters_and_is_judged_so(final_runs: SyntheticRuns) -> None:
    # Measured: effective_clusters 1.39, target_cluster_usage 0.16, collapsed at step 84.
    none, verdict = final_runs["none"]
    assert none["effective_clusters"] < 2.5
    assert none["target_cluster_usage"] < 0.2
    assert verdict.health == "collapsed"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["prior", "center"])
def test_normalised_teachers_keep_clusters_and_are_judged_ok(
    final_runs: SyntheticRuns, mode: str
) -> None:
    # Measured (prior): 18.5 effective clusters, target_mutual_info_norm 0.25.
    (kept, verdict), (none, _) = final_runs[mode], final_runs["none"]
    assert verdict.health == "ok"
    assert kept["effective_clusters"] > 4.0
    assert kept["effective_clusters"] > 2 * none["effective_clusters"]
    assert kept["target_cluster_usage"] > 2 * none["target_cluster_usage"]


@pytest.mark.slow
def test_the_demo_recipe_stays_healthy_and_reaches_85_percent() -> None:
    """configs/digits-demo.yaml as `make run` trains it, with its baselines.

    Measured (docs/benchmarks.md): k-NN 92.2% with health ok; the same network at random
    init, BatchNorm recalibrated, 93.3%; raw pixels 98.1%.
    """
    config = load_config(DEMO_CONFIG, ["data.loader_workers=0"])
    run = build_run(config)
    metrics = run_training(run, LastLog())
    assert run.state.health.verdict.health == "ok", metrics
    assert metrics["knn_top1"] >= 85.0, metrics
    for baseline in ("random_init_knn_top1", "random_init_linear_top1", "pixels_knn_top1"):
        assert 0.0 < metrics[baseline] <= 100.0


@pytest.mark.slow
def test_the_demo_recipe_without_normalisation_is_judged_collapsed() -> None:
    # Measured: `none` puts every image in one cluster from step 65 of 220.
    config = load_config(DEMO_CONFIG, ["data.loader_workers=0", "objective.mode=none"])
    run = build_run(config)
    metrics = run_training(run, LastLog(), evaluates=False)
    assert run.state.health.verdict.health == "collapsed", metrics
    assert metrics["healthy"] == 0.0
