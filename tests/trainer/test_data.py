"""trainer.data: the four dataset kinds, their splits, and the loaders, on real files."""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.factories import save_image
from trainer.config import DataConfig
from trainer.data import (
    CIFAR10_CLASSES,
    CIFAR10_RECORD,
    DataSplits,
    EpochSampler,
    ImageFiles,
    TensorImages,
    build_splits,
    make_eval_loader,
    make_synthetic,
    make_train_loader,
)

# The shared data beside the checkout (../shared/data), or wherever KLSSL_TEST_DATA says.
TEST_DATA = Path(
    os.environ.get("KLSSL_TEST_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
)
CIFAR_JPEG_TARBALL = TEST_DATA / "cifar10-jpeg" / "train.tar.gz"


def labels_of(dataset: TensorImages | ImageFiles) -> list[int]:
    if isinstance(dataset, TensorImages):
        return dataset.labels.tolist()
    return list(dataset.labels)


def check_split(splits: DataSplits, fraction: float) -> None:
    """Items are uint8 (3, H, W) + int; the held-out part is per class and disjoint."""
    assert isinstance(splits.train, TensorImages | ImageFiles)
    assert isinstance(splits.holdout, TensorImages | ImageFiles)
    for dataset in (splits.train, splits.holdout):
        image, label = dataset[0]
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        assert isinstance(label, int) and 0 <= label < splits.num_classes
    assert len(splits.class_names) == splits.num_classes
    train_counts = Counter(labels_of(splits.train))
    holdout_counts = Counter(labels_of(splits.holdout))
    assert set(holdout_counts) == set(range(splits.num_classes))  # >= 1 per class
    for label, held in holdout_counts.items():
        total = held + train_counts[label]
        assert held == max(1, min(round(total * fraction), total - 1))
    if isinstance(splits.train, TensorImages):
        assert isinstance(splits.holdout, TensorImages)
        assert not set(splits.train.ids.tolist()) & set(splits.holdout.ids.tolist())
    else:
        assert isinstance(splits.holdout, ImageFiles)
        assert not set(splits.train.files) & set(splits.holdout.files)


# --- digits and synthetic -------------------------------------------------------------------


def test_digits() -> None:
    splits = build_splits(DataConfig(kind="digits", holdout_fraction=0.1), seed=0)
    check_split(splits, 0.1)
    assert splits.num_classes == 10 and splits.class_names == [str(d) for d in range(10)]
    assert len(splits.train) + len(splits.holdout) == 1797
    image, _ = splits.train[0]
    assert image.shape == (3, 8, 8)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey
    assert isinstance(splits.train, TensorImages)
    assert int(splits.train.images.max()) == 255 and int(splits.train.images.min()) == 0


def test_in_memory_split_is_seeded() -> None:
    config = DataConfig(kind="digits")
    a, b = build_splits(config, seed=1), build_splits(config, seed=1)
    c = build_splits(config, seed=2)
    assert isinstance(a.holdout, TensorImages) and isinstance(b.holdout, TensorImages)
    assert isinstance(c.holdout, TensorImages)
    assert torch.equal(a.holdout.ids, b.holdout.ids)
    assert not torch.equal(a.holdout.ids, c.holdout.ids)


def test_synthetic_has_known_learnable_clusters() -> None:
    config = DataConfig(
        kind="synthetic", synthetic_samples=600, synthetic_classes=6, synthetic_image_size=16
    )
    splits = build_splits(config, seed=0)
    check_split(splits, config.holdout_fraction)
    assert splits.num_classes == 6 and len(splits.train) + len(splits.holdout) == 600
    assert splits.train[0][0].shape == (3, 16, 16)
    images, labels = make_synthetic(6, 600, 16, seed=0)
    assert Counter(labels.tolist()) == dict.fromkeys(range(6), 100)  # balanced
    assert images.float().std() > 30  # not a flat image
    # Learnable: nearest class mean over circular shifts beats chance by far; not trivial:
    # raw pixels do not separate the classes perfectly.
    x = images.float().flatten(1)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    similarity = x[:300] @ x[300:].T
    nearest = labels[similarity.argmax(0)]
    accuracy = (nearest == labels[300:]).float().mean().item()
    assert 2 / 6 < accuracy < 0.99


def test_synthetic_is_deterministic_in_the_seed() -> None:
    a, _ = make_synthetic(3, 30, 8, seed=7)
    b, _ = make_synthetic(3, 30, 8, seed=7)
    c, _ = make_synthetic(3, 30, 8, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_max_samples_caps_train_class_balanced() -> None:
    splits = build_splits(DataConfig(kind="digits", max_samples=95), seed=0)
    assert len(splits.train) == 95
    counts = Counter(labels_of(splits.train))  # type: ignore[arg-type]
    assert max(counts.values()) - min(counts.values()) <= 1
    again = build_splits(DataConfig(kind="digits", max_samples=95), seed=0)
    assert isinstance(splits.train, TensorImages) and isinstance(again.train, TensorImages)
    assert torch.equal(splits.train.ids, again.train.ids)
    assert len(splits.holdout) == len(build_splits(DataConfig(kind="digits"), seed=0).holdout)


# --- imagefolder ----------------------------------------------------------------------------


def write_imagefolder(root: Path, counts: dict[str, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            height, width = 10 + i, 12 + 2 * i
            channels = (3, 1, 4)[i % 3]  # RGB, grey and RGBA files
            image = torch.randint(
                0, 256, (channels, height, width), dtype=torch.uint8, generator=generator
            )
            save_image(image, root / name / f"{i:04d}.png")


def test_imagefolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"cat": 10, "ant": 6, "bee": 3})
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    splits = build_splits(
        DataConfig(kind="imagefolder", path=tmp_path, holdout_fraction=0.2), seed=0
    )
    check_split(splits, 0.2)
    assert splits.class_names == ["ant", "bee", "cat"]
    assert isinstance(splits.holdout, ImageFiles) and isinstance(splits.train, ImageFiles)
    # The last files of every class, in sorted order.
    assert [p.relative_to(tmp_path).as_posix() for p in splits.holdout.files] == [
        "ant/0005.png",
        "bee/0002.png",
        "cat/0008.png",
        "cat/0009.png",
    ]
    for index in range(len(splits.train)):
        image, _ = splits.train[index]
        assert image.dtype == torch.uint8 and image.shape[0] == 3  # grey and RGBA -> RGB
    image, _ = splits.train[1]  # ant/0001.png, 11 x 14
    assert image.shape == (3, 11, 14)


@pytest.mark.parametrize("link", ["class folder", "image"])
def test_imagefolder_refuses_symlinks_out_of_the_data_folder(tmp_path: Path, link: str) -> None:
    """Finding 3 of issue 11: the data path is confined, and so is what is inside it."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    write_imagefolder(root, {"cat": 3, "ant": 3})
    write_imagefolder(outside, {"secret": 2})
    if link == "class folder":
        (root / "secret").symlink_to(outside / "secret", target_is_directory=True)
    else:
        (root / "cat" / "9999.png").symlink_to(outside / "secret" / "0000.png")
    with pytest.raises(ValueError, match="entries resolve outside the data folder"):
        build_splits(DataConfig(kind="imagefolder", path=root), seed=0)


def test_a_symlink_inside_the_data_folder_is_fine(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"cat": 3, "ant": 3})
    (tmp_path / "ant" / "again.png").symlink_to(tmp_path / "ant" / "0000.png")
    splits = build_splits(DataConfig(kind="imagefolder", path=tmp_path), seed=0)
    assert len(splits.train) + len(splits.holdout) == 7


def test_imagefolder_accepts_a_train_subfolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "train", {"a": 3, "b": 3})
    (tmp_path / "test").mkdir()
    splits = build_splits(DataConfig(kind="imagefolder", path=tmp_path), seed=0)
    assert splits.class_names == ["a", "b"] and len(splits.train) == 4


@pytest.fixture(scope="module")
def cifar_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 30 real CIFAR-10 JPEG files (10 of 3 classes) from the shared tarball."""
    if not CIFAR_JPEG_TARBALL.exists():
        pytest.skip(f"{CIFAR_JPEG_TARBALL} is not on this machine")
    root = tmp_path_factory.mktemp("cifar-jpeg")
    taken: Counter[str] = Counter()
    with tarfile.open(CIFAR_JPEG_TARBALL, "r:gz") as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or not member.name.endswith(".jpg"):
                continue
            label = parts[1]
            if taken[label] >= 10 or (label not in taken and len(taken) == 3):
                if len(taken) == 3 and all(n >= 10 for n in taken.values()):
                    break
                continue
            archive.extract(member, root, filter="data")
            taken[label] += 1
    return root


def test_imagefolder_with_real_cifar_jpegs(cifar_jpegs: Path) -> None:
    config = DataConfig(kind="imagefolder", path=cifar_jpegs, batch_size=8)
    splits = build_splits(config, seed=0)  # the root holds train/<class>/<file>.jpg
    check_split(splits, config.holdout_fraction)
    assert splits.num_classes == 3 and set(splits.class_names) <= set(CIFAR10_CLASSES)
    assert len(splits.train) == 27 and len(splits.holdout) == 3
    image, _ = splits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert image.float().std() > 5  # a real picture, not a blank
    loader = make_train_loader(splits.train, config, seed=0)
    loader.sampler.set_epoch(0)  # type: ignore[attr-defined]
    views, labels = next(iter(loader))
    assert labels.shape == (8,)
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 6
    images, holdout_labels = next(iter(make_eval_loader(splits.holdout, config)))
    assert images.shape == (3, 3, 32, 32) and holdout_labels.tolist() == [0, 1, 2]


def test_imagefolder_decode_error_names_the_file(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"a": 2, "b": 2})
    broken = tmp_path / "a" / "0000.png"
    broken.write_bytes(b"not a png")
    splits = build_splits(DataConfig(kind="imagefolder", path=tmp_path), seed=0)
    with pytest.raises(ValueError, match=r"0000\.png"):
        splits.train[0]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "is empty"),
        ({"readme.txt": None}, "no class subfolders"),
        ({"a/readme.txt": None, "b/": None}, "no images"),
        ({"a/x.png": "png", "b/readme.txt": None}, "without images: b"),
    ],
)
def test_imagefolder_errors_name_the_path(
    tmp_path: Path, layout: dict[str, str | None], message: str
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for name, content in layout.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        elif content == "png":
            save_image(torch.zeros(3, 4, 4, dtype=torch.uint8), path)
        else:
            path.write_text("text")
    with pytest.raises(ValueError, match=message) as error:
        build_splits(DataConfig(kind="imagefolder", path=root), seed=0)
    assert str(root) in str(error.value)


# --- cifar10 binary -------------------------------------------------------------------------


def write_cifar_batch(path: Path, labels: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], pixels], axis=1)
    path.write_bytes(records.tobytes())
    return pixels.reshape(-1, 3, 32, 32)


