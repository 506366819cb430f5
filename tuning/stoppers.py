"""Stop trials whose clusters collapsed, judged from the label-free diagnostics.

A collapsed run wastes the rest of its budget: its targets no longer depend on the
image (every image in one cluster, or every image the same, often uniform,
distribution). By default a trial is judged by the trainer's own verdict, the
``healthy`` metric of `trainer.health` (normalised target mutual information, target
cluster usage and the temperature-free logit spread, the rule behind every run's
``klssl.health`` tag), so a
sweep and a single run never disagree about a collapse. The raw teacher metrics
``mutual_info`` or ``effective_clusters`` below a threshold remain as alternatives.

A trial whose metric stays collapsed for ``patience`` consecutive epochs, after
``grace_epochs`` of warm-up, is stopped. The decision is a pure function of the trial's
reports (`collapse_epoch`), so the sweep's MLflow callback can tell a collapse stop from
an ASHA stop with the same rule, and the rule is tested without Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ray.tune.stopper import Stopper

from trainer.health import HEALTHY_METRIC
from tuning.config import CollapseConfig


def collapse_epoch(
    reports: Iterable[tuple[float, float]],
    *,
    threshold: float,
    patience: int,
    grace_epochs: int,
) -> float | None:
    """The epoch at which a run counts as collapsed, or None.

    Args:
        reports: (epoch, metric) per report in order; ``epoch`` is the number of
            completed epochs. Reports at or before ``grace_epochs`` are not judged.
        threshold: the metric is collapsed while strictly below this.
        patience: consecutive collapsed reports needed.
        grace_epochs: epochs of warm-up never judged.

    Returns:
        The epoch of the report that completed ``patience`` collapsed reports in a row.
    """
    streak = 0
    for epoch, value in reports:
        if epoch <= grace_epochs:
            continue
        streak = streak + 1 if value < threshold else 0
        if streak >= patience:
            return epoch
    return None


class CollapseHistory:
    """Per-trial (epoch, metric) reports and the collapse rule applied to them.

    A trial restarted from a checkpoint re-reports epochs it reported before; each epoch
    keeps its newest value, so the history stays one value per epoch.

    Args:
        settings: the sweep's collapse settings.
        max_epochs: a trial's epoch budget; a trial that reached it is finishing (its
            backbone is being exported) and is never stopped.
    """

    def __init__(self, settings: CollapseConfig, max_epochs: int) -> None:
        self.settings = settings
        self.max_epochs = max_epochs
        self.reports: dict[str, dict[float, float]] = {}

    @property
    def threshold(self) -> float:
        """Collapsed below this: the setting, or 0.5 for the trainer's 0/1 verdict."""
        return 0.5 if self.settings.metric == HEALTHY_METRIC else self.settings.threshold

    def observe(self, trial_id: str, result: Mapping[str, Any]) -> bool:
        """Record one Tune result; True when the trial should stop for collapse now."""
        metric = self.settings.metric
        if "epoch" not in result or metric not in result:
            return False
        epoch = float(result["epoch"])
        self.reports.setdefault(trial_id, {})[epoch] = float(result[metric])
        return self.enabled and epoch < self.max_epochs and self.collapsed(trial_id)

    @property
    def enabled(self) -> bool:
        """Whether collapse stopping is on."""
        return self.settings.enabled

    def collapsed(self, trial_id: str) -> bool:
        """Whether the trial's reports so far meet the collapse rule."""
        reports = sorted(self.reports.get(trial_id, {}).items())
        return (
            collapse_epoch(
                reports,
                threshold=self.threshold,
                patience=self.settings.patience,
                grace_epochs=self.settings.grace_epochs,
            )
            is not None
        )


class CollapseStopper(Stopper):
    """Ray Tune stopper: stops one trial once its clusters collapsed (see module doc).

    Args:
        settings: the metric (``healthy`` by default), threshold, patience, grace epochs.
        max_epochs: the trials' epoch budget (trials at it are left to finish).
    """

    def __init__(self, settings: CollapseConfig, max_epochs: int) -> None:
        self.history = CollapseHistory(settings, max_epochs)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.history.observe(trial_id, result)

    def stop_all(self) -> bool:
        """A collapse ends its own trial, never the sweep."""
        return False
