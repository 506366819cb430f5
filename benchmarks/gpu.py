"""GPU benchmark: one command that measures one GPU of a node in about 8 minutes.

    python benchmarks/gpu.py --output runs/gpu                 # one H200, ~8 min
    python benchmarks/gpu.py --smoke --output /tmp/gpu-smoke   # every section tiny, CPU

Sections (`SECTIONS`, in order; each gets its share of ``--minutes``, the last what is
left):

- ``vit_s16``, ``vit_s16_compiled``: ViT-S/16 multi-crop training steps (2 x 224 + 10 x 96
  px views, K = 65536, bf16 autocast) on random views already on the device, eager and
  with ``runtime.compile``: images/s, MFU and peak memory. The FLOPs of one step (teacher
  forward, student forward and backward) are counted with ``torch.utils.flop_counter``
  on an eager step; MFU = FLOPs per step / seconds per step / ``--peak-tflops`` (989, the
  dense bf16 peak of an H200).
- ``resnet18_cifar``: ResNet-18 with the CIFAR stem on 2 x 32 + 6 x 16 px views, batch 256,
  K = 4096 (the quality benchmark's GPU preset), random views on the device: images/s.
- ``input_bound``: the same run fed by its real loader (`trainer.data.make_train_loader`,
  ``--loader-workers`` processes) on synthetic 32 px images, or on the ImageFolder of
  ``--data``: the share of the wall time the step waits for its next batch.
- ``augmentation``: multi-crop views made on the device in batches
  (`trainer.augment_device`, ``data.augment_device``) against the CPU pipeline on one
  core, ImageNet-sized: images/s and their ratio (target >= 10x).
- ``quality``: the quality benchmark's GPU preset (`benchmarks/quality.py`, prior mode)
  on CIFAR-10 for the minutes left, k-NN on the held-out split beside the random-init
  and pixel baselines.

Every step is the project's own (`trainer.loop.build_run`, `trainer.engine.train_step`,
`train_one_epoch`), with a run's own settings (channels_last, fused AdamW, pinned
memory on CUDA), so the figures are those of a real run. A section that fails records
its error in the JSON, the others still run, and the script exits 1 at the end. Writes
``gpu.json`` under ``--output`` after every section.

Imports torch, timm, numpy, pydantic, PyYAML, Pillow, scikit-learn and trainer modules
only (no Ray, no MLflow), so it runs on a bare GPU machine with those installed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# benchmarks/ is not a package: running this file puts its folder first on sys.path.
import quality
import torch
import torch._dynamo
from cifar10 import ARCHIVE, DATA, ensure_data
from reports import write_json
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import TrainConfig, apply_overrides, validate_config
from trainer.data import build_splits
from trainer.engine import Batch, train_one_epoch, train_step
from trainer.loop import Run, build_run
from trainer.models import as_network
from trainer.schedules import StepSchedule

H200_DENSE_BF16_TFLOPS = 989.0
"""An H200's (and H100 SXM's) dense bf16 tensor-core peak, the MFU denominator."""
MIN_TIMED_STEPS = 3
"""Timed steps a step section takes even when its warm-up (compilation) used its budget."""
INPUT_BOUND_SHARE = 0.05
"""A run is called input-bound when its step waits longer than this share for batches."""
FINAL_MARGIN_S = 5.0
"""Seconds kept free at the end of the budget for writing the report."""


@dataclass(frozen=True)
class Context:
    """What a section is given: the options, the device, its deadline and what ran before."""

    args: argparse.Namespace
    device: torch.device
    deadline: float
    """``time.perf_counter()`` value by which the section should be done."""
    earlier: dict[str, dict[str, Any]]
    """The report entries of the sections that ran before this one."""

    def seconds_left(self) -> float:
        """Seconds until the deadline (negative once it passed)."""
        return self.deadline - time.perf_counter()


@dataclass(frozen=True)
class Section:
    """A benchmark section: a function of the context returning its figures."""

    run: Callable[[Context], dict[str, Any]]
    share: float | None
    """Share of ``--minutes`` (None: what the sections before left, for the last one)."""


def progress(line: str) -> None:
    """One time-stamped progress line on stderr (stdout gets the summary)."""
    print(f"[gpu {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def synchronise(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- configs ------------------------------------------------------------------------------


def step_config(args: argparse.Namespace, raw: dict[str, Any]) -> TrainConfig:
    """A validated config for random-view step timing: synthetic data, no warm-up effects.

    The prototypes are not frozen (a step updates every parameter, as after the first
    epoch) and the loader is unused, so synthetic images of the least size do.
    """
    batch = raw["data"]["batch_size"]
    base: dict[str, Any] = {
        "data": {
            "kind": "synthetic",
            "synthetic_samples": max(2 * batch, 20),
            "synthetic_image_size": 8,
            "loader_workers": 0,
        },
        "optim": {"freeze_last_layer_epochs": 0},
        "eval": {"baselines": False},
        "runtime": {"device": "cpu" if args.smoke else "cuda"},
    }
    for section, fields in raw.items():
        base[section] = base.get(section, {}) | fields if isinstance(fields, dict) else fields
    return validate_config(base, "benchmark config")


def vit_config(args: argparse.Namespace, compile_backbone: bool) -> TrainConfig:
    """ViT-S/16, DINO's multi-crop (2 x 224 + 10 x 96) and K = 65536 in bf16 (smoke: tiny)."""
    if args.smoke:
        model = {
            "backbone": "vit_tiny_patch16_224",
            "small_images": False,
            "patch_size": 4,
            "backbone_kwargs": {"depth": 1},
            "head_hidden_dim": 64,
            "head_bottleneck_dim": 32,
        }
        sizes, clusters = (16, 8), 256
    else:
        model = {"backbone": "vit_small_patch16_224", "small_images": False, "patch_size": 16}
        sizes, clusters = (224, 96), 65536
    return step_config(
        args,
        {
            "name": "bench-gpu-vit",
            "data": {
                "global_crop_size": sizes[0],
                "local_crop_size": sizes[1],
                "num_local_crops": 10,
                "batch_size": args.vit_batch,
            },
            "model": model,
            "objective": {"num_clusters": clusters},
            "runtime": {"precision": "bf16", "compile": compile_backbone},
        },
    )


