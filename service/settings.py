"""Settings of the control plane, read from ``KLSSL_*`` environment variables.

Nothing here is created at import time: `create_app` receives a `Settings` (or builds
one from the environment), and routes reach it through the `get_settings` dependency.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, IPvAnyNetwork, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.quotas import Quota
from trainer.bounds import MAX_CAPACITY_WAIT_S

# The example secrets of `.env.example` and `deploy/k8s` (one list, checked by the tests in
# tests/deploy): a production service refuses to start with any of them.
PLACEHOLDER_SECRETS = (
    "change-me-api-token",
    "change-me-ray-auth-token",
    "change-me-postgres-password",
    "change-me-minio-root-password",
    "change-me-s3-secret-key",
)


class Settings(BaseSettings):
    """Everything the service needs to know about its environment.

    Lists and mappings are given as JSON, e.g.
    ``KLSSL_API_TOKENS='{"s3cret-token": "alice"}'`` and
    ``KLSSL_ALLOWED_DATA_ROOTS='["/data", "/mnt/datasets"]'``.
    """

    # An empty variable (compose's `${KLSSL_QUOTAS:-}`) means the default, not a value.
    model_config = SettingsConfigDict(env_prefix="KLSSL_", extra="ignore", env_ignore_empty=True)

    environment: Literal["development", "production"] = Field(
        "development",
        description="`production` refuses to start without API tokens and a Ray token, or "
        "with a placeholder secret of .env.example (`PLACEHOLDER_SECRETS`).",
    )

    database_url: str = Field(
        "sqlite:///runs/klssl-service.db",
        description="SQLAlchemy URL of the job store: SQLite (default) or PostgreSQL.",
    )
    ray_address: str = Field(
        "http://127.0.0.1:8265",
        description="HTTP address of the Ray dashboard (Jobs API) of the cluster. Note: "
        "Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS when they are set in the "
        "service's environment.",
    )
    ray_auth_token: SecretStr | None = Field(
        None, description="The cluster's token when Ray runs with RAY_AUTH_MODE=token."
    )
    pass_ray_token_to_jobs: bool = Field(
        False,
        description="Also give jobs RAY_AUTH_TOKEN in their runtime env (then visible on the "
        "Ray dashboard). Not needed when the Ray nodes have the token in their environment, "
        "as `klssl up`, the compose file and the Kubernetes manifests arrange: job drivers "
        "inherit it.",
    )
    mlflow_tracking_uri: str = Field(
        "http://127.0.0.1:5000", description="MLflow tracking server the jobs log into."
    )
    mlflow_ui_url: str | None = Field(
        None, description="Public MLflow UI base URL for links (default: the tracking URI)."
    )
    storage_path: str = Field(
        "runs/ray", description="Checkpoint storage of the jobs: a shared directory or s3://."
    )
    api_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="Bearer token -> owner. Empty: authentication is off (local use only).",
    )
    auth_reads: bool = Field(
        True,
        description="Read endpoints also need a valid token. Off: anyone may read every "
        "record (a public, read-only view); submitting and cancelling still need a token.",
    )
    admin_owners: list[str] = Field(
        default_factory=list,
        description="Owners (values of api_tokens) who see and cancel every owner's jobs "
        "and sweeps; every other owner sees only their own (another's is a 404).",
    )
    allowed_data_roots: list[Path] = Field(
        default_factory=list,
        description="Dataset paths must resolve inside one of these (empty: no paths).",
    )
    allowed_data_uris: list[str] = Field(
        default_factory=list,
        description="Object-store data (s3://bucket/prefix) must lie under one of these "
        "prefixes (empty: none); read with the KLSSL_S3_ENDPOINT_URL and AWS_* credentials "
        "of the jobs' environment, as checkpoint storage.",
    )
    max_request_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest request body accepted; a larger one is a 413 before it is read.",
    )
    dispatcher_lease_s: float = Field(
        60.0,
        ge=1,
        le=3600,
        description="The dispatcher's lease in the store: with several API processes one "
        "dispatches; when it dies another takes over after this many seconds.",
    )
    max_log_streams_per_owner: int = Field(
        4, ge=1, le=1000, description="Live log streams (logs?follow=true) an owner may hold."
    )
    max_log_stream_s: float = Field(
        3600.0,
        ge=1,
        le=7 * 86400,
        description="A live log stream ends after this many seconds (reconnect to go on).",
    )
    max_concurrent_jobs: int = Field(2, ge=1, description="Jobs submitted to Ray at once.")
    quotas: dict[str, Quota] = Field(
        default_factory=dict,
        max_length=10_000,
        description="Per-owner quotas of what their active jobs hold together, in Ray "
        'resources: owner -> {"jobs": N, "cpus": N, "gpus": N} (each optional), "*" for '
        "every owner without one. A job beyond its owner's quota waits QUEUED with the "
        "reason on its record; one that could never fit is refused (422).",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="Attempts of a job that Ray loses (its head restarted, its node was "
        "lost) before it is FAILED; each new attempt resumes from the job's last "
        "checkpoint into the same MLflow run. A retry (POST .../retry) always runs.",
    )
    cluster_has_gpus: bool = Field(
        False,
        description="The Ray cluster has GPUs: jobs with runtime.device auto then count one "
        "GPU per worker against quotas (as they will use one).",
    )
    capacity_wait_s: float = Field(
        0.0,
        ge=0,
        le=MAX_CAPACITY_WAIT_S,
        description="How long a job's driver waits for an autoscaling Ray cluster to grow "
        "to the job's size (KubeRay's GPU group at minReplicas 0) before failing the job "
        "as too large; 0: fail at once, for a cluster of fixed size.",
    )
    dispatch_interval_s: float = Field(
        2.0, gt=0, description="Seconds between dispatcher/reconciler rounds."
    )
    python_executable: str = Field(
        default_factory=lambda: sys.executable,
        description="Python that runs `-m trainer.run` on the cluster.",
    )
    job_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for every job."
    )
    request_timeout_s: float = Field(
        5.0, gt=0, description="Timeout of readiness probes to Ray and MLflow."
    )
    notify_timeout_s: float = Field(
        5.0,
        gt=0,
        le=60,
        description="Timeout of each webhook notification's connect, send and answer.",
    )
    notify_max_attempts: int = Field(
        8,
        ge=1,
        le=50,
        description="Attempts at delivering one webhook notification before giving it up "
        "(its last error stays in the job's record).",
    )
    notify_backoff_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Wait before a failed notification's second attempt; each further "
        "wait doubles, up to an hour.",
    )
    notify_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names webhook URLs may name (`.example.com` also allows its "
        "subdomains). Empty: any host whose addresses are public.",
    )
    notify_private_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Networks (CIDR) webhooks may reach besides public addresses, e.g. "
        '`["10.20.0.0/16"]` for an in-cluster receiver. Loopback, private, link-local and '
        "other non-public addresses are refused otherwise (webhooks are requests the "
        "service makes for its users).",
    )

    @model_validator(mode="after")
    def _production_secrets(self) -> Self:
        if self.environment != "production":
            return self
        problems = []
        if not self.api_tokens:
            problems.append("KLSSL_API_TOKENS is empty (authentication would be off)")
        if any(token in PLACEHOLDER_SECRETS for token in self.api_tokens):
            problems.append("KLSSL_API_TOKENS holds a placeholder token")
        ray_token = self.ray_auth_token.get_secret_value() if self.ray_auth_token else ""
        if not ray_token or ray_token in PLACEHOLDER_SECRETS:
            problems.append("KLSSL_RAY_AUTH_TOKEN is unset or a placeholder")
        for name, url in (
            ("KLSSL_DATABASE_URL", self.database_url),
            ("KLSSL_MLFLOW_TRACKING_URI", self.mlflow_tracking_uri),
        ):
            if any(secret in url for secret in PLACEHOLDER_SECRETS):
                problems.append(f"{name} holds a placeholder password")
        if problems:
            raise ValueError("production settings refused: " + "; ".join(problems))
        return self

    def resolved_storage_path(self) -> str:
        """``storage_path`` as an absolute path (jobs run in other directories) or URI."""
        if "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path).expanduser().resolve())

    def mlflow_base_url(self) -> str | None:
        """Base URL for links to MLflow runs, when the tracking URI is a server."""
        if self.mlflow_ui_url:
            return self.mlflow_ui_url.rstrip("/")
        if self.mlflow_tracking_uri.startswith(("http://", "https://")):
            return self.mlflow_tracking_uri.rstrip("/")
        return None
