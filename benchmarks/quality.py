"""Quality benchmark with baselines: every normalisation mode on CIFAR-10, at equal budget.

Trains one arm per (``objective.mode``, seed) on the CIFAR-10 ImageFolder in this process
(`trainer.loop.build_run` + `run_training`, what ``klssl train`` runs; no Ray, no MLflow),
with the last 10% of every class held out. For every arm it reports weighted k-NN top-1
(k = 20 and 200) and the linear probe of the teacher backbone, the baselines of the same
split (the same network at random initialisation, k-NN and linear; k-NN on raw pixels),
the final health verdict, the learning curve (k-NN every ``eval.every_epochs`` epochs,
against epochs and minutes) and the diagnostic curves (loss, target_mutual_info_norm,
logit_spread against steps). It answers: which normalisation (prior, center, sinkhorn,
none) learns the best features for the same budget, by how much above the baselines, and
how much the answer moves between seeds.

    python benchmarks/quality.py --preset cpu               # 4 modes x 2 seeds, ~1 h per arm
    python benchmarks/quality.py --preset gpu               # 200 epochs, DINO-like recipe
    python benchmarks/quality.py --preset cpu --resume      # keep finished arms, run the rest
    python benchmarks/quality.py --max-samples 600 --epochs 1 --seeds 0 --modes prior none
        --output runs/quality-smoke                         # smoke run (minutes)

Presets (``--set section.field=value`` overrides any field, as ``klssl train --set``):

- ``cpu``: timm ResNet-18 with its standard ImageNet stem (``small_images: false``) on
  32 px global and 16 px local crops (2 + 2 views), batch 128, K = 1024, teacher
  temperature 0.04, teacher momentum 0.996 -> 1, 10 epochs of the 45,000 training images
  (about 3,500 steps), k-NN every 2 epochs: about an hour per arm on 2 quiet CPU cores
  (450,000 images at 150-175 images/s, plus about 10 minutes of evaluation). Throughput
  of the candidates relative to this one, measured side by side on the shared 2-core VM
  (1 torch thread, interleaved rounds): the CIFAR stem (3x3 stride 1, no max-pool, 16x
  the activations) 0.12x, resnet10t 1.45x (CIFAR stem 0.19x), ResNet-18 at 24 px 1.38x,
  2 + 6 views 0.84x, timm ``test_resnet`` 3.1x (CIFAR stem 0.68x, but 96 channels).
- ``gpu``: ResNet-18 with the CIFAR stem, 32 px + 16 px crops (2 + 6), batch 256, K = 4096,
  200 epochs, teacher temperature 0.04 -> 0.07 over 30 epochs, teacher momentum
  0.996 -> 1, AdamW at 5e-4 x batch / 256 with 10 warm-up epochs, k-NN every 10 epochs.

Unpacks ``../shared/data/cifar10-jpeg/train.tar.gz`` into ``.data/`` when needed
(``--data`` chooses another folder). Writes ``NAME.json`` and ``NAME.png`` under
``--output`` (default ``benchmarks/results``, NAME ``quality``), rewriting both after
every finished arm, and prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

# benchmarks/ is not a package: running this file puts its folder first on sys.path, so
# the sibling modules are importable (neither imports Ray: benchmarks/gpu.py runs this
# code on machines without it).
from cifar10 import ARCHIVE, ensure_data
from reports import write_json

from trainer.config import TrainConfig, apply_overrides, validate_config
from trainer.engine import TrainingState
from trainer.loop import build_run, run_training

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".data" / "train"
MODES = ("prior", "center", "sinkhorn", "none")
DIAGNOSTIC_KEYS = (
    "loss",
    "kl",
    "target_mutual_info_norm",
    "target_cluster_usage",
    "logit_spread",
    "effective_clusters",
    "target_effective_clusters",
    "teacher_temp",
    "lr",
    "healthy",
    "images_per_s",
)
"""What the diagnostic curves keep of every ``on_log`` call (besides step and epoch)."""
CPU_EPOCHS, GPU_EPOCHS = 10, 200


# --- configuration ------------------------------------------------------------------------


def preset_config(preset: str, data_path: Path, epochs: int) -> dict[str, Any]:
    """The raw TrainConfig of a preset, before ``--max-samples``, ``--backbone``, ``--set``."""
    if preset == "gpu":
        return {
            "name": "bench-quality-gpu",
            "data": {
                "kind": "imagefolder",
                "path": str(data_path),
                "holdout_fraction": 0.1,
                "global_crop_size": 32,
                "local_crop_size": 16,
                "num_local_crops": 6,
                "global_crop_scale": [0.4, 1.0],
                "local_crop_scale": [0.05, 0.4],
                "batch_size": 256,
                # ~280 images/s of 2+6 views per core (docs/benchmarks.md): a dozen
                # workers keep one GPU fed at 32 px.
                "loader_workers": max(1, min(12, (os.cpu_count() or 2) - 2)),
            },
            "model": {"backbone": "resnet18", "small_images": True},
            "objective": {
                # K = 4096 as configs/cifar10-resnet18.yaml; DINO's 65536 is one --set away.
                "num_clusters": 4096,
                "teacher_temp": 0.07,
                "warmup_teacher_temp": 0.04,
                "warmup_teacher_temp_epochs": min(30, epochs),
            },
            # lr is per 256 images and scaled by the global batch (trainer.schedules).
            "optim": {"optimizer": "adamw", "lr": 5e-4, "weight_decay_end": 0.4},
            "schedule": {
                "epochs": epochs,
                "warmup_epochs": min(10, epochs),
                "teacher_momentum": 0.996,
            },
            "eval": {"knn_k": [20, 200], "every_epochs": min(10, epochs)},
            "runtime": {"device": "auto", "log_every_steps": 20},
        }
    return {
        "name": "bench-quality-cpu",
        "data": {
            "kind": "imagefolder",
            "path": str(data_path),
            "holdout_fraction": 0.1,
            "global_crop_size": 32,
            "local_crop_size": 16,
            "num_local_crops": 2,
            "global_crop_scale": [0.4, 1.0],
            "local_crop_scale": [0.05, 0.4],
            "batch_size": 128,
            # A loader process would take a core from torch's 2 intra-op threads, which
            # then wait for each other at every operator; augmentation costs far less.
            "loader_workers": 0,
        },
        "model": {"backbone": "resnet18", "small_images": False},
        "objective": {
            # K = 1024: with 256 teacher outputs a step, the EMA prior of 4096 clusters
            # would be estimated from few samples per cluster.
            "num_clusters": 1024,
            # The GPU recipe's temperature over its first 3,500 steps (it warms up over
            # 5,000): a warm-up squeezed into the short run's first epochs raises the
            # temperature while the head is still near-uniform, and the targets drift to
            # uniform (seen in short checks: MI_norm 0.10 -> 0.02 in 110 steps).
            "teacher_temp": 0.04,
            "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0,
        },
        "optim": {"optimizer": "adamw", "lr": 5e-4, "weight_decay_end": 0.4},
        "schedule": {
            "epochs": epochs,
            "warmup_epochs": max(1, epochs // 10),
            # DINO's 0.996 (its advice for small batches is 0.996 and more). 0.99 was
            # tried first for the short run and its targets drifted to uniform within
            # 40 steps; 0.996 is the setting of the first CPU run that learned (5 epochs:
            # k-NN 31% against 20% at random init).
            "teacher_momentum": 0.996,
        },
        "eval": {"knn_k": [20, 200], "every_epochs": min(2, epochs)},
        "runtime": {"device": "cpu", "log_every_steps": 10},
    }


def arm_config(base: dict[str, Any], mode: str, seed: int) -> TrainConfig:
    """The validated config of one arm: the base with its mode and seed."""
    raw = apply_overrides(base, [f"objective.mode={mode}", f"runtime.seed={seed}"])
    return validate_config(raw, f"arm {mode}/seed{seed}")


def base_config(args: argparse.Namespace, data_path: Path) -> dict[str, Any]:
    """The preset with the command line's overrides applied (validated once here)."""
    raw = preset_config(args.preset, data_path, args.epochs)
    overrides = list(args.set)
    if args.max_samples is not None:
        overrides.append(f"data.max_samples={args.max_samples}")
    if args.backbone is not None:
        overrides.append(f"model.backbone={args.backbone}")
    raw = apply_overrides(raw, overrides)
    validate_config(raw, "benchmark base config")  # fail before any arm starts
    return raw


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for ``--resume`` to add arms to an existing report."""
    return {
        "preset": args.preset,
        "epochs": args.epochs,
        "max_samples": args.max_samples,
        "backbone": args.backbone,
        "set": sorted(args.set),
    }


# --- one arm ------------------------------------------------------------------------------


def _round(value: float, digits: int = 5) -> float:
    """A float kept to ``digits`` significant digits (smaller JSON, no false precision)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


