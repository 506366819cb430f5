"""Joining a Ray cluster: a head that answers late is tried again, a refused token is not.

Unit tests of our retry logic: ``ray.init`` is replaced by a stand-in that fails as Ray
does (ConnectionError, AuthenticationError); the real connection is exercised by the
entry-point and sweep tests against real clusters.
"""

from __future__ import annotations

from typing import Any

import pytest
import ray

from trainer.distributed import environment
from trainer.distributed.environment import CONNECT_RETRY_PAUSES_S, connect_ray
from trainer.distributed.errors import LaunchError


class FlakyInit:
    """``ray.init`` that raises ``errors`` in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, **kwargs: Any) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(environment.time, "sleep", slept.append)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    return slept


def test_a_late_head_is_tried_again(monkeypatch: pytest.MonkeyPatch, pauses: list[float]) -> None:
    init = FlakyInit(ConnectionError("GCS timeout"), ConnectionError("GCS timeout"))
    monkeypatch.setattr(ray, "init", init)
    assert connect_ray("10.0.0.1:6379") == "10.0.0.1:6379"
    assert init.calls == 3 and pauses == list(CONNECT_RETRY_PAUSES_S)


def test_a_head_that_never_answers_fails_after_every_attempt(
    monkeypatch: pytest.MonkeyPatch, pauses: list[float]
) -> None:
    init = FlakyInit(*[ConnectionError("no GCS")] * 5)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(LaunchError, match=r"cannot connect .* \(3 attempts\): no GCS"):
        connect_ray("10.0.0.1:6379")
    assert init.calls == 3


def test_a_refused_token_is_not_retried(
    monkeypatch: pytest.MonkeyPatch, pauses: list[float]
) -> None:
    init = FlakyInit(ray.exceptions.AuthenticationError("bad token"))
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(LaunchError, match="refused the connection"):
        connect_ray("10.0.0.1:6379")
    assert init.calls == 1 and pauses == []