def write_cifar(folder: Path, per_batch: int = 20, test: bool = False) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = [
        write_cifar_batch(folder / f"data_batch_{b}.bin", [i % 10 for i in range(per_batch)], b)
        for b in range(1, 6)
    ]
    if test:
        write_cifar_batch(folder / "test_batch.bin", [i % 10 for i in range(30)], 99)
    return batches


def test_cifar10_binary_records(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path)
    splits = build_splits(DataConfig(kind="cifar10", path=tmp_path), seed=0)
    check_split(splits, 0.1)
    assert splits.class_names == list(CIFAR10_CLASSES)
    assert len(splits.train) + len(splits.holdout) == 100  # 5 x 20, 10 held out
    assert isinstance(splits.train, TensorImages)
    # R, G and B planes in record order: id 0 is batch 1's first record, label 0.
    items = {
        int(dataset.ids[i]): dataset[i]
        for dataset in (splits.train, splits.holdout)
        if isinstance(dataset, TensorImages)
        for i in range(len(dataset))
    }
    assert len(items) == 100
    image, label = items[0]
    assert label == 0 and torch.equal(image, torch.from_numpy(batches[0][0]))
    image, label = items[47]  # batch 3, record 7
    assert label == 7 and torch.equal(image, torch.from_numpy(batches[2][7]))


