"""TrainConfig: loading, overrides, and every validation error with its field path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from trainer.config import (
    BACKBONE_KWARGS,
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
        ({"runtime": {"checkpoint_every_steps": -1}}, "runtime.checkpoint_every_steps", "greater"),
        (
            {"data": {"augment_device": "cuda"}, "runtime": {"device": "cpu"}},
            "data.augment_device",
            "'cuda' needs a CUDA training device",
        ),
        (
            {"runtime": {"checkpoint_every_steps": 100}, "data": {"loader": "ray"}},
            "runtime.checkpoint_every_steps",
            "needs data.loader 'torch'",
        ),
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


# ------------------------------------------------------------------ bounds (issue 11)

# The absurd values, and infinities, each an error naming its field.
ABSURD = [
    ({"objective": {"num_clusters": 1e9}}, "objective.num_clusters", "less than or equal"),
    ({"data": {"batch_size": 1e9}}, "data.batch_size", "less than or equal"),
    ({"schedule": {"epochs": 1e9}}, "schedule.epochs", "less than or equal"),
    ({"data": {"global_crop_size": 1e6}}, "data.global_crop_size", "less than or equal"),
    ({"data": {"num_local_crops": 1e6}}, "data.num_local_crops", "less than or equal"),
    ({"data": {"loader_workers": 1e5}}, "data.loader_workers", "less than or equal"),
    ({"model": {"head_hidden_dim": 1e9}}, "model.head_hidden_dim", "less than or equal"),
    ({"model": {"head_bottleneck_dim": 1e9}}, "model.head_bottleneck_dim", "less than"),
    ({"runtime": {"num_workers": 1e6}}, "runtime.num_workers", "less than or equal"),
    ({"model": {"backbone_kwargs": {"depth": 1e6}}}, "model.backbone_kwargs", "depth expects"),
    ({"data": {"max_samples": 1e30}}, "data.max_samples", "integer, exceeded maximum size"),
    ({"data": {"max_samples": 10**30}}, "data.max_samples", "less than or equal"),
    ({"data": {"synthetic_samples": 1e12}}, "data.synthetic_samples", "less than or equal"),
    ({"optim": {"lr": float("inf")}}, "optim.lr", "finite number"),
    ({"optim": {"lr": float("nan")}}, "optim.lr", "finite number"),
    ({"optim": {"clip_grad": float("inf")}}, "optim.clip_grad", "finite number"),
    ({"optim": {"weight_decay": 1e9}}, "optim.weight_decay", "less than or equal"),
    ({"runtime": {"cpus_per_worker": float("inf")}}, "runtime.cpus_per_worker", "finite"),
    ({"runtime": {"cpus_per_worker": 1e6}}, "runtime.cpus_per_worker", "less than or equal"),
    ({"objective": {"teacher_temp": float("inf")}}, "objective.teacher_temp", "finite"),
    ({"objective": {"student_temp": 1e9}}, "objective.student_temp", "less than or equal"),
    ({"objective": {"prior_power": float("nan")}}, "objective.prior_power", "finite"),
    ({"objective": {"sinkhorn_iters": 1e9}}, "objective.sinkhorn_iters", "less than"),
    ({"data": {"holdout_fraction": float("nan")}}, "data.holdout_fraction", "finite"),
    ({"data": {"global_crop_scale": [0.4, float("inf")]}}, "data.global_crop_scale.1", "finite"),
    ({"eval": {"knn_k": [1e9]}}, "eval.knn_k.0", "less than or equal"),
    ({"eval": {"knn_k": list(range(1, 100))}}, "eval.knn_k", "at most 16"),
    ({"eval": {"every_epochs": 1e9}}, "eval.every_epochs", "less than or equal"),
    ({"runtime": {"max_failures": -1}}, "runtime.max_failures", "greater than or equal to 0"),
    ({"runtime": {"max_failures": 10**6}}, "runtime.max_failures", "less than or equal"),
    ({"runtime": {"seed": 2**40}}, "runtime.seed", "less than or equal"),
    ({"runtime": {"keep_checkpoints": 10**9}}, "runtime.keep_checkpoints", "less than"),
    ({"runtime": {"log_every_steps": 10**12}}, "runtime.log_every_steps", "less than"),
    ({"schedule": {"warmup_epochs": 10**9}}, "schedule.warmup_epochs", "less than"),
    ({"name": "n" * 129}, "name", "at most 128 characters"),
    ({"model": {"backbone": "b" * 129}}, "model.backbone", "at most 128 characters"),
    ({"model": {"backbone": "hf-hub:timm/x"}}, "model.backbone", "should match pattern"),
    ({"model": {"backbone": "local-dir:/etc"}}, "model.backbone", "should match pattern"),
    ({"model": {"patch_size": 10**6}}, "model.patch_size", "less than or equal"),
    ({"model": {"head_layers": 10**6}}, "model.head_layers", "less than or equal"),
]


@pytest.mark.parametrize(("raw", "field", "reason"), ABSURD)
def test_absurd_values_and_infinities_name_their_field(
    raw: dict[str, object], field: str, reason: str
) -> None:
    problems = problems_of(raw)
    matching = [p for p in problems if p.startswith(f"{field}:")]
    assert matching, f"no error for {field} in {problems}"
    assert reason in matching[0], matching[0]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"optim": {"lr": 1e999}}', "optim.lr"),
        ('{"runtime": {"cpus_per_worker": Infinity}}', "runtime.cpus_per_worker"),
        ('{"objective": {"teacher_temp": NaN}}', "objective.teacher_temp"),
        ('{"schedule": {"epochs": 1e999}}', "schedule.epochs"),
    ],
)
def test_json_infinities_are_refused(text: str, field: str) -> None:
    problems = problems_of(json.loads(text))
    assert [p for p in problems if p.startswith(f"{field}:") and "finite" in p], problems


def test_yaml_infinity_and_overrides_are_refused(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("optim: {lr: .inf}\nruntime: {cpus_per_worker: .nan}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "c.yaml")
    fields = {p.split(":")[0] for p in caught.value.problems}
    assert fields == {"optim.lr", "runtime.cpus_per_worker"}
    with pytest.raises(ConfigError, match=r"objective\.num_clusters: .*less than or equal"):
        load_config(None, ["objective.num_clusters=1000000000"])


def test_long_paths_are_a_validation_error_not_an_os_error() -> None:
    found = problems_of({"data": {"kind": "imagefolder", "path": "/d/" + "x" * 5000}})
    assert found == ["data.path: path of 5003 characters is longer than 4096 (Linux's PATH_MAX)"]
    found = problems_of({"data": {"kind": "imagefolder", "path": "/d/" + "x" * 300 + "/y"}})
    assert found == [
        "data.path: a path component of 300 bytes is longer than 255 (Linux's NAME_MAX)"
    ]
    longest = "/" + "/".join(["x" * 255] * 15)  # 3856 characters, every component at 255
    assert validate_config({"data": {"path": longest}}).data.path == Path(longest)


def large_cluster_config() -> dict[str, Any]:
    """ViT-g/14 on 1024 GPUs over ImageNet-22k: the largest runs the bounds must admit."""
    return {
        "name": "vit-g14-in22k-" + "x" * 100,
        "data": {
            "kind": "imagefolder",
            "path": "/mnt/datasets/imagenet-22k/train",
            "max_samples": 10**10,
            "holdout_fraction": 0.001,
            "global_crop_size": 1024,
            "local_crop_size": 512,
            "num_local_crops": 64,
            "batch_size": 64,  # x 1024 workers = a global batch of 65536
            "loader_workers": 64,
        },
        "model": {
            "backbone": "vit_giant_patch14_224",
            "small_images": False,
            "patch_size": 14,
            "backbone_kwargs": {
                "depth": 40,
                "embed_dim": 1536,
                "num_heads": 24,
                "mlp_ratio": 4.3637,
                "drop_path_rate": 0.4,
                "init_values": 1e-5,
                "img_size": 1024,
                "reg_tokens": 4,
                "qkv_bias": True,
            },
            "head_hidden_dim": 65536,
            "head_bottleneck_dim": 65536,
            "head_layers": 8,
        },
        "objective": {
            "mode": "sinkhorn",
            "num_clusters": 262144,
            "teacher_temp": 0.07,
            "warmup_teacher_temp_epochs": 300,
            "sinkhorn_iters": 100,
        },
        "optim": {"lr": 4.8, "min_lr": 1e-6, "weight_decay": 0.5, "clip_grad": 1000.0},
        "schedule": {"epochs": 1000, "warmup_epochs": 100},
        "eval": {"knn_k": [10, 20, 100, 200, 10000], "every_epochs": 1000},
        "runtime": {
            "seed": 2**32 - 1,
            "device": "cuda",
            "precision": "bf16",
            "num_workers": 4096,
            "cpus_per_worker": 256,
            "max_failures": 100,
            "keep_checkpoints": 100,
            "log_every_steps": 100_000,
            "checkpoint_every_epochs": 1000,
            "placement_strategy": "SPREAD",
        },
    }


def test_the_documented_large_cluster_values_are_accepted() -> None:
    config = validate_config(large_cluster_config())
    assert config.objective.num_clusters == 262144
    assert config.runtime.num_workers == 4096
    assert config.data.max_samples == 10**10
    # A global batch of 65536 also fits on one worker, and a head of 65536 x 262144.
    single = validate_config({"data": {"batch_size": 65536}, "model": {"head_hidden_dim": 65536}})
    assert single.data.batch_size == 65536


# --------------------------------------------------------- backbone_kwargs allow-list


@pytest.mark.parametrize(
    "key",
    [
        "checkpoint_path",
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "file",
        "url",
        "cache_dir",
        "weights",
        "hf_hub_id",
        "state_dict_path",
    ],
)
def test_backbone_kwargs_that_name_files_or_weights_are_refused(key: str) -> None:
    (problem,) = problems_of({"model": {"backbone_kwargs": {key: "/etc/passwd"}}})
    assert problem.startswith(f"model.backbone_kwargs: key '{key}' is refused: it names a file")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"num_classes": 10}, "key 'num_classes' is refused: klssl builds the backbone headless"),
        ({"in_chans": 1}, "key 'in_chans' is refused: klssl's views are RGB"),
        ({"global_pool": ""}, "key 'global_pool' is refused: klssl needs the backbone's pooled"),
        ({"features_only": True}, "key 'features_only' is refused"),
        ({"act_layer": "gelu"}, "key 'act_layer' is not an allowed architecture argument"),
        ({"depth": 1e6}, "depth expects int 1 to 256, got 1000000"),
        ({"depth": 2.5}, "depth expects an integer, got 2.5"),
        ({"depth": True}, "depth expects a number, got True"),
        ({"depth": "12"}, "depth expects a number, got '12'"),
        ({"embed_dim": 10**9}, "embed_dim expects int 1 to 16384"),
        ({"drop_path_rate": 1.0}, "drop_path_rate expects float 0 to < 1, got 1.0"),
        ({"drop_path_rate": -0.1}, "drop_path_rate expects float 0 to < 1"),
        ({"mlp_ratio": 1e9}, "mlp_ratio expects float 0.125 to 64"),
        ({"qkv_bias": 1}, "qkv_bias expects true or false, got 1"),
        ({"stem_type": "../../etc"}, "stem_type expects one of '' | 'deep' | 'deep_tiered'"),
        ({"k" * 300: 1}, "key 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'... of 300 char"),
    ],
)
def test_backbone_kwargs_outside_the_allow_list_or_bounds_are_refused(
    kwargs: dict[str, object], reason: str
) -> None:
    (problem,) = problems_of({"model": {"backbone_kwargs": kwargs}})
    assert problem.startswith("model.backbone_kwargs: ")
    assert reason in problem, problem
    assert len(problem) < 600  # a long key is cut, never echoed whole


def test_every_bad_backbone_kwarg_is_named_at_once() -> None:
    (problem,) = problems_of(
        {"model": {"backbone_kwargs": {"checkpoint_path": "/x", "depth": 0, "nope": 1}}}
    )
    assert "'checkpoint_path' is refused" in problem
    assert "depth expects int 1 to 256, got 0" in problem
    assert "'nope' is not an allowed" in problem


def test_allowed_backbone_kwargs_keep_their_types() -> None:
    config = validate_config(
        {
            "model": {
                "backbone_kwargs": {
                    "depth": 2.0,  # a whole float (JSON, sweeps) becomes the int timm expects
                    "mlp_ratio": 4,
                    "drop_path_rate": 0.1,
                    "qkv_bias": False,
                    "stem_type": "deep",
                }
            }
        }
    )
    kwargs = config.model.backbone_kwargs
    assert kwargs == {
        "depth": 2,
        "mlp_ratio": 4.0,
        "drop_path_rate": 0.1,
        "qkv_bias": False,
        "stem_type": "deep",
    }
    assert type(kwargs["depth"]) is int and type(kwargs["mlp_ratio"]) is float
    # Assignment is validated as well.
    with pytest.raises(ValidationError, match="checkpoint_path"):
        config.model.backbone_kwargs = {"checkpoint_path": "/etc/passwd"}


def test_the_json_schema_states_the_bounds_and_the_allowed_keys() -> None:
    schema = TrainConfig.model_json_schema()["$defs"]
    assert schema["DataConfig"]["properties"]["path"]["maxLength"] == 4096
    assert schema["ObjectiveConfig"]["properties"]["num_clusters"]["maximum"] == 1_048_576
    kwargs = schema["ModelConfig"]["properties"]["backbone_kwargs"]
    assert set(kwargs["propertyNames"]["enum"]) == set(BACKBONE_KWARGS)
    assert "checkpoint_path" not in BACKBONE_KWARGS and "pretrained" not in BACKBONE_KWARGS
