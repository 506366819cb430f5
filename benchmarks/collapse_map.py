"""Collapse-region map: the paper's claim, tested where a CPU can.

The claim (Kittler, Atito, Awais, 2026): normalising the teacher by the inverse of the
cluster prior (``prior``) keeps training away from collapse over a wider range of
settings than its Jensen approximation, DINO's centering (``center``). Two experiments,
both in this process (`trainer.loop.build_run` + `run_training`, no Ray):

``--experiment map`` (default): short runs on scikit-learn's 8x8 digits, the base config
read from ``configs/digits-demo.yaml`` (so the map follows the demo recipe), over
``objective.mode`` x constant teacher temperature x batch size x seeds. Every run is
scored by its final health verdict (`trainer.health`: ok / collapsed), its final
``target_mutual_info_norm`` and ``logit_spread``, and the k-NN top-1 of the held-out
split. It answers: in which (temperature, batch) cells does each mode stay non-collapsed,
and does ``prior`` keep a larger non-collapsed region than ``center``?

``--experiment clusters``: the synthetic set with 10 known clusters, where the clustering
itself can be scored: NMI and ARI (scikit-learn) between the true classes and the
teacher's cluster assignments of the held-out images, plus k-NN, for ``prior`` with
``prior_power`` 0.5 and 1, ``center`` and ``sinkhorn``, K in {10, 64}, balanced and
long-tailed classes (``--imbalance``). The assignment scored first is argmax Q, the
target the objective trains on (the held-out images as one batch, with the run's final
prior / center and teacher temperature), because Q is where the normalisations differ;
argmax of the raw teacher logits (the batch-independent clusterer a user would deploy)
is reported beside it. ``data.kind: synthetic`` has no imbalance option
(`trainer.data.make_synthetic` draws balanced classes), so the long tail is cut here from
the built splits (`long_tail`): class c keeps a share ``ratio ** (-c / (C - 1))``.

    python benchmarks/collapse_map.py                                # 4 x 4 x 2 x 3 = 96 runs
    python benchmarks/collapse_map.py --resume                       # finish an interrupted map
    python benchmarks/collapse_map.py --experiment clusters          # 4 x 2 x 2 x 3 = 48 runs
    python benchmarks/collapse_map.py --epochs 1 --seeds 0 --temps 0.04 --batches 16
        --modes prior none --output runs/collapse-smoke              # smoke run

Writes ``collapse_map.json`` / ``.png`` (or ``collapse_map_clusters.*``) under
``--output`` (default ``benchmarks/results``), rewritten after every run, and prints a
markdown table (and, for the map, the one-line answer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# benchmarks/ is not a package: running this file puts its folder first on sys.path.
from reports import write_json

from trainer.config import TrainConfig, apply_overrides, read_config_file, validate_config
from trainer.data import DataSplits, ImageFiles, TensorImages, make_eval_loader, make_train_loader
from trainer.health import CollapseRule
from trainer.loop import Run, build_run, evaluate_baselines, run_training
from trainer.models import as_network
from trainer.objective import teacher_targets
from trainer.schedules import Schedules

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASE = ROOT / "configs" / "digits-demo.yaml"
MODES = ("prior", "center", "sinkhorn", "none")
MAP_TEMPS = (0.04, 0.055, 0.07, 0.1)
MAP_BATCHES = (16, 64)
CLUSTER_MODES = ("prior", "center", "sinkhorn")


# --- configs ------------------------------------------------------------------------------


def base_raw(args: argparse.Namespace) -> dict[str, Any]:
    """The base config: the demo file, with evaluation cut to k-NN and the experiment's data.

    Baselines and the linear probe are off (they would cost more than the short runs);
    the teacher temperature is held constant (no warm-up) so that each run measures one
    temperature; one process does everything, since a loader process would only compete
    for the same cores on these 8x8 (or 16x16) images.
    """
    raw = read_config_file(args.base)
    warmup = validate_config(raw, str(args.base)).schedule.warmup_epochs
    overrides = [
        f"schedule.epochs={args.epochs}",
        # The base's learning-rate warm-up, but never the whole of a short run.
        f"schedule.warmup_epochs={min(warmup, args.epochs - 1)}",
        "objective.warmup_teacher_temp_epochs=0",
        "eval.baselines=false",
        "eval.linear_probe=false",
        "eval.every_epochs=0",
        "data.loader_workers=0",
        "runtime.device=cpu",
    ]
    if args.experiment == "clusters":
        overrides += [
            "data.kind=synthetic",
            f"data.synthetic_classes={args.synthetic_classes}",
            f"data.synthetic_samples={args.synthetic_samples}",
            f"data.synthetic_image_size={args.synthetic_image_size}",
            "data.holdout_fraction=0.2",
        ]
    raw = apply_overrides(raw, [*overrides, *args.set])
    validate_config(raw, f"base config ({args.base})")  # fail before the first run
    return raw


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run's settings: the fields that vary between runs."""

    mode: str
    temp: float
    batch: int
    seed: int
    prior_power: float | None = None
    """Overrides the base's ``objective.prior_power`` when set (clusters experiment)."""
    clusters: int | None = None
    imbalance: float = 1.0

    @property
    def arm(self) -> str:
        """The method: the mode, with its prior power where the experiment varies it."""
        if self.mode == "prior" and self.prior_power is not None:
            return f"prior a={self.prior_power:g}"
        return self.mode

    @property
    def label(self) -> str:
        """A unique, readable key of the run in the report."""
        label = f"{self.arm}/T{self.temp:g}/B{self.batch}/seed{self.seed}"
        if self.clusters is not None:
            label += f"/K{self.clusters}/imb{self.imbalance:g}"
        return label

    def config(self, base: dict[str, Any]) -> TrainConfig:
        """The validated config of this run."""
        overrides = [
            f"objective.mode={self.mode}",
            f"objective.teacher_temp={self.temp}",
            f"objective.warmup_teacher_temp={self.temp}",
            f"data.batch_size={self.batch}",
            f"runtime.seed={self.seed}",
        ]
        if self.prior_power is not None:
            overrides.append(f"objective.prior_power={self.prior_power}")
        if self.clusters is not None:
            overrides.append(f"objective.num_clusters={self.clusters}")
        return validate_config(apply_overrides(base, overrides), self.label)


