"""All-reduce cost on this machine: gradients vs the K-vector of cluster statistics.

Two (or ``--workers``) processes in a gloo group on loopback time ``dist.all_reduce`` of

- the student's gradients: P fp32 values for the networks of the benchmark configs
  (what DDP all-reduces every step, in buckets, overlapped with the backward pass);
- the cluster statistics of `trainer.statistics.ClusterStatistics.measure`: 2K + 2 fp32
  values, one collective per step on the critical path (for K = 256 ... 65536);
- one Sinkhorn iteration's K float64 row sums (``objective.mode: sinkhorn``).

    python benchmarks/allreduce.py [--workers 2] [--rounds 20]

Writes ``benchmarks/results/allreduce.json`` and prints a table (median ms per call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.config import ModelConfig
from trainer.models import build_network

RESULTS = Path(__file__).resolve().parent / "results"
CLUSTERS = (256, 4096, 65536)
NETWORKS = {
    "vit_tiny(depth 2)+head(256,64,K=256)": (
        ModelConfig(
            backbone="vit_tiny_patch16_224",
            patch_size=4,
            backbone_kwargs={"depth": 2},
            head_hidden_dim=256,
            head_bottleneck_dim=64,
        ),
        256,
        16,
    ),
    "resnet18(cifar)+head(2048,256,K=4096)": (ModelConfig(backbone="resnet18"), 4096, 32),
}


def timed(tensor: torch.Tensor, rounds: int) -> float:
    """Median milliseconds of one all-reduce of ``tensor`` (after 3 warm-up calls)."""
    for _ in range(3):
        dist.all_reduce(tensor)
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def worker(rank: int, world: int, rounds: int, port: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for name, (config, k, size) in NETWORKS.items():
        params = sum(
            p.numel() for p in build_network(config, k, size).parameters() if p.requires_grad
        )
        ms = timed(torch.zeros(params), rounds)
        rows.append({"what": f"gradients {name}", "values": params, "bytes": 4 * params, "ms": ms})
    for k in CLUSTERS:
        ms = timed(torch.zeros(2 * k + 2), rounds)
        rows.append(
            {"what": f"statistics K={k}", "values": 2 * k + 2, "bytes": 8 * k + 8, "ms": ms}
        )
        ms = timed(torch.zeros(k, dtype=torch.float64), rounds)
        rows.append({"what": f"sinkhorn row sums K={k}", "values": k, "bytes": 8 * k, "ms": ms})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--output", type=Path, default=RESULTS / "allreduce.json")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=worker, args=(rank, args.workers, args.rounds, args.port, queue))
        for rank in range(args.workers)
    ]
    for process in processes:
        process.start()
    rows = queue.get(timeout=600)
    for process in processes:
        process.join()
    report = {
        "backend": "gloo (TCP loopback)",
        "workers": args.workers,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['what']:<50} {row['bytes'] / 1e6:10.3f} MB {row['ms']:9.3f} ms")


if __name__ == "__main__":
    main()