class ArmRecorder:
    """Loop hooks that keep an arm's curves and print its progress.

    Training time excludes evaluation: it is summed from the ``images_per_s`` windows of
    the log calls, which tile every epoch's steps (the engine restarts its window at every
    log and at every epoch start), so the minutes axis is the cost of training alone.
    """

    def __init__(self, label: str, config: TrainConfig, progress_every_s: float) -> None:
        self.label = label
        self.batch = config.data.batch_size
        self.epochs = config.schedule.epochs
        self.ks = list(config.eval.knn_k)
        self.progress_every_s = progress_every_s
        self.started = time.perf_counter()
        self.last_print = self.started
        self.last_step = 0
        self.train_s = 0.0
        self.diagnostics: list[dict[str, float]] = []
        self.learning_curve: list[dict[str, float]] = []
        self.first_collapse_step: int | None = None
        self.baselines: dict[str, float] = {}

    def elapsed_min(self) -> float:
        """Wall-clock minutes since the arm started (evaluations included)."""
        return (time.perf_counter() - self.started) / 60

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """Keep the diagnostics; print a progress line at most every progress_every_s."""
        steps = state.step - self.last_step
        self.last_step = state.step
        self.train_s += steps * self.batch / max(metrics["images_per_s"], 1e-9)
        point = {"step": float(state.step), "epoch": _round(metrics["epoch"], 4)}
        point |= {key: _round(metrics[key]) for key in DIAGNOSTIC_KEYS if key in metrics}
        self.diagnostics.append(point)
        if metrics["healthy"] < 0.5 and self.first_collapse_step is None:
            self.first_collapse_step = int(metrics["collapse_step"])
        now = time.perf_counter()
        if now - self.last_print >= self.progress_every_s:
            self.last_print = now
            progress(
                f"{self.label} | epoch {metrics['epoch']:.2f}/{self.epochs} | step {state.step}"
                f" | {self.elapsed_min():.1f} min | loss {metrics['loss']:.3f}"
                f" | MI_norm {metrics['target_mutual_info_norm']:.3f}"
                f" | spread {metrics['logit_spread']:.4f}"
                f" | {metrics['images_per_s']:.0f} img/s | {state.health.verdict.describe()}"
            )

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        """Add a learning-curve point when the epoch was evaluated; print the epoch line."""
        line = (
            f"{self.label} | epoch {state.epoch}/{self.epochs} done | {self.elapsed_min():.1f} min"
        )
        if "knn_top1" in metrics:
            point = {
                "epoch": float(state.epoch),
                "step": float(state.step),
                "train_min": _round(self.train_s / 60),
                "wall_min": _round(self.elapsed_min()),
            }
            point |= {
                key: _round(metrics[key])
                for key in [*(f"knn_top1_k{k}" for k in self.ks), "linear_top1"]
                if key in metrics
            }
            self.learning_curve.append(point)
            self.baselines = {
                key: _round(value)
                for key, value in metrics.items()
                if key.startswith(("random_init_", "pixels_"))
            }
            line += f" | k-NN {metrics['knn_top1']:.2f}"
            if "linear_top1" in metrics:
                line += f" | linear {metrics['linear_top1']:.2f}"
        progress(line + f" | {state.health.verdict.describe()}")


