"""The closing lines of a run: quality beside its baselines, and the health verdict.

A number without a baseline says nothing, so every place that reports a finished run
(`klssl train`, `klssl submit --follow`, `klssl up --demo`) prints the same lines from
the run's final metrics:

    k-NN top-1 (k=20): 93.59%  (random init 85.79%, raw pixels 97.77%)
    linear top-1: 95.82%  (random init 90.53%)
    health: ok

A run started from ``model.init`` also shows its start: ``(at model.init 88.10%, ...)``.
"""

from __future__ import annotations

from collections.abc import Mapping

from trainer.health import Verdict


def result_lines(metrics: Mapping[str, float], knn_k: int) -> list[str]:
    """Human-readable lines of a run's final ``metrics`` (only what they contain)."""
    lines = []
    if "knn_top1" in metrics:
        lines.append(
            f"k-NN top-1 (k={knn_k}): {metrics['knn_top1']:.2f}%"
            + _beside(
                metrics,
                init="init_knn_top1",
                random_init="random_init_knn_top1",
                pixels="pixels_knn_top1",
            )
        )
    if "linear_top1" in metrics:
        lines.append(
            f"linear top-1: {metrics['linear_top1']:.2f}%"
            + _beside(metrics, init="init_linear_top1", random_init="random_init_linear_top1")
        )
    verdict = Verdict.of_metrics(metrics)
    if verdict is not None:
        lines.append(f"health: {verdict.describe()}")
    return lines


def _beside(metrics: Mapping[str, float], **baselines: str) -> str:
    names = {"init": "at model.init", "random_init": "random init", "pixels": "raw pixels"}
    shown = [
        f"{names[label]} {metrics[key]:.2f}%" for label, key in baselines.items() if key in metrics
    ]
    return f"  ({', '.join(shown)})" if shown else ""
