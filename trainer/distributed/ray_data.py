"""Training batches streamed through Ray Data (``data.loader: ray``).

The driver turns the training split into a Ray Dataset (`train_dataset`): one row per
image (``id``, ``label`` and the image's ``path``, or its decoded ``pixels``), in a
seeded random order, in small blocks whose order Ray reshuffles every epoch; a packed
split (`trainer.packing`) is read from its Parquet shards instead (encoded ``image``
bytes), the shards in a new order every epoch. `make_views` decodes and augments a
batch of rows in a Ray Data task, which Ray schedules on any node with a free CPU
(CPU-only nodes can augment for GPU workers). Ray Train splits the stream among the
workers (``streaming_split(equal=True)``: every image once per epoch, the same count
per worker), and each worker reads its shard through a `ShardLoader`, which yields the
``(views, labels)`` batches of the torch DataLoader path and mixes rows from different
blocks in a local shuffle buffer.

What differs from ``data.loader: torch``:

- The views are not reproducible bit for bit: Ray schedules blocks dynamically, so each
  batch's augmentation is seeded from the run's seed, its first image and fresh entropy.
- An image that cannot be decoded is replaced by a readable image of the same batch
  (with its label), flagged in the row's ``unreadable`` column and counted by the
  worker that receives it; the epoch metric ``unreadable_images`` sums the workers'
  counts, and a worker whose shard has more than ``data.max_unreadable_fraction``
  unreadable rows in one epoch fails the run. A file is counted once per epoch it is
  read in (the torch path counts each file once per run).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import ray.data
import torch
import torch.distributed as dist
from PIL import Image
from ray.data import DataIterator, RandomSeedConfig
from ray.data.extensions import ArrowTensorArray
from torch import Tensor

from trainer.augment import MultiCropAugmentation
from trainer.config import DataConfig, TrainConfig
from trainer.data import (
    ImageFiles,
    PackedImages,
    TensorImages,
    UnreadableImagesError,
    build_splits,
    decode_rgb,
    decode_rgb_bytes,
    mix_seed,
)
from trainer.object_store import is_object_uri, path_of, s3_filesystem

TRAIN_DATASET = "train"
"""The name of the training dataset in the TorchTrainer (``get_dataset_shard``)."""
ROWS_PER_BLOCK = 256
"""Images per Ray Data block: the unit reshuffled between epochs and handed to a task."""
VIEW_BATCH = 64
"""Images decoded and augmented per task call."""
SHUFFLE_BATCHES = 4
"""The worker's local shuffle buffer, in training batches."""

log = logging.getLogger(__name__)