def run_arm(config: TrainConfig, label: str, progress_every_s: float) -> dict[str, Any]:
    """Train one arm to the end and return its record (final metrics, verdict, curves)."""
    started = time.perf_counter()
    run = build_run(config)
    recorder = ArmRecorder(label, config, progress_every_s)
    health: dict[str, Any]
    try:
        final = run_training(run, recorder)
        verdict = run.state.health.verdict
        health = {
            "verdict": verdict.health,
            "describe": verdict.describe(),
            "since_step": verdict.since_step,
        }
    except FloatingPointError as error:
        # A diverged arm is a result (and must not end the other arms): kept, unscored.
        final = {}
        health = {"verdict": "diverged", "describe": f"diverged: {error}", "since_step": None}
    # The random-init point of the learning curve: the baselines are measured at step 0.
    if recorder.learning_curve:
        start = {"epoch": 0.0, "step": 0.0, "train_min": 0.0, "wall_min": 0.0}
        start |= {
            key.removeprefix("random_init_"): value
            for key, value in recorder.baselines.items()
            if key.startswith("random_init_") and key != "random_init_knn_top1"
        }
        recorder.learning_curve.insert(0, start)
    images_per_s = [p["images_per_s"] for p in recorder.diagnostics if "images_per_s" in p]
    return {
        "mode": config.objective.mode,
        "seed": config.runtime.seed,
        "final": {key: _round(value) for key, value in final.items()},
        "health": health | {"first_collapse_step": recorder.first_collapse_step},
        "steps": run.state.step,
        "train_images": len(run.splits.train),
        "holdout_images": len(run.splits.holdout),
        "train_min": _round(recorder.train_s / 60),
        "wall_min": _round((time.perf_counter() - started) / 60),
        "median_images_per_s": _round(statistics.median(images_per_s)) if images_per_s else None,
        "learning_curve": recorder.learning_curve,
        "diagnostics": recorder.diagnostics,
    }


