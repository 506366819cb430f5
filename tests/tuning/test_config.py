"""Sweep configs: every problem is reported with its field path before anything runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.factories import tiny_config
from trainer.config import ConfigError
from tuning.config import (
    SweepConfig,
    apply_sample,
    dataset_has_labels,
    load_sweep,
    optuna_available,
    validate_sweep,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TEMP = {"type": "loguniform", "low": 0.02, "high": 0.1}


def sweep(space: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A raw sweep over the tiny digits config."""
    return {"base": tiny_config().model_dump(mode="json"), "space": space, **fields}


def problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_sweep(raw, "sweep.yaml")
    assert str(caught.value).startswith("invalid sweep.yaml:")
    return caught.value.problems


def test_a_valid_sweep_resolves_its_defaults() -> None:
    modes = {"type": "choice", "values": ["prior", "center"]}
    config = validate_sweep(sweep({"objective.teacher_temp": TEMP, "objective.mode": modes}))
    assert config.sweep_name == "klssl-test"  # from the base config
    assert config.samples == 8
    assert config.epochs == config.base.schedule.epochs  # ASHA's max_t
    assert config.resources.workers_per_trial == config.base.runtime.num_workers
    assert config.resources.cpus_per_worker == config.base.runtime.cpus_per_worker
    # A k-NN objective is evaluated after every epoch, where schedulers compare trials.
    assert config.trial_base().eval.every_epochs == 1


def test_the_default_objective_is_knn_with_labels() -> None:
    config = validate_sweep(sweep({"objective.teacher_temp": TEMP}))
    assert dataset_has_labels(config.base.data)
    assert config.objective == ("knn_top1", "max")


@pytest.mark.parametrize(
    ("metric", "mode"), [("mutual_info", "max"), ("epoch_loss", "min"), ("knn_top1_k20", "max")]
)
def test_a_named_metric_gets_its_own_direction(metric: str, mode: str) -> None:
    config = validate_sweep(sweep({"objective.teacher_temp": TEMP}, metric=metric))
    assert config.objective == (metric, mode)


def test_unlabelled_data_defaults_to_mutual_information(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every built-in kind is labelled; a kind without labels falls back to the label-free
    # objective (and a k-NN metric is refused).
    monkeypatch.setattr("tuning.config.dataset_has_labels", lambda data: False)
    config = validate_sweep(sweep({"objective.teacher_temp": TEMP}))
    assert config.objective == ("mutual_info", "max")
    assert config.trial_base().eval.every_epochs == 0
    found = problems(sweep({"objective.teacher_temp": TEMP}, metric="knn_top1"))
    assert found[0].startswith("metric: unknown metric 'knn_top1'")


def test_an_unknown_field_lists_close_names() -> None:
    found = problems(sweep({"objective.teacher_tmp": TEMP}))
    assert len(found) == 1
    assert found[0].startswith("space.objective.teacher_tmp: not a TrainConfig field")
    assert "close names: objective.teacher_temp" in found[0]


def test_a_range_that_makes_the_config_invalid_is_refused() -> None:
    negative = {"type": "uniform", "low": -0.1, "high": 0.1}
    found = problems(sweep({"objective.teacher_temp": negative}))
    assert found == [
        "space.objective.teacher_temp: endpoint -0.1 is invalid: Input should be greater than 0"
    ]
    up_to_one = {"type": "uniform", "low": 0.5, "high": 1.0}
    found = problems(sweep({"objective.prior_momentum": up_to_one}))
    assert found == [
        "space.objective.prior_momentum: endpoint 1.0 is invalid: Input should be less than 1"
    ]


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        sweep(
            {
                "objective.mode": {"type": "choice", "values": ["prior", "centre"]},
                "objective.nope": TEMP,
                "schedule.epochs": {"type": "uniform", "low": 0, "high": 4},
            },
            metric="knn_top2",
        )
    )
    assert [problem.split(":")[0] for problem in found] == [
        "metric",
        "space.objective.mode",
        "space.objective.nope",
        "space.schedule.epochs",
    ]
    assert "value \"centre\" is invalid: Input should be 'prior', 'center'" in found[1]
    assert "endpoint 0 is invalid: Input should be greater than or equal to 1" in found[3]


