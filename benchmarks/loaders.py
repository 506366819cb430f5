"""Training input: Ray Data (``data.loader: ray``) against the torch DataLoader.

Both loaders turn the same JPEG files (a CIFAR-10 ImageFolder subset) into the same
multi-crop views (the production augmentation), for 1 and 2 Ray Train workers, in one
local Ray cluster and one invocation of this script. Each Ray Train worker runs the
production loader of its kind (`trainer.data.make_train_loader` with one loader process
per worker, or `trainer.distributed.worker.ray_data_loader` over its Ray Data shard) and
consumes batches without a model, so the loaders are what is timed: each side has as
many decoding processes as workers (the cluster has 2 x workers CPUs; Ray Data's tasks
get the CPUs the workers leave free). The first epoch warms up (process start, Ray
Data's plan); the images of the next ``--epochs`` epochs, over every worker, divided by
the slowest worker's time are the throughput. Sides alternate ``--repeats`` times
(torch, ray, torch, ray) so that load from other processes hits both alike; the result
is the ratio ray / torch of the best rounds, with the medians beside it.

    python benchmarks/loaders.py [--images 4096] [--epochs 2] [--repeats 2]

Writes benchmarks/results/loaders.json (``--output`` elsewhere) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle

from trainer.distributed import environment

environment.ensure_ray_env()  # before Ray is imported (pins Train V2)

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
from cifar10 import ensure_data  # noqa: E402

from trainer.config import TrainConfig, validate_config  # noqa: E402
from trainer.data import build_splits, make_train_loader  # noqa: E402
from trainer.distributed.ray_data import TRAIN_DATASET, train_dataset  # noqa: E402
from trainer.distributed.worker import ray_data_loader  # noqa: E402
from trainer.loop import TrainLoader  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def bench_config(data: Path, images: int, loader: str) -> TrainConfig:
    """CIFAR-10 JPEGs, 32 px global and 16 px local crops (2 + 2 views), batches of 64."""
    return validate_config(
        {
            "name": "bench-loaders",
            "data": {
                "kind": "imagefolder",
                "path": str(data),
                "max_samples": images,
                "holdout_fraction": 0.02,
                "global_crop_size": 32,
                "local_crop_size": 16,
                "num_local_crops": 2,
                "batch_size": 64,
                "loader": loader,
                "loader_workers": 1 if loader == "torch" else 0,
            },
            "runtime": {"device": "cpu"},
        }
    )


def consume_loop(loop_config: dict[str, Any]) -> None:
    """One worker: iterate its loader for 1 + ``epochs`` epochs; record the timed ones."""
    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    splits = build_splits(config.data, seed=config.runtime.seed)
    loader: TrainLoader
    if config.data.loader == "ray":
        loader = ray_data_loader(config, world)(splits)
    else:
        loader = make_train_loader(
            splits.train, config.data, seed=config.runtime.seed, rank=rank, world_size=world
        )
    images, started = 0, 0.0
    for epoch in range(1 + loop_config["epochs"]):
        if epoch == 1:
            started, images = time.perf_counter(), 0
        if hasattr(loader, "sampler"):
            loader.sampler.set_epoch(epoch)
        for views, _labels in loader:
            images += views[0].shape[0]
    record = {"rank": rank, "images": images, "seconds": time.perf_counter() - started}
    Path(loop_config["out"], f"rank_{rank}.json").write_text(json.dumps(record))


def measure(config: TrainConfig, workers: int, epochs: int) -> dict[str, float]:
    """Images per second over every worker, with the loader of ``config``."""
    with tempfile.TemporaryDirectory() as out:
        trainer = ray.train.torch.TorchTrainer(
            consume_loop,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "epochs": epochs,
                "out": out,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=workers),
            run_config=ray.train.RunConfig(storage_path=str(Path(out) / "storage")),
            datasets={TRAIN_DATASET: train_dataset(config)}
            if config.data.loader == "ray"
            else None,
        )
        trainer.fit()
        records = [json.loads(path.read_text()) for path in Path(out).glob("rank_*.json")]
    images = sum(record["images"] for record in records)
    seconds = max(record["seconds"] for record in records)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096, help="training images")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after 1 warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of torch, ray")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", type=Path, default=None, help="an ImageFolder (CIFAR-10)")
    parser.add_argument("--output", type=Path, default=RESULTS / "loaders.json")
    args = parser.parse_args()
    data = args.data or ensure_data()

    results: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "images": args.images,
        "cpu_count": os.cpu_count(),
        "workers": {},
    }
    for workers in args.workers:
        ray.init(num_cpus=2 * workers, include_dashboard=False)
        try:
            runs: dict[str, list[dict[str, float]]] = {"torch": [], "ray": []}
            for round_ in range(args.repeats):
                for loader in ("torch", "ray"):
                    config = bench_config(data, args.images, loader)
                    run = measure(config, workers, args.epochs) | {
                        "load_average": os.getloadavg()[0]
                    }
                    runs[loader].append(run)
                    print(
                        f"workers={workers} round={round_} {loader:>5}: "
                        f"{run['images_per_s']:8.1f} images/s",
                        flush=True,
                    )
        finally:
            ray.shutdown()
        best = {name: max(run["images_per_s"] for run in runs[name]) for name in runs}
        median = {
            name: statistics.median(run["images_per_s"] for run in runs[name]) for name in runs
        }
        results["workers"][str(workers)] = {
            "runs": runs,
            "best_images_per_s": best,
            "ratio_best": best["ray"] / best["torch"],
            "ratio_median": median["ray"] / median["torch"],
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"{'workers':>8} {'torch img/s':>12} {'ray img/s':>10} {'ray/torch':>10}")
    for workers, entry in results["workers"].items():
        best = entry["best_images_per_s"]
        print(f"{workers:>8} {best['torch']:12.1f} {best['ray']:10.1f} {entry['ratio_best']:10.2f}")


if __name__ == "__main__":
    main()
