"""A job cancelled by its owner stops, whatever Ray did with the stop request.

The service cancels a job by closing its MLflow run as KILLED, then asks Ray to stop
it. Ray can miss that stop (a job whose driver is still starting was seen to run to its
end while Ray reported it STOPPED), so the driver watches its run itself: it refuses to
start on a KILLED run, and while training a watcher thread ends the driver process when
the run becomes KILLED. Ray then tears the job's actors (the Train controller and every
worker) down with their driver.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

from trainer.distributed.errors import LaunchError
from trainer.tracking import TrackedRun

log = logging.getLogger(__name__)

CANCELLED_EXIT_CODE = 4
"""The driver's exit code when its job was cancelled."""
POLL_S_ENV_VAR = "KLSSL_CANCEL_POLL_S"


class RunCancelledError(LaunchError):
    """The job's run was closed as KILLED before the run started: it was cancelled."""


def run_status(tracked: TrackedRun) -> str:
    """The MLflow status of the run (RUNNING, FINISHED, FAILED, KILLED, ...)."""
    return str(tracked.client().get_run(tracked.run_id).info.status)


def refuse_if_cancelled(tracked: TrackedRun) -> None:
    """Raise `RunCancelledError` when the run is already KILLED."""
    if run_status(tracked) == "KILLED":
        raise RunCancelledError(
            f"MLflow run {tracked.run_id} is KILLED: the job was cancelled before it started"
        )


def _exit_cancelled() -> None:
    print("the job was cancelled (its MLflow run is KILLED): stopping", file=sys.stderr)
    sys.stderr.flush()
    os._exit(CANCELLED_EXIT_CODE)  # from a thread: the only way to end the blocked driver


class CancelWatch:
    """A daemon thread that calls ``on_cancel`` once the run becomes KILLED.

    Use as a context manager around the blocking ``fit``. MLflow errors are logged and
    retried: a tracking server that is briefly down cancels nothing.
    """

    def __init__(
        self,
        tracked: TrackedRun,
        poll_s: float | None = None,
        on_cancel: Callable[[], None] = _exit_cancelled,
    ) -> None:
        self.tracked = tracked
        self.poll_s = poll_s or float(os.environ.get(POLL_S_ENV_VAR, "5"))
        self.on_cancel = on_cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="klssl-cancel", daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                status = run_status(self.tracked)
            except Exception as error:
                log.warning("cannot read the status of run %s: %s", self.tracked.run_id, error)
                continue
            if status == "KILLED":
                self.on_cancel()
                return

    def __enter__(self) -> CancelWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 1)