def train_dataset(config: TrainConfig) -> ray.data.Dataset:
    """The training split of ``config.data`` as a Ray Dataset of multi-crop views.

    Each row, once `make_views` ran: ``id`` (the image's position in the split),
    ``label``, ``unreadable`` and ``view_0`` .. ``view_{V-1}`` (float32 (3, h, w), the
    global views first).
    """
    seed = config.runtime.seed
    train = build_splits(config.data, seed=seed).train
    if isinstance(train, PackedImages):
        rows = packed_rows(train, seed)
    elif isinstance(train, TensorImages | ImageFiles):
        table = source_table(train, seed)
        blocks = max(1, -(-table.num_rows // ROWS_PER_BLOCK))
        rows = ray.data.from_arrow(table, override_num_blocks=blocks)
    else:
        raise TypeError(f"data.loader 'ray' cannot read {type(train).__name__}")
    return rows.randomize_block_order(
        seed=RandomSeedConfig(seed=seed, reseed_after_execution=True)
    ).map_batches(
        functools.partial(make_views, augmentation=MultiCropAugmentation(config.data), seed=seed),
        batch_size=VIEW_BATCH,
        batch_format="numpy",
    )


def source_table(dataset: TensorImages | ImageFiles, seed: int) -> pa.Table:
    """One row per image of ``dataset``, in a seeded random order (so that blocks mix
    classes, whatever the order of the files): ``id``, ``label`` and ``path`` (files) or
    ``pixels`` (uint8 (3, H, W) images held in memory)."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    columns: dict[str, Any] = {"id": pa.array(order, pa.int64())}
    if isinstance(dataset, ImageFiles):
        columns["label"] = pa.array(np.asarray(dataset.labels, np.int64)[order])
        columns["path"] = pa.array([str(dataset.files[i]) for i in order], pa.string())
    else:
        columns["label"] = pa.array(dataset.labels.numpy()[order])
        columns["pixels"] = ArrowTensorArray.from_numpy(dataset.images.numpy()[order])
    return pa.table(columns)


def packed_rows(dataset: PackedImages, seed: int) -> ray.data.Dataset:
    """The rows of a packed split (`trainer.packing`), read from its Parquet shards:
    ``id`` (the position in the split), ``label`` and the encoded ``image``.

    Rows outside the split (a labelled pack's held-out images) are dropped as read, and
    the rest are shuffled over the cluster every epoch: a pack keeps its source's order
    (often by class or by folder), and batches drawn from a few consecutive rows would
    bias the batch statistics the objective relies on. That exchanges the image bytes
    once per epoch, which Ray Data streams.
    """
    shards = dataset.shards
    remote = is_object_uri(shards[0])
    read = ray.data.read_parquet(
        [path_of(shard) for shard in shards] if remote else shards,
        filesystem=s3_filesystem() if remote else None,
        columns=["index", "image"],
    )
    rows = np.asarray(dataset.rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    selected = read.map_batches(
        functools.partial(
            _select_rows,
            sorted_rows=rows[order],
            positions=order,
            labels=np.asarray(dataset.labels, dtype=np.int64)[order],
        ),
        batch_format="numpy",
    )
    return selected.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def _select_rows(
    batch: dict[str, np.ndarray], sorted_rows: np.ndarray, positions: np.ndarray, labels: np.ndarray
) -> dict[str, np.ndarray]:
    """The rows of ``batch`` whose pack ``index`` is in the split, as split rows."""
    where = np.searchsorted(sorted_rows, batch["index"]).clip(max=len(sorted_rows) - 1)
    inside = sorted_rows[where] == batch["index"]
    return {
        "id": positions[where[inside]],
        "label": labels[where[inside]],
        "image": batch["image"][inside],
    }


def make_views(
    batch: dict[str, np.ndarray], augmentation: MultiCropAugmentation, seed: int
) -> dict[str, Any]:
    """Decode (when needed) and augment one batch of rows into multi-crop views.

    ``augmentation`` is built once on the driver and travels with the task (not rebuilt
    from the config for every batch).

    Unreadable images are replaced by readable ones of the same batch, labels included,
    and flagged in ``unreadable``.

    Raises:
        UnreadableImagesError: no image of the batch can be decoded.
    """
    images, unreadable = _decode(batch)
    readable = np.flatnonzero(~unreadable)
    if readable.size == 0:
        raise UnreadableImagesError(
            f"none of the {len(unreadable)} images of a batch can be decoded, e.g. "
            f"{batch['path'][0] if 'path' in batch else batch['id'][0]}"
        )
    source = np.arange(len(unreadable))
    source[unreadable] = readable[np.arange(int(unreadable.sum())) % readable.size]
    ids = batch["id"]
    # Fresh entropy per call: the same image gets new views every epoch.
    generator = torch.Generator().manual_seed(
        mix_seed(seed, int(ids[0]), int.from_bytes(os.urandom(8), "little"))
    )
    chosen = [cast(Tensor, images[i]) for i in source]  # readable, by construction of source
    per_image = [augmentation(image, generator=generator) for image in chosen]
    views = {
        f"view_{v}": torch.stack([views[v] for views in per_image]).numpy()
        for v in range(augmentation.num_global_crops + augmentation.num_local_crops)
    }
    return {"id": ids, "label": batch["label"][source], "unreadable": unreadable, **views}


def _decode(batch: dict[str, np.ndarray]) -> tuple[list[Tensor | None], np.ndarray]:
    """The batch's images as uint8 (3, H, W) tensors (None where unreadable)."""
    if "pixels" in batch:
        pixels = [torch.from_numpy(np.ascontiguousarray(image)) for image in batch["pixels"]]
        return list(pixels), np.zeros(len(pixels), dtype=bool)
    images: list[Tensor | None] = []
    for row in range(len(batch["id"])):
        try:
            if "image" in batch:
                images.append(decode_rgb_bytes(batch["image"][row]))
            else:
                path = str(batch["path"][row])
                images.append(decode_rgb(path if is_object_uri(path) else Path(path)))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            where = batch["path"][row] if "path" in batch else f"row {batch['id'][row]}"
            log.warning("unreadable image %s (%s): replaced", where, error)
            images.append(None)
    return images, np.array([image is None for image in images], dtype=bool)


class ShardLoader:
    """A worker's training batches from its Ray Data shard, as the DataLoader's.

    Iterating yields ``(views, labels)`` (a list of ``num_views`` float32 (B, 3, h, w)
    tensors, int64 (B,)) for one epoch; ``len`` is the number of batches per epoch,
    which every worker shares (the split is equal, incomplete batches dropped).

    Args:
        shard: ``ray.train.get_dataset_shard(TRAIN_DATASET)``.
        config: the data section.
        dataset_size: images in the whole training split.
        world_size: training workers.
    """

    def __init__(
        self, shard: DataIterator, config: DataConfig, dataset_size: int, world_size: int
    ) -> None:
        self.shard = shard
        self.config = config
        self.shard_size = dataset_size // world_size
        self.steps = self.shard_size // config.batch_size
        if self.steps == 0:
            raise ValueError(
                f"{dataset_size} training images cannot fill one batch of "
                f"{config.batch_size} on each of {world_size} worker(s); lower "
                "data.batch_size or add images"
            )
        self.unreadable_count = 0
        """Unreadable images in the last epoch, over every worker's shard."""

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[list[Tensor], Tensor]]:
        views = range(self.config.num_views)
        for batch in self.batches():
            yield [batch[f"view_{v}"] for v in views], batch["label"]

    def batches(self) -> Iterator[dict[str, Tensor]]:
        """One epoch of the shard's batches as column tensors (``id`` included)."""
        unreadable = 0
        limit = self.config.max_unreadable_fraction * self.shard_size
        for batch in self.shard.iter_torch_batches(
            batch_size=self.config.batch_size,
            drop_last=True,
            device="cpu",
            local_shuffle_buffer_size=SHUFFLE_BATCHES * self.config.batch_size,
        ):
            unreadable += int(batch["unreadable"].sum())
            if unreadable > limit:
                raise UnreadableImagesError(
                    f"{unreadable} of the {self.shard_size} images of this worker's shard "
                    "cannot be decoded, more than data.max_unreadable_fraction "
                    f"({self.config.max_unreadable_fraction:g}) allows (their paths are in "
                    "the Ray Data task logs)"
                )
            yield batch
        self.unreadable_count = _sum_over_workers(unreadable)


def _sum_over_workers(count: int) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return count
    total = torch.tensor(count, dtype=torch.int64)
    dist.all_reduce(total)
    return int(total)