def progress(line: str) -> None:
    """One progress line on stderr, time-stamped (stdout keeps the table)."""
    print(f"[quality {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


# --- report -------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one seed), min, max and count."""
    return {
        "mean": _round(statistics.fmean(values)),
        "std": _round(statistics.stdev(values)) if len(values) > 1 else 0.0,
        "min": _round(min(values)),
        "max": _round(max(values)),
        "n": len(values),
    }


def summarise(arms: dict[str, dict[str, Any]], modes: Iterable[str]) -> dict[str, Any]:
    """Per mode, every final metric aggregated over seeds, and the verdicts counted."""
    summary: dict[str, Any] = {}
    for mode in modes:
        records = [arm for arm in arms.values() if arm["mode"] == mode]
        if not records:
            continue
        scored = [arm for arm in records if arm["final"]]  # diverged arms have no metrics
        keys = sorted(set.intersection(*(set(arm["final"]) for arm in scored))) if scored else []
        verdicts = [arm["health"]["verdict"] for arm in records]
        summary[mode] = {
            "seeds": sorted(arm["seed"] for arm in records),
            "ok": verdicts.count("ok"),
            "collapsed": verdicts.count("collapsed"),
            "diverged": verdicts.count("diverged"),
            "train_min": spread([arm["train_min"] for arm in records]),
            "wall_min": spread([arm["wall_min"] for arm in records]),
            "metrics": {key: spread([arm["final"][key] for arm in scored]) for key in keys},
        }
    return summary


def _cell(summary: dict[str, Any], key: str) -> str:
    stats = summary["metrics"].get(key)
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.2f}"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f} ({stats['min']:.1f}-{stats['max']:.1f})"


