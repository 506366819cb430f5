"""The cluster side: Ray's Jobs API (submit, status, logs, stop) behind a small interface.

The service never spawns training processes itself: each job is one Ray job whose
entrypoint is ``<python> -m trainer.run --spec spec.json`` (``tuning.run`` for a sweep).
The job's spec (`service.job_kinds.JobSpec`) is its only input: it travels as the job's
``working_dir`` (Ray uploads it to the cluster), so the head node needs no shared
filesystem with the service. The environment carries only the deployment's settings
(where MLflow is, the allowed data roots, Ray's token). The submission id is derived
from the job id, so a retried submission can never start a second Ray job.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from service.settings import Settings
from service.store import JobState
from trainer.preflight import ALLOWED_ROOTS_ENV_VAR, ALLOWED_URIS_ENV_VAR
from trainer.spec import SPEC_FILE

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

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
        self, submission_id: str, *, module: str, spec_json: str, env: dict[str, str]
    ) -> None:
        """Start ``python -m MODULE --spec spec.json`` with ``spec_json`` as that file.

        A no-op when ``submission_id`` already exists.
        """

    def status(self, submission_id: str) -> RayJobStatus:
        """Ray's state of the job."""

    def logs(self, submission_id: str) -> str:
        """The driver's log so far."""

    def tail(self, submission_id: str) -> AsyncIterator[str]:
        """The driver's log from its start, chunk by chunk as it is written, until the
        job ends (`RayUnavailableError` when the connection drops before)."""

    def stop(self, submission_id: str) -> None:
        """Ask Ray to stop the job."""


def entrypoint_args(module: str) -> list[str]:
    """The Python arguments of a job's driver: ``-m MODULE --spec spec.json``."""
    return ["-m", module, "--spec", SPEC_FILE, "--output", "runs"]


def job_environment(settings: Settings) -> dict[str, str]:
    """Environment of every job: where to track, where to checkpoint, how to join Ray."""
    roots = [str(root.expanduser().resolve()) for root in settings.allowed_data_roots]
    env = {
        "KLSSL_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        # Every worker confines the job's data paths again (trainer.preflight).
        ALLOWED_ROOTS_ENV_VAR: json.dumps(roots),
        ALLOWED_URIS_ENV_VAR: json.dumps(settings.allowed_data_uris),
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
        self, submission_id: str, *, module: str, spec_json: str, env: dict[str, str]
    ) -> None:
        entrypoint = shlex.join([self.python, *entrypoint_args(module)])
        with tempfile.TemporaryDirectory(prefix="klssl-job-") as tmp:
            (Path(tmp) / SPEC_FILE).write_text(spec_json)
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

    async def tail(self, submission_id: str) -> AsyncIterator[str]:
        # Ray pushes only what is new over a websocket: no re-reading of the whole log.
        client = await asyncio.to_thread(self._connect)
        try:
            async for chunk in client.tail_job_logs(submission_id):
                yield chunk
        except RuntimeError as error:
            text = str(error)
            if "does not exist" in text or "404" in text:
                raise RayJobNotFoundError(submission_id) from None
            raise RayUnavailableError(f"Ray at {self.address}: {text}") from None
        except (ConnectionError, OSError) as error:  # aiohttp's errors are OSErrors
            raise RayUnavailableError(f"Ray at {self.address}: {error}") from None

    def stop(self, submission_id: str) -> None:
        self._call("stop_job", submission_id)
