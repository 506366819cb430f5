"""Data-parallel training on a real two-node Ray cluster (on this machine), tracked in MLflow.

One Ray cluster (two nodes of one CPU each, from Ray's multi-node test utility) serves
the whole module; every training run is a real `TorchTrainer` with gloo all-reduces and
a real SQLite MLflow store. Workers run the production per-worker loop
(`trainer.distributed.worker.worker_main`); tests only add observer hooks that record what every
rank saw.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from tests import factories
from trainer.config import TrainConfig, validate_config
from trainer.distributed.cluster import (
    Placement,
    check_cluster_capacity,
    plan_placement,
    wait_for_capacity,
)
from trainer.distributed.environment import require_train_v2
from trainer.distributed.errors import (
    InsufficientResourcesError,
    LaunchError,
    StorageUnavailableError,
)
from trainer.distributed.launcher import LaunchResult, launch_training
from trainer.distributed.worker import WorkerSetup, worker_main
from trainer.engine import DIAGNOSTICS, TrainingState, build_optimizer, train_step
from trainer.evaluation import extract_features, knn_report
from trainer.loop import Run
from trainer.models import build_network, build_teacher, unwrap
from trainer.schedules import Schedules
from trainer.statistics import ClusterStatistics
from trainer.tracking import TrackedRun, load_backbone

pytestmark = pytest.mark.slow

# Workers unpickle the probes and loops defined here; this module is not importable
# on them (tests/ is no installed package), so it travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


RAY_TEST_FIELDS: dict[str, dict[str, Any]] = {
    "data": {"max_samples": 128, "batch_size": 16},
    "model": {"head_layers": 2},
    "schedule": {"epochs": 2, "warmup_epochs": 0},
    "eval": {"knn_k": [5]},
    "runtime": {"device": "cpu", "log_every_steps": 1, "checkpoint_every_epochs": 1},
}


def tiny_config(**sections: dict[str, Any]) -> TrainConfig:
    """The shared tiny digits config, logging and checkpointing at every chance."""
    merged = {
        section: {**RAY_TEST_FIELDS.get(section, {}), **sections.get(section, {})}
        for section in RAY_TEST_FIELDS.keys() | sections.keys()
    }
    return factories.tiny_config(name="ray-test", **merged)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two Ray nodes with one CPU each: two workers land on different nodes."""
    with factories.ray_cluster(1, 1) as nodes:
        yield nodes


# ------------------------------------------------------------------ observer hooks