def markdown_table(summary: dict[str, Any], ks: Sequence[int]) -> str:
    """Mean ± std (min-max) over seeds of every headline number, one row per mode."""
    header = [
        "mode",
        "seeds",
        *(f"k-NN k={k}" for k in ks),
        "linear",
        f"random-init k-NN k={ks[0]}",
        "random-init linear",
        f"pixels k-NN k={ks[0]}",
        "health",
        "train min/arm",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for mode, row in summary.items():
        cells = [
            mode,
            str(len(row["seeds"])),
            *(_cell(row, f"knn_top1_k{k}") for k in ks),
            _cell(row, "linear_top1"),
            _cell(row, f"random_init_knn_top1_k{ks[0]}"),
            _cell(row, "random_init_linear_top1"),
            _cell(row, f"pixels_knn_top1_k{ks[0]}"),
            f"{row['ok']} ok / {row['collapsed']} collapsed"
            + (f" / {row['diverged']} diverged" if row["diverged"] else ""),
            f"{row['train_min']['mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """k-NN vs epochs per mode (baselines as horizontal lines); k-NN vs training minutes;
    loss, target_mutual_info_norm and logit_spread vs steps (one line per arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: dict[str, dict[str, Any]] = report["arms"]
    modes = [mode for mode in MODES if any(arm["mode"] == mode for arm in arms.values())]
    if not modes:
        return
    k = report["knn_k"][0]
    columns = max(len(modes), 4)
    figure, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 7.6), dpi=100, squeeze=False)
    colours = {mode: f"C{i}" for i, mode in enumerate(MODES)}
    for column, mode in enumerate(modes):
        ax = axes[0][column]
        records = [arm for arm in arms.values() if arm["mode"] == mode]
        for arm in records:
            curve = arm["learning_curve"]
            ax.plot(
                [p["epoch"] for p in curve],
                [p.get(f"knn_top1_k{k}", math.nan) for p in curve],
                marker="o",
                markersize=3,
                color=colours[mode],
                alpha=0.5 + 0.5 / len(records),
                label=f"seed {arm['seed']}",
            )
        baselines = summarise(arms, [mode])[mode]["metrics"]
        for key, style, name in (
            (f"random_init_knn_top1_k{k}", ":", "random init"),
            (f"pixels_knn_top1_k{k}", "--", "pixels"),
        ):
            if key in baselines:
                ax.axhline(baselines[key]["mean"], color="grey", linestyle=style, label=name)
        ax.set_title(f"{mode}: k-NN (k={k}) on held-out")
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1, %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for column in range(len(modes), columns):
        axes[0][column].axis("off")

    bottom = axes[1]
    for arm in arms.values():
        colour = colours[arm["mode"]]
        label = f"{arm['mode']} s{arm['seed']}"
        curve = arm["learning_curve"]
        bottom[0].plot(
            [p["train_min"] for p in curve],
            [p.get(f"knn_top1_k{k}", math.nan) for p in curve],
            marker="o",
            markersize=3,
            color=colour,
            label=label,
        )
        steps = [p["step"] for p in arm["diagnostics"]]
        marker = "." if len(steps) < 20 else None  # a lone point is invisible as a line
        for ax, key in zip(
            bottom[1:4], ("loss", "target_mutual_info_norm", "logit_spread"), strict=True
        ):
            ax.plot(
                steps,
                [p.get(key, math.nan) for p in arm["diagnostics"]],
                color=colour,
                lw=0.8,
                marker=marker,
                label=label,
            )
    bottom[0].set_title(f"k-NN (k={k}) vs training minutes (eval excluded)")
    bottom[0].set_xlabel("minutes")
    for ax, key in zip(
        bottom[1:4], ("loss", "target_mutual_info_norm", "logit_spread"), strict=True
    ):
        ax.set_title(key)
        ax.set_xlabel("step")
    bottom[3].set_yscale("log")
    for ax in bottom[:4]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for column in range(4, columns):
        bottom[column].axis("off")
    figure.suptitle(report["title"])
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def load_previous(path: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The finished arms to keep: those of ``path`` with ``--resume``, none otherwise.

    Refuses to resume a report of other settings, and refuses to overwrite finished
    arms unless ``--fresh`` says so: a forgotten ``--resume`` must not cost hours.
    """
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    if args.resume:
        if previous.get("settings") != settings_of(args):
            sys.exit(
                f"{path} was written with settings {previous.get('settings')}, not "
                f"{settings_of(args)}: resume with the same options, or pass --fresh"
            )
        arms: dict[str, dict[str, Any]] = previous["arms"]
        return arms
    if previous.get("arms") and not args.fresh:
        sys.exit(f"{path} holds {len(previous['arms'])} finished arm(s): pass --resume or --fresh")
    return {}


def environment() -> dict[str, Any]:
    """Where the numbers were measured (they are only comparable on the same machine)."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def portable(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as stored in the report: the data path relative to the repository."""
    stored = json.loads(json.dumps(raw))
    path = Path(stored["data"]["path"])
    stored["data"]["path"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--epochs", type=int, help=f"default {CPU_EPOCHS} (cpu), {GPU_EPOCHS} (gpu)"
    )
    parser.add_argument("--max-samples", type=int, help="train on a class-balanced subset")
    parser.add_argument("--backbone", help="timm model name (the preset's stem setting stays)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="config override"
    )
    parser.add_argument("--data", type=Path, default=DATA, help="the unpacked ImageFolder")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--name", default="quality", help="file stem of the JSON and PNG")
    parser.add_argument("--resume", action="store_true", help="skip arms already in the JSON")
    parser.add_argument("--fresh", action="store_true", help="discard the JSON's finished arms")
    parser.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = GPU_EPOCHS if args.preset == "gpu" else CPU_EPOCHS

    if not args.data.exists() and args.data.name != "train":
        # The archive unpacks to <parent>/train: any other name would never appear.
        parser.error(f"--data {args.data} does not exist and is not a folder named 'train'")
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / f"{args.name}.json"
    arms = load_previous(json_path, args)
    base = base_config(args, ensure_data(ARCHIVE, args.data))
    ks = list(validate_config(base).eval.knn_k)
    report: dict[str, Any] = {
        "what": "quality of every normalisation mode at equal budget, with baselines",
        "title": f"CIFAR-10, preset {args.preset}: {base['model']['backbone']}, "
        f"{args.epochs} epochs, held-out 10% of every class",
        "settings": settings_of(args),
        "base_config": portable(base),
        "knn_k": ks,
        "arms": arms,
    }
    todo = [(mode, seed) for mode in args.modes for seed in args.seeds]
    for index, (mode, seed) in enumerate(todo, start=1):
        label = f"{mode}/seed{seed}"
        if label in arms:
            progress(f"{label} | already in {json_path.name}, skipped (--resume)")
            continue
        progress(f"{label} | arm {index}/{len(todo)} starts")
        arms[label] = run_arm(arm_config(base, mode, seed), label, args.progress_every)
        arm = arms[label]
        progress(
            f"{label} | finished in {arm['wall_min']:.1f} min ({arm['train_min']:.1f} training)"
            f" | k-NN {arm['final'].get('knn_top1', math.nan):.2f} | {arm['health']['describe']}"
        )
        report["summary"] = summarise(arms, MODES)
        report["environment"] = environment()
        write_json(json_path, report)
        plot(report, args.output / f"{args.name}.png")

    report["summary"] = summarise(arms, MODES)
    report["environment"] = environment()
    write_json(json_path, report)
    plot(report, args.output / f"{args.name}.png")
    print(markdown_table(report["summary"], ks))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
