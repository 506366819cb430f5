"""Shared fixtures."""

from __future__ import annotations

import pytest

from tests.factories import tiny_config
from trainer.config import TrainConfig


@pytest.fixture
def tiny() -> TrainConfig:
    """A digits config that trains two epochs in seconds."""
    return tiny_config()