def test_cifar10_test_batch_is_the_holdout(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-bin", test=True)  # the parent is given
    splits = build_splits(DataConfig(kind="cifar10", path=tmp_path, max_samples=50), seed=0)
    assert len(splits.holdout) == 30 and len(splits.train) == 50
    assert Counter(labels_of(splits.train)) == dict.fromkeys(range(10), 5)  # type: ignore[arg-type]


def test_cifar10_missing_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(ValueError, match=r"data_batch_3\.bin") as error:
        build_splits(DataConfig(kind="cifar10", path=tmp_path), seed=0)
    assert str(tmp_path) in str(error.value)


def test_cifar10_truncated_file(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2.bin").write_bytes(b"\x00" * (CIFAR10_RECORD + 7))
    with pytest.raises(ValueError, match=r"data_batch_2\.bin"):
        build_splits(DataConfig(kind="cifar10", path=tmp_path), seed=0)


# --- loaders --------------------------------------------------------------------------------


def small_set(count: int = 40, size: int = 12) -> TensorImages:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return TensorImages(images, torch.arange(count) % 4)


LOADER_CONFIG = DataConfig(batch_size=8, global_crop_size=16, local_crop_size=8, num_local_crops=2)


def test_train_loader_batches() -> None:
    loader = make_train_loader(small_set(), LOADER_CONFIG, seed=0)
    assert isinstance(loader.sampler, DistributedSampler)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 40 // 8
    for views, labels in batches:
        assert isinstance(views, list) and len(views) == LOADER_CONFIG.num_views
        assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
        assert all(v.dtype == torch.float32 for v in views)
        assert labels.dtype == torch.int64 and labels.shape == (8,)
    seen = torch.cat([labels for _, labels in batches])
    assert Counter(seen.tolist()) == dict.fromkeys(range(4), 10)  # every image once


def test_train_loader_drops_the_last_partial_batch() -> None:
    loader = make_train_loader(small_set(43), LOADER_CONFIG, seed=0)
    assert len(list(loader)) == 5


def collect(loader: DataLoader[Any], epoch: int) -> list[torch.Tensor]:
    """Every batch of one epoch, all views of an image flattened into one row."""
    assert isinstance(loader.sampler, DistributedSampler)
    loader.sampler.set_epoch(epoch)
    return [torch.cat([v.flatten(1) for v in views], 1) for views, _ in loader]


def test_train_loader_is_seeded() -> None:
    data = small_set()
    a = collect(make_train_loader(data, LOADER_CONFIG, seed=3), epoch=0)
    b = collect(make_train_loader(data, LOADER_CONFIG, seed=3), epoch=0)
    c = collect(make_train_loader(data, LOADER_CONFIG, seed=4), epoch=0)
    d = collect(make_train_loader(data, LOADER_CONFIG, seed=3), epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], d[0])


def test_train_loader_workers_give_the_same_views() -> None:
    data = small_set(16)
    config = LOADER_CONFIG.model_copy(update={"loader_workers": 2})
    in_process = collect(make_train_loader(data, LOADER_CONFIG, seed=0), epoch=2)
    with_workers = collect(make_train_loader(data, config, seed=0), epoch=2)
    assert all(torch.equal(x, y) for x, y in zip(in_process, with_workers, strict=True))


def test_distributed_shards_are_disjoint() -> None:
    data = small_set(40)
    shards = []
    for rank in (0, 1):
        loader = make_train_loader(data, LOADER_CONFIG, seed=0, rank=rank, world_size=2)
        loader.sampler.set_epoch(1)  # type: ignore[attr-defined]
        assert len(loader) == 20 // 8
        shards.append({index for _, index in loader.sampler})
        assert len(list(loader)) == 2
    assert len(shards[0]) == len(shards[1]) == 20
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(40))