def cells_of(args: argparse.Namespace, base: dict[str, Any]) -> list[Cell]:
    """Every run of the experiment, in the order they run."""
    temps = args.temps or (
        MAP_TEMPS if args.experiment == "map" else (base["objective"]["teacher_temp"],)
    )
    batches = args.batches or (
        MAP_BATCHES if args.experiment == "map" else (base["data"]["batch_size"],)
    )
    if args.experiment == "map":
        modes = args.modes or MODES
        return [
            Cell(mode, temp, batch, seed)
            for mode in modes
            for batch in batches
            for temp in temps
            for seed in args.seeds
        ]
    cells = []
    for imbalance in args.imbalance:
        for clusters in args.clusters_k:
            for mode in args.modes or CLUSTER_MODES:
                powers: list[float | None] = list(args.prior_powers) if mode == "prior" else [None]
                for power in powers:
                    for temp in temps:
                        for batch in batches:
                            for seed in args.seeds:
                                cell = Cell(mode, temp, batch, seed, power, clusters, imbalance)
                                cells.append(cell)
    return cells


# --- running ------------------------------------------------------------------------------


class IntervalCounter:
    """Loop hooks that count the log intervals the collapse rule flags."""

    def __init__(self) -> None:
        self.rule = CollapseRule()
        self.intervals = 0
        self.collapsed = 0

    def on_log(self, state: object, metrics: dict[str, float]) -> None:
        """Count this interval, and whether it alone looks collapsed."""
        self.intervals += 1
        self.collapsed += self.rule.interval_collapsed(metrics)

    def on_epoch_end(self, state: object, metrics: dict[str, float]) -> None:
        """Nothing per epoch: the runs are scored at their end."""


