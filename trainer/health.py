"""The health verdict of a run: ``ok``, or ``collapsed`` since a given step.

A clustering run has collapsed when the targets Q it trains the student on no longer
depend on the image: every image in one cluster, or every image the same (often uniform)
distribution. Either way nothing about images is left to learn, and the student goes on
fitting a constant. Two label-free measures of the global batch see it whatever the
temperature, K or batch size (`trainer.engine.collapse_diagnostics`):

- ``target_mutual_info_norm``: I(x; y) under Q divided by its ceiling log(min(K, N)),
  0 for both kinds of collapse, up to 1 for sharp, balanced targets;
- ``target_cluster_usage``: the entropy of Q's batch marginal over the same ceiling,
  near 0 when (nearly) every image lands in one cluster, even while the few images
  outside it keep the mutual information above its floor;
- ``logit_spread``: the spread of the teacher's cosine logits across images, 0 when its
  output is constant, however the temperature or prior then reshape it.

One log interval is *collapsed* when either is below its floor (`CollapseRule`); a run
is judged ``collapsed`` once ``patience`` intervals in a row are, from the first of
them, and ``ok`` again if it recovers. The same rule ends collapsed sweep trials
(`tuning.stoppers`), so a sweep and a single run never disagree about a collapse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from trainer.mlflow_names import COLLAPSE_STEP_TAG, HEALTH_TAG

Health = Literal["ok", "collapsed"]

HEALTHY_METRIC = "healthy"
"""Metric logged with the diagnostics: 1 while the verdict is ok, 0 while collapsed."""
COLLAPSE_STEP_METRIC = "collapse_step"
"""Metric logged while collapsed: the step the collapse started."""


@dataclass(frozen=True)
class CollapseRule:
    """Floors below which one log interval counts as collapsed.

    Calibrated on the digits demo and the synthetic set (docs/benchmarks.md).
    """

    min_target_mutual_info_norm: float = 0.05
    min_target_cluster_usage: float = 0.2
    min_logit_spread: float = 1e-3
    patience: int = 3
    """Consecutive collapsed log intervals before the run is judged collapsed."""

    def interval_collapsed(self, metrics: Mapping[str, float]) -> bool:
        """Whether one log interval's diagnostics show constant or uniform targets."""
        return (
            metrics["target_mutual_info_norm"] < self.min_target_mutual_info_norm
            or metrics["target_cluster_usage"] < self.min_target_cluster_usage
            or metrics["logit_spread"] < self.min_logit_spread
        )


@dataclass(frozen=True)
class Verdict:
    """What a `HealthMonitor` concluded so far."""

    health: Health
    since_step: int | None = None
    """The step the current collapse started (None while ok)."""

    def describe(self) -> str:
        """``ok`` or ``collapsed at step N``: the line `klssl train` ends with."""
        return "ok" if self.health == "ok" else f"collapsed at step {self.since_step}"

    def metrics(self) -> dict[str, float]:
        """``healthy`` (1 ok, 0 collapsed) and, while collapsed, ``collapse_step``."""
        if self.health == "ok":
            return {HEALTHY_METRIC: 1.0}
        return {HEALTHY_METRIC: 0.0, COLLAPSE_STEP_METRIC: float(self.since_step or 0)}

    @classmethod
    def of_metrics(cls, metrics: Mapping[str, float]) -> Verdict | None:
        """The verdict a run's final metrics carry (None when they carry none)."""
        if HEALTHY_METRIC not in metrics:
            return None
        if metrics[HEALTHY_METRIC] >= 0.5:
            return cls("ok")
        return cls("collapsed", int(metrics[COLLAPSE_STEP_METRIC]))

    def tags(self) -> dict[str, str]:
        """The MLflow tags of this verdict (the collapse step is empty while ok)."""
        return {
            HEALTH_TAG: self.health,
            COLLAPSE_STEP_TAG: "" if self.since_step is None else str(self.since_step),
        }


class HealthMonitor:
    """Applies a `CollapseRule` to a run's log intervals in order.

    Args:
        rule: the floors and patience.
    """

    def __init__(self, rule: CollapseRule | None = None) -> None:
        self.rule = rule or CollapseRule()
        self.streak = 0
        self.streak_start: int | None = None
        self.verdict = Verdict("ok")

    def observe(self, step: int, metrics: Mapping[str, float]) -> Verdict:
        """Fold one log interval (its step and diagnostics) into the verdict."""
        if self.rule.interval_collapsed(metrics):
            if self.streak == 0:
                self.streak_start = step
            self.streak += 1
        else:
            self.streak, self.streak_start = 0, None
        if self.streak >= self.rule.patience:
            self.verdict = Verdict("collapsed", self.streak_start)
        else:
            self.verdict = Verdict("ok")
        return self.verdict

    def state_dict(self) -> dict[str, int | None]:
        """The streak so far (checkpointed, so a resumed run judges like an unbroken one)."""
        return {"streak": self.streak, "streak_start": self.streak_start}

    def load_state_dict(self, state: Mapping[str, int | None]) -> None:
        """Continue from `state_dict`'s streak."""
        streak = state["streak"]
        self.streak = int(streak) if streak is not None else 0
        self.streak_start = state["streak_start"]
        collapsed = self.streak >= self.rule.patience
        self.verdict = Verdict("collapsed", self.streak_start) if collapsed else Verdict("ok")