def cifar_data(args: argparse.Namespace) -> dict[str, Any]:
    """The data section of the CIFAR-like runs (smoke: 16 px and 8 px crops)."""
    return {
        "global_crop_size": 8 if args.smoke else 32,
        "local_crop_size": 4 if args.smoke else 16,
        "num_local_crops": 2 if args.smoke else 6,
        "batch_size": args.resnet_batch,
    }


def cifar_folder(args: argparse.Namespace, folder: Path) -> Path:
    """``folder``, unpacked from ``--archive`` first when it is a missing ``train`` folder.

    The archive unpacks to ``<parent>/train``; any other missing folder stays missing and
    the run building on it says so.
    """
    if folder.exists() or folder.name != "train":
        return folder
    progress(f"  unpacking {args.archive} into {folder.parent}")
    return ensure_data(args.archive, folder)


def resnet_config(args: argparse.Namespace) -> TrainConfig:
    """ResNet-18 with the CIFAR stem, the quality benchmark's GPU views and K."""
    return step_config(
        args,
        {
            "name": "bench-gpu-resnet18",
            "data": cifar_data(args),
            "model": {"backbone": "resnet18", "small_images": True} | smoke_head(args),
            "objective": {"num_clusters": 256 if args.smoke else 4096},
        },
    )


def smoke_head(args: argparse.Namespace) -> dict[str, Any]:
    """A narrow projection head for the smoke run (the real runs keep DINO's)."""
    return {"head_hidden_dim": 64, "head_bottleneck_dim": 32} if args.smoke else {}


