"""Ray Tune sweeps over Ray Train (V2) runs, tracked as MLflow parent and child runs.

`run_sweep` is the driver of a sweep. Every Tune trial is a small function
(`trial_main`) that builds the trial's config (the base config with the sampled values),
creates or re-attaches the trial's MLflow child run and fits a `TorchTrainer` through
the launcher of a single job (`trainer.distributed.launcher.fit_run`); its
``TuneReportCallback`` hands every epoch's report from rank 0 to Tune, where the ASHA
scheduler and the collapse stopper (`tuning.stoppers.CollapseStopper`) may stop the
trial early. The trial function itself reserves no CPU (only a little memory): the
TorchTrainer's workers reserve the CPUs and GPUs, and the number of trials at once is
capped by what the cluster can hold, so trials never wait on each other's workers.

A driver-side Tune callback (`SweepTracker`) closes the child runs of trials Tune
stopped early (status KILLED, tag ``klssl.stopped`` = ``collapse`` or ``asha``) or lost;
a trial that ran to the end closes its own run (FINISHED, or FAILED on an error). At the
end the best trial is tagged on the parent (``klssl.best_trial_id``, ``klssl.best_run_id``,
``klssl.best_value``) and on its child (``klssl.best = true``), and the report of
`tuning.report` is logged on the parent.

A sweep is resumable: its Tune experiment lives in ``<storage>/<sweep_id>`` and every
trial's Ray Train run in ``<storage>/<sweep_id>/train_<trial_id>``; running the same
sweep id again restores the experiment, keeps the finished trials and continues the
others from their newest checkpoints, logging into the same MLflow runs. Tune's console
output follows ``KLSSL_TUNE_VERBOSE`` (0 silent to 3 detailed; default 1).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.fs
import ray
import ray.tune
from pydantic import BaseModel, ConfigDict
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, SearchAlgorithm, Searcher

from trainer.config import TrainConfig
from trainer.distributed.cancel import CancelWatch, refuse_if_cancelled
from trainer.distributed.cluster import Placement, plan_placement, wait_for_capacity
from trainer.distributed.environment import connect_ray, require_train_v2
from trainer.distributed.errors import LaunchError
from trainer.distributed.launcher import TrainingFailedError, fit_run
from trainer.distributed.storage import check_storage, storage_uri
from trainer.distributed.worker import WorkerSetup
from trainer.mlflow_names import (
    BEST_METRIC_TAG,
    BEST_RUN_ID_TAG,
    BEST_TAG,
    BEST_TRIAL_ID_TAG,
    BEST_VALUE_TAG,
    CONFIG_TAG,
    DONE_TAG,
    ERROR_TAG,
    INTERRUPTED_TAG,
    OWNER_TAG,
    PARENT_TAG,
    ROLE_TAG,
    RUN_NAME_TAG,
    SAMPLE_TAG,
    STOPPED_AT_TAG,
    STOPPED_TAG,
    STORAGE_TAG,
    SWEEP_ARTIFACT,
    SWEEP_ID_TAG,
    TRIAL_ID_TAG,
)
from trainer.preflight import preflight
from trainer.tracking import (
    TrackedRun,
    absolute_tracking_uri,
    attach_run,
    create_run,
    finish_run,
    set_tags,
)
from tuning.config import (
    Choice,
    Grid,
    LogUniform,
    SweepConfig,
    Uniform,
    apply_sample,
    is_integer_field,
)
from tuning.report import (
    TrialRecord,
    best_trial,
    log_report,
    trials_from_mlflow,
)
from tuning.stoppers import CollapseHistory, CollapseStopper

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TRIAL_DRIVER_MEMORY = 256 * 1024**2
"""Ray ``memory`` (bytes) reserved by a trial's driver function, which takes no CPU."""
TRAIN_RUN_PREFIX = "train_"


# ------------------------------------------------------------------ search space


