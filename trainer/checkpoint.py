"""Checkpoints: one directory per checkpoint, the training state plus its config.

A checkpoint directory holds ``state.pt`` (student, teacher, optimiser, grad scaler,
cluster statistics, epoch, step, RNG states) and ``config.json`` beside it, so every
checkpoint says how it was made. The same directory is what Ray Train's
``Checkpoint.from_directory`` wraps, so local and Ray runs share one format.

Checkpoints live on shared storage that others may write to, so they are read with
``torch.load(weights_only=True)``: only tensors and plain values (dicts, lists, tuples,
numbers, strings, None) load, and a file holding anything else (a pickled object whose
loading would run code) is refused without running it. Every random generator's state
is therefore stored as tensors and plain values (`rng_state`), never as pickled NumPy
arrays or tuples of objects. Checkpoints of the older format (before
`CHECKPOINT_FORMAT` 2, with a pickled NumPy RNG state) are refused with a clear error.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.acceleration import load_optimizer_state
from trainer.config import TrainConfig, validate_config
from trainer.engine import TrainingState
from trainer.models import unwrap

STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
CHECKPOINT_PREFIX = "epoch_"
CHECKPOINT_FORMAT = 2
"""Version of ``state.pt`` and of the RNG files: 2 holds only tensors and plain values."""
FORMAT_KEY = "format"


class CheckpointError(ValueError):
    """A checkpoint file that klssl refuses to load (unsafe, old format or malformed)."""


def safe_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, refusing anything but tensors and plain values.

    Raises:
        CheckpointError: the file holds other objects (a pickled class, a NumPy array, a
            callable that would run on load): it is refused without running anything.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} refused: it holds objects other than tensors and plain values, and "
            "checkpoints are loaded with weights_only=True so that nothing in them runs. "
            f"It was written by an older klssl (before checkpoint format {CHECKPOINT_FORMAT}, "
            "with pickled RNG states) or it was tampered with; start the run afresh "
            f"(torch: {detail})"
        ) from None


def _checked_format(path: Path, loaded: Any) -> dict[str, Any]:
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} is not a klssl checkpoint: not a mapping")
    found = loaded.get(FORMAT_KEY)
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {found!r}; this klssl reads format "
            f"{CHECKPOINT_FORMAT} only (RNG states as tensors): start the run afresh"
        )
    return loaded


def rng_state() -> dict[str, Any]:
    """This process's random generator states (a checkpoint's ``rng`` entry).

    Tensors and plain values only, so ``torch.load(weights_only=True)`` reads them:
    NumPy's MT19937 key (624 uint32) and Python's Mersenne Twister state (625 words) as
    int64 tensors, their positions and cached Gaussians as numbers.
    """
    np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        FORMAT_KEY: CHECKPOINT_FORMAT,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_kind),
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
    }


def set_rng_state(rng: Mapping[str, Any]) -> None:
    """Restore every generator from an `rng_state` (CUDA's only where CUDA is present).

    Raises:
        CheckpointError: ``rng`` is not of the current format.
    """
    try:
        numpy_state = rng["numpy"]
        python_state = rng["python"]
        numpy_tuple = (
            str(numpy_state["kind"]),
            numpy_state["key"].cpu().numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
        gauss_next = python_state["gauss_next"]
        python_tuple = (
            int(python_state["version"]),
            tuple(int(word) for word in python_state["internal"].tolist()),
            None if gauss_next is None else float(gauss_next),
        )
        torch_state = rng["torch"].cpu()
        cuda_states = [state.cpu() for state in rng["cuda"]]
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"malformed RNG state in a checkpoint (format {CHECKPOINT_FORMAT} expected): "
            f"{type(error).__name__}: {error}"
        ) from None
    torch.set_rng_state(torch_state)
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    np.random.set_state(numpy_tuple)
    random.setstate(python_tuple)


def save_rng(path: Path) -> None:
    """Write this process's `rng_state` to ``path`` (a rank's own RNG file)."""
    torch.save(rng_state(), path)


def load_rng(path: Path) -> dict[str, Any]:
    """Read an RNG file of `save_rng` with ``weights_only=True`` (see `safe_load`)."""
    return _checked_format(path, safe_load(path))


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
        "epoch_samples": state.epoch_samples,
        "health": state.health.state_dict(),
        "rng": rng_state(),
        FORMAT_KEY: CHECKPOINT_FORMAT,
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
    """Read a checkpoint's state with ``weights_only=True`` (see `safe_load`).

    Raises:
        FileNotFoundError: no ``state.pt`` in ``directory``.
        CheckpointError: the file holds anything but tensors and plain values, or is of
            an older format.
    """
    path = directory / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a klssl checkpoint: {STATE_FILE} missing")
    return _checked_format(path, safe_load(path, map_location=map_location))


def load_checkpoint_config(directory: Path) -> TrainConfig:
    """The config stored beside a checkpoint, re-validated."""
    raw = json.loads((directory / CONFIG_FILE).read_text())
    return validate_config(raw, str(directory / CONFIG_FILE))


def config_changes(stored: TrainConfig, new: TrainConfig) -> list[str]:
    """``field: old -> new`` for every flattened field a resumed run changes.

    A resume restores the weights, optimiser and statistics of ``stored``; a changed
    field (a longer schedule, another learning rate) then applies from the resumed step
    on, which the user should be told about rather than find out from the curves.
    """
    before, after = stored.flat(), new.flat()
    return [
        f"{key}: {before.get(key)} -> {after[key]}"
        for key in sorted(after)
        if before.get(key) != after[key]
    ]


def restore_state(state: TrainingState, payload: dict[str, Any]) -> None:
    """Load a payload into a freshly built state (same config), RNG states included."""
    unwrap(state.student).load_state_dict(payload["student"])
    state.teacher.load_state_dict(payload["teacher"])
    state.statistics.load_state_dict(payload["statistics"])
    load_optimizer_state(state.optimizer, payload["optimizer"])  # this device's kernel
    if state.scaler is not None and payload["scaler"] is not None:
        state.scaler.load_state_dict(payload["scaler"])
    state.epoch = payload["epoch"]
    state.step = payload["step"]
    state.epoch_samples = payload.get("epoch_samples", 0)  # 0: taken at an epoch's end
    if "health" in payload:  # checkpoints written before the health verdict existed
        state.health.load_state_dict(payload["health"])
    set_rng_state(payload["rng"])


def checkpoint_due(config: TrainConfig, epoch: int) -> bool:
    """Whether a checkpoint is taken after ``epoch`` completed epochs (always after the last)."""
    every = config.runtime.checkpoint_every_epochs
    return epoch % every == 0 or epoch == config.schedule.epochs


def step_checkpoint_due(config: TrainConfig, step: int) -> bool:
    """Whether a mid-epoch checkpoint is taken after optimiser step ``step``."""
    every = config.runtime.checkpoint_every_steps
    return every > 0 and step % every == 0


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """The directory name of a checkpoint after ``epoch`` completed epochs.

    One taken within the next epoch also names its ``step``; names sort in the order
    the checkpoints were taken (``epoch_0003`` < ``epoch_0003_step_00000450`` <
    ``epoch_0004``).
    """
    name = f"{CHECKPOINT_PREFIX}{epoch:04d}"
    return name if step is None else f"{name}_step_{step:08d}"


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
