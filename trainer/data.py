"""Datasets, their train / held-out split, and the loaders that turn them into views.

Five built-in kinds (docs/design.md section 3.1), none of which downloads anything:

- ``digits``: scikit-learn's shipped 8x8 digits, grey replicated to RGB (kept at 8x8;
  the crops upscale).
- ``synthetic``: generated images with a known cluster structure (`make_synthetic`).
- ``imagefolder``: a folder per class (``root/<class>/<image>``, or
  ``root/train/<class>/<image>``), decoded lazily with Pillow.
- ``cifar10``: the CIFAR-10 binary release (``data_batch_{1..5}.bin``, optional
  ``test_batch.bin``).
- ``files``: own images, labels optional: under a folder, by a glob or listed in a
  manifest (`trainer.manifests`), or packed into Parquet shards (`trainer.packing`).

Every dataset item is ``(uint8 (3, H, W) tensor, int label)``. The held-out split is the
last ``holdout_fraction`` of every class (sorted file order for folders, a seeded order
for in-memory sets; at least one image per class), or CIFAR-10's test batch when present;
it is never trained on and serves the labelled k-NN evaluation. The training loader
yields multi-crop views (`trainer.augment.MultiCropAugmentation`), or the images and
their views' parameters for `trainer.augment_device.DeviceMultiCrop`; the evaluation
loader one deterministic view per image (`trainer.augment.eval_transform`).
"""

from __future__ import annotations

import io
import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from trainer.augment import MultiCropAugmentation, eval_transform
from trainer.augment_device import ImageBatch, view_table
from trainer.config import DataConfig, DatasetKind, DataSource
from trainer.manifests import IMAGE_EXTENSIONS, find_image_files, is_image
from trainer.object_store import is_object_uri, read_object

if TYPE_CHECKING:  # pyarrow loads only for packed data (a GPU node may train without it)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.packing import PackLayout

Item = tuple[Tensor, int]
"""One image, uint8 (3, H, W), and its class index (`UNLABELLED` when it has none)."""

log = logging.getLogger(__name__)

SPLIT_FOLDERS = frozenset({"train", "val", "valid", "validation", "test"})
"""Subfolders that mark a root holding splits rather than classes (``train`` is used)."""
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32
"""Bytes per CIFAR-10 binary record: the label, then the R, G and B planes of 32x32."""


@dataclass
class DataSplits:
    """A dataset split into the images to train on and the labelled held-out images."""

    train: TensorImages | EncodedImages
    holdout: TensorImages | EncodedImages
    num_classes: int
    class_names: list[str]


class TensorImages(Dataset[Item]):
    """In-memory images: uint8 (N, 3, H, W) and int64 (N,) labels.

    ``ids`` (int64 (N,), default 0..N-1) are the images' positions in the full set they
    came from, kept by `subset`, so splits can be told apart and traced back.
    """

    def __init__(self, images: Tensor, labels: Tensor, ids: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.ids = torch.arange(images.shape[0]) if ids is None else ids

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Item:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Sequence[int]) -> TensorImages:
        """The images at ``indices``, in that order (copied, so the rest can be freed)."""
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return TensorImages(self.images[index].contiguous(), self.labels[index], self.ids[index])


def decode_rgb(path: Path | str) -> Tensor:
    """The image file at ``path`` (or ``s3://`` URI) as a uint8 RGB (3, H, W) tensor.

    Pillow decodes (torchvision's decoders are deprecated); ``convert("RGB")`` turns grey,
    palette and alpha images into three channels. An image over Pillow's pixel limit
    (a decompression bomb) raises rather than exhausting memory.

    Raises:
        OSError, ValueError, PIL.Image.DecompressionBombError: the file is not an image
            Pillow can decode.
    """
    return _channels_first(
        rgb_pixels(io.BytesIO(read_object(path)) if isinstance(path, str) else path)
    )


def decode_rgb_bytes(data: bytes) -> Tensor:
    """An encoded image (a file's bytes) decoded exactly as `decode_rgb` decodes files."""
    return _channels_first(rgb_pixels(io.BytesIO(data)))