@pytest.mark.parametrize(
    ("distribution", "message"),
    [
        ({"type": "uniform", "low": 0.2, "high": 0.1}, "low (0.2) must be smaller than high (0.1)"),
        ({"type": "uniform", "low": 0.1, "high": 0.1}, "must be smaller than high"),
        ({"type": "loguniform", "low": 0.0, "high": 0.1}, "needs low > 0, got low = 0"),
        ({"type": "loguniform", "low": -1, "high": 0.1}, "needs low > 0"),
        ({"type": "choice", "values": []}, "values must hold at least one value"),
        ({"type": "grid", "values": []}, "values must hold at least one value"),
        ({"type": "normal", "mean": 0.1}, "does not match any of the expected tags"),
    ],
)
def test_bad_distributions_name_their_field(distribution: dict[str, Any], message: str) -> None:
    found = problems(sweep({"objective.teacher_temp": distribution}))
    assert len(found) == 1
    assert found[0].startswith("space.objective.teacher_temp")
    assert ".uniform" not in found[0] and ".loguniform" not in found[0]  # no union tags
    assert message in found[0]


def test_an_empty_space_is_refused() -> None:
    assert problems(sweep({})) == [
        "space: the search space is empty: give at least one field to sweep"
    ]


def test_integer_fields_need_whole_endpoints() -> None:
    found = problems(sweep({"data.batch_size": {"type": "uniform", "low": 8.5, "high": 32}}))
    assert found == ["space.data.batch_size: an integer field needs whole endpoints, got 8.5"]
    validate_sweep(sweep({"data.batch_size": {"type": "loguniform", "low": 8, "high": 64}}))


def test_grid_search_takes_grids_and_choices_only() -> None:
    config = validate_sweep(
        sweep(
            {
                "objective.teacher_temp": {"type": "grid", "values": [0.04, 0.07]},
                "objective.mode": {"type": "choice", "values": ["prior", "center"]},
            },
            search="grid",
        )
    )
    assert config.samples == 1  # one pass over the grid
    found = problems(sweep({"objective.teacher_temp": TEMP}, search="grid"))
    assert found == [
        "space.objective.teacher_temp: search 'grid' needs grid or choice values, not loguniform"
    ]


def test_optuna_needs_its_package_and_no_grid() -> None:
    found = problems(
        sweep({"objective.mode": {"type": "grid", "values": ["prior"]}}, search="optuna")
    )
    if optuna_available():
        assert found == ["space.objective.mode: search 'optuna' cannot run a grid; use choice"]
    else:
        assert found[0].startswith("search: search 'optuna' needs the optuna package")


def test_asha_and_unknown_keys_are_checked() -> None:
    found = problems(sweep({"objective.teacher_temp": TEMP}, asha={"max_t": 5, "grace_period": 9}))
    assert found == [
        "asha.max_t: max_t (5) exceeds the base schedule.epochs (2)",
        "asha.grace_period: grace_period (9) exceeds max_t (5)",
    ]
    found = problems(sweep({"objective.teacher_temp": TEMP}, schedulr="asha"))
    assert found == ["schedulr: Extra inputs are not permitted"]


def test_sweeps_checkpoint_at_epoch_ends_only() -> None:
    raw = sweep({"objective.teacher_temp": TEMP})
    raw["base"]["runtime"]["checkpoint_every_steps"] = 50
    (found,) = problems(raw)
    assert found.startswith("base.runtime.checkpoint_every_steps: sweeps checkpoint at epoch ends")
    every = {"type": "choice", "values": [0, 50]}
    (found,) = problems(sweep({"runtime.checkpoint_every_steps": every}))
    assert found.startswith("space.runtime.checkpoint_every_steps: sweeps checkpoint at epoch")


def test_trials_have_a_fixed_number_of_workers() -> None:
    raw = sweep({"objective.teacher_temp": TEMP})
    raw["base"]["runtime"] |= {"num_workers": 2, "min_workers": 1}
    (found,) = problems(raw)
    assert found.startswith("base.runtime.min_workers: a trial runs on a fixed number")


def test_base_config_errors_keep_their_path() -> None:
    raw = sweep({"objective.teacher_temp": TEMP})
    raw["base"]["objective"]["mode"] = "centre"
    found = problems(raw)
    assert found[0].startswith("base.objective.mode: Input should be 'prior'")