def long_tail(run: Run, ratio: float) -> Run:
    """The run with a long-tailed class distribution cut from its balanced splits.

    Class c keeps the share ``ratio ** (-c / (C - 1))`` of its images (the first in the
    split's seeded order), in the training and the held-out split alike, so the largest
    class has ``ratio`` times the images of the smallest. The loader and schedules are
    rebuilt for the smaller training split.
    """
    if ratio == 1:
        return run
    classes = run.splits.num_classes

    def cut(dataset: TensorImages | ImageFiles) -> TensorImages:
        if not isinstance(dataset, TensorImages):
            raise TypeError("long_tail needs an in-memory dataset (digits, synthetic)")
        keep: list[int] = []
        for label in range(classes):
            members = (dataset.labels == label).nonzero().flatten().tolist()
            share = ratio ** (-label / max(classes - 1, 1))
            keep += members[: max(1, round(len(members) * share))]
        return dataset.subset(sorted(keep))

    splits = DataSplits(
        cut(run.splits.train), cut(run.splits.holdout), classes, run.splits.class_names
    )
    config = run.config
    augment_on = None if run.augment is None else run.augment.device
    loader = make_train_loader(
        splits.train, config.data, seed=config.runtime.seed, augment_on=augment_on
    )
    schedules = Schedules(config, steps_per_epoch=len(loader), global_batch=config.data.batch_size)
    return dataclasses.replace(
        run, splits=splits, evaluation=splits, train_loader=loader, schedules=schedules
    )


@torch.no_grad()
def cluster_scores(run: Run) -> dict[str, float]:
    """NMI, ARI and purity of the teacher's cluster assignments of the held-out images.

    ``target_*``: argmax of Q, computed as a training step would, with the held-out
    images as one batch, the run's final EMA prior / center and teacher temperature
    (sinkhorn balances over that batch). ``head_*``: argmax of the raw teacher logits.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    teacher = as_network(run.state.teacher)
    was_training = teacher.training
    teacher.eval()
    logits, labels = [], []
    for images, batch_labels in make_eval_loader(run.splits.holdout, run.config.data):
        logits.append(teacher([images.to(run.device)])[0].float().cpu())
        labels.append(batch_labels)
    teacher.train(was_training)
    all_logits, truth = torch.cat(logits), torch.cat(labels).numpy()
    objective = run.config.objective
    statistics_ = run.state.statistics
    targets = teacher_targets(
        all_logits,
        mode=objective.mode,
        teacher_temp=run.schedules.at(max(run.state.step - 1, 0)).teacher_temp,
        prior=statistics_.prior.cpu(),
        center=statistics_.center.cpu(),
        prior_power=objective.prior_power,
        sinkhorn_iters=objective.sinkhorn_iters,
    )
    scores: dict[str, float] = {}
    for name, assignment in (("target", targets.argmax(-1)), ("head", all_logits.argmax(-1))):
        predicted = assignment.numpy()
        scores[f"{name}_nmi"] = float(normalized_mutual_info_score(truth, predicted))
        scores[f"{name}_ari"] = float(adjusted_rand_score(truth, predicted))
        scores[f"{name}_purity"] = purity(truth, predicted)
        scores[f"{name}_clusters_used"] = float(len(np.unique(predicted)))
    return scores


def purity(truth: np.ndarray, predicted: np.ndarray) -> float:
    """The share of images whose cluster's majority class is their class."""
    correct = 0
    for cluster in np.unique(predicted):
        correct += int(np.bincount(truth[predicted == cluster]).max())
    return correct / len(truth)


