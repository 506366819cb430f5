"""Ray's process environment: set before Ray starts, checked before a run launches."""

from __future__ import annotations

import os

from trainer.distributed.errors import LaunchError

TRAIN_V2_ENV_VAR = "RAY_TRAIN_V2_ENABLED"
_FALSE = ("0", "false", "no", "off")


def ensure_ray_env() -> None:
    """Set what Ray reads from the environment; call it before Ray is imported.

    Ray Train V2 is the default from Ray 2.5x: pinning it makes an environment that
    still says 0 fail loudly (`require_train_v2`) instead of running the removed V1 code
    path. A cluster token given to the process means token authentication: Ray sends
    the token only in ``RAY_AUTH_MODE=token``. Idempotent; never overrides a value the
    user set.
    """
    os.environ.setdefault(TRAIN_V2_ENV_VAR, "1")
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def require_train_v2() -> None:
    """Raise when Ray Train V2 is disabled (``RAY_TRAIN_V2_ENABLED=0``)."""
    value = os.environ.get(TRAIN_V2_ENV_VAR, "1").strip().lower()
    if value in _FALSE:
        raise LaunchError(
            f"klssl needs Ray Train V2, but {TRAIN_V2_ENV_VAR} is set to "
            f"{os.environ.get(TRAIN_V2_ENV_VAR)!r}; unset it or set it to 1"
        )


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Connect to the cluster at ``address`` or ``RAY_ADDRESS``, else start a local Ray.

    Token authentication (Ray >= 2.52) is read by Ray itself from ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token``, which
    `ensure_ray_env` sets (it is called here too, for callers that forgot).

    Returns:
        The address connected to (``local`` for a Ray started here).
    """
    ensure_ray_env()
    import ray

    if ray.is_initialized():
        return "existing"
    target = address or os.environ.get("RAY_ADDRESS", "").strip() or None
    try:
        if target is None:
            ray.init(num_cpus=num_cpus, log_to_driver=True)
            return "local"
        ray.init(address=target, log_to_driver=True)
    except ray.exceptions.AuthenticationError as error:
        raise LaunchError(
            f"the Ray cluster at {target} refused the connection: {error}. "
            "Set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token."
        ) from error
    except ConnectionError as error:
        hint = (
            "check the address and, for a cluster with token authentication, "
            "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
        )
        raise LaunchError(
            f"cannot connect to the Ray cluster at {target}: {error}; {hint}"
        ) from error
    return target
