"""Why a run could not start (the driver's exit code 3)."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A run that cannot start: bad resources, storage or Ray connection."""


class InsufficientResourcesError(LaunchError):
    """The cluster can never hold the requested workers (it would wait forever)."""


class StorageUnavailableError(LaunchError):
    """The storage path for checkpoints is not writable or not reachable."""
