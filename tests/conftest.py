"""Shared fixtures."""

from __future__ import annotations

import os

# torch's OpenMP threads spin while they wait for work; on a machine whose cores are
# busy with other processes that spinning starves the real work (runs 5-10x slower,
# measured beside a second training). Passive waiting costs nothing when idle. It must
# be set before torch loads its OpenMP runtime, so before any test module imports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from tests.factories import tiny_config
from trainer.config import TrainConfig
from trainer.distributed.environment import ensure_ray_env

ensure_ray_env()  # what every entry point does before Ray starts


@pytest.fixture
def tiny() -> TrainConfig:
    """A digits config that trains two epochs in seconds."""
    return tiny_config()