def tune_domain(path: str, distribution: Uniform | Choice, *, grid_choices: bool) -> Any:
    """The Ray Tune domain of one distribution (integer fields sample integers)."""
    if isinstance(distribution, Grid) or (grid_choices and isinstance(distribution, Choice)):
        return ray.tune.grid_search(list(distribution.values))
    if isinstance(distribution, Choice):
        return ray.tune.choice(list(distribution.values))
    low, high = distribution.low, distribution.high
    if is_integer_field(path):
        if isinstance(distribution, LogUniform):
            return ray.tune.lograndint(int(low), int(high) + 1)
        return ray.tune.randint(int(low), int(high) + 1)
    if isinstance(distribution, LogUniform):
        return ray.tune.loguniform(low, high)
    return ray.tune.uniform(low, high)


def param_space(sweep: SweepConfig) -> dict[str, dict[str, Any]]:
    """Tune's (nested) parameter space: ``{section: {field: domain}}``."""
    space: dict[str, dict[str, Any]] = {}
    for path, distribution in sweep.space.items():
        section, leaf = path.split(".", 1)
        space.setdefault(section, {})[leaf] = tune_domain(
            path, distribution, grid_choices=sweep.search == "grid"
        )
    return space


def expected_trials(sweep: SweepConfig) -> int:
    """How many trials the sweep runs in all (grids multiply the samples)."""
    count = sweep.samples
    for distribution in sweep.space.values():
        if isinstance(distribution, Grid) or (
            sweep.search == "grid" and isinstance(distribution, Choice)
        ):
            count *= len(distribution.values)
    return count


def _plain(value: Any) -> Any:
    """A JSON-ready Python value (Tune may hand out NumPy scalars)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def sampled_values(sweep_paths: list[str], config: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's sampled values by dotted path, from Tune's nested trial config."""
    sample = {}
    for path in sweep_paths:
        section, leaf = path.split(".", 1)
        sample[path] = _plain(config[section][leaf])
    return sample


def searcher(sweep: SweepConfig, concurrency: int) -> SearchAlgorithm | Searcher:
    """The search algorithm (random or grid variants, or Optuna's TPE), at most
    ``concurrency`` trials at once (Tune ignores ``max_concurrent_trials`` for a given
    variant generator, so the limit is set here)."""
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = sweep.objective
        optuna = OptunaSearch(metric=metric, mode=mode, seed=sweep.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=concurrency)
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)


def scheduler(sweep: SweepConfig) -> TrialScheduler:
    """ASHA over epochs, or FIFO (no early stopping but the collapse stopper's)."""
    if not sweep.asha.enabled:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=sweep.epochs,
        grace_period=sweep.asha.grace_period,
        reduction_factor=sweep.asha.reduction_factor,
        # A trial at its last epoch is finishing (exporting its backbone): never stop it.
        stop_last_trials=False,
    )


def max_concurrent_trials(placement: Placement, cluster: Mapping[str, float]) -> int:
    """Trials the cluster can hold at once: its totals over one trial's workers (>= 1).

    A trial whose workers stream from Ray Data also needs ``placement.loader_cpus``
    free CPUs for its tasks.
    """
    per_trial = {
        key: value * placement.workers for key, value in placement.resources_per_worker.items()
    }
    per_trial["CPU"] = per_trial.get("CPU", 0.0) + placement.loader_cpus
    fits = [
        math.floor(cluster.get(key, 0.0) / value + 1e-9)
        for key, value in per_trial.items()
        if value > 0
    ]
    return max(1, min(fits, default=1))


# ------------------------------------------------------------------------ trials


class TrialContext(BaseModel):
    """What every trial function gets from the driver besides its sampled values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: TrainConfig
    sweep_id: str
    sweep_paths: list[str]
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    storage_path: str
    """The storage path as the filesystem passed beside the context sees it."""
    owner: str | None = None
    """The sweep's owner, tagged on every trial run (the parent's owner)."""
    system_metrics: bool = True


def find_child_run(
    client: MlflowClient, experiment_id: str, sweep_id: str, trial_id: str
) -> str | None:
    """The MLflow run of a trial of a sweep, when one was created before."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
        ),
        max_results=1,
    )
    return str(runs[0].info.run_id) if runs else None