# --- step timing --------------------------------------------------------------------------


def random_views(run: Run) -> list[torch.Tensor]:
    """One batch of normalised-looking random views, on the run's device."""
    data = run.config.data
    sizes = [data.global_crop_size] * data.num_global_crops
    sizes += [data.local_crop_size] * data.num_local_crops
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(data.batch_size, 3, size, size, generator=generator).to(run.device)
        for size in sizes
    ]


def count_step(run: Run, views: list[torch.Tensor]) -> tuple[int, str]:
    """The FLOPs of one eager training step, and the dtype of the backbone's first layer.

    Counted eagerly (a compiled graph hides its operators from the counter); the step
    is the same mathematics compiled or not. The dtype of the first convolution or linear
    layer's output shows whether autocast reaches the backbone (bfloat16 under bf16; the
    backbone's own output is float32 either way, from its final LayerNorm or pooling).
    """
    networks = [as_network(run.state.student), as_network(run.state.teacher)]
    backends = [network.compile_backend for network in networks]
    dtypes: list[torch.dtype] = []
    first = next(
        module
        for module in networks[0].backbone.modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear)
    )
    hook = first.register_forward_hook(lambda _module, _inputs, output: dtypes.append(output.dtype))
    try:
        for network in networks:
            network.compile_backend = None
        with FlopCounterMode(display=False) as counter:
            train_step(run.state, views, step_schedule(run), run.config, precision=run.precision)
    finally:
        hook.remove()
        for network, backend in zip(networks, backends, strict=True):
            network.compile_backend = backend
    return counter.get_total_flops(), str(dtypes[0]).removeprefix("torch.")


def step_schedule(run: Run) -> StepSchedule:
    """The schedule at the end of the learning-rate warm-up (every value non-zero)."""
    return run.schedules.at(run.schedules.steps_per_epoch * run.config.schedule.warmup_epochs)


def time_steps(run: Run, context: Context, warmup: int, max_steps: int) -> dict[str, Any]:
    """Train on one batch of random views kept on the device; time the steps after warm-up.

    Takes at most ``max_steps`` timed steps and stops at the section's deadline, after at
    least `MIN_TIMED_STEPS`. The first warm-up step compiles when ``runtime.compile`` is on.
    """
    args, device = context.args, run.device
    views = random_views(run)
    flops, dtype = count_step(run, views)
    schedule = step_schedule(run)

    def step() -> None:
        train_step(run.state, views, schedule, run.config, precision=run.precision)
        run.state.step += 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronise(device)
    warmup_s = time.perf_counter() - started
    progress(f"  warm-up: {warmup} steps in {warmup_s:.1f} s")
    timed, started = 0, time.perf_counter()
    while timed < max_steps and (timed < MIN_TIMED_STEPS or time.perf_counter() < context.deadline):
        step()
        timed += 1
    synchronise(device)
    step_s = (time.perf_counter() - started) / timed
    data = run.config.data
    student = as_network(run.state.student)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "backbone": run.config.model.backbone,
        "batch": data.batch_size,
        "views": f"{data.num_global_crops}x{data.global_crop_size}"
        f"+{data.num_local_crops}x{data.local_crop_size}",
        "num_clusters": run.config.objective.num_clusters,
        "precision": run.precision,
        "backbone_compute_dtype": dtype,
        "channels_last": student.input_format == torch.channels_last,
        "fused_optimizer": bool(run.state.optimizer.defaults.get("fused")),
        "compile_backend": student.compile_backend,
        "warmup_steps": warmup,
        "warmup_s": round(warmup_s, 2),
        "timed_steps": timed,
        "step_ms": round(step_s * 1e3, 3),
        "images_per_s": round(data.batch_size / step_s, 2),
        "flops_per_step": flops,
        "tflops_per_s": flops / step_s / 1e12,
        "peak_tflops": args.peak_tflops,
        "mfu": flops / step_s / (args.peak_tflops * 1e12),
        "peak_memory_gib": None if peak is None else round(peak, 3),
    }