def rgb_pixels(source: Path | io.BytesIO) -> np.ndarray:
    """The decoding step of `decode_rgb` alone (Pillow, no torch): uint8 (H, W, 3).

    Raises:
        OSError, ValueError, PIL.Image.DecompressionBombError: not an image Pillow
            can decode.
    """
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def _channels_first(pixels: np.ndarray) -> Tensor:
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


class UnreadableImagesError(ValueError):
    """More images cannot be decoded than ``data.max_unreadable_fraction`` allows."""


class EncodedImages(Dataset[Item], ABC):
    """Images stored encoded (files, packed bytes), decoded on access to uint8 RGB
    (3, H, W) tensors, with one policy for images that cannot be decoded.

    Such an image is logged with its name, flagged in ``unreadable`` and replaced by the
    next readable image (its pixels and its label), so batches stay full and every label
    stays true. The flags live in shared memory, one per image: loader worker processes
    and later epochs count each image once. When more than ``max_unreadable_fraction``
    of the images are flagged, the access that finds one more raises
    `UnreadableImagesError`: nothing is dropped silently.
    """

    def __init__(self, size: int, max_unreadable_fraction: float) -> None:
        self.max_unreadable_fraction = max_unreadable_fraction
        self.unreadable = torch.zeros(size, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.unreadable)

    def __getitem__(self, index: int) -> Item:
        size = len(self)
        for offset in range(size):
            candidate = (index + offset) % size
            if not self.unreadable[candidate]:
                image = self._decode(candidate)
                if image is not None:
                    return image, self._label(candidate)
        raise UnreadableImagesError(f"none of the {size} images can be decoded")

    @property
    def unreadable_count(self) -> int:
        """Images found unreadable so far (by any loader worker)."""
        return int(self.unreadable.sum())

    @abstractmethod
    def subset(self, indices: Sequence[int]) -> EncodedImages:
        """The images at ``indices``, in that order (with flags of their own)."""

    @abstractmethod
    def _read(self, index: int) -> Tensor:
        """Image ``index`` decoded (OSError, ValueError, DecompressionBombError: it cannot
        be; anything else is not about the image and is not caught)."""

    @abstractmethod
    def _label(self, index: int) -> int:
        """The label of image ``index``."""

    @abstractmethod
    def _name(self, index: int) -> str:
        """Image ``index`` as the logs and errors name it."""

    def _decode(self, index: int) -> Tensor | None:
        try:
            return self._read(index)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            self.unreadable[index] = True
            count, total, name = self.unreadable_count, len(self), self._name(index)
            log.warning("unreadable image %s (%s): replaced, %d of %d", name, error, count, total)
            if count > self.max_unreadable_fraction * total:
                raise UnreadableImagesError(
                    f"{count} of {total} images cannot be decoded, more than "
                    f"data.max_unreadable_fraction ({self.max_unreadable_fraction:g}) allows; "
                    f"the latest: {name}: {error}"
                ) from error
            return None


