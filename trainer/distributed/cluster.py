"""Where a run's workers go, and whether the cluster can ever hold them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainer.config import TrainConfig
from trainer.distributed.errors import InsufficientResourcesError, LaunchError

log = logging.getLogger(__name__)

CAPACITY_POLL_S = 5.0
"""Seconds between looks at the cluster while waiting for it to grow."""

RAY_DATA_CPUS = 1.0
"""CPUs kept free for Ray Data's tasks when the workers stream from it (at least one:
fewer and its tasks would wait forever beside the workers' reservation)."""


@dataclass(frozen=True)
class Placement:
    """How the workers are placed: their count and each one's resources."""

    workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    strategy: str
    loader_cpus: float = 0.0
    """CPUs that must stay free beside the workers: Ray Data's decode and augment tasks
    (``data.loader: ray``) run outside the workers' reservation."""
    min_workers: int | None = None
    """Elastic: the run starts with this many and grows to ``workers`` (None: fixed)."""

    @property
    def fewest(self) -> int:
        """The workers the run needs to start."""
        return self.workers if self.min_workers is None else self.min_workers


def plan_placement(
    config: TrainConfig,
    workers: int | None = None,
    *,
    cluster_has_gpus: bool | None = None,
    extra_resources: Mapping[str, float] | None = None,
) -> Placement:
    """Resources of each worker from the config (``device: auto`` uses GPUs if any)."""
    count = workers if workers is not None else config.runtime.num_workers
    if count < 1:
        raise LaunchError(f"workers must be >= 1, got {count}")
    device = config.runtime.device
    if cluster_has_gpus is None:
        import ray  # the connected cluster's totals (callers have called ensure_ray_env)

        cluster_has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    use_gpu = device == "cuda" or (device == "auto" and cluster_has_gpus)
    resources = {"CPU": float(config.runtime.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    resources.update({key: float(value) for key, value in (extra_resources or {}).items()})
    loader_cpus = RAY_DATA_CPUS if config.data.loader == "ray" else 0.0
    fewest = config.runtime.min_workers
    if fewest is not None and fewest > count:
        raise LaunchError(
            f"runtime.min_workers ({fewest}) is more than the {count} workers asked for"
        )
    strategy = config.runtime.placement_strategy
    return Placement(count, use_gpu, resources, strategy, loader_cpus, fewest)


def check_cluster_capacity(placement: Placement, nodes: Sequence[Mapping[str, Any]]) -> None:
    """Fail fast when the cluster's total resources can never hold the workers (an
    elastic run's ``min_workers``: it grows into what joins later).

    Ray would otherwise wait forever for a placement group that cannot be placed.
    Each worker must fit on one node; ``STRICT_SPREAD`` needs a node per worker and
    ``STRICT_PACK`` all workers on one node. Resources in use by other jobs are not
    counted against the request (those free up).

    Args:
        placement: what the run asks for.
        nodes: ``ray.nodes()`` entries (``Alive`` and total ``Resources``).
    """
    need = {key: value for key, value in placement.resources_per_worker.items() if value > 0}
    alive = [node for node in nodes if node.get("Alive", False)]
    fits = []
    for node in alive:
        total = node.get("Resources", {})
        fits.append(
            min(math.floor(total.get(key, 0.0) / value + 1e-9) for key, value in need.items())
        )
    if placement.strategy == "STRICT_SPREAD":
        slots = sum(1 for fit in fits if fit >= 1)
    elif placement.strategy == "STRICT_PACK":
        slots = max(fits, default=0)
    else:
        slots = sum(fits)
    totals: dict[str, float] = {}
    for node in alive:
        for key, value in node.get("Resources", {}).items():
            totals[key] = totals.get(key, 0.0) + value
    if slots >= placement.fewest:
        free_cpus = totals.get("CPU", 0.0) - placement.fewest * need.get("CPU", 0.0)
        if free_cpus + 1e-9 < placement.loader_cpus:
            raise InsufficientResourcesError(
                f"data.loader 'ray' decodes and augments in Ray Data tasks, which need "
                f"{placement.loader_cpus:g} CPU beyond the {placement.workers} workers' "
                f"reservation, but the Ray cluster has {totals.get('CPU', 0.0):g} CPUs in "
                "total; lower --workers or runtime.cpus_per_worker, use data.loader 'torch', "
                "or add a node"
            )
        return
    wanted = ", ".join(f"{key}={value:g}" for key, value in sorted(need.items()))
    have = ", ".join(f"{key}={totals.get(key, 0.0):g}" for key in sorted(need)) or "nothing"
    asked = (
        f"{placement.workers}" if placement.min_workers is None
        else f"at least {placement.min_workers} (of up to {placement.workers})"
    )  # fmt: skip
    raise InsufficientResourcesError(
        f"the run asks for {asked} workers with {{{wanted}}} each "
        f"({placement.strategy}), but the Ray cluster ({len(alive)} alive node(s), "
        f"{have} in total) can place at most {slots}; lower --workers or "
        "runtime.cpus_per_worker, use a CPU device, or add nodes"
    )


NodesReader = Callable[[], Sequence[Mapping[str, Any]]]
ResourceRequest = Callable[[list[dict[str, float]]], None]


def autoscaler_request(bundles: list[dict[str, float]]) -> None:
    """Ask Ray's autoscaler for room for ``bundles`` (an empty list withdraws the ask)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def wait_for_capacity(
    placement: Placement,
    timeout_s: float,
    *,
    nodes: NodesReader,
    request: ResourceRequest = autoscaler_request,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = CAPACITY_POLL_S,
) -> None:
    """`check_cluster_capacity`, waiting up to ``timeout_s`` for the cluster to grow.

    An autoscaling cluster (KubeRay's GPU group at ``minReplicas: 0``) is smaller than
    the job until the autoscaler adds nodes, and it adds them only for demand it sees:
    while waiting, the workers' bundles are requested from the autoscaler at every look
    (withdrawn when the wait ends, either way; the run's own placement group is the
    demand from then on). ``timeout_s`` 0 checks once and fails at once, for a fixed cluster.

    Raises:
        InsufficientResourcesError: the cluster still cannot hold the workers when the
            time is up (the message says how long it waited).
    """
    deadline = clock() + timeout_s
    requested = False
    try:
        while True:
            try:
                check_cluster_capacity(placement, nodes())
                return
            except InsufficientResourcesError as error:
                if clock() >= deadline:
                    if timeout_s <= 0:
                        raise
                    raise InsufficientResourcesError(
                        f"{error} (after waiting {timeout_s:g} s for the cluster to grow)"
                    ) from None
                if not requested:
                    log.warning("%s; waiting up to %g s for the autoscaler", error, timeout_s)
                # Asked again at every look: the autoscaler holds one request for the
                # whole cluster, which another job's driver may have replaced since.
                bundles = [dict(placement.resources_per_worker)] * placement.workers
                if placement.loader_cpus > 0:
                    bundles.append({"CPU": placement.loader_cpus})
                request(bundles)
                requested = True
            sleep(min(poll_s, max(deadline - clock(), 0.0)))
    finally:
        if requested:
            request([])