def vit_section(compile_backbone: bool) -> Callable[[Context], dict[str, Any]]:
    """The ViT-S/16 step section, eager or compiled."""

    def measure(context: Context) -> dict[str, Any]:
        args = context.args
        run = build_run(vit_config(args, compile_backbone))
        if compile_backbone:  # runtime.compile's backend, or the smoke run's cheaper one
            for network in (as_network(run.state.student), as_network(run.state.teacher)):
                network.compile_backend = args.compile_backend
        warmup = 1 if args.smoke else 3
        return time_steps(run, context, warmup, 2 if args.smoke else 500)

    return measure


def resnet_section(context: Context) -> dict[str, Any]:
    """ResNet-18 with the CIFAR stem: images/s of the step alone."""
    args = context.args
    run = build_run(resnet_config(args))
    return time_steps(run, context, 1 if args.smoke else 5, 2 if args.smoke else 500)


# --- input-bound --------------------------------------------------------------------------


class TimedBatches:
    """A loader's batches, timing how long the training loop waits for each one.

    The device is synchronised before each wait, so a wait is time in which the device
    has nothing to do (the real loop overlaps the last kernels of a step with the next
    request; its waits can only be shorter). Stops an epoch early once the deadline has
    passed and at least ``minimum`` batches came.
    """

    def __init__(
        self, loader: DataLoader[Any], device: torch.device, deadline: float, minimum: int
    ) -> None:
        self.loader = loader
        self.device = device
        self.deadline = deadline
        self.minimum = minimum
        self.waits: list[float] = []
        self.arrivals: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self.loader)
        while True:  # at least one batch per epoch: train_one_epoch refuses an empty one
            synchronise(self.device)
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            arrived = time.perf_counter()
            self.waits.append(arrived - asked)
            self.arrivals.append(arrived)
            yield batch
            if self.done():
                return

    def done(self) -> bool:
        """Whether the deadline passed with enough batches taken."""
        return len(self.waits) >= self.minimum and time.perf_counter() >= self.deadline


def input_bound_section(context: Context) -> dict[str, Any]:
    """The ResNet-18 CIFAR run on its real loader: the share of time spent waiting for data.

    Whole epochs as `trainer.engine.train_one_epoch` runs them, until the deadline; the
    first batches (worker start-up) are left out of the figures.
    """
    args, device = context.args, context.device
    data: dict[str, Any] = cifar_data(args) | {"loader_workers": args.loader_workers}
    if args.data is not None:
        data |= {"kind": "imagefolder", "path": str(cifar_folder(args, args.data))}
    else:
        data |= {
            "synthetic_samples": 400 if args.smoke else 50_000,
            "synthetic_image_size": 8 if args.smoke else 32,
        }
    config = step_config(
        args,
        {
            "name": "bench-gpu-input",
            "data": data,
            "model": {"backbone": "resnet18", "small_images": True},
            "objective": {"num_clusters": 256 if args.smoke else 4096},
            "runtime": {"log_every_steps": 20},
        },
    )
    if args.smoke:  # the tiny ViT: a CPU step as short as the loader's batch
        config = config.model_copy(update={"model": vit_config(args, False).model})
    run = build_run(config)
    skipped = 1 if args.smoke else 10
    deadline = time.perf_counter() if args.smoke else context.deadline  # smoke: the minimum
    batches = TimedBatches(run.train_loader, device, deadline, skipped + 2)
    epochs = 0
    while not batches.done():
        run.train_loader.sampler.set_epoch(epochs)  # type: ignore[attr-defined]
        train_one_epoch(
            run.state, batches, run.schedules, config, device=device, precision=run.precision
        )
        epochs += 1
    synchronise(device)
    ended = time.perf_counter()
    window = ended - batches.arrivals[skipped - 1]
    waited = sum(batches.waits[skipped:])
    counted = len(batches.waits) - skipped
    share = waited / window
    return {
        "data": str(args.data) if args.data is not None else "synthetic",
        "train_images": len(run.splits.train),
        "views": f"{config.data.num_global_crops}x{config.data.global_crop_size}"
        f"+{config.data.num_local_crops}x{config.data.local_crop_size}",
        "batch": config.data.batch_size,
        "loader_workers": config.data.loader_workers,
        "pinned_memory": run.train_loader.pin_memory,
        "cpus": os.cpu_count(),
        "batches": counted,
        "epochs": round(len(batches.waits) / len(run.train_loader), 3),
        "seconds": round(window, 2),
        "images_per_s": round(counted * config.data.batch_size / window, 2),
        "loader_wait_s": round(waited, 3),
        "loader_wait_share": share,
        "input_bound": share > INPUT_BOUND_SHARE,
        "input_bound_threshold": INPUT_BOUND_SHARE,
    }