class ImageFiles(EncodedImages):
    """Image files (paths, or ``s3://`` URIs) decoded on access (`EncodedImages`)."""

    def __init__(
        self,
        files: Sequence[Path | str],
        labels: Sequence[int],
        max_unreadable_fraction: float = 0.0,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        super().__init__(len(files), max_unreadable_fraction)
        self.files = list(files)
        self.labels = list(labels)

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        """The files at ``indices``, in that order (with flags of their own)."""
        return ImageFiles(
            [self.files[i] for i in indices],
            [self.labels[i] for i in indices],
            self.max_unreadable_fraction,
        )

    def _read(self, index: int) -> Tensor:
        return decode_rgb(self.files[index])

    def _label(self, index: int) -> int:
        return self.labels[index]

    def _name(self, index: int) -> str:
        return str(self.files[index])


class PackReadError(RuntimeError):
    """A shard of a pack cannot be read: the pack is damaged, not one image."""


class PackedImages(EncodedImages):
    """The images of a packed dataset (`trainer.packing`), decoded on access from their
    bytes (`EncodedImages`: the same policy for undecodable ones as `ImageFiles`).

    Holds only the pack's layout (labels and row group positions, a few bytes per row)
    and the pack ``index`` of each of its rows. The image bytes are read a row group at
    a time from shards each process opens itself (loader workers included: open files
    and cached row groups are never pickled), keeping the last `CACHED_ROW_GROUPS` row
    groups and `OPEN_SHARDS` shards (a large pack must not exhaust file descriptors).

    Attributes for readers of the shards themselves (e.g. Ray Data): ``shards`` (paths or
    ``s3://`` URIs, in order), ``rows`` (the pack ``index`` of each item, in order),
    ``labels`` (each item's label) and ``class_names``.
    """

    CACHED_ROW_GROUPS = 4
    OPEN_SHARDS = 16

    def __init__(
        self,
        layout: PackLayout,
        rows: Sequence[int] | np.ndarray | None = None,
        max_unreadable_fraction: float = 0.0,
    ) -> None:
        everything = np.arange(layout.first, layout.first + len(layout), dtype=np.int64)
        chosen = everything if rows is None else np.asarray(rows, dtype=np.int64)
        outside = (chosen < layout.first) | (chosen >= layout.first + len(layout))
        if chosen.ndim != 1 or outside.any():
            raise ValueError(
                f"rows must be pack indices in [{layout.first}, {layout.first + len(layout)})"
            )
        super().__init__(len(chosen), max_unreadable_fraction)
        self.layout = layout
        self._rows = chosen
        self._open: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], pa.ChunkedArray] = OrderedDict()
        self._pid = os.getpid()

    @property
    def shards(self) -> list[str]:
        return list(self.layout.shards)

    @property
    def rows(self) -> list[int]:
        return [int(row) for row in self._rows]

    @property
    def labels(self) -> list[int]:
        return [int(label) for label in self.layout.labels[self._rows - self.layout.first]]

    @property
    def class_names(self) -> list[str]:
        return list(self.layout.class_names)

    def subset(self, indices: Sequence[int]) -> PackedImages:
        """The items at ``indices``, in that order (with flags of their own)."""
        chosen = self._rows[np.asarray(list(indices), dtype=np.int64)]
        return PackedImages(self.layout, chosen, self.max_unreadable_fraction)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"], state["_groups"] = OrderedDict(), OrderedDict()
        return state

    def _read(self, index: int) -> Tensor:
        shard, group, offset = self.layout.locate(int(self._rows[index]))
        data = self._column(shard, group, "image")[offset].as_py()
        return decode_rgb_bytes(data)

    def _label(self, index: int) -> int:
        return int(self.layout.labels[self._rows[index] - self.layout.first])

    def _name(self, index: int) -> str:
        row = int(self._rows[index])
        shard, group, offset = self.layout.locate(row)
        where = f"row {row} of {self.layout.shards[shard]}"
        try:
            return f"{self._column(shard, group, 'path')[offset].as_py()} ({where})"
        except PackReadError:
            return where

    def _column(self, shard: int, group: int, column: str) -> pa.ChunkedArray:
        """One column of a row group (image columns cached), read by this process."""
        if self._pid != os.getpid():  # a forked loader worker: its own files and cache
            self._open, self._groups, self._pid = OrderedDict(), OrderedDict(), os.getpid()
        key = (shard, group)
        if column == "image" and key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        from pyarrow import ArrowException

        path = self.layout.shards[shard]
        try:
            values = self._shard(shard).read_row_group(group, columns=[column]).column(column)
        except (OSError, ArrowException) as error:
            raise PackReadError(
                f"pack shard {path}: row group {group} cannot be read: {error}"
            ) from error
        if column == "image":
            self._groups[key] = values
            while len(self._groups) > self.CACHED_ROW_GROUPS:
                self._groups.popitem(last=False)
        return values

    def _shard(self, shard: int) -> pq.ParquetFile:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        from trainer.packing import open_shard

        self._open[shard] = open_shard(self.layout.shards[shard])
        while len(self._open) > self.OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return self._open[shard]


def build_splits(config: DataSource, seed: int) -> DataSplits:
    """Load the dataset of ``config.kind`` and split it into train and held-out images.

    Args:
        config: the data section (kind, path, holdout_fraction, max_samples, and the
            synthetic_* fields for ``synthetic``).
        seed: seeds the synthetic images and the order in which in-memory sets are split.

    Returns:
        The splits; ``max_samples`` caps the training split (class-balanced).

    Raises:
        ValueError: an unknown kind, or a path without usable data (the message names
            the path and what is wrong).
    """
    builders: dict[DatasetKind, Callable[[DataSource, int], DataSplits]] = {
        "digits": _digits,
        "synthetic": _synthetic,
        "imagefolder": _imagefolder,
        "cifar10": _cifar10,
        "files": _files,
    }
    builder = builders.get(config.kind)
    if builder is None:
        raise ValueError(f"unknown dataset kind {config.kind!r}; valid: {', '.join(builders)}")
    return builder(config, seed)


