"""The health verdict: the collapse rule, its streaks, and the lines a run ends with."""

from __future__ import annotations

import pytest

from trainer.health import CollapseRule, HealthMonitor, Verdict
from trainer.mlflow_names import COLLAPSE_STEP_TAG, HEALTH_TAG
from trainer.summary import result_lines

HEALTHY = {"target_mutual_info_norm": 0.4, "target_cluster_usage": 0.8, "logit_spread": 0.08}
UNIFORM = {"target_mutual_info_norm": 0.003, "target_cluster_usage": 0.99, "logit_spread": 0.006}
ONE_CLUSTER = {"target_mutual_info_norm": 0.08, "target_cluster_usage": 0.16, "logit_spread": 0.05}
"""Measured on the synthetic set with `none`: 1.4 effective clusters of 32."""
CONSTANT = {"target_mutual_info_norm": 0.3, "target_cluster_usage": 0.8, "logit_spread": 1e-5}
"""Logits equal for every image: whatever the temperature made of them, nothing is left."""


@pytest.mark.parametrize(
    ("metrics", "collapsed"),
    [(HEALTHY, False), (UNIFORM, True), (ONE_CLUSTER, True), (CONSTANT, True)],
)
def test_one_interval_is_collapsed_below_either_floor(
    metrics: dict[str, float], collapsed: bool
) -> None:
    assert CollapseRule().interval_collapsed(metrics) is collapsed


def test_a_collapse_needs_patience_and_dates_from_its_first_interval() -> None:
    monitor = HealthMonitor(CollapseRule(patience=3))
    verdicts = [
        monitor.observe(step, metrics)
        for step, metrics in [(10, HEALTHY), (20, UNIFORM), (30, UNIFORM), (40, HEALTHY)]
    ]
    assert [v.health for v in verdicts] == ["ok"] * 4  # a two-interval dip is no collapse
    for step in (50, 60, 70, 80):
        verdict = monitor.observe(step, UNIFORM)
    assert verdict == Verdict("collapsed", 50)
    assert verdict.describe() == "collapsed at step 50"
    assert verdict.tags() == {HEALTH_TAG: "collapsed", COLLAPSE_STEP_TAG: "50"}
    assert verdict.metrics() == {"healthy": 0.0, "collapse_step": 50.0}
    # A run that recovers is ok again.
    assert monitor.observe(90, HEALTHY) == Verdict("ok")
    assert Verdict("ok").tags() == {HEALTH_TAG: "ok", COLLAPSE_STEP_TAG: ""}


def test_the_streak_survives_a_checkpoint() -> None:
    before = HealthMonitor(CollapseRule(patience=2))
    before.observe(5, UNIFORM)
    after = HealthMonitor(CollapseRule(patience=2))
    after.load_state_dict(before.state_dict())
    assert after.observe(10, UNIFORM) == Verdict("collapsed", 5)
    done = HealthMonitor(CollapseRule(patience=2))
    done.load_state_dict(after.state_dict())
    assert done.verdict == Verdict("collapsed", 5)


def test_final_metrics_carry_the_verdict() -> None:
    assert Verdict.of_metrics({"loss": 1.0}) is None
    assert Verdict.of_metrics({"healthy": 1.0}) == Verdict("ok")
    assert Verdict.of_metrics({"healthy": 0.0, "collapse_step": 120.0}) == Verdict("collapsed", 120)


def test_result_lines_put_quality_beside_its_baselines() -> None:
    metrics = {
        "knn_top1": 93.5,
        "random_init_knn_top1": 85.25,
        "pixels_knn_top1": 97.0,
        "linear_top1": 95.0,
        "random_init_linear_top1": 90.0,
        "healthy": 0.0,
        "collapse_step": 40.0,
    }
    assert result_lines(metrics, knn_k=20) == [
        "k-NN top-1 (k=20): 93.50%  (random init 85.25%, raw pixels 97.00%)",
        "linear top-1: 95.00%  (random init 90.00%)",
        "health: collapsed at step 40",
    ]
    assert result_lines({"knn_top1": 50.0}, knn_k=5) == ["k-NN top-1 (k=5): 50.00%"]