# --- quality ------------------------------------------------------------------------------


def quality_base(args: argparse.Namespace) -> dict[str, Any]:
    """The quality benchmark's GPU preset with this run's loader workers (smoke: tiny)."""
    data_path = args.data if args.data is not None else DATA
    if not args.smoke or args.data is not None:
        data_path = cifar_folder(args, data_path)
    base = quality.preset_config("gpu", data_path, epochs=1)
    overrides = [
        f"data.loader_workers={args.loader_workers}",
        # k-NN is the headline and the baselines are k-NN too; the probe's L-BFGS on
        # 45,000 features would take minutes of the budget.
        "eval.linear_probe=false",
    ]
    if args.smoke:
        tiny = vit_config(args, False).model
        overrides += [f"model.{key}={json.dumps(value)}" for key, value in tiny]
        overrides += [
            "objective.num_clusters=64",
            *(f"data.{key}={value}" for key, value in cifar_data(args).items()),
            "runtime.device=cpu",
        ]
        if args.data is None:
            overrides += [
                "data.kind=synthetic",
                "data.path=",
                "data.synthetic_samples=200",
                "data.synthetic_image_size=8",
            ]
    return apply_overrides(base, overrides)


def plan_quality_run(
    context: Context, base: dict[str, Any], train_images: int
) -> tuple[int, int | None]:
    """(epochs, max_samples) that fit in the time left at the measured loader speed.

    Training gets two thirds of the time left (evaluation, baselines and set-up the
    rest); the speed is the ``input_bound`` section's (the same model, views and
    loader), else a cautious guess. When one epoch does not fit, the training set is
    capped (class-balanced) so that one does.
    """
    earlier = context.earlier.get("input_bound", {})
    measured = earlier.get("result", {}).get("images_per_s")
    speed = float(measured) if measured else (50.0 if context.args.smoke else 1000.0)
    images = context.seconds_left() * 2 / 3 * speed
    if context.args.smoke:
        return 1, min(train_images, 160)
    if images < train_images:
        return 1, max(int(images), base["data"]["batch_size"] * 10)
    return max(1, math.floor(images / train_images)), None