class RankProbe:
    """Records, on its rank, pi / c after every step and this rank's share of the batch.

    A forward hook on the teacher keeps the local teacher logits of the step, so the
    test can rebuild the global-batch statistic from every rank's local sums.
    """

    def __init__(self, run: Run, directory: str) -> None:
        self.run = run
        self.path = Path(directory) / f"rank{run.rank}-{os.getpid()}.pt"
        self.records: list[dict[str, Any]] = []
        self.logits: torch.Tensor | None = None
        run.state.teacher.register_forward_hook(self._capture)
        self.node = ray.get_runtime_context().get_node_id()
        self.started = time.time()
        self._save(final=False)

    def _capture(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.logits = output.detach().float()

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        assert self.logits is not None
        k = self.run.config.objective.num_clusters
        logits = self.logits.reshape(-1, k)
        temp = self.run.schedules.at(state.step - 1).teacher_temp
        self.records.append(
            {
                "step": state.step,
                "prior": state.statistics.prior.clone(),
                "center": state.statistics.center.clone(),
                "prob_sum": F.softmax(logits / temp, dim=-1).sum(0),
                "logit_sum": logits.sum(0),
                "count": logits.shape[0],
                "lr": metrics["lr"],
            }
        )

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        self._save(final=state.epoch == self.run.config.schedule.epochs)

    def _save(self, final: bool) -> None:
        staging = self.path.with_suffix(".tmp")
        torch.save(
            {
                "rank": self.run.rank,
                "pid": os.getpid(),
                "node": self.node,
                "started": self.started,
                "records": self.records,
                "teacher": self.run.state.teacher.state_dict() if final else None,
                "student": unwrap(self.run.state.student).state_dict() if final else None,
            },
            staging,
        )
        os.replace(staging, self.path)  # the test may read it while training goes on


def probed_loop(directory: Path) -> Any:
    """The production worker loop plus a `RankProbe` on every rank."""
    where = str(directory)

    def loop(loop_config: dict[str, Any]) -> dict[str, Any]:
        return worker_main(
            WorkerSetup.model_validate(loop_config),
            extra_hooks=lambda run: [RankProbe(run, where)],
        )

    return loop


def read_probes(directory: Path) -> dict[int, list[dict[str, Any]]]:
    """Every probe file by rank, in the order the attempts started."""
    by_rank: dict[int, list[dict[str, Any]]] = {}
    probes = [torch.load(path, weights_only=False) for path in directory.glob("rank*.pt")]
    for probe in sorted(probes, key=lambda probe: probe["started"]):
        by_rank.setdefault(probe["rank"], []).append(probe)
    return by_rank


# ---------------------------------------------------------------- two-node run


@pytest.fixture(scope="module")
def two_node_run(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tracked 2-worker run, one worker per node, pi = the batch marginal (m = 0)."""
    root = tmp_path_factory.mktemp("two-node")
    probes = root / "probes"
    probes.mkdir()
    config = tiny_config(
        objective={"prior_momentum": 0.0},
        runtime={"device": "cpu", "log_every_steps": 1, "placement_strategy": "STRICT_SPREAD"},
    )
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    started = time.perf_counter()
    result = launch_training(
        config,
        workers=2,
        storage_path=str(root / "storage"),
        tracking_uri=tracking_uri,
        register_as="ray-test-backbone",
        register_alias="champion",
        train_loop=probed_loop(probes),
    )
    return {
        "config": config,
        "result": result,
        "probes": read_probes(probes),
        "tracking_uri": tracking_uri,
        "seconds": time.perf_counter() - started,
    }


def test_two_workers_run_on_two_nodes(two_node_run: dict[str, Any]) -> None:
    probes = two_node_run["probes"]
    assert sorted(probes) == [0, 1]
    assert probes[0][-1]["node"] != probes[1][-1]["node"]
    result: LaunchResult = two_node_run["result"]
    assert result.metrics["epoch"] == 2.0
    assert "knn_top1" in result.metrics


def test_prior_is_identical_across_ranks_and_is_the_global_batch_marginal(
    two_node_run: dict[str, Any],
) -> None:
    config: TrainConfig = two_node_run["config"]
    rank0, rank1 = (two_node_run["probes"][rank][-1]["records"] for rank in (0, 1))
    assert len(rank0) == len(rank1) >= 2 * config.schedule.epochs  # every step recorded
    assert [record["step"] for record in rank0] == list(range(1, len(rank0) + 1))
    for mine, theirs in zip(rank0, rank1, strict=True):
        assert mine["step"] == theirs["step"]
        # The all-reduce hands both ranks the same sum: bitwise the same pi and c.
        assert torch.equal(mine["prior"], theirs["prior"])
        assert torch.equal(mine["center"], theirs["center"])
        count = mine["count"] + theirs["count"]
        global_prior = (mine["prob_sum"] + theirs["prob_sum"]) / count
        global_center = (mine["logit_sum"] + theirs["logit_sum"]) / count
        torch.testing.assert_close(mine["prior"], global_prior, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mine["center"], global_center, atol=1e-5, rtol=1e-5)
        # Each rank saw its own shard, not a copy of the other's.
        assert not torch.allclose(mine["prob_sum"], theirs["prob_sum"])


def test_teacher_and_student_weights_are_identical_across_ranks(
    two_node_run: dict[str, Any],
) -> None:
    finals = {rank: probes[-1] for rank, probes in two_node_run["probes"].items()}
    for name in ("teacher", "student"):
        weights0, weights1 = finals[0][name], finals[1][name]
        assert weights0 is not None and weights0.keys() == weights1.keys()
        for key in weights0:
            assert torch.equal(weights0[key], weights1[key]), f"{name}.{key} differs"


def test_mlflow_search_finds_the_run_with_params_and_metrics(
    two_node_run: dict[str, Any],
) -> None:
    import mlflow

    config: TrainConfig = two_node_run["config"]
    result: LaunchResult = two_node_run["result"]
    mlflow.set_tracking_uri(two_node_run["tracking_uri"])
    runs = mlflow.search_runs(
        experiment_names=[config.name],
        filter_string="params.`objective.num_clusters` = '32' and metrics.knn_top1 >= 0",
        output_format="list",
    )
    assert [run.info.run_id for run in runs] == [result.mlflow_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == config.flat()
    for name in (*DIAGNOSTICS, "lr", "images_per_s", "epoch_loss", "knn_top1"):
        assert name in run.data.metrics, name
    client = MlflowClient(two_node_run["tracking_uri"])
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(loss_steps) == list(range(1, len(loss_steps) + 1))
    assert run.data.tags["klssl.workers"] == "2"
    # Checkpoints: the URIs are recorded and point at real checkpoint directories.
    latest = run.data.tags["klssl.latest_checkpoint"]
    assert latest == result.checkpoints[-1]["uri"]
    assert Path(latest.removeprefix("file://"), "state.pt").exists()
    assert result.checkpoints[-1]["epoch"] == config.schedule.epochs
    version = client.get_model_version_by_alias("ray-test-backbone", "champion")
    assert version.run_id == run.info.run_id


def test_exported_backbone_reproduces_the_logged_knn(two_node_run: dict[str, Any]) -> None:
    from trainer.data import build_splits, make_eval_loader

    config: TrainConfig = two_node_run["config"]
    result: LaunchResult = two_node_run["result"]
    client = MlflowClient(two_node_run["tracking_uri"])
    run = client.get_run(result.mlflow_run_id or "")
    tracked = TrackedRun(two_node_run["tracking_uri"], run.info.run_id, run.info.experiment_id)
    backbone = load_backbone(tracked)  # a fresh timm model + the logged state_dict
    splits = build_splits(config.data, seed=config.runtime.seed)
    device = torch.device("cpu")
    bank = extract_features(backbone, make_eval_loader(splits.train, config.data), device)
    queries = extract_features(backbone, make_eval_loader(splits.holdout, config.data), device)
    report = knn_report(
        bank, queries, config.eval.knn_k, config.eval.knn_temperature, splits.num_classes
    )
    assert report["knn_top1"] == pytest.approx(run.data.metrics["knn_top1"], abs=1e-6)


# ------------------------------------------------------------------ equivalence


def _fixed_views(config: TrainConfig, images: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    data = config.data
    sizes = [data.global_crop_size] * data.num_global_crops + [data.local_crop_size] * (
        data.num_local_crops
    )
    return [torch.randn(images, 3, size, size, generator=generator) for size in sizes]


def _two_steps(
    config: TrainConfig,
    views: list[torch.Tensor],
    logits: torch.Tensor,
    wrap: Any,
    world_size: int,
) -> dict[str, Any]:
    """Statistics of ``logits`` alone, then two engine steps on ``views`` (one worker's)."""
    k = config.objective.num_clusters
    statistics = ClusterStatistics(k, momentum=0.5)
    for _ in range(2):
        statistics.update(logits, teacher_temp=0.1)
    torch.manual_seed(0)
    student = build_network(config.model, k, config.data.global_crop_size)
    teacher = build_teacher(config.model, student, k, config.data.global_crop_size)
    optimizer = build_optimizer(student, config)
    state = TrainingState(
        student=wrap(student),
        teacher=teacher,
        statistics=ClusterStatistics(k, config.objective.prior_momentum),
        optimizer=optimizer,
    )
    schedules = Schedules(config, steps_per_epoch=4, global_batch=views[0].shape[0] * world_size)
    diagnostics = {}
    for step in range(2):
        result = train_step(
            state, views, schedules.at(step + 1), config, precision="fp32", with_diagnostics=True
        )
        diagnostics = {key: float(value) for key, value in result.diagnostics.items()}
    return {
        "statistics": (statistics.prior.clone(), statistics.center.clone()),
        "engine_statistics": (state.statistics.prior.clone(), state.statistics.center.clone()),
        "student": {k: v.clone() for k, v in unwrap(state.student).state_dict().items()},
        "teacher": {k: v.clone() for k, v in state.teacher.state_dict().items()},
        "diagnostics": diagnostics,
    }


def _numpy(tree: Any) -> Any:
    """Tensors -> arrays: a Ray Train function may not return tensors."""
    if isinstance(tree, torch.Tensor):
        return tree.numpy()
    if isinstance(tree, dict):
        return {key: _numpy(value) for key, value in tree.items()}
    if isinstance(tree, tuple | list):
        return [_numpy(value) for value in tree]
    return tree


def equivalence_loop(loop_config: dict[str, Any]) -> Any:
    """On each of 2 workers: its half of a fixed batch of 2b images, for every config."""
    context = ray.train.get_context()
    rank, half = context.get_world_rank(), loop_config["half"]
    mine = slice(rank * half, (rank + 1) * half)
    results = {}
    for mode, config_json in loop_config["configs"].items():
        config = validate_config(json.loads(config_json))
        views = _fixed_views(config, 2 * half, seed=1)
        logits = torch.randn(
            2 * half, config.objective.num_clusters, generator=torch.Generator().manual_seed(2)
        )
        results[mode] = _numpy(
            _two_steps(
                config,
                [view[mine] for view in views],
                logits[mine],
                wrap=lambda module: ray.train.torch.prepare_model(module, move_to_device=False),
                world_size=context.get_world_size(),
            )
        )
    return results


def equivalence_config(mode: str) -> TrainConfig:
    return tiny_config(
        objective={"mode": mode, "prior_momentum": 0.7},
        optim={"optimizer": "sgd", "freeze_last_layer_epochs": 0, "lr": 0.5},
    )


def test_two_workers_of_batch_b_equal_one_worker_of_batch_2b(cluster: Any, tmp_path: Path) -> None:
    """Statistics, targets, DDP gradients and the EMA teacher: the same as one big batch."""
    modes = ("prior", "center", "sinkhorn")
    half = 6
    trainer = ray.train.torch.TorchTrainer(
        equivalence_loop,
        train_loop_config={
            "configs": {mode: equivalence_config(mode).to_json() for mode in modes},
            "half": half,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="equivalence", storage_path=str(tmp_path)),
    )
    result: Any = trainer.fit()  # V2's Result (mypy sees V1's, without return_value)
    everything = result.return_value
    for mode in modes:
        config = equivalence_config(mode)
        distributed = everything[mode]
        views = _fixed_views(config, 2 * half, seed=1)
        logits = torch.randn(2 * half, 32, generator=torch.Generator().manual_seed(2))
        single = _two_steps(config, views, logits, wrap=lambda module: module, world_size=1)
        for name in ("statistics", "engine_statistics"):
            for got, want in zip(distributed[name], single[name], strict=True):
                torch.testing.assert_close(torch.tensor(got), want, atol=1e-6, rtol=1e-5)
        for network in ("student", "teacher"):
            for key, want in single[network].items():
                torch.testing.assert_close(
                    torch.tensor(distributed[network][key]),
                    want,
                    atol=2e-5,
                    rtol=1e-4,
                    msg=f"{mode}: {network}.{key}",
                )
        # Every diagnostic, the loss included, is a statistic of the global batch.
        for key in DIAGNOSTICS:
            got, want = distributed["diagnostics"][key], single["diagnostics"][key]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5), f"{mode}: {key}"


# --------------------------------------------------------------- fault tolerance


class WaitForCPUs:
    """Holds every rank after a given step until the cluster has ``cpus`` CPUs (at most
    two minutes), so a resize cannot come after the run's end on a slow machine."""

    def __init__(self, step: int, cpus: float) -> None:
        self.step, self.cpus = step, cpus

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        deadline = time.monotonic() + 120
        while state.step == self.step and time.monotonic() < deadline:
            if ray.cluster_resources().get("CPU", 0.0) >= self.cpus:
                return
            time.sleep(0.2)

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass


def resumable_config(epochs: int, **runtime: Any) -> TrainConfig:
    """256 digits (8 steps an epoch on 2 workers), every step logged, two checkpoints kept:
    a run to stop and resume."""
    return tiny_config(
        data={"max_samples": 256},
        schedule={"epochs": epochs, "warmup_epochs": 1},
        runtime={"device": "cpu", "log_every_steps": 1, "keep_checkpoints": 2, **runtime},
    )


def run_paths(tmp_path: Path, run_name: str) -> tuple[Path, Path, str, Path]:
    """The probes folder, the storage, the MLflow store and Ray's checkpoint snapshot."""
    probes = tmp_path / "probes"
    probes.mkdir()
    storage = tmp_path / "storage"
    snapshot = storage / run_name / "checkpoint_manager_snapshot.json"
    return probes, storage, f"sqlite:///{tmp_path / 'mlflow.db'}", snapshot


class KillOnce:
    """SIGKILLs its own worker (rank 0, first attempt) after a given step, the way a
    preempted node's process dies, once Ray has registered the checkpoint named
    ``after`` (the controller records a checkpoint a moment after the worker's report)."""

    def __init__(self, run: Run, step: int, after: str, snapshot: str, marker: str) -> None:
        self.run, self.step, self.after = run, step, after
        self.snapshot, self.marker = Path(snapshot), Path(marker)

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        if self.run.rank != 0 or state.step != self.step or self.marker.exists():
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.snapshot.exists() and self.after in self.snapshot.read_text():
                break
            time.sleep(0.05)
        self.marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass


def test_a_worker_killed_mid_epoch_resumes_at_its_step(cluster: Any, tmp_path: Path) -> None:
    """``runtime.checkpoint_every_steps``: rank 0 dies after step 13 of 8-step epochs; the
    restarted group resumes from the step-12 checkpoint (inside epoch 2), logs every
    MLflow step once and ends with the run's epochs and checkpoints."""
    epochs = 4
    config = resumable_config(epochs, checkpoint_every_steps=4, max_failures=1)
    probes, storage, tracking_uri, snapshot = run_paths(tmp_path, "killed-run")
    marker = tmp_path / "killed"

    def loop(loop_config: dict[str, Any]) -> dict[str, Any]:
        return worker_main(
            WorkerSetup.model_validate(loop_config),
            extra_hooks=lambda run: [
                RankProbe(run, str(probes)),
                KillOnce(run, 13, "epoch_0001_step_00000012", str(snapshot), str(marker)),
            ],
        )

    result = launch_training(
        config,
        workers=2,
        storage_path=str(storage),
        tracking_uri=tracking_uri,
        run_name="killed-run",
        train_loop=loop,
    )
    victim = int(marker.read_text())

    attempts = read_probes(probes)
    assert len(attempts[0]) == 2, "rank 0 should have started twice (one restart)"
    assert attempts[0][1]["pid"] != victim
    resumed = attempts[0][1]["records"]
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.mlflow_run_id or "")
    steps_per_epoch = 8  # 256 images / 2 workers / batch 16
    assert int(run.data.tags["klssl.resumed_from_epoch"]) == 1
    assert int(run.data.tags["klssl.resumed_from_step"]) == 12  # 4 steps into epoch 2
    # The new attempt continued right after the checkpoint's step, inside the epoch.
    resumed_in_epoch_2 = [r["step"] for r in resumed if r["step"] <= 2 * steps_per_epoch]
    assert resumed_in_epoch_2 == [13, 14, 15, 16]

    total = epochs * steps_per_epoch
    assert result.metrics["epoch"] == float(epochs)
    epoch_loss = client.get_metric_history(run.info.run_id, "epoch_loss")
    assert sorted(m.step for m in epoch_loss) == [steps_per_epoch * e for e in range(1, epochs + 1)]
    loss_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert loss_steps == list(range(1, total + 1))  # every step once, none twice
    epoch_values = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert max(epoch_values) == float(epochs)
    assert run.info.status == "FINISHED"
    # The two newest: the last mid-epoch checkpoint (step 28, in epoch 4) and the end.
    assert [record["step"] for record in result.checkpoints] == [28, total]
    assert [record["epoch"] for record in result.checkpoints] == [epochs - 1, epochs]


def test_an_elastic_run_grows_when_a_node_joins_and_keeps_its_schedule(
    cluster: Any, tmp_path: Path
) -> None:
    """``runtime.min_workers`` 2 of 3 on two one-CPU nodes: the run starts with 2; a
    third node joins; Ray Train restarts the workers as 3 from the latest checkpoint,
    and the schedules go on from the images seen (not from a step count made with the
    old batch), each MLflow step logged once."""
    epochs = 3
    config = resumable_config(
        epochs, checkpoint_every_steps=2, num_workers=3, min_workers=2, resize_check_s=1
    )
    probes, storage, tracking_uri, snapshot = run_paths(tmp_path, "elastic-run")
    outcome: dict[str, Any] = {}

    def elastic_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
        return worker_main(
            WorkerSetup.model_validate(loop_config),
            extra_hooks=lambda run: [RankProbe(run, str(probes)), WaitForCPUs(4, 3.0)],
        )

    def drive() -> None:
        try:
            outcome["result"] = launch_training(
                config,
                storage_path=str(storage),
                tracking_uri=tracking_uri,
                run_name="elastic-run",
                train_loop=elastic_loop,
            )
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    deadline = time.monotonic() + 180
    while not (snapshot.exists() and "_step_" in snapshot.read_text()):
        assert driver.is_alive(), f"the run ended before its first checkpoint: {outcome}"
        assert time.monotonic() < deadline, "no mid-epoch checkpoint within 180 s"
        time.sleep(0.05)
    joined = cluster.add_node(num_cpus=1)  # Ray's Cluster must be driven from this thread
    try:
        driver.join(timeout=300)
    finally:
        cluster.remove_node(joined)
    assert not driver.is_alive(), "the run did not finish after growing"
    assert "error" not in outcome, outcome.get("error")
    result: LaunchResult = outcome["result"]

    attempts = read_probes(probes)
    assert len(attempts[0]) == 2, "rank 0 should have started twice (before and after)"
    assert len(attempts[2]) == 1, "a third rank exists only after the resize"
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.mlflow_run_id or "")
    assert run.info.status == "FINISHED" and result.metrics["epoch"] == float(epochs)
    resumed_step = int(run.data.tags["klssl.resumed_from_step"])
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps == sorted(set(loss_steps))  # every step once
    assert resumed_step + 1 in loss_steps

    # After the resize: 3 workers x 16 = 48 images a step, 256 // 3 // 16 = 5 steps an
    # epoch. The last step stands at the end of that grid, whatever the step count is
    # (the first attempt's steps were of 32 images); keyed by the step count instead, the
    # schedules would have run past their end before the run did. (Read from the
    # workers: MLflow keeps, for a step both attempts trained, the first one's values.)
    after = Schedules(config, steps_per_epoch=5, global_batch=48)
    last = attempts[0][-1]["records"][-1]
    assert last["step"] != epochs * 5  # the step count is not the new grid's
    assert last["lr"] == pytest.approx(after.at(epochs * 5 - 1).lr, rel=1e-6)
    assert last["lr"] != pytest.approx(after.at(last["step"] - 1).lr, rel=1e-3)