def _required_path(config: DataSource) -> Path:
    if config.path is None:
        raise ValueError(f"data.path is required for dataset kind {config.kind!r}")
    return Path(config.path).expanduser()


# --- in-memory kinds ----------------------------------------------------------------------


def _digits(config: DataSource, seed: int) -> DataSplits:
    from sklearn.datasets import load_digits  # shipped with scikit-learn, no download

    digits = load_digits()
    # Values 0..16 -> 0..255; one grey plane replicated to RGB.
    grey = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8))
    images = grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    names = [str(name) for name in digits.target_names]
    return _split_in_memory(TensorImages(images, labels), names, config, seed)


def _synthetic(config: DataSource, seed: int) -> DataSplits:
    images, labels = make_synthetic(
        config.synthetic_classes, config.synthetic_samples, config.synthetic_image_size, seed
    )
    names = [f"cluster_{k}" for k in range(config.synthetic_classes)]
    return _split_in_memory(TensorImages(images, labels), names, config, seed)


def make_synthetic(
    num_classes: int, num_samples: int, size: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Images with a known cluster structure, deterministic given ``seed``.

    Each class has a prototype: a smooth random colour pattern (a 4x4 grid of random RGB
    values, bicubically upsampled) plus a class colour. A sample is its class prototype
    translated circularly by up to half the side in each direction, with a random gain
    and offset, a smooth random distractor pattern of its own and pixel noise, squashed
    into 0..255. Classes are balanced. The translation makes raw pixels a weak signal (a
    20-NN classifier on pixels reaches ~60% for 10 classes at 32 px, chance 10%), while
    a network trained with random crops learns the class patterns.

    Returns:
        uint8 (N, 3, size, size) images and int64 (N,) labels.
    """
    generator = torch.Generator().manual_seed(seed)

    def smooth(count: int, cells: int) -> Tensor:
        grid = torch.randn(count, 3, cells, cells, generator=generator)
        return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)

    prototypes = smooth(num_classes, 4) + 0.6 * torch.randn(
        num_classes, 3, 1, 1, generator=generator
    )
    labels = (torch.arange(num_samples) % num_classes)[
        torch.randperm(num_samples, generator=generator)
    ]
    reach = size // 2
    shifts = torch.randint(-reach, reach + 1, (num_samples, 2), generator=generator).tolist()
    images = torch.stack(
        [
            torch.roll(prototypes[label], (dy, dx), dims=(1, 2))
            for label, (dy, dx) in zip(labels.tolist(), shifts, strict=True)
        ]
    )
    gain = 0.6 + 0.8 * torch.rand(num_samples, 1, 1, 1, generator=generator)
    offset = 0.5 * torch.randn(num_samples, 1, 1, 1, generator=generator)
    noise = 0.15 * torch.randn(num_samples, 3, size, size, generator=generator)
    images = gain * images + offset + smooth(num_samples, 3) + noise
    return (torch.sigmoid(images) * 255).round().to(torch.uint8), labels


def _split_in_memory(
    dataset: TensorImages, names: list[str], config: DataSource, seed: int
) -> DataSplits:
    # A seeded order within each class, so the held-out images are a random sample.
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    train, holdout = _per_class_split(
        [int(dataset.labels[i]) for i in order], order, config.holdout_fraction
    )
    train = _cap(train, [int(dataset.labels[i]) for i in train], config.max_samples)
    return DataSplits(dataset.subset(train), dataset.subset(holdout), len(names), names)


# --- imagefolder --------------------------------------------------------------------------


def _imagefolder(config: DataSource, seed: int) -> DataSplits:
    del seed  # the split follows the sorted file order, as documented
    root = find_class_root(_required_path(config))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.rglob("*") if is_image(p) and p.is_file())
        if not images:
            empty.append(class_dir.name)
        files += images
        labels += [label] * len(images)
    check_confined(root, [*class_dirs, *files])
    if not files:
        raise ValueError(
            f"imagefolder {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
            f"{len(class_dirs)} class folder(s)"
        )
    if empty:
        raise ValueError(f"imagefolder {root}: class folder(s) without images: {', '.join(empty)}")
    train, holdout = _per_class_split(labels, list(range(len(files))), config.holdout_fraction)
    train = _cap(train, [labels[i] for i in train], config.max_samples)
    dataset = ImageFiles(files, labels, config.max_unreadable_fraction)
    names = [p.name for p in class_dirs]
    return DataSplits(dataset.subset(train), dataset.subset(holdout), len(names), names)


# --- files --------------------------------------------------------------------------------


def _files(config: DataSource, seed: int) -> DataSplits:
    """Images anywhere under a folder (or a glob), listed in a manifest, or packed.

    Without labels everything is trained on and nothing is held out (evaluation needs
    ``eval.data``); with labels (a manifest's, a labelled pack's) the split is per class,
    as for imagefolder.
    """
    del seed  # the split follows the sorted (or listed, or packed) order
    if config.path is None:
        raise ValueError("data.path is required for dataset kind 'files'")
    from trainer.packing import is_pack  # pyarrow loads only for kind files

    if is_pack(config.path):
        return _packed(config)
    found = find_image_files(config.path, config.pattern)
    if found.root is not None:  # local files; object keys were checked when listed
        check_confined(found.root, [Path(file) for file in found.files], what="files")
    dataset = ImageFiles(found.files, found.labels, config.max_unreadable_fraction)
    return _split_listed(dataset, found.labels, found.class_names, config)


def _packed(config: DataSource) -> DataSplits:
    """A packed dataset (`trainer.packing`): a folder of shards, or one shard."""
    assert config.path is not None  # checked by the caller
    if config.pattern is not None:
        raise ValueError(f"data.pattern applies to a folder of images; {config.path} is a pack")
    from trainer.packing import read_pack

    layout = read_pack(config.path)
    location = str(config.path)
    if not is_object_uri(location) and Path(location).is_dir():
        check_confined(Path(location), [Path(shard) for shard in layout.shards], what="pack")
    dataset = PackedImages(layout, max_unreadable_fraction=config.max_unreadable_fraction)
    return _split_listed(dataset, layout.labels.tolist(), layout.class_names, config)


def _split_listed(
    dataset: EncodedImages, labels: list[int], names: list[str], config: DataSource
) -> DataSplits:
    """Unlabelled: everything to train on, nothing held out; labelled: the last
    ``holdout_fraction`` of every class in listed order held out."""
    if not names:
        train = _cap(list(range(len(dataset))), labels, config.max_samples)
        return DataSplits(dataset.subset(train), dataset.subset([]), 0, [])
    train, holdout = _per_class_split(labels, list(range(len(dataset))), config.holdout_fraction)
    train = _cap(train, [labels[i] for i in train], config.max_samples)
    return DataSplits(dataset.subset(train), dataset.subset(holdout), len(names), names)


def check_confined(root: Path, entries: list[Path], what: str = "imagefolder") -> None:
    """Refuse entries (class folders, images) that resolve outside ``root``.

    The data path itself was confined by `trainer.preflight`; a symlink inside it must
    not lead elsewhere on the host.

    Raises:
        ValueError: naming up to five escaping entries and how many there are.
    """
    inside = root.resolve()
    escaping = [entry for entry in entries if not entry.resolve().is_relative_to(inside)]
    if escaping:
        shown = ", ".join(
            str(entry.relative_to(root)) if entry.is_relative_to(root) else str(entry)
            for entry in escaping[:5]
        )
        raise ValueError(
            f"{what} {root}: {len(escaping)} entries resolve outside the data folder "
            f"({shown}); copy the data in or point data.path at it"
        )


def find_class_root(path: Path) -> Path:
    """The folder whose subfolders are the classes: ``path`` or ``path/train``.

    ``path/train`` is used when every subfolder of ``path`` is a split name
    (`SPLIT_FOLDERS`), e.g. the unpacked CIFAR-10 JPEG archive ``train/<class>/...``.

    Raises:
        ValueError: ``path`` is not a folder, is empty, or has no subfolders.
    """
    if not path.is_dir():
        raise ValueError(f"imagefolder path {path} is not a folder")
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise ValueError(f"imagefolder {path} is empty (expected {path}/<class>/<image>)")
    subdirs = {p.name for p in entries if p.is_dir()}
    if not subdirs:
        raise ValueError(
            f"imagefolder {path} has no class subfolders (expected {path}/<class>/<image>, "
            f"found {len(entries)} file(s))"
        )
    if "train" in subdirs and subdirs <= SPLIT_FOLDERS:
        return find_class_root(path / "train")
    return path


# --- cifar10 ------------------------------------------------------------------------------


def _cifar10(config: DataSource, seed: int) -> DataSplits:
    folder = find_cifar10_folder(_required_path(config))
    train_images, train_labels = read_cifar10_batches(
        [folder / name for name in CIFAR10_TRAIN_FILES]
    )
    names = _cifar10_names(folder)
    test_file = folder / CIFAR10_TEST_FILE
    if not test_file.exists():
        return _split_in_memory(TensorImages(train_images, train_labels), names, config, seed)
    test_images, test_labels = read_cifar10_batches([test_file])
    train = list(range(len(train_labels)))
    train = _cap(train, train_labels.tolist(), config.max_samples)
    return DataSplits(
        TensorImages(train_images, train_labels).subset(train),
        TensorImages(test_images, test_labels),
        len(names),
        names,
    )


def find_cifar10_folder(path: Path) -> Path:
    """The folder holding the CIFAR-10 binary batches: ``path`` or its
    ``cifar-10-batches-bin`` subfolder.

    Raises:
        ValueError: a training batch file is missing (the message lists which).
    """
    if not path.is_dir():
        raise ValueError(f"cifar10 path {path} is not a folder")
    nested = path / "cifar-10-batches-bin"
    folder = nested if nested.is_dir() and not (path / CIFAR10_TRAIN_FILES[0]).exists() else path
    missing = [name for name in CIFAR10_TRAIN_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"cifar10 folder {folder} lacks the binary batch file(s) {', '.join(missing)} "
            "(expected the CIFAR-10 binary release: data_batch_1.bin .. data_batch_5.bin)"
        )
    return folder


def read_cifar10_batches(files: Sequence[Path]) -> tuple[Tensor, Tensor]:
    """Read CIFAR-10 binary batch files into uint8 (N, 3, 32, 32) images, int64 labels."""
    images, labels = [], []
    for file in files:
        raw = np.fromfile(file, dtype=np.uint8)
        if raw.size == 0 or raw.size % CIFAR10_RECORD:
            raise ValueError(
                f"cifar10 file {file} has {raw.size} bytes, not a positive multiple of the "
                f"{CIFAR10_RECORD}-byte record (label + 3x32x32)"
            )
        records = raw.reshape(-1, CIFAR10_RECORD)
        if records[:, 0].max() >= len(CIFAR10_CLASSES):
            raise ValueError(f"cifar10 file {file} has labels >= {len(CIFAR10_CLASSES)}")
        labels.append(torch.from_numpy(records[:, 0].astype(np.int64)))
        images.append(torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()))
    return torch.cat(images), torch.cat(labels)


def _cifar10_names(folder: Path) -> list[str]:
    meta = folder / "batches.meta.txt"
    if meta.is_file():
        names = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
        if len(names) == len(CIFAR10_CLASSES):
            return names
    return list(CIFAR10_CLASSES)


# --- splitting ----------------------------------------------------------------------------


def _per_class_split(
    labels: Sequence[int], order: Sequence[int], fraction: float
) -> tuple[list[int], list[int]]:
    """Indices (from ``order``) to train on and to hold out: the last ``fraction`` of
    every class in that order, at least one image, and at least one left to train on
    when the class has two or more."""
    by_class: dict[int, list[int]] = {}
    for label, index in zip(labels, order, strict=True):
        by_class.setdefault(label, []).append(index)
    train: list[int] = []
    holdout: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        count = max(1, round(len(members) * fraction))
        if len(members) > 1:
            count = min(count, len(members) - 1)
        train += members[: len(members) - count]
        holdout += members[len(members) - count :]
    return train, holdout


def _cap(indices: list[int], labels: Sequence[int], limit: int | None) -> list[int]:
    """At most ``limit`` of ``indices``, class-balanced: the first of each class in turn."""
    if limit is None or limit >= len(indices):
        return indices
    by_class: dict[int, list[int]] = {}
    for label, index in zip(labels, indices, strict=True):
        by_class.setdefault(label, []).append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    kept: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        for queue in queues:
            if depth < len(queue) and len(kept) < limit:
                kept.append(queue[depth])
    position = {index: rank for rank, index in enumerate(indices)}
    return sorted(kept, key=position.__getitem__)


# --- loaders ------------------------------------------------------------------------------


class EpochSampler(DistributedSampler[Any]):
    """A `DistributedSampler` that yields ``(epoch, index)`` pairs and can start mid-epoch.

    The epoch travels with each index to the dataset (also into worker processes, which
    never see ``set_epoch`` calls), so a view's randomness can be a function of
    (seed, epoch, index) alone: the same views whatever the number of loader workers or
    the order in which they finish.

    An epoch is one permutation of the dataset (seeded by seed + epoch, as
    `DistributedSampler`'s), dealt to the ranks in turn. After b batches of B on each of
    W ranks the images trained on are exactly the permutation's first b * B * W, whatever
    W is; `set_position` skips them, which is how a mid-epoch checkpoint resumes (the
    loader's state is that one number, the checkpoint's ``epoch_samples``). Without a
    position the indices are `DistributedSampler`'s own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.drop_last:
            raise ValueError("EpochSampler deals whole rounds only: build it with drop_last")
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, consumed: int) -> None:
        """Start ``epoch`` after the first ``consumed`` images of its permutation."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if not 0 <= consumed <= size:
            raise ValueError(f"position {consumed} is outside an epoch of {size} images")
        super().set_epoch(epoch)
        self.start = consumed

    def _order(self) -> list[int]:
        size = len(self.dataset)  # type: ignore[arg-type]
        if not self.shuffle:
            return list(range(size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(size, generator=generator).tolist()

    def _remaining(self) -> int:
        """Images left to each rank (the permutation's tail, dropped to a multiple of W)."""
        return (len(self.dataset) - self.start) // self.num_replicas  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        dealt = self._order()[self.start :][: self._remaining() * self.num_replicas]
        for index in dealt[self.rank :: self.num_replicas]:
            yield self.epoch, index

    def __len__(self) -> int:
        return self._remaining()


class _KeyedImages(Dataset[Any]):
    """Images for ``(epoch, index)`` keys, each with a generator seeded by
    (seed, epoch, index): the base of `MultiCropViews` and `MultiCropImages`.

    Args:
        dataset: items ``(uint8 (3, H, W), label)``.
        augmentation: makes (or samples the parameters of) the views.
        seed: with the epoch and the index, seeds the generator of each item's views.
    """

    def __init__(
        self, dataset: Dataset[Item], augmentation: MultiCropAugmentation, seed: int
    ) -> None:
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def item(self, key: tuple[int, int]) -> tuple[Tensor, int, torch.Generator]:
        """The image and label of ``key`` and the generator of its views."""
        epoch, index = key
        image, label = self.dataset[index]
        return image, label, torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))


