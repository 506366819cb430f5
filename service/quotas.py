"""What a job asks of the cluster, and whether its owner's quota lets it run now.

A job's demand is counted in Ray resources, as its workers reserve them
(`trainer.distributed.cluster.plan_placement`): CPUs per worker times workers, one GPU
per worker when it trains on GPUs, and the CPU that Ray Data's tasks need beside the
workers (``data.loader: ray``). A sweep asks for its trial's demand times
``max_concurrent_trials``. Quotas (`Quota`, settings ``KLSSL_QUOTAS``) cap what each
owner's active jobs hold together: concurrent jobs, CPUs and GPUs. The dispatcher
admits queued jobs by priority, then age, skipping (with the reason on the record) those
whose owner is at its quota; a job that could never fit its owner's quota is refused at
submission.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from trainer.config import TrainConfig
from trainer.distributed.cluster import plan_placement
from tuning.config import SweepConfig

DEFAULT_OWNER = "*"
"""The key of ``KLSSL_QUOTAS`` whose quota applies to owners without one of their own."""


class Quota(BaseModel):
    """What one owner's active jobs may hold together (None: no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    jobs: int | None = Field(None, ge=0, le=100_000, description="Concurrent jobs.")
    cpus: float | None = Field(None, ge=0, le=1e7, description="CPUs (Ray resources).")
    gpus: float | None = Field(None, ge=0, le=1e6, description="GPUs (Ray resources).")

    @property
    def limits_resources(self) -> bool:
        return self.cpus is not None or self.gpus is not None


@dataclass(frozen=True)
class Demand:
    """Ray resources one job holds while it runs."""

    cpus: float
    gpus: float

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.cpus + other.cpus, self.gpus + other.gpus)


NOTHING = Demand(0.0, 0.0)


def train_demand(config: TrainConfig, cluster_has_gpus: bool) -> Demand:
    """What a training run's workers (and its Ray Data tasks) reserve."""
    placement = plan_placement(config, cluster_has_gpus=cluster_has_gpus)
    per_worker = placement.resources_per_worker
    return Demand(
        cpus=per_worker.get("CPU", 0.0) * placement.workers + placement.loader_cpus,
        gpus=per_worker.get("GPU", 0.0) * placement.workers,
    )


def demand_of(config: TrainConfig | SweepConfig, cluster_has_gpus: bool) -> Demand:
    """A job's demand: a training run's, or a sweep's trials at their concurrency (one
    trial when the sweep does not cap it)."""
    if isinstance(config, SweepConfig):
        trial = train_demand(config.trial_base(), cluster_has_gpus)
        trials = config.max_concurrent_trials or 1
        return Demand(trial.cpus * trials, trial.gpus * trials)
    return train_demand(config, cluster_has_gpus)


def quota_for(quotas: dict[str, Quota], owner: str) -> Quota | None:
    """The owner's quota, else the default one (``"*"``), else None (no limits)."""
    return quotas.get(owner, quotas.get(DEFAULT_OWNER))


@dataclass
class Usage:
    """What an owner's active jobs hold."""

    jobs: int = 0
    held: Demand = NOTHING

    def add(self, demand: Demand) -> None:
        self.jobs += 1
        self.held = self.held + demand


def usage_by_owner(jobs: Iterable[tuple[str, Demand]]) -> dict[str, Usage]:
    """Sum of (owner, demand) pairs per owner."""
    usage: dict[str, Usage] = {}
    for owner, demand in jobs:
        usage.setdefault(owner, Usage()).add(demand)
    return usage


def over_quota(quota: Quota | None, owner: str, usage: Usage, demand: Demand) -> str | None:
    """Why the owner cannot start a job of ``demand`` now (None: it can)."""
    if quota is None:
        return None
    if quota.jobs is not None and usage.jobs + 1 > quota.jobs:
        return f"owner {owner!r} is at its quota of {quota.jobs} concurrent job(s)"
    for name, limit, held, asked in (
        ("CPUs", quota.cpus, usage.held.cpus, demand.cpus),
        ("GPUs", quota.gpus, usage.held.gpus, demand.gpus),
    ):
        if limit is not None and held + asked > limit + 1e-9:
            return (
                f"owner {owner!r} holds {held:g} of its {limit:g} {name} and this job asks "
                f"for {asked:g}"
            )
    return None


def never_fits(
    quota: Quota | None, config: TrainConfig | SweepConfig, demand: Demand
) -> str | None:
    """Why a job could never run under ``quota`` even alone (None: it could)."""
    if quota is None:
        return None
    if quota.jobs == 0:
        return "the owner's quota allows no jobs"
    if (
        isinstance(config, SweepConfig)
        and quota.limits_resources
        and config.max_concurrent_trials is None
    ):
        return (
            "the owner has a CPU or GPU quota: set max_concurrent_trials, so that the "
            "sweep's demand is known"
        )
    for name, limit, asked in (
        ("CPUs", quota.cpus, demand.cpus),
        ("GPUs", quota.gpus, demand.gpus),
    ):
        if limit is not None and asked > limit + 1e-9:
            return f"the job asks for {asked:g} {name}, more than the owner's quota of {limit:g}"
    return None
