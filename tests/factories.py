"""Config factories for tests: tiny runs that train in seconds on two CPU cores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig, validate_config

torch.set_num_threads(2)


def tiny_config(name: str = "klssl-test", **sections: dict[str, Any]) -> TrainConfig:
    """A digits run small enough for unit tests; ``sections`` override fields by section."""
    raw: dict[str, Any] = {
        "name": name,
        "data": {
            "kind": "digits",
            "max_samples": 256,
            "holdout_fraction": 0.2,
            "global_crop_size": 16,
            "local_crop_size": 8,
            "num_local_crops": 2,
            "batch_size": 32,
        },
        "model": {
            "backbone": "vit_tiny_patch16_224",
            "patch_size": 4,
            "backbone_kwargs": {"depth": 1},
            "head_hidden_dim": 64,
            "head_bottleneck_dim": 32,
        },
        "objective": {"num_clusters": 32},
        "schedule": {"epochs": 2, "warmup_epochs": 1},
        "eval": {"knn_k": [5, 20]},
        "runtime": {"log_every_steps": 2},
    }
    for section, fields in sections.items():
        raw.setdefault(section, {}).update(fields)
    return validate_config(raw)


def save_image(image: torch.Tensor, path: Path) -> None:
    """Write a uint8 (C, H, W) tensor (C = 1, 3 or 4) as an image file, by its suffix."""
    from PIL import Image

    pixels = image.permute(1, 2, 0).numpy()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
    picture = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jpg", ".jpeg"):
        picture.save(path, quality=95)
    else:
        picture.save(path)


@contextlib.contextmanager
def ray_cluster(*node_cpus: int) -> Iterator[Any]:
    """A Ray cluster of one node per entry of ``node_cpus`` (CPUs each), connected to.

    Started with Ray's ``Cluster`` utility: the nodes inherit this process's environment
    (so their workers do too), and unlike a local ``ray.init()`` it leaves no
    ``RAY_AUTH_MODE`` behind for the job processes of later tests.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": node_cpus[0]})
    for cpus in node_cpus[1:]:
        nodes.add_node(num_cpus=cpus)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
