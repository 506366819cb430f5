"""MLflow tracking without Ray: run creation, step de-duplication, backbone export.

Everything runs against a real SQLite tracking store in a temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

from tests import factories
from trainer.config import ModelConfig, TrainConfig, validate_config
from trainer.models import build_backbone
from trainer.tracking import (
    MetricLogger,
    create_from_recipe,
    create_run,
    export_backbone,
    finish_run,
    load_backbone,
    resolve_tracking_uri,
    timm_recipe,
)


def tiny_config(**runtime: Any) -> TrainConfig:
    return factories.tiny_config(name="tracking-test", runtime=runtime)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_tracking_uri_comes_from_the_environment_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLSSL_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(tmp_path) == "http://mlflow:5000"
    monkeypatch.setenv("KLSSL_MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_tracking_uri(tmp_path) == "http://tracking:5000"


def test_run_holds_flattened_config_and_config_json(tracking_uri: str, tmp_path: Path) -> None:
    config = tiny_config(num_workers=2)
    tracked = create_run(config, tracking_uri, run_name="job-1", tags={"klssl.job_id": "j1"})
    run = MlflowClient(tracking_uri).get_run(tracked.run_id)
    assert run.data.params == config.flat()
    assert run.data.tags["klssl.job_id"] == "j1"
    assert run.info.run_name == "job-1"
    # Artifacts sit beside the database, not in whatever directory the process runs in.
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    text = MlflowClient(tracking_uri).download_artifacts(
        tracked.run_id, "config.json", str(tmp_path)
    )
    assert validate_config(json.loads(Path(text).read_text())) == config


def test_restarted_logger_never_logs_a_step_twice(tracking_uri: str) -> None:
    tracked = create_run(tiny_config(), tracking_uri, run_name="restart")
    first = MetricLogger(tracked)
    for step in range(1, 11):
        first.log({"loss": float(step), "lr": 0.1}, step=step)
    first.log({"loss": 10.0, "epoch_loss": 5.0}, step=10)  # epoch end: loss already there
    first.close()

    # A restarted attempt resumes from a checkpoint at step 6 and re-trains 7..15.
    second = MetricLogger(tracked)
    assert second.last_step == {"loss": 10, "lr": 10, "epoch_loss": 10}
    written = [second.log({"loss": 100.0 + step, "lr": 0.2}, step=step) for step in range(7, 16)]
    assert written == [0, 0, 0, 0, 2, 2, 2, 2, 2]
    second.log({"epoch_loss": 7.0, "nan_metric": float("nan")}, step=15)
    second.close()

    client = MlflowClient(tracking_uri)
    loss = client.get_metric_history(tracked.run_id, "loss")
    steps = sorted(metric.step for metric in loss)
    assert steps == list(range(1, 16))
    values = {metric.step: metric.value for metric in loss}
    assert values[10] == 10.0 and values[11] == 111.0
    assert [m.step for m in client.get_metric_history(tracked.run_id, "epoch_loss")] == [10, 15]
    assert "nan_metric" not in client.get_run(tracked.run_id).data.metrics


@pytest.mark.parametrize("name", ["resnet10t", "vit_tiny_patch16_224"])
def test_timm_recipe_rebuilds_the_backbone(name: str) -> None:
    model_config = ModelConfig(backbone=name, patch_size=4, backbone_kwargs={"depth": 1})
    if name.startswith("resnet"):
        model_config = ModelConfig(backbone=name)
    original = build_backbone(model_config, image_size=16)
    recipe = timm_recipe(model_config, 16)
    json.dumps(recipe)  # stored as JSON
    rebuilt = create_from_recipe(recipe)
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    images = torch.randn(2, 3, 16, 16)
    original.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(images), original(images))
    if not recipe["small_image_stem"]:  # a plain timm call rebuilds it, nothing of ours
        plain = timm.create_model(
            recipe["model_name"], pretrained=False, num_classes=0, **recipe["kwargs"]
        )
        plain.load_state_dict(original.state_dict(), strict=True)


def test_a_stopped_run_gets_no_backbone_and_stays_stopped(tracking_uri: str) -> None:
    """A sweep trial Tune stopped (or a cancelled job) whose worker trained on: logging
    the model would reopen the run and end it FINISHED."""
    config = tiny_config()
    tracked = create_run(config, tracking_uri, run_name="stopped")
    finish_run(tracked, "KILLED")
    backbone = build_backbone(config.model, config.data.global_crop_size)
    assert export_backbone(tracked, backbone, config) is None
    client = MlflowClient(tracking_uri)
    run = client.get_run(tracked.run_id)
    assert run.info.status == "KILLED"
    assert "klssl.backbone_model_uri" not in run.data.tags
    assert client.list_artifacts(tracked.run_id, "backbone") == []


def test_exported_backbone_round_trips_and_registers_with_alias(
    tracking_uri: str, tmp_path: Path
) -> None:
    config = tiny_config()
    tracked = create_run(config, tracking_uri, run_name="export")
    backbone = build_backbone(config.model, config.data.global_crop_size)
    model_uri = export_backbone(
        tracked, backbone, config, register_as="klssl-test-backbone", alias="champion"
    )
    finish_run(tracked)
    images = torch.randn(3, 3, 16, 16)
    backbone.eval()
    expected = backbone(images)
    torch.testing.assert_close(load_backbone(tracked)(images), expected)
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pytorch.load_model(model_uri)
    torch.testing.assert_close(loaded(images), expected)

    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias("klssl-test-backbone", "champion")
    assert version.run_id == tracked.run_id
    # The logged model belongs to the run's experiment, its files beside the database.
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.experiment_id == tracked.experiment_id
    assert logged.artifact_location.startswith((tmp_path / "mlartifacts").resolve().as_uri())
    run = client.get_run(tracked.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["klssl.backbone_model_uri"] == model_uri