class MultiCropViews(_KeyedImages):
    """``(views, label)`` for ``(epoch, index)`` keys: the multi-crop views of an image."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[Tensor], int]:
        image, label, generator = self.item(key)
        return self.augmentation(image, generator=generator), label


class MultiCropImages(_KeyedImages):
    """``(image, label, view table)`` for ``(epoch, index)`` keys: an image and the
    parameters of its views (`trainer.augment_device.view_table`), drawn from the
    generator `MultiCropViews` seeds for the same key, so the device renders the views
    the CPU pipeline would make.
    """

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, Tensor]:
        image, label, generator = self.item(key)
        params = self.augmentation.sample(image.shape[-2], image.shape[-1], generator)
        return image, label, view_table(params)


def collate_images(items: Sequence[tuple[Tensor, int, Tensor]]) -> tuple[ImageBatch, Tensor]:
    """``(ImageBatch, labels)`` of `MultiCropImages` items: the images stacked when they
    share a size, else kept as a list (own photos differ in size)."""
    images = [image for image, _, _ in items]
    same_size = len({tuple(image.shape) for image in images}) == 1
    return (
        ImageBatch(
            torch.stack(images) if same_size else images,
            torch.stack([table for _, _, table in items]),
        ),
        torch.tensor([label for _, label, _ in items], dtype=torch.int64),
    )


class Transformed(Dataset[Item]):
    """``(transform(image), label)`` for each item of ``dataset``."""

    def __init__(self, dataset: Dataset[Item], transform: Callable[[Tensor], Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Item:
        image, label = self.dataset[index]
        return self.transform(image), label


def make_train_loader(
    dataset: Dataset[Item],
    config: DataConfig,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    augment_on: torch.device | None = None,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """Shuffled batches of multi-crop views for one of ``world_size`` workers.

    Each batch is ``(views, labels)``: ``views`` a list of ``config.num_views`` float32
    (B, 3, h, w) tensors, the global views first, and ``labels`` int64 (B,), with
    B = ``config.batch_size``. The sampler is a `DistributedSampler` (also for one
    worker), so call ``loader.sampler.set_epoch(epoch)`` before each epoch; every rank
    gets a disjoint shard and incomplete batches are dropped. ``pin_memory`` puts the
    batches in page-locked memory (for asynchronous copies to a CUDA device; see
    `trainer.acceleration.pin_memory_wanted`).

    With ``augment_on`` (a device) the views are made there instead: each batch is
    ``(ImageBatch, labels)``, the decoded uint8 images and their views' parameters for
    `trainer.augment_device.DeviceMultiCrop.batch_views`, in pinned memory for CUDA.
    The parameters are the ones the views of the default mode are made from.

    Raises:
        ValueError: fewer images than one batch on every worker.
    """
    size = len(dataset)  # type: ignore[arg-type]
    needed = config.batch_size * world_size
    if size < needed:
        raise ValueError(
            f"{size} training images cannot fill one batch of {config.batch_size} on each of "
            f"{world_size} worker(s) ({needed} needed); lower data.batch_size or add images"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    sampler = EpochSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    if augment_on is not None:
        images = MultiCropImages(dataset, MultiCropAugmentation(config), seed)
        return DataLoader(
            images,
            batch_size=config.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=config.loader_workers,
            persistent_workers=config.loader_workers > 0,
            collate_fn=collate_images,
            pin_memory=pin_memory or augment_on.type == "cuda",
            prefetch_factor=prefetch_factor(config.loader_workers),
        )
    views = MultiCropViews(dataset, MultiCropAugmentation(config), seed)
    return DataLoader(
        views,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        pin_memory=pin_memory,
        num_workers=config.loader_workers,
        persistent_workers=config.loader_workers > 0,
        prefetch_factor=prefetch_factor(config.loader_workers),
    )


def make_eval_loader(
    dataset: Dataset[Item], config: DataConfig, batch_size: int = 256, pin_memory: bool = False
) -> DataLoader[Any]:
    """Batches ``(images, labels)`` in dataset order: float32 normalised (B, 3, S, S)
    images (S = ``config.global_crop_size``, no randomness) and int64 (B,) labels;
    ``pin_memory`` as `make_train_loader`'s."""
    return DataLoader(
        Transformed(dataset, eval_transform(config)),
        batch_size=batch_size,
        shuffle=False,
        pin_memory=pin_memory,
        num_workers=config.loader_workers,
        persistent_workers=config.loader_workers > 0,
        prefetch_factor=prefetch_factor(config.loader_workers),
    )


LOADER_BATCHES_AHEAD = 8
"""Batches the loader workers keep ready together, at least (2 per worker above 4)."""


def prefetch_factor(workers: int) -> int | None:
    """Batches each loader worker prepares ahead (None without workers, as torch wants).

    Few workers get a deeper queue each, so that one slow batch (a large JPEG, a busy
    core) does not stall the step; many workers keep torch's 2 each, which already
    holds 2 x workers batches in host memory.
    """
    if workers == 0:
        return None
    return max(2, -(-LOADER_BATCHES_AHEAD // workers))


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby keys seed far apart."""
    state = 0
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15
        state &= 0xFFFFFFFFFFFFFFFF
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state >> 1
