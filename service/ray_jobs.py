"""The cluster side: Ray's Jobs API (submit, status, logs, stop) behind a small interface.

The service never spawns training processes itself: each job is one Ray job whose
entrypoint is ``<python> -m trainer.run config.json ...``. The config travels as the
job's ``working_dir`` (Ray uploads it to the cluster), so the head node needs no shared
filesystem with the service. The submission id is derived from the job id, so a retried
submission can never start a second Ray job.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from service.settings import Settings
from service.store import JobKind, JobState

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

CONFIG_FILE = "config.json"

# Ray's JobStatus -> ours. STOPPED is what `stop_job` leads to.
RAY_STATES = {
    "PENDING": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "STOPPED": JobState.CANCELLED,
}


class RayUnavailableError(RuntimeError):
    """The cluster's Jobs API cannot be reached (down, restarting, wrong token)."""


class RayJobNotFoundError(LookupError):
    """Ray does not know this submission id (e.g. the head node restarted)."""


@dataclass(frozen=True)
class RayJobStatus:
    """Ray's view of a job."""

    state: JobState
    message: str | None = None


class RayJobsClient(Protocol):
    """What the service needs from a Ray cluster (a fake implements it in unit tests)."""

    def ping(self) -> None:
        """Raise `RayUnavailableError` when the Jobs API does not answer."""

    def submit(
        self, submission_id: str, *, config_json: str, args: list[str], env: dict[str, str]
    ) -> None:
        """Start ``python ARGS`` with ``config_json`` as its config file (see `entrypoint_args`).

        A no-op when ``submission_id`` already exists.
        """

    def status(self, submission_id: str) -> RayJobStatus:
        """Ray's state of the job."""

    def logs(self, submission_id: str) -> str:
        """The driver's log so far."""

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop the job."""


def entrypoint_args(job_id: str, mlflow_run_id: str, kind: JobKind = JobKind.TRAIN) -> list[str]:
    """The Python arguments of a job's driver: ``-m trainer.run`` or ``-m tuning.run``.

    The job id names the Ray Train run (or the Tune experiment of a sweep), so a driver
    that Ray restarts resumes the same run instead of starting another.
    """
    if kind is JobKind.SWEEP:
        return [
            "-m", "tuning.run", CONFIG_FILE,
            "--sweep-id", job_id,
            "--mlflow-run-id", mlflow_run_id,
            "--output", "runs",
        ]  # fmt: skip
    return [
        "-m", "trainer.run", CONFIG_FILE,
        "--run-name", job_id,
        "--mlflow-run-id", mlflow_run_id,
        "--tag", f"klssl.job_id={job_id}",
        "--output", "runs",
    ]  # fmt: skip


def job_environment(settings: Settings) -> dict[str, str]:
    """Environment of every job: where to track, where to checkpoint, how to join Ray."""
    env = {
        "KLSSL_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "KLSSL_STORAGE_PATH": settings.resolved_storage_path(),
        **settings.job_env,
    }
    if settings.ray_auth_token is not None and settings.pass_ray_token_to_jobs:
        env["RAY_AUTH_TOKEN"] = settings.ray_auth_token.get_secret_value()
    return env


class RayJobs:
    """`RayJobsClient` over `ray.job_submission.JobSubmissionClient`.

    The client is created on first use and again after a connection failure (its
    constructor checks the connection). With token authentication the token goes in
    the ``Authorization`` header, which Ray's client then leaves as it is.
    """

    def __init__(self, settings: Settings) -> None:
        self.address = settings.ray_address.rstrip("/")
        self.python = settings.python_executable
        self.timeout_s = settings.request_timeout_s
        token = settings.ray_auth_token
        self._headers = (
            {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
        )
        self._client: JobSubmissionClient | None = None
        self._lock = threading.Lock()

    def _connect(self) -> JobSubmissionClient:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.address, headers=dict(self._headers))
                except (ConnectionError, OSError, RuntimeError) as error:
                    raise RayUnavailableError(f"Ray at {self.address}: {error}") from None
            return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._connect()
        try:
            return getattr(client, method)(*args, **kwargs)
        except (ConnectionError, OSError) as error:
            self._client = None
            raise RayUnavailableError(f"Ray at {self.address}: {error}") from None
        except RuntimeError as error:
            text = str(error)
            if "does not exist" in text or "404" in text:
                raise RayJobNotFoundError(args[0] if args else text) from None
            if "401" in text or "403" in text:
                self._client = None
                raise RayUnavailableError(f"Ray refused the token: {text}") from None
            raise

    def ping(self) -> None:
        try:
            response = httpx.get(
                f"{self.address}/api/version", headers=self._headers, timeout=self.timeout_s
            )
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise RayUnavailableError(f"Ray at {self.address}: {error}") from None

    def submit(
        self, submission_id: str, *, config_json: str, args: list[str], env: dict[str, str]
    ) -> None:
        entrypoint = shlex.join([self.python, *args])
        with tempfile.TemporaryDirectory(prefix="klssl-job-") as tmp:
            (Path(tmp) / CONFIG_FILE).write_text(config_json)
            try:
                self._call(
                    "submit_job",
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env={"working_dir": tmp, "env_vars": env},
                    metadata={"klssl.job_id": submission_id},
                )
            except RuntimeError as error:
                if "already exists" not in str(error):
                    raise
                # An earlier attempt got through: that job is the one.

    def status(self, submission_id: str) -> RayJobStatus:
        info = self._call("get_job_info", submission_id)
        return RayJobStatus(RAY_STATES[str(info.status.value)], info.message)

    def logs(self, submission_id: str) -> str:
        return str(self._call("get_job_logs", submission_id))

    def stop(self, submission_id: str) -> None:
        self._call("stop_job", submission_id)


def dump_config(config: dict[str, Any]) -> str:
    """The JSON a job receives as its config file."""
    return json.dumps(config, indent=2)
