"""Checkpoints: one directory per checkpoint, the training state plus its config.

A checkpoint directory holds ``state.pt`` (student, teacher, optimiser, grad scaler,
cluster statistics, epoch, step, RNG states) and ``config.json`` beside it, so every
checkpoint says how it was made. The same directory is what Ray Train's
``Checkpoint.from_directory`` wraps, so local and Ray runs share one format.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import TrainConfig, validate_config
from trainer.engine import TrainingState
from trainer.models import unwrap

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_PREFIX = "epoch_"


def rng_state() -> dict[str, Any]:
    """This process's random generator states (a checkpoint's ``rng`` entry)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def state_payload(state: TrainingState) -> dict[str, Any]:
    """The training state as a dict of tensors and plain values."""
    return {
        "student": unwrap(state.student).state_dict(),
        "teacher": state.teacher.state_dict(),
        "statistics": state.statistics.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": None if state.scaler is None else state.scaler.state_dict(),
        "epoch": state.epoch,
        "step": state.step,
        "health": state.health.state_dict(),
        "rng": rng_state(),
    }


def save_checkpoint(directory: Path, state: TrainingState, config: TrainConfig) -> Path:
    """Write a checkpoint directory atomically (a crash never leaves half a checkpoint)."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(state_payload(state), staging / STATE_FILE)
    (staging / CONFIG_FILE).write_text(config.to_json())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def load_payload(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint's state (``weights_only=False``: it holds RNG states we wrote)."""
    path = directory / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a klssl checkpoint: {STATE_FILE} missing")
    payload: dict[str, Any] = torch.load(path, map_location=map_location, weights_only=False)
    return payload


def load_checkpoint_config(directory: Path) -> TrainConfig:
    """The config stored beside a checkpoint, re-validated."""
    raw = json.loads((directory / CONFIG_FILE).read_text())
    return validate_config(raw, str(directory / CONFIG_FILE))


def restore_state(state: TrainingState, payload: dict[str, Any]) -> None:
    """Load a payload into a freshly built state (same config), RNG states included."""
    unwrap(state.student).load_state_dict(payload["student"])
    state.teacher.load_state_dict(payload["teacher"])
    state.statistics.load_state_dict(payload["statistics"])
    state.optimizer.load_state_dict(payload["optimizer"])
    if state.scaler is not None and payload["scaler"] is not None:
        state.scaler.load_state_dict(payload["scaler"])
    state.epoch = payload["epoch"]
    state.step = payload["step"]
    if "health" in payload:  # checkpoints written before the health verdict existed
        state.health.load_state_dict(payload["health"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def checkpoint_due(config: TrainConfig, epoch: int) -> bool:
    """Whether a checkpoint is taken after ``epoch`` completed epochs (always after the last)."""
    every = config.runtime.checkpoint_every_epochs
    return epoch % every == 0 or epoch == config.schedule.epochs


def checkpoint_name(epoch: int) -> str:
    """The directory name of the checkpoint taken after ``epoch`` completed epochs."""
    return f"{CHECKPOINT_PREFIX}{epoch:04d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not root.exists():
        return []
    return sorted(
        path
        for path in root.iterdir()
        if path.is_dir()
        and path.name.startswith(CHECKPOINT_PREFIX)
        and not path.name.endswith(".tmp")
        and (path / STATE_FILE).exists()
    )


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, if any."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