def quality_section(context: Context) -> dict[str, Any]:
    """A short CIFAR-10 run of the quality benchmark's GPU preset, with its baselines."""
    args = context.args
    minimum = 5.0 if args.smoke else 60.0
    if context.seconds_left() < minimum:
        raise TimeoutError(
            f"{context.seconds_left():.0f} s left of --minutes {args.minutes}, less than the "
            f"{minimum:.0f} s a quality run needs: give more minutes"
        )
    base = quality_base(args)
    train_images = len(build_splits(validate_config(base).data, seed=0).train)
    epochs, max_samples = plan_quality_run(context, base, train_images)
    planned = [
        f"schedule.epochs={epochs}",
        f"schedule.warmup_epochs={max(1, epochs // 10)}",
        f"eval.every_epochs={epochs}",  # k-NN once, at the end
        # The CPU preset's reasoning: a teacher-temperature warm-up squeezed into a short
        # run raises the temperature while the head is near-uniform, and the targets
        # drift to uniform; the short run keeps the warm-up's starting 0.04.
        "objective.teacher_temp=0.04",
        "objective.warmup_teacher_temp_epochs=0",
    ]
    if max_samples is not None:
        planned.append(f"data.max_samples={max_samples}")
    base = apply_overrides(base, planned)
    progress(f"  {epochs} epoch(s) of {max_samples or train_images} images")
    record = quality.run_arm(quality.arm_config(base, "prior", 0), "quality/prior", 30.0)
    final = record["final"]
    if not final:
        raise RuntimeError(f"the quality run ended without metrics: {record['health']}")
    k = validate_config(base).eval.knn_k[0]
    return {
        "epochs": epochs,
        "train_images": record["train_images"],
        "holdout_images": record["holdout_images"],
        "steps": record["steps"],
        "train_min": record["train_min"],
        "wall_min": record["wall_min"],
        "median_images_per_s": record["median_images_per_s"],
        "knn_k": k,
        "knn_top1": final[f"knn_top1_k{k}"],
        "random_init_knn_top1": final[f"random_init_knn_top1_k{k}"],
        "pixels_knn_top1": final[f"pixels_knn_top1_k{k}"],
        "final": final,
        "health": record["health"],
        "learning_curve": record["learning_curve"],
        "config": base if args.smoke else quality.portable(base),
    }


def augmentation_section(context: Context) -> dict[str, Any]:
    """Multi-crop views made on the device in batches (`trainer.augment_device`) against
    the CPU pipeline on one core, ImageNet-sized (500 x 375 sources, 2 x 224 + 8 x 96 px
    views; CIFAR-sized in the smoke run): images/s and their ratio."""
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    import augmentation  # its import pins one thread for its own command line: undo that

    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    smoke = context.args.smoke
    return augmentation.measure_device_augmentation(
        context.device,
        "cifar" if smoke else "imagenet",
        seconds=2.0 if smoke else max(10.0, 0.8 * context.seconds_left()),
        batch_size=8 if smoke else 128,
    )


SECTIONS: dict[str, Section] = {
    "vit_s16": Section(vit_section(compile_backbone=False), 0.10),
    "vit_s16_compiled": Section(vit_section(compile_backbone=True), 0.25),
    "resnet18_cifar": Section(resnet_section, 0.07),
    "input_bound": Section(input_bound_section, 0.13),
    "augmentation": Section(augmentation_section, 0.08),
    "quality": Section(quality_section, None),
}
"""Every section, in order, with its share of the budget; the last takes what is left.

A new section is one entry: a function of the `Context` returning a JSON-able dict, and
its share (the quality run keeps what the others leave)."""


# --- main ---------------------------------------------------------------------------------


def run_section(name: str, section: Section, context: Context) -> dict[str, Any]:
    """Run one section; its figures, or its error (never raised: the others still run)."""
    started = time.perf_counter()
    progress(f"{name}: starts, {context.seconds_left():.0f} s budget")
    entry: dict[str, Any]
    try:
        entry = {"status": "ok", "result": section.run(context)}
        progress(f"{name}: done in {time.perf_counter() - started:.1f} s")
    except Exception as error:  # recorded in the report; the exit status says it failed
        entry = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        }
        progress(f"{name}: FAILED: {entry['error']}")
    finally:
        gc.collect()
        torch._dynamo.reset()  # compiled graphs of one section are no use to the next
        if context.device.type == "cuda":
            torch.cuda.empty_cache()
    entry["seconds"] = round(time.perf_counter() - started, 2)
    entry["budget_s"] = round(context.deadline - started, 2)
    return entry