@pytest.mark.parametrize("size", [40, 43])
def test_epoch_sampler_deals_what_a_distributed_sampler_deals(size: int) -> None:
    data = small_set(size)
    for world_size in (1, 2, 3):
        for rank in range(world_size):
            ours = EpochSampler(data, num_replicas=world_size, rank=rank, seed=7, drop_last=True)
            torch_own = DistributedSampler(
                data, num_replicas=world_size, rank=rank, seed=7, drop_last=True
            )
            ours.set_epoch(3)
            torch_own.set_epoch(3)
            assert [index for _, index in ours] == list(torch_own)
            assert len(ours) == len(torch_own)


def rounds(world_size: int, batch: int, epoch: int, start: int, data: Any) -> list[list[int]]:
    """The global batches (ranks' batches in rank order) of an epoch started at ``start``."""
    shards = []
    for rank in range(world_size):
        sampler = EpochSampler(data, num_replicas=world_size, rank=rank, seed=0, drop_last=True)
        sampler.set_position(epoch, start)
        indices = [index for _, index in sampler]
        shards.append([indices[i : i + batch] for i in range(0, len(indices) - batch + 1, batch)])
    return [[index for part in parts for index in part] for parts in zip(*shards, strict=True)]


@pytest.mark.parametrize(("before", "after"), [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_a_mid_epoch_position_resumes_with_the_images_not_yet_trained_on(
    before: int, after: int
) -> None:
    """After b global batches the images trained on are the permutation's first b*B*W,
    whatever W: resuming from that count (even on another number of workers) trains on
    the rest of the epoch, each image once, and on the same ones as without the stop."""
    data, batch = small_set(64), 4
    straight = rounds(before, batch, epoch=2, start=0, data=data)
    done = 3
    trained = straight[:done]
    consumed = done * batch * before
    rest = rounds(after, batch, epoch=2, start=consumed, data=data)
    seen = [index for global_batch in trained + rest for index in global_batch]
    (order,) = rounds(1, 64, epoch=2, start=0, data=data)  # the epoch's permutation
    assert len(seen) == len(set(seen)) > 64 - batch * after  # only a last partial round left out
    assert set(seen) == set(order[: len(seen)])  # the permutation, in its order of rounds
    if before == after:
        assert trained + rest == straight


def test_a_position_outside_the_epoch_is_refused() -> None:
    sampler = EpochSampler(small_set(16), num_replicas=1, rank=0, drop_last=True)
    with pytest.raises(ValueError, match="position 17 is outside an epoch of 16 images"):
        sampler.set_position(0, 17)


def test_train_loader_needs_a_full_batch_per_worker() -> None:
    with pytest.raises(ValueError, match=r"12 training images .*\(16 needed\)"):
        make_train_loader(small_set(12), LOADER_CONFIG, seed=0, world_size=2)


def test_eval_loader_keeps_order() -> None:
    data = small_set(20)
    loader = make_eval_loader(data, LOADER_CONFIG, batch_size=6)
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [6, 6, 6, 2]
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    assert images.shape == (20, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.equal(labels, data.labels)
    again = torch.cat([images for images, _ in make_eval_loader(data, LOADER_CONFIG)])
    assert torch.equal(images, again)
