"""Packed datasets: image files as Parquet shards of their bytes (`trainer.packing`).

A nested folder of JPEG and PNG files packs into numbered shards whose images decode to
the same pixels as the files, in the source's sorted order; class folders become labels
and a labelled pack splits per class. An undecodable file is left out and reported, or,
packed unverified, counted once (also from loader worker processes) and replaced like an
unreadable file. A pack trains; a refused or failed pack leaves nothing behind; a pack
with a shard missing or foreign is an error before anything trains; a pack on object
storage reads like a local one.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from tests.factories import save_image
from tests.trainer.test_files import (
    Quiet,
    digit_images,
    files_config,
    labelled_folder,
    unlabelled_folder,
)
from tests.trainer.test_object_store import BUCKET, s3, s3_config  # noqa: F401 (s3: a fixture)
from trainer.data import (
    PackedImages,
    PackReadError,
    UnreadableImagesError,
    build_splits,
    decode_rgb,
)
from trainer.loop import build_run, run_training
from trainer.manifests import UNLABELLED
from trainer.packing import CLASS_NAMES_KEY, pack_images, shard_name

CORRUPT = b"\xff\xd8 not really a JPEG"


def photos(root: Path, count: int, broken: int | None = None) -> list[Path]:
    """``count`` nested class-free images in sorted order, the ``broken``-th corrupt."""
    paths = sorted(unlabelled_folder(root, count))
    if broken is not None:
        paths[broken].write_bytes(CORRUPT)
    return paths


def test_a_nested_folder_packs_into_shards_with_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, pack = tmp_path / "photos", tmp_path / "pack"
    paths = photos(source, 30, broken=7)
    reported: list[tuple[int, int]] = []
    summary = pack_images(
        source,
        pack,
        shard_bytes=6000,
        row_group_bytes=1500,
        progress=lambda done, total: reported.append((done, total)),
    )
    relative = [path.relative_to(source).as_posix() for path in paths]
    assert [path for path, _ in summary.unreadable] == [relative[7]]
    assert "cannot be decoded" in summary.unreadable[0][1]
    assert reported == [(done, 30) for done in range(1, 31)]
    kept = [path for index, path in enumerate(paths) if index != 7]
    assert summary.images == len(kept) == 29 and summary.class_names == []
    names = [shard_name(number) for number in range(len(summary.shards))]
    assert len(names) > 1 and sorted(os.listdir(pack)) == names  # no temporaries left
    assert summary.shards == [str(pack / name) for name in names]
    assert summary.bytes == sum((pack / name).stat().st_size for name in names)

    table = pq.read_table([str(pack / name) for name in names])
    assert table.column_names == ["index", "path", "image", "label"]
    assert table.column("index").to_pylist() == list(range(29))
    assert table.column("path").to_pylist() == [p.relative_to(source).as_posix() for p in kept]
    assert table.column("image").to_pylist() == [path.read_bytes() for path in kept]
    assert set(table.column("label").to_pylist()) == {UNLABELLED}
    assert json.loads(table.schema.metadata[CLASS_NAMES_KEY]) == []
    assert pq.ParquetFile(pack / names[0]).metadata.num_row_groups > 1

    splits = build_splits(files_config(pack).data, seed=0)
    dataset = splits.train
    assert isinstance(dataset, PackedImages) and len(splits.holdout) == 0
    assert splits.num_classes == 0 and dataset.shards == summary.shards
    assert dataset.rows == list(range(29)) and set(dataset.labels) == {UNLABELLED}
    # One shard open and one row group cached at a time: every access may evict.
    monkeypatch.setattr(PackedImages, "OPEN_SHARDS", 1)
    monkeypatch.setattr(PackedImages, "CACHED_ROW_GROUPS", 1)
    for position in [*range(29), *reversed(range(29)), *range(0, 29, 7)]:
        image, label = dataset[position]
        assert torch.equal(image, decode_rgb(kept[position])), kept[position]
        assert label == UNLABELLED
    assert dataset.unreadable_count == 0


def test_class_folders_become_labels_split_per_class(tmp_path: Path) -> None:
    labelled_folder(tmp_path / "digits", 60)
    summary = pack_images(tmp_path / "digits", tmp_path / "pack", labels="folders")
    assert summary.class_names == [str(digit) for digit in range(10)] and summary.images == 60
    assert len(summary.shards) == 1

    splits = build_splits(files_config(tmp_path / "pack", holdout_fraction=0.2).data, seed=0)
    assert splits.num_classes == 10 and splits.class_names == summary.class_names
    train, holdout = splits.train, splits.holdout
    assert isinstance(train, PackedImages) and isinstance(holdout, PackedImages)
    assert sorted(train.rows + holdout.rows) == list(range(60))
    paths = pq.read_table(summary.shards[0]).column("path").to_pylist()
    for dataset in (train, holdout):
        for position, (row, label) in enumerate(zip(dataset.rows, dataset.labels, strict=True)):
            assert splits.class_names[label] == paths[row].split("/")[0]
            image, item_label = dataset[position]
            assert item_label == label
            assert torch.equal(image, decode_rgb(tmp_path / "digits" / paths[row]))
    held = [splits.class_names[label] for label in holdout.labels]
    assert sorted(set(held)) == splits.class_names  # every class holds some out

    save_image(digit_images(1)[0][0], tmp_path / "digits" / "loose.png")
    with pytest.raises(ValueError, match=r"1 are not: loose\.png"):
        pack_images(tmp_path / "digits", tmp_path / "other", labels="folders")
    assert not (tmp_path / "other").exists()


def test_loader_workers_count_a_corrupt_packed_image_once(tmp_path: Path) -> None:
    paths = photos(tmp_path / "photos", 24, broken=5)
    summary = pack_images(tmp_path / "photos", tmp_path / "pack", verify=False)
    assert summary.images == 24 and summary.unreadable == []  # packed unchecked
    config = files_config(tmp_path / "pack", max_unreadable_fraction=0.1)
    dataset = build_splits(config.data, seed=0).train
    assert isinstance(dataset, PackedImages)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    for _ in range(2):  # two epochs over worker processes
        assert sum(len(labels) for _, labels in loader) == 24
    assert dataset.unreadable_count == 1 and bool(dataset.unreadable[5])
    image, _ = dataset[5]
    assert torch.equal(image, decode_rgb(paths[6]))  # replaced by the next readable
    assert dataset.unreadable_count == 1
    # What travels to a worker is the layout, never the images or open shards.
    assert len(pickle.dumps(dataset)) < summary.bytes / 4
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[3][0], decode_rgb(paths[3]))

    strict = build_splits(files_config(tmp_path / "pack").data, seed=0).train
    name = paths[5].relative_to(tmp_path / "photos").as_posix()
    with pytest.raises(UnreadableImagesError, match=rf"1 of 24 .*: {name} \(row 5 of .*part-0"):
        strict[5]


def test_a_packed_folder_trains(tmp_path: Path) -> None:
    photos(tmp_path / "photos", 64, broken=3)
    pack_images(tmp_path / "photos", tmp_path / "pack", verify=False, shard_bytes=20_000)
    config = files_config(tmp_path / "pack", max_unreadable_fraction=0.05)
    metrics = run_training(build_run(config), Quiet())
    assert metrics["unreadable_images"] == 1
    assert "target_mutual_info" in metrics and "knn_top1" not in metrics


def test_refused_and_failed_packs_leave_nothing_behind(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    photos(source, 12)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    refusals = {
        tmp_path / "full": r"destination .*full is not empty \(1 entries: keep\.txt\)",
        tmp_path / "file": r"destination .*file is a file",
        source / "packed": r"lies inside the source folder",
    }
    for destination, reason in refusals.items():
        with pytest.raises(ValueError, match=reason):
            pack_images(source, destination)
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and not (source / "packed").exists()

    def crash(done: int, total: int) -> None:
        if done == 10:  # a few shards are written by now, all under temporary names
            written = os.listdir(destination)
            assert len(written) > 1 and all(name.startswith(".part-") for name in written)
            raise RuntimeError("interrupted")

    for destination in (tmp_path / "new", tmp_path / "empty"):
        if destination.name == "empty":
            destination.mkdir()
        with pytest.raises(RuntimeError, match="interrupted"):
            pack_images(source, destination, shard_bytes=2000, row_group_bytes=500, progress=crash)
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path / "empty") == []

    broken = tmp_path / "broken"
    for index in range(3):
        (broken / f"{index}.png").parent.mkdir(exist_ok=True)
        (broken / f"{index}.png").write_bytes(CORRUPT)
    with pytest.raises(ValueError, match=r"none of the 3 images can be read \(0\.png: cannot"):
        pack_images(broken, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_a_damaged_pack_is_refused_and_a_single_shard_reads(tmp_path: Path) -> None:
    photos(tmp_path / "photos", 30)
    summary = pack_images(tmp_path / "photos", tmp_path / "pack", shard_bytes=6000)
    assert len(summary.shards) >= 3
    middle = Path(summary.shards[1])
    one = build_splits(files_config(middle).data, seed=0).train
    assert isinstance(one, PackedImages)
    first = pq.read_table(middle).column("index").to_pylist()
    assert one.rows == first and first[0] > 0 and one.shards == [str(middle)]
    with pytest.raises(ValueError, match="applies to a folder of images"):
        build_splits(files_config(tmp_path / "pack", pattern="*.png").data, seed=0)

    # A shard that disappears under a built dataset is a damaged pack, not bad images.
    whole = build_splits(files_config(tmp_path / "pack").data, seed=0).train
    assert isinstance(whole, PackedImages)
    middle.rename(tmp_path / "aside.parquet")
    with pytest.raises(PackReadError, match=rf"pack shard {middle}: row group 0 cannot be read"):
        whole[first[0]]
    assert whole.unreadable_count == 0
    with pytest.raises(ValueError, match=r"not numbered 0\.\.\d+ \(missing: part-00001"):
        build_run(files_config(tmp_path / "pack"))
    pq.write_table(pq.read_table(tmp_path / "aside.parquet").drop_columns(["image"]), middle)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) of a pack .*: image \(missing\)"):
        build_run(files_config(tmp_path / "pack"))
    (tmp_path / "aside.parquet").rename(middle)
    (tmp_path / "pack" / shard_name(1)).rename(tmp_path / "pack" / shard_name(7))
    with pytest.raises(ValueError, match=r"missing: part-00001"):
        build_run(files_config(tmp_path / "pack"))


def test_a_pack_on_object_storage(
    s3: pyarrow.fs.S3FileSystem,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
) -> None:
    labelled_folder(tmp_path / "digits", 40)
    destination = f"s3://{BUCKET}/packs/digits"
    summary = pack_images(tmp_path / "digits", destination, labels="folders", shard_bytes=8000)
    names = [shard_name(number) for number in range(len(summary.shards))]
    assert summary.shards == [f"{destination}/{name}" for name in names] and len(names) > 1
    listed = s3.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/packs/digits"))
    assert sorted(info.base_name for info in listed) == names  # temporaries moved away

    splits = build_splits(s3_config(destination, holdout_fraction=0.2).data, seed=0)
    assert isinstance(splits.train, PackedImages) and splits.num_classes == 10
    assert len(splits.train) + len(splits.holdout) == 40
    paths = sorted((tmp_path / "digits").rglob("*.png"))
    for position, row in enumerate(splits.train.rows[:5]):
        assert torch.equal(splits.train[position][0], decode_rgb(paths[row]))
    with pytest.raises(ValueError, match=r"digits is not empty \(\d+ entries: part-00000"):
        pack_images(tmp_path / "digits", destination)
