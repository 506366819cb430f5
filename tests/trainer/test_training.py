"""Short real trainings: collapse is visible in the diagnostics, and the backbone learns.

The thresholds come from measured runs documented in docs/benchmarks.md ("Collapse and
learning on the CPU"); each leaves a wide margin between the measured values.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import tiny_config
from trainer.config import TrainConfig, load_config
from trainer.engine import TrainingState
from trainer.loop import build_run, random_init_knn, run_training

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


@pytest.fixture(scope="module")
def final_diagnostics() -> dict[str, dict[str, float]]:
    finals = {}
    for mode in ("none", "prior", "center"):
        hooks = LastLog()
        run_training(build_run(synthetic_config(mode)), hooks, evaluates=False)
        finals[mode] = hooks.last
    return finals


@pytest.mark.slow
def test_none_collapses_onto_few_clusters(final_diagnostics: dict[str, dict[str, float]]) -> None:
    # Measured: effective_clusters 1.47, mutual_info 0.27 (from 1.40 at the start).
    none = final_diagnostics["none"]
    assert none["effective_clusters"] < 2.5
    assert none["mutual_info"] < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["prior", "center"])
def test_normalised_teachers_keep_clusters_and_information(
    final_diagnostics: dict[str, dict[str, float]], mode: str
) -> None:
    # Measured: prior 18.9 clusters / MI 0.90, center 6.9 clusters / MI 0.94.
    kept, none = final_diagnostics[mode], final_diagnostics["none"]
    assert kept["effective_clusters"] > 4.0
    assert kept["mutual_info"] > 0.6
    assert kept["effective_clusters"] > 2 * none["effective_clusters"]
    assert kept["mutual_info"] > 1.5 * none["mutual_info"]


@pytest.mark.slow
def test_training_on_digits_beats_random_initialisation() -> None:
    # The demo config, 3 epochs. Measured: 46.2% at random init, 57.1% after 3 epochs.
    config = load_config(DEMO_CONFIG, ["schedule.epochs=3", "data.loader_workers=0"])
    baseline = random_init_knn(config)["knn_top1"]
    trained = run_training(build_run(config), LastLog())["knn_top1"]
    assert trained > baseline + 5.0, f"k-NN {trained:.1f}% vs {baseline:.1f}% at random init"
