"""A cancelled job stops by itself: the driver watches its MLflow run (real SQLite MLflow)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.factories import tiny_config
from trainer.distributed.cancel import CancelWatch, RunCancelledError, refuse_if_cancelled
from trainer.tracking import TrackedRun, create_run


@pytest.fixture
def tracked(tmp_path: Path) -> TrackedRun:
    return create_run(tiny_config("cancel"), f"sqlite:///{tmp_path / 'mlflow.db'}", run_name="r")


def test_a_run_killed_before_the_start_is_refused(tracked: TrackedRun) -> None:
    refuse_if_cancelled(tracked)  # RUNNING: fine
    tracked.client().set_terminated(tracked.run_id, status="KILLED")
    with pytest.raises(RunCancelledError, match="cancelled before it started"):
        refuse_if_cancelled(tracked)


def test_the_watch_fires_once_the_run_is_killed_and_not_before(tracked: TrackedRun) -> None:
    fired = threading.Event()
    with CancelWatch(tracked, poll_s=0.05, on_cancel=fired.set):
        assert not fired.wait(0.3)  # RUNNING: nothing happens
        tracked.client().set_terminated(tracked.run_id, status="KILLED")
        assert fired.wait(10)


def test_a_finished_run_is_not_a_cancel(tracked: TrackedRun) -> None:
    fired = threading.Event()
    with CancelWatch(tracked, poll_s=0.05, on_cancel=fired.set):
        tracked.client().set_terminated(tracked.run_id, status="FINISHED")
        assert not fired.wait(0.3)
