"""`klssl train` and `klssl eval` as a user runs them: a real subprocess, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.factories import tiny_config
from trainer.local import forget_metrics_after

KLSSL = [sys.executable, "-m", "service.cli"]


def klssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KLSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


def test_train_resume_and_eval_from_the_command_line(tmp_path: Path) -> None:
    config = tiny_config(schedule={"epochs": 1})
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "run"

    first = klssl("train", str(config_file), "--output", str(out), "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "k-NN top-1 (k=5):" in first.stdout and "(random init " in first.stdout
    assert "linear top-1:" in first.stdout
    health = first.stdout.splitlines()[-2]  # the line before "outputs in ..."
    assert health == "health: ok" or health.startswith("health: collapsed at step "), health
    assert (out / "checkpoints" / "epoch_0001" / "state.pt").exists()
    assert json.loads((out / "config.json").read_text())["schedule"]["epochs"] == 1

    second = klssl(
        "train",
        str(config_file),
        "--output",
        str(out),
        "--set",
        "schedule.epochs=2",
        "--resume",
        "--no-progress",
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr and "epoch 1" in second.stderr
    assert "schedule.epochs: 1 -> 2" in second.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch_end"] for r in records if "epoch_end" in r] == [1, 2]
    steps = [r["step"] for r in records if "epoch_end" not in r]
    assert steps == sorted(set(steps)), "a resumed run must not repeat logged steps"
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["knn_top1"] <= 100.0

    evaluated = klssl("eval", str(out / "checkpoints" / "epoch_0002"), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    for metric in ("knn_top1", "linear_top1"):
        reported = float(evaluated.stdout.split(f"{metric}:")[1].split("%")[0])
        assert abs(reported - results[metric]) < 0.006  # printed with 2 decimals


def test_bad_config_is_rejected_with_field_and_reason(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("objective: {teacher_temp: 0.04}\n")
    invalid = klssl(
        "train", str(config_file), "--set", "objective.prior_momentum=1.5", cwd=tmp_path
    )
    assert invalid.returncode == 2
    assert "objective.prior_momentum: Input should be less than 1" in invalid.stderr
    # Valid, but not runnable here: the preflight names every problem.
    unrunnable = klssl(
        "train",
        str(config_file),
        "--set",
        "model.backbone=resnet19",
        "--set",
        "data.kind=imagefolder",
        "--set",
        "data.path=missing",
        cwd=tmp_path,
    )
    assert unrunnable.returncode == 2
    assert "model.backbone: unknown backbone 'resnet19'; close timm names: resnet18" in (
        unrunnable.stderr
    )
    assert "data.path: path 'missing' does not exist" in unrunnable.stderr
    assert not (tmp_path / "runs").exists(), "a rejected config must create nothing"


def test_resume_without_checkpoint_fails_clearly(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    result = klssl(
        "train", str(config_file), "--output", str(tmp_path / "empty"), "--resume", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "no checkpoint under" in result.stderr


def test_a_resume_drops_the_metrics_logged_after_its_checkpoint(tmp_path: Path) -> None:
    """Steps the stopped run logged after its last checkpoint are trained (and logged)
    again by the resumed run: the file keeps each step once."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 5}, {"step": 8, "epoch_end": 1}, {"step": 10}, {"step": 12}]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    forget_metrics_after(path, 10)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    forget_metrics_after(tmp_path / "absent.jsonl", 3)  # a first run has no file yet