# ------------------------------------------------------------------- bad input


def test_too_many_workers_fail_fast_with_a_clear_message(cluster: Any, tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.perf_counter()
    with pytest.raises(InsufficientResourcesError, match=r"3 workers .*CPU=2 in total"):
        launch_training(
            tiny_config(), workers=3, storage_path=str(tmp_path), tracking_uri=tracking_uri
        )
    with pytest.raises(InsufficientResourcesError, match=r"GPU=1.*GPU=0 in total"):
        launch_training(
            tiny_config(runtime={"device": "cuda"}),
            workers=1,
            storage_path=str(tmp_path),
            tracking_uri=tracking_uri,
        )
    assert time.perf_counter() - started < 10
    # Nothing half-created: no MLflow run exists for the refused jobs.
    assert MlflowClient(tracking_uri).get_experiment_by_name("ray-test") is None


def test_unreachable_storage_fails_before_training(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(StorageUnavailableError, match="a-file/checkpoints"):
        launch_training(
            tiny_config(),
            workers=1,
            storage_path=str(blocker / "checkpoints"),
            tracking_uri=tracking_uri,
        )
    # An S3 endpoint that nothing listens on (a MinIO that is down).
    monkeypatch.setenv("KLSSL_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "klssl")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "klssl-secret")
    with pytest.raises(StorageUnavailableError, match="s3://checkpoints/runs"):
        launch_training(
            tiny_config(),
            workers=1,
            storage_path="s3://checkpoints/runs",
            tracking_uri=tracking_uri,
        )
    assert MlflowClient(tracking_uri).get_experiment_by_name("ray-test") is None


@pytest.mark.parametrize(
    ("strategy", "workers", "fits"),
    [("PACK", 4, True), ("PACK", 5, False), ("STRICT_SPREAD", 2, True),
     ("STRICT_SPREAD", 3, False), ("STRICT_PACK", 3, True), ("STRICT_PACK", 4, False)],
)  # fmt: skip
def test_capacity_check_counts_whole_workers_per_node(
    strategy: str, workers: int, fits: bool
) -> None:
    nodes = [
        {"Alive": True, "Resources": {"CPU": 3.0, "memory": 1e9}},
        {"Alive": True, "Resources": {"CPU": 1.5}},
        {"Alive": False, "Resources": {"CPU": 64.0}},
    ]
    placement = Placement(workers, False, {"CPU": 1.0}, strategy)
    if fits:
        check_cluster_capacity(placement, nodes)
    else:
        with pytest.raises(InsufficientResourcesError, match=f"{workers} workers"):
            check_cluster_capacity(placement, nodes)


def test_an_elastic_run_needs_room_for_its_fewest_workers() -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}]
    check_cluster_capacity(Placement(8, False, {"CPU": 1.0}, "PACK", min_workers=2), nodes)
    with pytest.raises(InsufficientResourcesError, match=r"at least 3 \(of up to 8\) workers"):
        check_cluster_capacity(Placement(8, False, {"CPU": 1.0}, "PACK", min_workers=3), nodes)
    elastic = tiny_config(runtime={"num_workers": 4, "min_workers": 3})
    assert plan_placement(elastic, cluster_has_gpus=False).fewest == 3
    with pytest.raises(LaunchError, match=r"min_workers \(3\) is more than the 2 workers"):
        plan_placement(elastic, 2, cluster_has_gpus=False)


class FakeClock:
    """Time that passes only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_the_capacity_wait_asks_the_autoscaler_and_withdraws_the_ask() -> None:
    small = [{"Alive": True, "Resources": {"CPU": 1.0}}]
    grown = [*small, {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}]
    placement = Placement(2, False, {"CPU": 1.0}, "PACK", loader_cpus=0.0)
    clock, requests, looks = FakeClock(), [], []

    def nodes() -> list[dict[str, Any]]:
        looks.append(clock.now)
        return grown if clock.now >= 30 else small

    wait_for_capacity(
        placement, 600, nodes=nodes, request=requests.append, clock=clock, sleep=clock.sleep
    )
    assert looks == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    ask = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert requests == [ask] * 6 + [[]]  # asked at every look, withdrawn at the end

    clock, requests = FakeClock(), []
    with pytest.raises(InsufficientResourcesError, match=r"after waiting 12 s for the cluster"):
        wait_for_capacity(
            placement, 12, nodes=lambda: small, request=requests.append, clock=clock,
            sleep=clock.sleep,
        )  # fmt: skip
    assert clock.now == 12 and requests[-1] == []
    with pytest.raises(InsufficientResourcesError, match=r"can place at most 1; lower"):
        wait_for_capacity(placement, 0, nodes=lambda: small, request=requests.append)


def test_the_capacity_wait_sees_a_node_that_joins_the_cluster(cluster: Any) -> None:
    """A real Ray of 2 CPUs and a run of 3 one-CPU workers: the wait asks Ray's
    autoscaler interface (no autoscaler runs here) and returns once a node joins."""
    placement = plan_placement(tiny_config(), 3)
    with pytest.raises(InsufficientResourcesError):
        wait_for_capacity(placement, 0, nodes=ray.nodes)
    looks: list[float] = []
    outcome: dict[str, Any] = {}

    def nodes() -> list[dict[str, Any]]:
        looks.append(time.monotonic())
        return list(ray.nodes())

    def wait() -> None:
        try:
            wait_for_capacity(placement, 120, nodes=nodes, poll_s=0.2)
            outcome["done"] = time.monotonic()
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    while len(looks) < 3 and waiter.is_alive():
        time.sleep(0.05)
    assert waiter.is_alive(), f"the wait ended before the node joined: {outcome}"
    joining_at = time.monotonic()  # add_node returns once the node has registered
    joined = cluster.add_node(num_cpus=1)  # Ray's Cluster must be driven from this thread
    try:
        waiter.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["done"] >= joining_at
    finally:
        cluster.remove_node(joined)


def test_train_v2_is_required() -> None:
    assert os.environ["RAY_TRAIN_V2_ENABLED"] == "1"
    require_train_v2()