def run_cell(cell: Cell, base: dict[str, Any]) -> dict[str, Any]:
    """Train one run and return its record."""
    started = time.perf_counter()
    config = cell.config(base)
    run = build_run(config)
    if cell.imbalance != 1:
        run = long_tail(run, cell.imbalance)
    counter = IntervalCounter()
    diverged: str | None
    try:
        final = run_training(run, counter)
    except FloatingPointError as error:
        # A non-finite loss is a result of the cell, not a reason to stop the map.
        final, diverged = {}, str(error)
    else:
        diverged = None
    verdict = run.state.health.verdict
    record: dict[str, Any] = dataclasses.asdict(cell) | {
        "arm": cell.arm,
        "health": "diverged" if diverged else verdict.health,
        "error": diverged,
        "collapse_step": verdict.since_step,
        "collapsed_interval_share": counter.collapsed / max(counter.intervals, 1),
        "steps": run.state.step,
        "train_images": len(run.splits.train),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    for key in (
        "target_mutual_info_norm",
        "target_cluster_usage",
        "logit_spread",
        "effective_clusters",
        "target_effective_clusters",
        "knn_top1",
        "epoch_loss",
    ):
        record[key] = final.get(key)
    if cell.clusters is not None and not diverged:
        record |= cluster_scores(run)
    return record


def cluster_baselines(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    """What the clustering scores and k-NN are read against, per (imbalance, K, seed).

    The network before its first step: NMI / ARI of its cluster assignments (the same
    `cluster_scores`), and `trainer.loop.evaluate_baselines` (random-init k-NN with its
    BatchNorm recalibrated, raw-pixel k-NN) on the same splits as the trained runs.
    """
    found: dict[str, Any] = {}
    for imbalance in args.imbalance:
        for clusters in args.clusters_k:
            for seed in args.seeds:
                cell = Cell(
                    "prior",
                    base["objective"]["teacher_temp"],
                    base["data"]["batch_size"],
                    seed,
                    None,
                    clusters,
                    imbalance,
                )
                run = build_run(cell.config(base))
                if imbalance != 1:
                    run = long_tail(run, imbalance)
                found[f"imb{imbalance:g}/K{clusters}/seed{seed}"] = {
                    "imbalance": imbalance,
                    "clusters": clusters,
                    "seed": seed,
                    **cluster_scores(run),
                    **evaluate_baselines(run),
                }
    return found


def baseline_table(baselines: dict[str, Any]) -> str:
    """Mean ± std over seeds of the untrained network's scores and the pixel k-NN."""
    groups: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for record in baselines.values():
        groups.setdefault((record["imbalance"], record["clusters"]), []).append(record)
    lines = [
        "| imbalance | K | NMI (Q) at init | ARI (Q) at init | k-NN random init "
        "| k-NN raw pixels |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (imbalance, clusters), records in sorted(groups.items()):

        def pm(key: str, spec: str, records: list[dict[str, Any]] = records) -> str:
            values = [r[key] for r in records]
            return f"{_fmt(mean(values), spec)} ± {_fmt(std(values), spec)}"

        lines.append(
            f"| {imbalance:g}:1 | {clusters} | {pm('target_nmi', '.3f')} | "
            f"{pm('target_ari', '.3f')} | {pm('random_init_knn_top1', '.1f')} | "
            f"{pm('pixels_knn_top1', '.1f')} |"
        )
    return "\n".join(lines)


def progress(line: str) -> None:
    """One progress line on stderr, time-stamped (stdout keeps the table)."""
    print(f"[collapse_map {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# --- summaries ----------------------------------------------------------------------------


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that exist (None when none does)."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(present) if present else None


def std(values: Sequence[float | None]) -> float | None:
    """The sample standard deviation of the values that exist (0 for one value)."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None
    return statistics.stdev(present) if len(present) > 1 else 0.0


def map_cells(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, batch, temperature): seeds, collapsed share and the mean scores."""
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    for record in runs:
        groups.setdefault((record["mode"], record["batch"], record["temp"]), []).append(record)
    cells = []
    for (mode, batch, temp), records in sorted(
        groups.items(), key=lambda item: (MODES.index(item[0][0]), item[0][1], item[0][2])
    ):
        # A diverged run (non-finite loss) counts as not ok, like a collapsed one.
        collapsed = sum(r["health"] != "ok" for r in records)
        cells.append(
            {
                "mode": mode,
                "batch": batch,
                "temp": temp,
                "seeds": len(records),
                "collapsed": collapsed,
                "diverged": sum(r["health"] == "diverged" for r in records),
                "collapsed_share": collapsed / len(records),
                "majority_ok": len(records) - collapsed > len(records) / 2,
                "logit_spread": mean([r["logit_spread"] for r in records]),
                "target_mutual_info_norm": mean([r["target_mutual_info_norm"] for r in records]),
                "target_cluster_usage": mean([r.get("target_cluster_usage") for r in records]),
                "knn_top1": mean([r["knn_top1"] for r in records]),
                "knn_top1_std": std([r["knn_top1"] for r in records]),
            }
        )
    return cells


def region_answer(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per mode, the (temperature, batch) cells where most seeds stayed ok; the answer."""
    region = {
        mode: {
            "majority_ok_cells": sum(c["majority_ok"] for c in cells if c["mode"] == mode),
            "cells": sum(c["mode"] == mode for c in cells),
        }
        for mode in MODES
        if any(c["mode"] == mode for c in cells)
    }
    if "prior" in region and "center" in region:
        prior, center = region["prior"], region["center"]
        larger = prior["majority_ok_cells"] > center["majority_ok_cells"]
        verdict = "yes" if larger else "no"
        if prior["majority_ok_cells"] == center["majority_ok_cells"]:
            verdict = "no (equal)"
        line = (
            f"does prior keep a larger non-collapsed region than center? {verdict}: "
            f"prior {prior['majority_ok_cells']}/{prior['cells']} (temperature, batch) cells "
            f"with a majority of seeds ok, center {center['majority_ok_cells']}/{center['cells']}"
        )
    else:
        line = "does prior keep a larger non-collapsed region than center? not measured"
    return {"per_mode": region, "answer": line}


def map_table(cells: Sequence[dict[str, Any]]) -> str:
    """One row per (mode, batch): collapsed seeds and mean spread / MI / k-NN per temperature."""
    temps = sorted({c["temp"] for c in cells})
    header = ["mode", "batch", *(f"T={t:g}" for t in temps)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    rows: dict[tuple[str, int], dict[float, dict[str, Any]]] = {}
    for cell in cells:
        rows.setdefault((cell["mode"], cell["batch"]), {})[cell["temp"]] = cell
    for (mode, batch), by_temp in rows.items():
        entries = []
        for temp in temps:
            found = by_temp.get(temp)
            if found is None:
                entries.append("-")
                continue
            ok = found["seeds"] - found["collapsed"]
            entries.append(
                f"{ok}/{found['seeds']} ok, spread {_fmt(found['logit_spread'], '.2g')}, "
                f"MI {_fmt(found['target_mutual_info_norm'], '.2f')}, "
                f"k-NN {_fmt(found['knn_top1'], '.1f')}"
            )
        lines.append("| " + " | ".join([mode, str(batch), *entries]) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cluster_summary(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (imbalance, K, arm): mean and std over seeds of the clustering scores."""
    groups: dict[tuple[float, int, str], list[dict[str, Any]]] = {}
    for record in runs:
        key = (record["imbalance"], record["clusters"], record["arm"])
        groups.setdefault(key, []).append(record)
    keys = [
        "target_nmi",
        "target_ari",
        "target_purity",
        "target_clusters_used",
        "head_nmi",
        "head_ari",
        "head_clusters_used",
        "knn_top1",
        "target_mutual_info_norm",
    ]
    summary = []
    for (imbalance, clusters, arm), records in sorted(groups.items()):
        row: dict[str, Any] = {
            "imbalance": imbalance,
            "clusters": clusters,
            "arm": arm,
            "seeds": len(records),
            "collapsed": sum(r["health"] != "ok" for r in records),
        }
        for measure in keys:
            row[measure] = mean([r.get(measure) for r in records])
            row[f"{measure}_std"] = std([r.get(measure) for r in records])
        summary.append(row)
    return summary


def cluster_table(summary: Sequence[dict[str, Any]]) -> str:
    """One row per (imbalance, K, arm): NMI / ARI of Q and of the head, k-NN, health."""
    header = [
        "imbalance",
        "K",
        "arm",
        "NMI (Q)",
        "ARI (Q)",
        "clusters used (Q)",
        "NMI (head)",
        "ARI (head)",
        "k-NN",
        "not ok",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in summary:

        def pm(key: str, spec: str = ".3f", row: dict[str, Any] = row) -> str:
            if row[key] is None:
                return "-"
            return f"{row[key]:{spec}} ± {row[f'{key}_std']:{spec}}"

        cells = [
            f"{row['imbalance']:g}:1",
            str(row["clusters"]),
            row["arm"],
            pm("target_nmi"),
            pm("target_ari"),
            pm("target_clusters_used", ".1f"),
            pm("head_nmi"),
            pm("head_ari"),
            pm("knn_top1", ".1f"),
            f"{row['collapsed']}/{row['seeds']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------


def plot_map(cells: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """Rows mode, columns batch; x teacher temperature; colour the collapsed share of
    seeds; each square annotated with collapsed/seeds and the mean final logit_spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(c["mode"] == m for c in cells)]
    batches = sorted({c["batch"] for c in cells})
    temps = sorted({c["temp"] for c in cells})
    if not modes:
        return
    figure, axes = plt.subplots(
        len(modes),
        len(batches),
        figsize=(1.5 + 1.25 * len(temps) * len(batches), 1.2 + 1.0 * len(modes)),
        dpi=100,
        squeeze=False,
        layout="constrained",
    )
    image = None
    for row, mode in enumerate(modes):
        for column, batch in enumerate(batches):
            ax = axes[row][column]
            by_temp = {c["temp"]: c for c in cells if c["mode"] == mode and c["batch"] == batch}
            shares = [[by_temp[t]["collapsed_share"] if t in by_temp else np.nan for t in temps]]
            image = ax.imshow(shares, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
            for index, temp in enumerate(temps):
                cell = by_temp.get(temp)
                if cell is None:
                    continue
                text = (
                    f"{cell['collapsed']}/{cell['seeds']} coll.\n"
                    f"spread {_fmt(cell['logit_spread'], '.2g')}"
                )
                ax.text(index, 0, text, ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"batch {batch}")
            if row == len(modes) - 1:
                ax.set_xlabel("teacher temperature")
            if column == 0:
                ax.set_ylabel(mode, rotation=0, ha="right", va="center")
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="share of seeds collapsed")
    figure.suptitle(title, fontsize=9)
    figure.savefig(path)
    plt.close(figure)


def plot_clusters(summary: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """Rows imbalance, columns K: NMI and ARI of argmax Q and of the head, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imbalances = sorted({row["imbalance"] for row in summary})
    ks = sorted({row["clusters"] for row in summary})
    if not summary:
        return
    figure, axes = plt.subplots(
        len(imbalances), len(ks), figsize=(5.5 * len(ks), 3.4 * len(imbalances)), squeeze=False
    )
    measures = ("target_nmi", "target_ari", "head_nmi", "head_ari")
    width = 0.8 / len(measures)
    for row_index, imbalance in enumerate(imbalances):
        for column, k in enumerate(ks):
            ax = axes[row_index][column]
            rows = [r for r in summary if r["imbalance"] == imbalance and r["clusters"] == k]
            for index, measure in enumerate(measures):
                ax.bar(
                    [i + index * width for i in range(len(rows))],
                    [r[measure] or 0.0 for r in rows],
                    width,
                    yerr=[r[f"{measure}_std"] or 0.0 for r in rows],
                    label=measure.replace("target_", "Q ").replace("head_", "head "),
                    hatch="//" if measure.startswith("head") else None,
                )
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["arm"] for r in rows])
            ax.set_ylim(0, 1)
            ax.set_title(f"K = {k}, imbalance {imbalance:g}:1")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# --- main ---------------------------------------------------------------------------------


def load_previous(path: Path, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The finished runs to keep: those of ``path`` with ``--resume`` (same settings)."""
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if args.resume:
        if previous.get("settings") != settings:
            sys.exit(f"{path} was written with other settings: rerun with them, or --fresh")
        runs: dict[str, Any] = previous["runs"]
        return runs
    if previous.get("runs") and not args.fresh:
        sys.exit(f"{path} holds {len(previous['runs'])} finished run(s): pass --resume or --fresh")
    return {}


def summarise(
    experiment: str, runs: dict[str, Any], title: str, output: Path, name: str
) -> tuple[dict[str, Any], str]:
    """The experiment's summary for the JSON, its table, and its plot (written)."""
    records = list(runs.values())
    if experiment == "map":
        cells = map_cells(records)
        answer = region_answer(cells)
        plot_map(cells, title, output / f"{name}.png")
        return {"cells": cells, "region": answer}, map_table(cells) + "\n\n" + answer["answer"]
    summary = cluster_summary(records)
    plot_clusters(summary, title, output / f"{name}.png")
    return {"arms": summary}, cluster_table(summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", choices=["map", "clusters"], default="map")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        help="default: every mode (map), prior center sinkhorn (clusters)",
    )
    parser.add_argument("--temps", type=float, nargs="+", help=f"default {list(MAP_TEMPS)} (map)")
    parser.add_argument("--batches", type=int, nargs="+", help=f"default {list(MAP_BATCHES)} (map)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="per run; default 2 (map), 5 (clusters)")
    parser.add_argument("--prior-powers", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--clusters-k", type=int, nargs="+", default=[10, 64])
    parser.add_argument(
        "--imbalance", type=float, nargs="+", default=[1.0, 10.0], help="largest:smallest class"
    )
    parser.add_argument("--synthetic-classes", type=int, default=10)
    parser.add_argument("--synthetic-samples", type=int, default=3000)
    parser.add_argument("--synthetic-image-size", type=int, default=16)
    parser.add_argument("--base", type=Path, default=BASE, help="base config (YAML or JSON)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="base override"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", help="file stem (default collapse_map[_clusters])")
    parser.add_argument("--resume", action="store_true", help="skip runs already in the JSON")
    parser.add_argument("--fresh", action="store_true", help="discard the JSON's finished runs")
    args = parser.parse_args()
    if args.epochs is None:
        # The map asks whether a run collapses early; recovering clusters needs longer.
        args.epochs = 2 if args.experiment == "map" else 5
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    name = args.name or ("collapse_map" if args.experiment == "map" else "collapse_map_clusters")

    base = base_raw(args)
    cells = cells_of(args, base)
    settings = {"experiment": args.experiment, "base": base, "epochs": args.epochs}
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / f"{name}.json"
    runs = load_previous(json_path, settings, args)
    data = base["data"]["kind"]
    title = (
        f"{data}, {base['model']['backbone']}, {args.epochs} epoch(s) per run, "
        f"base {args.base.name}; {len(args.seeds)} seed(s) per cell"
    )
    report: dict[str, Any] = {
        "what": "collapse-region map" if args.experiment == "map" else "cluster recovery",
        "settings": settings,
        "runs": runs,
    }
    started = time.perf_counter()
    for index, cell in enumerate(cells, start=1):
        if cell.label in runs:
            continue
        record = run_cell(cell, base)
        runs[cell.label] = record
        line = (
            f"{index}/{len(cells)} {cell.label}: {record['health']}"
            f" | MI_norm {_fmt(record['target_mutual_info_norm'], '.3f')}"
            f" | spread {_fmt(record['logit_spread'], '.3g')}"
            f" | k-NN {_fmt(record['knn_top1'], '.1f')}"
        )
        if "target_nmi" in record:
            line += f" | NMI {record['target_nmi']:.3f} | ARI {record['target_ari']:.3f}"
        progress(
            line + f" | {record['wall_s']:.0f} s ({(time.perf_counter() - started) / 60:.1f} min)"
        )
        report["summary"], _ = summarise(args.experiment, runs, title, args.output, name)
        write_json(json_path, report)

    report["summary"], table = summarise(args.experiment, runs, title, args.output, name)
    if args.experiment == "clusters":  # measured once; a resumed experiment keeps them
        kept = json.loads(json_path.read_text()).get("baselines") if args.resume else None
        report["baselines"] = kept or cluster_baselines(args, base)
        table += "\n\n" + baseline_table(report["baselines"])
    report["environment"] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }
    write_json(json_path, report)
    print(table)
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