def trial_run(
    context: TrialContext, trial_id: str, config: TrainConfig, sample: Mapping[str, Any]
) -> TrackedRun:
    """The trial's child run: re-attached when the trial restarts, else created."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=context.tracking_uri)
    existing = find_child_run(client, context.experiment_id, context.sweep_id, trial_id)
    if existing is not None:
        return attach_run(context.tracking_uri, existing)
    tags = {
        PARENT_TAG: context.parent_run_id,
        SWEEP_ID_TAG: context.sweep_id,
        TRIAL_ID_TAG: trial_id,
        ROLE_TAG: "trial",
        **({OWNER_TAG: context.owner} if context.owner is not None else {}),
        SAMPLE_TAG: json.dumps(dict(sample)),
        CONFIG_TAG: config.model_dump_json(),
    }
    return create_run(
        config,
        context.tracking_uri,
        run_name=f"{context.sweep_id}-{trial_id}",
        tags=tags,
        experiment_id=context.experiment_id,
    )


def trial_main(
    config: dict[str, Any], context: TrialContext, filesystem: pyarrow.fs.FileSystem | None
) -> None:
    """One Tune trial: train the sampled config with a TorchTrainer, reporting to Tune.

    Runs in the trial's actor (no CPU reserved). The Ray Train run is named after the
    trial, so a restarted trial continues from its newest checkpoint, and its MLflow
    child run is found again by its tags.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    if replay_ended_trial(context, trial_id):
        return
    sample = sampled_values(context.sweep_paths, config)
    trial_config = apply_sample(context.base, sample)
    fs_path = context.storage_path
    run_name = f"{TRAIN_RUN_PREFIX}{trial_id}"
    root = storage_uri(f"{fs_path.rstrip('/')}/{context.sweep_id}", filesystem)
    tracked = trial_run(context, trial_id, trial_config, sample)
    set_tags(tracked, {RUN_NAME_TAG: run_name, STORAGE_TAG: f"{root}/{run_name}"})
    placement = plan_placement(trial_config)
    setup = WorkerSetup(
        config=trial_config,
        use_gpu=placement.use_gpu,
        tracking_uri=context.tracking_uri,
        mlflow_run_id=tracked.run_id,
        experiment_id=tracked.experiment_id,
        checkpoint_root_uri=f"{root}/{run_name}",
        system_metrics=context.system_metrics,
    )
    try:
        fit_run(
            setup,
            placement,
            run_name=run_name,
            storage_path=f"{fs_path.rstrip('/')}/{context.sweep_id}",
            filesystem=filesystem,
            callbacks=[TuneReportCallback()],
        )
    except TrainingFailedError as error:
        # Training itself failed. Anything else (the trial stopped by Tune, the sweep
        # interrupted) leaves the run to the driver's tracker or to a resumed attempt.
        set_tags(tracked, {ERROR_TAG: f"{type(error).__name__}: {error}"[:5000]})
        finish_run(tracked, "FAILED")
        raise
    set_tags(tracked, {DONE_TAG: "true"})
    finish_run(tracked, "FINISHED")