def test_apply_sample_sets_and_revalidates() -> None:
    base = tiny_config()
    trial = apply_sample(base, {"objective.teacher_temp": 0.07, "objective.mode": "center"})
    assert (trial.objective.teacher_temp, trial.objective.mode) == (0.07, "center")
    assert base.objective.teacher_temp == 0.04  # the base is left alone
    with pytest.raises(ConfigError, match=r"objective.teacher_temp: Input should be greater"):
        apply_sample(base, {"objective.teacher_temp": -1.0})
    with pytest.raises(ConfigError, match=r"objective.temp: not a TrainConfig field"):
        apply_sample(base, {"objective.temp": 1.0})


def test_the_example_sweep_loads_with_overrides() -> None:
    config = load_sweep(CONFIGS / "digits-sweep.yaml", ["schedule.epochs=2"])
    assert isinstance(config, SweepConfig)
    assert set(config.space) == {"objective.teacher_temp", "objective.prior_momentum"}
    assert config.samples == 4
    assert config.base.schedule.epochs == 2
    with pytest.raises(ConfigError, match=r"base.schedule.epochs: Input should be greater"):
        load_sweep(CONFIGS / "digits-sweep.yaml", ["schedule.epochs=0"])


# ------------------------------------------------------------------ bounds (issue 11)

ABSURD_SWEEPS = [
    ({"num_samples": 10**12}, "num_samples", "less than or equal to 10000"),
    ({"num_samples": float("inf")}, "num_samples", "finite number"),
    ({"max_concurrent_trials": 10**6}, "max_concurrent_trials", "less than or equal to 1024"),
    ({"seed": 2**40}, "seed", "less than or equal"),
    ({"asha": {"grace_period": 10**9}}, "asha.grace_period", "less than or equal"),
    ({"asha": {"max_t": 10**9}}, "asha.max_t", "less than or equal"),
    ({"asha": {"reduction_factor": float("inf")}}, "asha.reduction_factor", "finite number"),
    ({"asha": {"reduction_factor": 1e9}}, "asha.reduction_factor", "less than or equal"),
    ({"collapse": {"threshold": float("nan")}}, "collapse.threshold", "finite number"),
    ({"collapse": {"patience": 10**9}}, "collapse.patience", "less than or equal"),
    ({"collapse": {"grace_epochs": 10**9}}, "collapse.grace_epochs", "less than or equal"),
    ({"resources": {"workers_per_trial": 10**6}}, "resources.workers_per_trial", "less than"),
    ({"resources": {"cpus_per_worker": float("inf")}}, "resources.cpus_per_worker", "finite"),
    ({"resources": {"cpus_per_worker": 1e9}}, "resources.cpus_per_worker", "less than"),
    ({"metric": "m" * 1000}, "metric", "at most 128 characters"),
    ({"name": "n" * 1000}, "name", "at most 128 characters"),
]


@pytest.mark.parametrize(("fields", "field", "reason"), ABSURD_SWEEPS)
def test_absurd_sweep_values_name_their_field(
    fields: dict[str, Any], field: str, reason: str
) -> None:
    found = problems(sweep({"objective.teacher_temp": TEMP}, **fields))
    matching = [p for p in found if p.startswith(f"{field}:")]
    assert matching, f"no error for {field} in {found}"
    assert reason in matching[0], matching[0]


@pytest.mark.parametrize(
    ("distribution", "field", "reason"),
    [
        ({"type": "uniform", "low": 0.01, "high": float("inf")}, ".high", "finite number"),
        ({"type": "loguniform", "low": float("nan"), "high": 1}, ".low", "finite number"),
        ({"type": "uniform", "low": 0.01, "high": 1e300}, ".high", "less than or equal"),
        ({"type": "choice", "values": [0.05, float("inf")]}, ".values.1.float", "finite"),
        ({"type": "grid", "values": [0.05] * 1001}, ".values", "at most 1000 items"),
    ],
)
def test_infinite_or_oversized_distributions_are_refused(
    distribution: dict[str, Any], field: str, reason: str
) -> None:
    found = problems(sweep({"objective.teacher_temp": distribution}))
    path = f"space.objective.teacher_temp{field}"
    matching = [p for p in found if p.startswith(f"{path}:")]
    assert matching, f"no error for {path} in {found}"
    assert reason in matching[0], matching[0]


def test_a_base_config_with_an_infinity_is_refused() -> None:
    raw = sweep({"objective.teacher_temp": TEMP})
    raw["base"]["optim"]["lr"] = float("inf")
    found = problems(raw)
    assert found[0].startswith("base.optim.lr: Input should be a finite number")