def summary_line(name: str, entry: dict[str, Any]) -> str:
    """A one-line reading of a section's figures."""
    if entry["status"] != "ok":
        return f"{name}: {entry['error']}"
    result = entry["result"]
    if "mfu" in result:
        memory = result["peak_memory_gib"]
        return (
            f"{name}: {result['images_per_s']:.1f} images/s, MFU {100 * result['mfu']:.3g}% "
            f"of {result['peak_tflops']:g} TFLOP/s"
            + ("" if memory is None else f", peak {memory:.1f} GiB")
        )
    if "loader_wait_share" in result:
        return (
            f"{name}: waits {100 * result['loader_wait_share']:.1f}% of the time with "
            f"{result['loader_workers']} loader workers ({result['images_per_s']:.0f} images/s)"
        )
    if "knn_top1" in result:
        return (
            f"{name}: k-NN {result['knn_top1']:.2f}% after {result['epochs']} epoch(s); "
            f"random init {result['random_init_knn_top1']:.2f}%, "
            f"pixels {result['pixels_knn_top1']:.2f}%"
        )
    return f"{name}: ok"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder of gpu.json")
    parser.add_argument(
        "--smoke", action="store_true", help="every section tiny, on the CPU, in seconds"
    )
    parser.add_argument("--minutes", type=float, help="time budget (default 8; smoke 1)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_DENSE_BF16_TFLOPS,
        help="the GPU's dense bf16 peak, MFU's denominator (default: an H200's 989)",
    )
    parser.add_argument(
        "--loader-workers", type=int, help="loader processes (default: CPUs - 1; smoke 1)"
    )
    parser.add_argument(
        "--data", type=Path, help="a CIFAR-10 ImageFolder for input_bound and quality"
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=ARCHIVE,
        help="the CIFAR-10 JPEG archive unpacked when the quality run's data is missing",
    )
    parser.add_argument("--vit-batch", type=int, help="ViT-S images per step (default 128)")
    parser.add_argument("--resnet-batch", type=int, help="ResNet-18 images per step (256)")
    parser.add_argument(
        "--compile-backend",
        help="torch.compile backend of vit_s16_compiled (default inductor, as "
        "runtime.compile; smoke: eager, Dynamo's capture without code generation)",
    )
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these only")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "minutes": 1.0 if smoke else 8.0,
        "loader_workers": 1 if smoke else max(1, (os.cpu_count() or 2) - 1),
        "vit_batch": 4 if smoke else 128,
        "resnet_batch": 8 if smoke else 256,
        "compile_backend": "eager" if smoke else "inductor",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 < args.minutes <= 60:
        parser.error(f"--minutes {args.minutes}: must be in (0, 60]")
    if args.peak_tflops <= 0:
        parser.error(f"--peak-tflops {args.peak_tflops}: must be positive")
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke for the CPU check")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / "gpu.json"
    sections: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {
        "what": "one GPU of a node: training steps, loader, and a short quality run",
        "smoke": args.smoke,
        "command": " ".join(["python", "benchmarks/gpu.py", *(argv or sys.argv[1:])]),
        "settings": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
        "environment": quality.environment(),
        "sections": sections,
    }
    chosen = {name: SECTIONS[name] for name in args.only or SECTIONS}
    total = args.minutes * 60
    started = time.perf_counter()
    end = started + total - FINAL_MARGIN_S
    for name, section in chosen.items():
        now = time.perf_counter()
        deadline = end if section.share is None else min(now + section.share * total, end)
        sections[name] = run_section(name, section, Context(args, device, deadline, sections))
        write_json(path, report)
    failed = [name for name, entry in sections.items() if entry["status"] != "ok"]
    report["failed"] = failed
    report["total_s"] = round(time.perf_counter() - started, 1)
    write_json(path, report)
    for name, entry in sections.items():
        print(summary_line(name, entry))
    print(f"wrote {path} in {report['total_s']:.0f} s" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