def replay_ended_trial(context: TrialContext, trial_id: str) -> bool:
    """Report the outcome of a trial that already ended, instead of running it again.

    Tune's experiment state is saved every few seconds, so a sweep resumed after an
    interruption can restart a trial that had in fact finished (``klssl.done``) or been
    stopped (``klssl.stopped``) just before. Such a trial reports its last metrics once
    and returns: nothing is trained or logged twice.

    Returns:
        Whether the trial had ended (and was replayed).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=context.tracking_uri)
    run_id = find_child_run(client, context.experiment_id, context.sweep_id, trial_id)
    if run_id is None:
        return False
    run = client.get_run(run_id)
    if DONE_TAG not in run.data.tags and STOPPED_TAG not in run.data.tags:
        return False
    ray.tune.report(dict(run.data.metrics))
    return True


# ------------------------------------------------------------- driver callback


class SweepTracker(ray.tune.Callback):
    """Closes the MLflow child runs of trials that Tune ended (driver side).

    A trial Tune stopped before its epoch budget is KILLED with ``klssl.stopped`` =
    ``collapse`` (the collapse rule holds for its reports) or ``asha``; a trial whose
    actor failed is FAILED (the trial function marks ordinary training failures itself).
    """

    def __init__(self, sweep: SweepConfig, context: TrialContext) -> None:
        self.context = context
        self.max_epochs = sweep.epochs
        self.history = CollapseHistory(sweep.collapse, sweep.epochs)
        self.last_epoch: dict[str, float] = {}

    def _client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.context.tracking_uri)

    def _run_of(self, trial_id: str) -> TrackedRun | None:
        run_id = find_child_run(
            self._client(), self.context.experiment_id, self.context.sweep_id, trial_id
        )
        if run_id is None:
            return None
        return TrackedRun(self.context.tracking_uri, run_id, self.context.experiment_id)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self.history.observe(trial.trial_id, result)
        if "epoch" in result:
            self.last_epoch[trial.trial_id] = float(result["epoch"])

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        epoch = self.last_epoch.get(trial.trial_id, 0.0)
        if epoch >= self.max_epochs:
            return  # it ran to the end and closes its own run
        tracked = self._run_of(trial.trial_id)
        if tracked is None or not self._running(tracked):
            return  # a replayed trial that had ended before
        reason = (
            "collapse"
            if self.history.enabled and self.history.collapsed(trial.trial_id)
            else "asha"
        )
        set_tags(tracked, {STOPPED_TAG: reason, STOPPED_AT_TAG: f"{epoch:g}"})
        finish_run(tracked, "KILLED")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        tracked = self._run_of(trial.trial_id)
        if tracked is not None and self._running(tracked):
            finish_run(tracked, "FAILED")

    def _running(self, tracked: TrackedRun) -> bool:
        status = self._client().get_run(tracked.run_id).info.status
        return str(status) in ("RUNNING", "SCHEDULED")

    def get_state(self) -> dict[str, Any]:
        return {"reports": self.history.reports, "last_epoch": self.last_epoch}

    def set_state(self, state: dict[str, Any]) -> None:
        self.history.reports = state["reports"]
        self.last_epoch = state["last_epoch"]


def settle_stopped_trials(tracking_uri: str, records: list[TrialRecord]) -> list[TrialRecord]:
    """Close as KILLED every trial run that Tune stopped but whose status says otherwise.

    Tune stops a trial at a report; its Ray Train workers die with the trial a moment
    later and may meanwhile train on and export their backbone, which reopens the run
    (MLflow's ``start_run``): without this, such a run would end RUNNING (the sweep then
    looks interrupted) or FINISHED (as if it had run its budget).
    """
    settled = []
    for record in records:
        if record.stop_reason is not None and record.state != "KILLED":
            finish_run(TrackedRun(tracking_uri, record.run_id, ""), "KILLED")
            record = record.model_copy(update={"state": "KILLED"})
        settled.append(record)
    return settled


# ------------------------------------------------------------------------ driver


@dataclass
class SweepResult:
    """What a sweep produced (also in MLflow, under the parent run)."""

    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment_path: str
    metric: str
    mode: str
    trials: list[TrialRecord] = field(default_factory=list)
    best: TrialRecord | None = None
    interrupted: bool = False

    @property
    def finished(self) -> int:
        """Trials that ran to their end or were stopped early on purpose."""
        return sum(1 for record in self.trials if record.state in ("FINISHED", "KILLED"))


def sweep_parent_run(
    sweep: SweepConfig,
    tracking_uri: str,
    sweep_id: str,
    parent_run_id: str | None,
    tags: Mapping[str, str],
) -> TrackedRun:
    """The sweep's parent run: the given one, the one of an earlier attempt, or a new one.

    A given run belongs to whoever gave it (the service): it is attached as it is, and
    refused when already KILLED (the sweep was cancelled before it started).
    """
    from mlflow.tracking import MlflowClient

    base = sweep.trial_base()
    if parent_run_id is not None:
        tracked = attach_run(tracking_uri, parent_run_id, reopen=False)
        refuse_if_cancelled(tracked)
        set_tags(tracked, {SWEEP_ID_TAG: sweep_id, ROLE_TAG: "sweep", **tags})
    else:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(base.name)
        runs: list[Any] = []
        earlier: str | None = None
        if experiment is not None:
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{SWEEP_ID_TAG}` = '{sweep_id}' "
                f"and tags.`{ROLE_TAG}` = 'sweep'",
                max_results=1,
            )
            earlier = str(runs[0].info.run_id) if runs else None
        if earlier is not None:  # this driver's own run from an earlier attempt
            tracked = attach_run(tracking_uri, earlier)
            set_tags(tracked, {SWEEP_ID_TAG: sweep_id, ROLE_TAG: "sweep", **tags})
        else:
            tracked = create_run(
                base,
                tracking_uri,
                run_name=sweep_id,
                tags={SWEEP_ID_TAG: sweep_id, ROLE_TAG: "sweep", **tags},
            )
    from mlflow.entities import Param

    client = tracked.client()
    existing = client.get_run(tracked.run_id).data.params
    params = {
        f"sweep.{key}": str(value)
        for key, value in {
            "search": sweep.search,
            "metric": sweep.objective[0],
            "mode": sweep.objective[1],
            "num_samples": sweep.samples,
        }.items()
    } | {
        f"space.{path}": json.dumps(distribution.model_dump(mode="json"))
        for path, distribution in sweep.space.items()
    }
    new = [Param(key, value) for key, value in params.items() if key not in existing]
    if new:
        client.log_batch(tracked.run_id, params=new)
    client.log_text(tracked.run_id, sweep.to_json(), SWEEP_ARTIFACT)
    return tracked


def mark_best(
    tracked: TrackedRun, records: list[TrialRecord], best: TrialRecord | None, metric: str
) -> None:
    """Tag the best trial on the parent and on its child run (and untag the others)."""
    client = tracked.client()
    for record in records:
        if best is not None and record.run_id == best.run_id:
            client.set_tag(record.run_id, BEST_TAG, "true")
        elif BEST_TAG in client.get_run(record.run_id).data.tags:
            client.delete_tag(record.run_id, BEST_TAG)
    if best is None:
        return
    value = best.metrics[metric]
    set_tags(
        tracked,
        {
            BEST_TRIAL_ID_TAG: best.trial_id,
            BEST_RUN_ID_TAG: best.run_id,
            BEST_METRIC_TAG: metric,
            BEST_VALUE_TAG: f"{value:.6g}",
        },
    )
    client.log_metric(tracked.run_id, f"best_{metric}", value)


def run_sweep(
    sweep: SweepConfig,
    *,
    tracking_uri: str,
    storage_path: str,
    sweep_id: str,
    parent_run_id: str | None = None,
    resume: bool = True,
    owner: str | None = None,
    capacity_wait_s: float = 0.0,
) -> SweepResult:
    """Run (or resume) a sweep on the connected Ray cluster (a local Ray if none).

    Args:
        sweep: the validated sweep.
        tracking_uri: MLflow tracking URI.
        storage_path: where the Tune experiment and the trials' checkpoints go: a
            shared directory or ``s3://bucket/prefix``.
        sweep_id: the sweep's id (the Tune experiment name); a sweep id that already
            has an experiment resumes it.
        parent_run_id: the MLflow parent run (pre-created by the REST service, which
            then closes it from the job's final state); default: the parent run of an
            earlier attempt of ``sweep_id``, else a new one, closed here.
        resume: restore an existing experiment of ``sweep_id``; with False an existing
            experiment is an error.
        owner: who submitted the sweep (tagged on every trial run, as on the parent).
        capacity_wait_s: how long to wait for an autoscaling cluster to grow to one
            trial's size (0: fail at once; see `wait_for_capacity`).

    Returns:
        The trials as MLflow records, the best trial, and whether the sweep was
        interrupted (a later call with the same ``sweep_id`` finishes it).

    Raises:
        trainer.distributed.errors.LaunchError: before anything starts (cluster too small
            for one trial, storage unreachable, an experiment exists and ``resume`` is
            False).
    """
    require_train_v2()
    base = preflight(sweep.trial_base(), source="sweep base config on the driver")
    connect_ray()
    tracking_uri = absolute_tracking_uri(tracking_uri)
    placement = plan_placement(base)
    wait_for_capacity(placement, capacity_wait_s, nodes=ray.nodes)
    filesystem, fs_path = check_storage(storage_path)
    experiment_path = f"{fs_path.rstrip('/')}/{sweep_id}"
    restorable = ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if restorable and not resume:
        raise LaunchError(
            f"sweep {sweep_id!r} already has an experiment at {experiment_path}; "
            "resume it or choose another sweep id"
        )
    metric, mode = sweep.objective
    parent = sweep_parent_run(
        sweep,
        tracking_uri,
        sweep_id,
        parent_run_id,
        {STORAGE_TAG: storage_uri(experiment_path, filesystem)},
    )
    context = TrialContext(
        base=base,
        sweep_id=sweep_id,
        sweep_paths=list(sweep.space),
        parent_run_id=parent.run_id,
        experiment_id=parent.experiment_id,
        tracking_uri=tracking_uri,
        storage_path=fs_path,
        owner=owner,
    )
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(trial_main, context=context, filesystem=filesystem),
        {"memory": TRIAL_DRIVER_MEMORY},
    )
    concurrency = sweep.max_concurrent_trials or max_concurrent_trials(
        placement, ray.cluster_resources()
    )
    if restorable:
        tuner = ray.tune.Tuner.restore(
            experiment_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=ray.tune.TuneConfig(
                metric=metric,
                mode=mode,
                search_alg=searcher(sweep, concurrency),
                scheduler=scheduler(sweep),
                num_samples=sweep.samples,
            ),
            run_config=ray.tune.RunConfig(
                name=sweep_id,
                storage_path=fs_path,
                storage_filesystem=filesystem,
                stop=CollapseStopper(sweep.collapse, sweep.epochs),
                callbacks=[SweepTracker(sweep, context)],
                # A failed trial is recorded and the sweep goes on with the others.
                failure_config=ray.tune.FailureConfig(max_failures=0, fail_fast=False),
                verbose=int(os.environ.get("KLSSL_TUNE_VERBOSE", "1")),
            ),
        )
    owns_parent = parent_run_id is None  # whoever creates a run closes it
    # A sweep the service cancels stops here too, trials and all (see CancelWatch).
    watch = contextlib.nullcontext() if owns_parent else CancelWatch(parent)
    try:
        with watch:
            grid = tuner.fit()
    except BaseException:
        if owns_parent:
            finish_run(parent, "FAILED")
        raise
    records = settle_stopped_trials(tracking_uri, trials_from_mlflow(tracking_uri, parent.run_id))
    # Tune counts the trials it stopped on an interruption as ended; their runs are not.
    unfinished = any(record.state == "RUNNING" for record in records)
    done = grid.num_terminated + grid.num_errors
    interrupted = unfinished or done < len(grid) or len(grid) < expected_trials(sweep)
    best = best_trial(records, metric, mode)
    mark_best(parent, records, best, metric)
    log_report(
        tracking_uri,
        parent.run_id,
        metric=metric,
        mode=mode,
        log_params=[p for p, d in sweep.space.items() if isinstance(d, LogUniform)],
    )
    result = SweepResult(
        sweep_id=sweep_id,
        parent_run_id=parent.run_id,
        tracking_uri=tracking_uri,
        experiment_path=storage_uri(experiment_path, filesystem),
        metric=metric,
        mode=mode,
        trials=records,
        best=best,
        interrupted=interrupted,
    )
    set_tags(parent, {INTERRUPTED_TAG: str(interrupted).lower()})
    if not owns_parent:
        return result
    if interrupted:
        finish_run(parent, "KILLED")
    else:
        finish_run(parent, "FINISHED" if result.finished else "FAILED")
    return result