def test_huge_grids_are_refused_by_their_trial_count() -> None:
    grid = {"type": "grid", "values": list(range(1, 101))}
    # 100 x 100 x 100 = 1e6 points: refused before anything runs.
    found = problems(
        sweep({"data.batch_size": grid, "runtime.seed": grid, "schedule.epochs": grid})
    )
    assert found == [
        "space: the grid has 100 x 100 x 100 points, times num_samples 1: "
        "1000000 trials, more than 10000"
    ]
    # Choices are grids under search: grid, and num_samples repeats the whole grid.
    choice = {"type": "choice", "values": list(range(1, 101))}
    found = problems(
        sweep({"data.batch_size": choice, "runtime.seed": choice}, search="grid", num_samples=2)
    )
    assert found == [
        "space: the grid has 100 x 100 points, times num_samples 2: 20000 trials, more than 10000"
    ]


def test_a_space_with_too_many_values_is_refused_before_any_is_checked() -> None:
    many = {"type": "choice", "values": list(range(100_000))}
    started = time.perf_counter()
    found = problems(sweep({"runtime.seed": many}))
    assert time.perf_counter() - started < 1.0  # no trial config is built for these
    assert found == ["space: 100000 choice and grid values in all, more than 10000"]
    spread = {f"p{i}": {"type": "choice", "values": list(range(1000))} for i in range(11)}
    assert problems(sweep(spread)) == [
        "space: 11000 choice and grid values in all, more than 10000"
    ]


def test_too_many_or_too_long_field_paths_are_refused() -> None:
    keys = {f"objective.x{i}": TEMP for i in range(65)}
    (found,) = problems(sweep(keys))
    assert found.startswith("space: 65 swept fields, more than 64")
    (found,) = problems(sweep({"o" * 5000: TEMP}))
    assert found.startswith('space: field path "oooo')
    assert found.endswith("of 5000 characters is longer than 128")
    assert len(found) < 300


def test_invalid_values_are_cut_and_counted() -> None:
    values = ["x" * 10_000] + [-float(i) for i in range(1, 20)]
    found = problems(sweep({"objective.teacher_temp": {"type": "choice", "values": values}}))
    assert len(found) == 6  # five one by one, then the count of the rest
    assert found[0].startswith('space.objective.teacher_temp: value "xxxx')
    assert len(found[0]) < 400  # a 10,000-character value is cut, never echoed whole
    assert found[-1] == "space.objective.teacher_temp: and 15 more invalid values"


def test_the_documented_large_sweep_values_are_accepted() -> None:
    raw = sweep(
        {
            "objective.teacher_temp": {"type": "loguniform", "low": 0.02, "high": 0.1},
            "objective.num_clusters": {"type": "choice", "values": [65536, 131072, 262144]},
            "data.max_samples": {"type": "uniform", "low": 10**6, "high": 10**10},
        },
        num_samples=10_000,
        max_concurrent_trials=1024,
        seed=2**32 - 1,
        resources={"workers_per_trial": 4096, "cpus_per_worker": 256},
        asha={"grace_period": 1, "reduction_factor": 4},
    )
    config = validate_sweep(raw)
    assert config.trial_count() == 10_000
    assert config.trial_base().runtime.num_workers == 4096
    grid = {"type": "grid", "values": list(range(1, 101))}
    config = validate_sweep(sweep({"data.batch_size": grid, "runtime.seed": grid}))
    assert config.trial_count() == 10_000  # the largest grid: 100 x 100
    assert config.grid_sizes() == [100, 100]
    one = {"type": "choice", "values": [0.04 + i * 1e-5 for i in range(1000)]}
    assert validate_sweep(sweep({"objective.teacher_temp": one})).samples == 8


def test_the_trial_count_is_what_the_driver_expects() -> None:
    driver = pytest.importorskip("tuning.driver")
    grid = {"type": "grid", "values": [1, 2, 3]}
    choice = {"type": "choice", "values": [16, 32]}
    for search, samples in (("random", 4), ("grid", 2)):
        config = validate_sweep(
            sweep(
                {"runtime.seed": grid, "data.batch_size": choice},
                search=search,
                num_samples=samples,
            )
        )
        assert config.trial_count() == driver.expected_trials(config)
