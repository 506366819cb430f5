"""Run training in this process (``klssl train``): a progress bar and a local directory.

The output directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per log
line), ``checkpoints/epoch_NNNN/`` and, at the end, ``backbone.pt`` (a state_dict that
loads into ``timm.create_model(name, pretrained=False, num_classes=0)`` after the same
small-image stem change) and ``results.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainer.checkpoint import (
    checkpoint_due,
    checkpoint_name,
    config_changes,
    latest_checkpoint,
    load_checkpoint_config,
    load_payload,
    prune_checkpoints,
    save_checkpoint,
)
from trainer.config import TrainConfig
from trainer.engine import TrainingState
from trainer.loop import Run, backbone_of, build_run, run_training

BACKBONE_FILE = "backbone.pt"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


class LocalHooks:
    """Progress bar, metrics file and checkpoints of an in-process run."""

    def __init__(self, run: Run, output_dir: Path, progress: Progress | None) -> None:
        self.run = run
        self.output_dir = output_dir
        self.checkpoint_root = output_dir / "checkpoints"
        self.metrics_file = (output_dir / METRICS_FILE).open("a")
        self.progress = progress
        self.task = (
            progress.add_task("training", total=run.schedules.total_steps, status="")
            if progress is not None
            else None
        )
        if progress is not None and self.task is not None:
            progress.update(self.task, completed=run.state.step)

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        self._write({"step": state.step, **metrics})
        if self.progress is not None and self.task is not None:
            self.progress.update(
                self.task,
                completed=state.step,
                status=f"epoch {state.epoch + 1}/{self.run.config.schedule.epochs}  "
                f"loss {metrics['loss']:.3f}  target MI "
                f"{metrics['target_mutual_info_norm']:.2f}  spread {metrics['logit_spread']:.3f}"
                f"  health {state.health.verdict.describe()}",
            )

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        self._write({"step": state.step, "epoch_end": state.epoch, **metrics})
        if checkpoint_due(self.run.config, state.epoch):
            self._save(checkpoint_name(state.epoch), state)

    def save_mid_epoch(self, state: TrainingState) -> None:
        """A checkpoint within an epoch (``runtime.checkpoint_every_steps``)."""
        self._save(checkpoint_name(state.epoch, state.step), state)

    def _save(self, name: str, state: TrainingState) -> None:
        config = self.run.config
        save_checkpoint(self.checkpoint_root / name, state, config)
        prune_checkpoints(self.checkpoint_root, config.runtime.keep_checkpoints)

    def _write(self, record: dict[str, Any]) -> None:
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def close(self) -> None:
        self.metrics_file.close()


def train_locally(
    config: TrainConfig,
    output_dir: Path,
    *,
    resume: bool = False,
    show_progress: bool = True,
    console: Console | None = None,
) -> dict[str, float]:
    """Train ``config`` in this process, writing everything under ``output_dir``.

    Args:
        config: the validated config.
        output_dir: where config, metrics, checkpoints and the backbone go.
        resume: continue from the newest checkpoint in ``output_dir`` (an error if none).
        show_progress: draw a progress bar.
        console: where messages go (default: stderr-safe rich console).

    Returns:
        The final metrics, including ``knn_top1`` when the data has labels.

    Raises:
        ValueError: the config streams its data through Ray (``data.loader: ray``).
        FileNotFoundError: ``resume`` without a checkpoint.
    """
    if config.data.loader == "ray":
        raise ValueError(
            "data.loader 'ray' streams the data through a Ray cluster: train with "
            "--workers N (Ray Train) or submit the job to the service, or set "
            "data.loader: torch to train in this process"
        )
    console = console or Console(stderr=True)
    payload = None
    if resume:
        checkpoint = latest_checkpoint(output_dir / "checkpoints")
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {output_dir / 'checkpoints'}")
        _warn_config_changes(load_checkpoint_config(checkpoint), config, console)
        payload = load_payload(checkpoint)
        console.print(
            f"resuming from {checkpoint} (epoch {payload['epoch']}, step {payload['step']})"
        )
        forget_metrics_after(output_dir / METRICS_FILE, payload["step"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(config.to_json())

    run = build_run(config)
    console.print(
        f"training {config.model.backbone} on {config.data.kind} "
        f"({len(run.splits.train)} train / {len(run.splits.holdout)} held-out images), "
        f"mode={config.objective.mode}, K={config.objective.num_clusters}, "
        f"{config.schedule.epochs} epochs x {run.schedules.steps_per_epoch} steps on "
        f"{run.device} ({run.precision})"
    )
    progress = (
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        if show_progress
        else None
    )
    hooks = LocalHooks(run, output_dir, progress)
    try:
        if progress is not None:
            progress.start()
        metrics = run_training(run, hooks, resume=payload, checkpoint=hooks.save_mid_epoch)
    finally:
        if progress is not None:
            progress.stop()
        hooks.close()
    torch.save(backbone_of(run).state_dict(), output_dir / BACKBONE_FILE)
    (output_dir / RESULTS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def forget_metrics_after(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` from a run's metrics file.

    They were logged by the stopped run after its last checkpoint; the resumed run
    trains those steps again and logs them anew, so every step stays in the file once.
    """
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(f"{line}\n" for line in kept))


def _warn_config_changes(stored: TrainConfig, new: TrainConfig, console: Console) -> None:
    changes = config_changes(stored, new)
    if changes:
        console.print("[yellow]resuming with a changed config:[/] " + ", ".join(changes))
