"""TrainConfig: loading, overrides, and every validation error with its field path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    load_config,
    validate_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def problems_of(raw: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    return caught.value.problems


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"objective": {"teacher_temp": -0.1}}, "objective.teacher_temp", "greater than 0"),
        ({"objective": {"student_temp": 0}}, "objective.student_temp", "greater than 0"),
        ({"objective": {"warmup_teacher_temp": 0}}, "objective.warmup_teacher_temp", "greater"),
        ({"objective": {"prior_momentum": 1.5}}, "objective.prior_momentum", "less than 1"),
        ({"objective": {"prior_momentum": 1.0}}, "objective.prior_momentum", "less than 1"),
        ({"objective": {"prior_momentum": -0.1}}, "objective.prior_momentum", "greater than"),
        ({"objective": {"num_clusters": 1}}, "objective.num_clusters", "greater than or equal"),
        ({"objective": {"prior_power": 2}}, "objective.prior_power", "less than or equal to 1"),
        ({"objective": {"mode": "dino"}}, "objective.mode", "'prior', 'center', 'sinkhorn'"),
        ({"data": {"kind": "imagenet"}}, "data.kind", "'digits', 'synthetic', 'imagefolder'"),
        ({"data": {"kind": "imagefolder"}}, "data", "data.path is required"),
        ({"data": {"local_crop_size": 48}}, "data.local_crop_size", "must not be larger"),
        ({"data": {"global_crop_scale": [0.9, 0.2]}}, "data.global_crop_scale", "low <= high"),
        ({"data": {"batch_size": 0}}, "data.batch_size", "greater than or equal to 1"),
        ({"schedule": {"epochs": 0}}, "schedule.epochs", "greater than or equal to 1"),
        ({"optim": {"lr": -1}}, "optim.lr", "greater than 0"),
        ({"objective": {"tau": 0.1}}, "objective.tau", "Extra inputs are not permitted"),
    ],
)
def test_every_bad_value_names_its_field_and_reason(
    raw: dict[str, object], field: str, reason: str
) -> None:
    problems = problems_of(raw)
    matching = [p for p in problems if p.startswith(f"{field}:")]
    assert matching, f"no error for {field} in {problems}"
    assert reason in matching[0]


def test_all_problems_are_reported_at_once() -> None:
    problems = problems_of(
        {"objective": {"teacher_temp": -1, "prior_momentum": 1.5}, "data": {"kind": "x"}}
    )
    fields = {p.split(":")[0] for p in problems}
    assert fields == {"objective.teacher_temp", "objective.prior_momentum", "data.kind"}


def test_defaults_are_valid_and_round_trip_through_json() -> None:
    config = TrainConfig()
    again = validate_config(json.loads(config.to_json()))
    assert again == config
    assert config.objective.mode == "prior"
    assert config.data.num_views == config.data.num_global_crops + config.data.num_local_crops


def test_flat_params_use_dotted_paths() -> None:
    flat = TrainConfig().flat()
    assert flat["objective.teacher_temp"] == "0.04"
    assert flat["eval.knn_k"] == "[20, 200]"
    assert all("." in key or key == "name" for key in flat)


def test_yaml_and_json_files_load_the_same(tmp_path: Path) -> None:
    raw = {"name": "x", "objective": {"mode": "center", "teacher_temp": 0.06}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "c.json").write_text(json.dumps(raw))
    assert load_config(tmp_path / "c.yaml") == load_config(tmp_path / "c.json")
    assert load_config(tmp_path / "c.yaml").objective.mode == "center"


def test_overrides_are_parsed_and_validated(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("schedule: {epochs: 10}\n")
    config = load_config(
        tmp_path / "c.yaml",
        ["schedule.epochs=2", f"data.path={tmp_path}", "eval.knn_k=[5, 10]", "data.kind=digits"],
    )
    assert config.schedule.epochs == 2
    assert config.data.path == tmp_path
    assert config.eval.knn_k == [5, 10]
    with pytest.raises(ConfigError, match=r"objective\.teacher_temp: .*greater than 0"):
        load_config(tmp_path / "c.yaml", ["objective.teacher_temp=-1"])


def test_malformed_overrides_and_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        apply_overrides({}, ["schedule.epochs"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"name": "x"}, ["name.first=1"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid json"):
        load_config(tmp_path / "broken.json")


@pytest.mark.parametrize(
    "name", sorted(p.name for p in CONFIGS.glob("*.yaml") if "sweep" not in p.name)
)  # sweeps (a base config and a space) are validated in tests/tuning
def test_example_configs_validate(name: str, tmp_path: Path) -> None:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    if "path" in raw["data"]:  # the data lives elsewhere on a user's machine
        raw["data"]["path"] = str(tmp_path)
    config = validate_config(raw, name)
    assert config.name == Path(name).stem
