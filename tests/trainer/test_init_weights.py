"""Pretrained starts (``model.init``): a file or an earlier run's backbone, weights only.

A run started from another run's exported backbone must start exactly where that run
ended: its k-NN before the first step equals the source's final k-NN on the same data.
A start that does not fit the backbone is refused before anything trains, naming the
tensors; a start that is not a local file or an MLflow URI is refused by validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.factories import tiny_config
from trainer.config import ConfigError, TrainConfig
from trainer.engine import TrainingState
from trainer.init_weights import InitError, init_problem, read_state_file
from trainer.loop import backbone_of, build_run, evaluate, evaluate_baselines, run_training
from trainer.preflight import PreflightError, preflight
from trainer.tracking import create_run, export_backbone, finish_run


class Quiet:
    """Loop hooks that ignore progress."""

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass


def source_config(**model: Any) -> TrainConfig:
    # A fast teacher and a large step: the source's weights (and its k-NN) move well away
    # from the random init in one short epoch, so equal k-NN cannot happen by chance.
    return tiny_config(
        model=model,
        optim={"lr": 0.01},
        schedule={
            "epochs": 1,
            "warmup_epochs": 0,
            "teacher_momentum": 0.5,
            "teacher_momentum_end": 0.5,
        },
        eval={"baselines": False},
    )


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One short run: its exported backbone's state_dict and its final metrics."""
    run = build_run(source_config())
    metrics = run_training(run, Quiet())
    state = {key: value.detach().clone() for key, value in backbone_of(run).state_dict().items()}
    return state, metrics


def started_from(init: str, tracking_uri: str | None = None) -> dict[str, float]:
    """The k-NN report of a run started from ``init``, before its first step."""
    run = build_run(source_config(init=init), tracking_uri=tracking_uri)
    return evaluate(run)


def test_without_init_a_run_starts_elsewhere(
    trained: tuple[dict[str, torch.Tensor], dict[str, float]],
) -> None:
    """What the tests below compare would not hold by chance."""
    _, metrics = trained
    fresh = evaluate(build_run(source_config()))
    assert any(fresh[key] != metrics[key] for key in fresh if key.startswith("knn_"))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_run_started_from_a_file_starts_where_the_source_ended(
    suffix: str, trained: tuple[dict[str, torch.Tensor], dict[str, float]], tmp_path: Path
) -> None:
    state, metrics = trained
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".pt":  # as DDP saves it: one prefix, stripped on load
        torch.save({f"module.{key}": value for key, value in state.items()}, path)
    else:
        save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    run = build_run(source_config(init=str(path)))
    for network in (run.state.student, run.state.teacher):  # the teacher is built from it
        for key, value in network.backbone.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    report = evaluate(run)
    assert report["knn_top1"] == metrics["knn_top1"]
    assert report["knn_top1_k5"] == metrics["knn_top1_k5"]


def test_a_run_started_from_an_earlier_runs_registered_backbone(
    trained: tuple[dict[str, torch.Tensor], dict[str, float]], tmp_path: Path
) -> None:
    state, metrics = trained
    config = source_config()
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = create_run(config, tracking_uri, run_name="source")
    backbone = build_run(config).state.teacher.backbone
    backbone.load_state_dict(state)
    model_uri = export_backbone(tracked, backbone, config, register_as="src", alias="best")
    finish_run(tracked)
    for init in (f"runs:/{tracked.run_id}", "models:/src@best", "models:/src/1", model_uri):
        assert started_from(init, tracking_uri)["knn_top1"] == metrics["knn_top1"], init
    with pytest.raises(InitError, match="no klssl backbone there"):
        started_from("runs:/0123456789abcdef0123456789abcdef", tracking_uri)


def test_the_start_is_reported_beside_a_fresh_random_init(tmp_path: Path) -> None:
    path = tmp_path / "start.pt"
    torch.save(backbone_of(build_run(source_config())).state_dict(), path)
    run = build_run(source_config(init=str(path)))
    report = evaluate_baselines(run)
    assert {"init_knn_top1", "random_init_knn_top1", "pixels_knn_top1"} <= set(report)


def test_weights_that_do_not_fit_are_refused_naming_the_tensors(
    trained: tuple[dict[str, torch.Tensor], dict[str, float]], tmp_path: Path
) -> None:
    state, _ = trained
    changed = dict(state)
    name = next(key for key, value in state.items() if value.dim() == 2)
    changed[name] = torch.zeros(3, 3)
    del changed[next(reversed(state))]
    changed["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pt"
    torch.save(changed, path)
    with pytest.raises(InitError) as error:
        build_run(source_config(init=str(path)))
    message = str(error.value)
    assert f"1 with another shape: {name} (3, 3)" in message
    assert f"1 missing from the file: {next(reversed(state))}" in message
    assert "1 not in the backbone: extra.weight" in message


def test_a_file_that_would_run_code_or_holds_no_state_dict_is_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "object.pt"
    torch.save({"weights": Path("not a tensor")}, pickled)
    with pytest.raises(InitError, match="weights only"):
        read_state_file(pickled)
    scalar = tmp_path / "scalar.pt"
    torch.save(torch.zeros(2), scalar)
    with pytest.raises(InitError, match="does not hold a state_dict"):
        read_state_file(scalar)


@pytest.mark.parametrize(
    ("init", "problem"),
    [
        ("hf-hub:timm/resnet18.a1_in1k", "nothing is downloaded from a hub"),
        ("https://example.org/w.pt", "nothing is downloaded from a hub"),
        ("s3://bucket/w.pt", "nothing is downloaded from a hub"),
        ("runs:/not a run", "is not runs:/<run id>"),
        ("models:/a b", "is not runs:/<run id>"),
        ("weights.bin", "expected a .pt, .pth, .safetensors file"),
    ],
)
def test_an_init_that_is_neither_a_weights_file_nor_an_mlflow_uri_is_invalid(
    init: str, problem: str
) -> None:
    assert problem in (init_problem(init) or "")
    with pytest.raises(ConfigError, match=r"model\.init"):
        tiny_config(model={"init": init})


@pytest.mark.parametrize(
    "init", ["w.pt", "a/b.pth", "c.safetensors", "runs:/abc123", "models:/m@champion"]
)
def test_local_files_and_mlflow_uris_are_valid_forms(init: str) -> None:
    assert init_problem(init) is None
    assert tiny_config(model={"init": init}).model.init == init


def test_preflight_confines_an_init_file_and_resolves_it(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "w.pt").write_bytes(b"")
    (outside / "w.pt").write_bytes(b"")
    inside = preflight(
        tiny_config(model={"init": str(root / ".." / "root" / "w.pt")}), allowed_roots=[root]
    )
    assert inside.model.init == str((root / "w.pt").resolve())
    for path, reason in (
        (outside / "w.pt", "outside the allowed data roots"),
        (root / "x.pt", "does not exist"),
    ):
        with pytest.raises(PreflightError) as error:
            preflight(tiny_config(model={"init": str(path)}), allowed_roots=[root])
        assert [field for field, _ in error.value.fields] == ["model.init"]
        assert reason in str(error.value)
    # An MLflow URI is not a path: the worker reads it from the tracking server.
    uri = preflight(tiny_config(model={"init": "models:/m@a"}), allowed_roots=[root])
    assert uri.model.init == "models:/m@a"
