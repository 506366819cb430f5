"""Checkpoints load with ``torch.load(weights_only=True)``: exact RNG streams, nothing runs.

Checkpoints sit on shared storage; whoever can write there must not run code on every
worker that resumes. Every RNG state is stored as tensors and plain values, a round trip
restores the exact random streams, and a file holding a pickled object that would run
code on load is refused without running it.
"""

from __future__ import annotations

import ast
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    STATE_FILE,
    CheckpointError,
    config_changes,
    load_checkpoint_config,
    load_payload,
    load_rng,
    restore_state,
    rng_state,
    save_checkpoint,
    save_rng,
    set_rng_state,
)
from trainer.config import TrainConfig
from trainer.loop import build_run

REPO = Path(__file__).resolve().parents[2]


def draws() -> dict[str, Any]:
    """A few values from every generator, Gaussians included (they cache a second value)."""
    return {
        "python": [random.random(), random.gauss(0, 1), random.getrandbits(64)],
        "numpy": [np.random.standard_normal(), *np.random.randint(0, 2**31, size=3).tolist()],
        "torch": torch.rand(4).tolist() + torch.randn(3).tolist(),
    }


def prime_generators(seed: int) -> None:
    """Seed, then leave a cached Gaussian in Python's and NumPy's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.gauss(0, 1)  # gauss_next now holds the pair's second value
    np.random.standard_normal()  # has_gauss = 1


def test_rng_states_are_tensors_and_plain_values_only(tmp_path: Path) -> None:
    prime_generators(3)
    state = rng_state()
    assert state["format"] == CHECKPOINT_FORMAT
    assert isinstance(state["numpy"]["key"], torch.Tensor)
    assert state["numpy"]["key"].shape == (624,)
    assert isinstance(state["python"]["internal"], torch.Tensor)
    assert state["python"]["internal"].shape == (625,)
    assert state["numpy"]["has_gauss"] == 1 and state["python"]["gauss_next"] is not None
    torch.save(state, tmp_path / "rng.pt")
    # The strict loader takes it as is: no allow-listed globals, no NumPy.
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert set(loaded) == {"format", "torch", "cuda", "numpy", "python"}


def test_an_rng_file_round_trip_restores_the_exact_streams(tmp_path: Path) -> None:
    prime_generators(7)
    save_rng(tmp_path / "rank_0.pt")
    expected = draws()
    prime_generators(99)  # another stream entirely
    assert draws() != expected
    set_rng_state(load_rng(tmp_path / "rank_0.pt"))
    assert draws() == expected


def test_a_checkpoint_round_trip_restores_the_exact_streams(
    tmp_path: Path, tiny: TrainConfig
) -> None:
    run = build_run(tiny)
    prime_generators(11)
    directory = save_checkpoint(tmp_path / "epoch_0001", run.state, tiny)
    expected = draws()
    prime_generators(12)
    payload = load_payload(directory)
    assert payload["format"] == CHECKPOINT_FORMAT
    restore_state(build_run(tiny).state, payload)
    assert draws() == expected


class RunsOnLoad:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def hostile_payload(marker: Path) -> dict[str, Any]:
    """A checkpoint's state with a pickled object hidden in its RNG entry."""
    payload = {"format": CHECKPOINT_FORMAT, "epoch": 1, "step": 10, "rng": rng_state()}
    payload["rng"]["numpy"] = RunsOnLoad(marker)
    return payload


def test_the_hostile_file_really_runs_code_under_a_plain_load(tmp_path: Path) -> None:
    # The control: what weights_only=False (the old loader) would have done.
    marker = tmp_path / "ran"
    torch.save(hostile_payload(marker), tmp_path / STATE_FILE)
    torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    directory = tmp_path / "epoch_0001"
    directory.mkdir()
    torch.save(hostile_payload(marker), directory / STATE_FILE)
    with pytest.raises(CheckpointError, match="refused: it holds objects other than tensors"):
        load_payload(directory)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["torch-zip", "raw-pickle"])
def test_an_rng_file_that_would_run_code_is_refused_without_running_it(
    tmp_path: Path, legacy: bool
) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "rank_1.pt"
    if legacy:  # a bare pickle stream, not torch's zip container
        path.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "x": RunsOnLoad(marker)}, 2))
    else:
        torch.save({"format": CHECKPOINT_FORMAT, "x": RunsOnLoad(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_rng(path)
    assert not marker.exists()


def test_old_format_checkpoints_are_refused_clearly(tmp_path: Path, tiny: TrainConfig) -> None:
    run = build_run(tiny)
    directory = save_checkpoint(tmp_path / "epoch_0001", run.state, tiny)
    payload = torch.load(directory / STATE_FILE, weights_only=True)
    # Format 1 stored NumPy's state tuple (an ndarray) and Python's as pickled tuples.
    payload["rng"] = {
        "torch": torch.get_rng_state(),
        "cuda": [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    del payload["format"]
    torch.save(payload, directory / STATE_FILE)
    with pytest.raises(CheckpointError, match=r"older klssl \(before checkpoint format 2"):
        load_payload(directory)
    # A file of plain values without the format marker is refused as well.
    torch.save({"epoch": 1}, directory / STATE_FILE)
    with pytest.raises(CheckpointError, match="has checkpoint format None"):
        load_payload(directory)
    with pytest.raises(CheckpointError, match="malformed RNG state"):
        set_rng_state({"torch": torch.get_rng_state(), "cuda": []})


def test_a_resumed_run_is_told_which_fields_its_config_changed(
    tmp_path: Path, tiny: TrainConfig
) -> None:
    directory = save_checkpoint(tmp_path / "epoch_0001", build_run(tiny).state, tiny)
    stored = load_checkpoint_config(directory)
    assert stored == tiny
    assert config_changes(stored, tiny) == []
    longer = tiny.model_copy(
        update={"schedule": tiny.schedule.model_copy(update={"epochs": tiny.schedule.epochs + 3})}
    )
    assert config_changes(stored, longer) == [
        f"schedule.epochs: {tiny.schedule.epochs} -> {tiny.schedule.epochs + 3}"
    ]


def _torch_load_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


def test_every_torch_load_of_the_code_is_weights_only() -> None:
    unsafe = []
    for folder in ("trainer", "tuning", "service", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for call in _torch_load_calls(path):
                flags = [k.value for k in call.keywords if k.arg == "weights_only"]
                if not (len(flags) == 1 and isinstance(flags[0], ast.Constant) and flags[0].value):
                    unsafe.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert unsafe == [], f"torch.load without weights_only=True: {unsafe}"
