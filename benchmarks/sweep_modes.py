"""Sweep benchmark: the prior and center modes over teacher temperature and prior momentum.

A grid sweep (``tuning.run_sweep``, the production driver: Ray Tune over Ray Train V2,
MLflow parent and child runs) on a subset of the CIFAR-10 ImageFolder: ``objective.mode``
in {prior, center} x ``objective.teacher_temp`` x ``objective.prior_momentum``, every
trial trained for the same number of epochs (ASHA off, so every trial is measured to the
end; the collapse stopper stays on). It answers two questions on real images: which
normalisation reaches the better k-NN accuracy, and how sensitive each one is to the two
parameters it shares (the teacher temperature, and the momentum of the prior pi or the
center c).

    python benchmarks/sweep_modes.py [--max-samples 3000] [--epochs 6] [--output DIR]

Unpacks ``../shared/data/cifar10-jpeg/train.tar.gz`` into ``.data/`` when needed. Writes
``benchmarks/results/sweep_modes.json`` and ``sweep_modes.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

# isort: split
import torch
from cifar10 import ensure_data

from tuning.config import SweepConfig, validate_sweep
from tuning.driver import run_sweep

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = ["prior", "center"]


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The 2 x 2 x 2 grid over a small ViT on a CIFAR-10 subset (16 px global crops)."""
    base = {
        "name": "bench-sweep-modes",
        "data": {
            "kind": "imagefolder",
            "path": str(ensure_data()),
            "max_samples": args.max_samples,
            "holdout_fraction": args.holdout_fraction,
            "global_crop_size": 16,
            "local_crop_size": 8,
            "num_local_crops": 2,
            "global_crop_scale": [0.4, 1.0],
            "local_crop_scale": [0.1, 0.4],
            "batch_size": 64,
        },
        "model": {
            "backbone": "vit_tiny_patch16_224",
            "patch_size": 4,
            "backbone_kwargs": {"depth": 2},
            "head_hidden_dim": 256,
            "head_bottleneck_dim": 64,
            "head_layers": 2,
        },
        "objective": {"num_clusters": 256},
        "optim": {"lr": 0.001, "weight_decay_end": 0.1},
        "schedule": {"epochs": args.epochs, "warmup_epochs": 1, "teacher_momentum": 0.95},
        "eval": {"knn_k": [20]},
        "runtime": {"device": "cpu", "log_every_steps": 10, "seed": 0},
    }
    return validate_sweep(
        {
            "name": "sweep-modes",
            "base": base,
            "space": {
                "objective.mode": {"type": "grid", "values": MODES},
                "objective.teacher_temp": {"type": "grid", "values": args.teacher_temps},
                "objective.prior_momentum": {"type": "grid", "values": args.momenta},
            },
            "search": "grid",
            "metric": "knn_top1",
            "asha": {"enabled": False},
            "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        },
        "benchmark sweep",
    )


def summarise(trials: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Best k-NN per mode, and each mode's spread over the two parameters."""
    per_mode: dict[str, Any] = {}
    for mode in MODES:
        rows = [t for t in trials if t["mode"] == mode and t["knn_top1"] is not None]
        if not rows:
            continue
        best = max(rows, key=lambda t: t["knn_top1"])

        def mean_at(key: str, value: float, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.fmean(t["knn_top1"] for t in rows if t[key] == value)

        temps = {str(v): mean_at("teacher_temp", v) for v in args.teacher_temps}
        momenta = {str(v): mean_at("prior_momentum", v) for v in args.momenta}
        per_mode[mode] = {
            "best_knn_top1": best["knn_top1"],
            "best_teacher_temp": best["teacher_temp"],
            "best_prior_momentum": best["prior_momentum"],
            "worst_knn_top1": min(t["knn_top1"] for t in rows),
            "mean_knn_by_teacher_temp": temps,
            "mean_knn_by_prior_momentum": momenta,
            "teacher_temp_effect": max(temps.values()) - min(temps.values()),
            "prior_momentum_effect": max(momenta.values()) - min(momenta.values()),
            "collapsed": sum(t["stop_reason"] == "collapse" for t in rows),
        }
    return per_mode


def plot(trials: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """k-NN top-1 against the teacher temperature, one line per (mode, momentum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    styles = {"prior": "-", "center": "--"}
    for mode, momentum in itertools.product(MODES, args.momenta):
        rows = sorted(
            (t for t in trials if t["mode"] == mode and t["prior_momentum"] == momentum),
            key=lambda t: t["teacher_temp"],
        )
        axes.plot(
            [t["teacher_temp"] for t in rows],
            [t["knn_top1"] for t in rows],
            styles[mode],
            marker="o",
            label=f"{mode}, m={momentum}",
        )
    axes.set_xlabel("teacher temperature")
    axes.set_ylabel(f"k-NN top-1 (k=20) after {args.epochs} epochs, %")
    axes.set_title(f"CIFAR-10 subset ({args.max_samples} images): prior vs center")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-samples", type=int, default=3000)
    parser.add_argument("--holdout-fraction", type=float, default=0.02)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-temps", type=float, nargs="+", default=[0.04, 0.07])
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    sweep = sweep_config(args)
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_sweep(
            sweep,
            tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}",
            storage_path=str(Path(tmp) / "ray"),
            sweep_id="sweep-modes",
        )
    elapsed = time.time() - started
    trials = [
        {
            "mode": record.params["objective.mode"],
            "teacher_temp": record.params["objective.teacher_temp"],
            "prior_momentum": record.params["objective.prior_momentum"],
            "state": record.state,
            "stop_reason": record.stop_reason,
            "epochs_done": round(record.metrics.get("epoch", 0.0)),
            "knn_top1": record.metrics.get("knn_top1"),
            "mutual_info": record.metrics.get("mutual_info"),
            "effective_clusters": record.metrics.get("effective_clusters"),
        }
        for record in result.trials
    ]
    trials.sort(key=lambda t: (MODES.index(t["mode"]), t["teacher_temp"], t["prior_momentum"]))
    report = {
        "what": "grid sweep of objective.mode x teacher_temp x prior_momentum (tuning.run_sweep)",
        "data": f"CIFAR-10 ImageFolder, {args.max_samples} training images, "
        f"{args.holdout_fraction:.0%} of every class held out for k-NN",
        "epochs": args.epochs,
        "trials": trials,
        "per_mode": summarise(trials, args),
        "best": {
            "mode": result.best.params["objective.mode"],
            "knn_top1": result.best.metrics["knn_top1"],
        }
        if result.best
        else None,
        "wall_s": round(elapsed, 1),
        "load_average_before": [round(value, 2) for value in load_before],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "interrupted": result.interrupted,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "sweep_modes.json").write_text(json.dumps(report, indent=2))
    plot(trials, args, args.output / "sweep_modes.png")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
