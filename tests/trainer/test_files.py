"""``data.kind: files``: own images without labels, from a folder, a glob or a manifest.

A nested folder of JPEG and PNG files with no class folders trains, and is evaluated on
a separate labelled set (``eval.data``); without one, the run reports only the
label-free diagnostics. An image that cannot be decoded is logged, counted (once, also
from loader worker processes) and replaced, up to ``data.max_unreadable_fraction``;
beyond it the run fails naming the file. Manifests list files relative to themselves;
missing or escaping entries are an error before anything trains.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tests.factories import save_image, tiny_config
from trainer.config import ConfigError, TrainConfig
from trainer.data import ImageFiles, UnreadableImagesError, build_splits
from trainer.engine import TrainingState
from trainer.loop import build_run, run_training
from trainer.manifests import UNLABELLED


class Quiet:
    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass


def digit_images(count: int) -> tuple[list[torch.Tensor], list[int]]:
    """``count`` digits as uint8 RGB 16x16 images, with their labels."""
    digits = load_digits()
    images = []
    for image in digits.images[:count]:
        grey = torch.from_numpy(np.rint(image * (255 / 16)).astype(np.uint8))
        big = grey.repeat_interleave(2, 0).repeat_interleave(2, 1)
        images.append(big.unsqueeze(0).expand(3, -1, -1).contiguous())
    return images, [int(label) for label in digits.target[:count]]


def unlabelled_folder(root: Path, count: int) -> list[Path]:
    """Images in nested folders that are not classes, half JPEG, half PNG."""
    images, _ = digit_images(count)
    paths = []
    for index, image in enumerate(images):
        suffix = ".png" if index % 2 else ".jpg"
        path = root / f"shoot_{index % 3}" / f"day_{index % 2}" / f"img_{index:04d}{suffix}"
        save_image(image, path)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return paths


def labelled_folder(root: Path, count: int) -> None:
    images, labels = digit_images(count)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        save_image(image, root / str(label) / f"{index:04d}.png")


def files_config(path: Path, **data: object) -> TrainConfig:
    return tiny_config(
        data={"kind": "files", "path": str(path), "max_samples": None, **data},
        schedule={"epochs": 1, "warmup_epochs": 0},
    )


def test_an_unlabelled_nested_folder_trains_and_evaluates_on_a_labelled_set(
    tmp_path: Path,
) -> None:
    paths = unlabelled_folder(tmp_path / "photos", 96)
    labelled_folder(tmp_path / "labelled", 120)
    config = files_config(tmp_path / "photos")
    splits = build_splits(config.data, seed=0)
    assert isinstance(splits.train, ImageFiles)
    assert sorted(splits.train.files) == sorted(paths)  # every image, nothing held out
    assert set(splits.train.labels) == {UNLABELLED} and len(splits.holdout) == 0

    unlabelled = build_run(config)
    assert unlabelled.evaluation is None
    metrics = run_training(unlabelled, Quiet())
    assert "knn_top1" not in metrics and "target_mutual_info" in metrics
    assert metrics["unreadable_images"] == 0

    evaluated = config.model_copy(
        update={
            "eval": config.eval.model_copy(
                update={
                    "data": TrainConfig.model_validate(
                        {"data": {"kind": "imagefolder", "path": str(tmp_path / "labelled")}}
                    ).data
                }
            )
        }
    )
    run = build_run(evaluated)
    assert run.evaluation is not None and run.evaluation.num_classes == 10
    metrics = run_training(run, Quiet())
    for key in ("knn_top1", "linear_top1", "random_init_knn_top1", "pixels_knn_top1"):
        assert 0 <= metrics[key] <= 100, key


def test_a_glob_selects_the_files(tmp_path: Path) -> None:
    paths = unlabelled_folder(tmp_path, 40)
    splits = build_splits(files_config(tmp_path, pattern="**/*.png").data, seed=0)
    assert isinstance(splits.train, ImageFiles)
    assert splits.train.files == sorted(p for p in paths if p.suffix == ".png")
    with pytest.raises(ValueError, match=r"no images matching '\*\*/\*.bmp'"):
        build_splits(files_config(tmp_path, pattern="**/*.bmp").data, seed=0)
    with pytest.raises(ConfigError, match=r"must stay inside data\.path"):
        files_config(tmp_path, pattern="../**/*.png")


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_corrupt_image_is_counted_once_logged_and_replaced(
    tmp_path: Path, loader_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    paths = unlabelled_folder(tmp_path, 64)
    broken = paths[5]
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    config = files_config(tmp_path, max_unreadable_fraction=0.05, loader_workers=loader_workers)
    run = build_run(config)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        metrics = run_training(run, Quiet())
    assert metrics["unreadable_images"] == 1  # seen by the main process from any worker
    if loader_workers == 0:  # worker processes log to their own stderr
        assert str(broken) in caplog.text
    dataset = build_splits(config.data, seed=0).train
    assert isinstance(dataset, ImageFiles)
    index = dataset.files.index(broken)
    image, _ = dataset[index]
    replacement, _ = dataset[index + 1]
    assert torch.equal(image, replacement) and dataset.unreadable_count == 1
    dataset[index]
    assert dataset.unreadable_count == 1  # a file is counted once, whatever the epochs


def test_more_unreadable_images_than_allowed_fail_naming_the_file(tmp_path: Path) -> None:
    paths = unlabelled_folder(tmp_path, 40)
    for path in paths[:3]:
        path.write_bytes(b"garbage")
    dataset = build_splits(files_config(tmp_path, max_unreadable_fraction=0.05).data, 0).train
    assert isinstance(dataset, ImageFiles)
    dataset[dataset.files.index(paths[0])]  # 1 of 40 is within 5%
    dataset[dataset.files.index(paths[1])]  # 2 of 40 too
    with pytest.raises(UnreadableImagesError, match=rf"3 of 40 images .* {paths[2]}"):
        dataset[dataset.files.index(paths[2])]


def test_manifests_list_files_with_or_without_labels(tmp_path: Path) -> None:
    labelled_folder(tmp_path / "images", 60)
    files = sorted((tmp_path / "images").rglob("*.png"))
    (tmp_path / "list.txt").write_text(
        "# my images\n" + "\n".join(str(f.relative_to(tmp_path)) for f in files) + "\n\n"
    )
    splits = build_splits(files_config(tmp_path / "list.txt").data, seed=0)
    assert isinstance(splits.train, ImageFiles)
    assert splits.train.files == files and splits.num_classes == 0

    rows = ["path,label"] + [f"{f.relative_to(tmp_path)},digit_{f.parent.name}" for f in files]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    splits = build_splits(files_config(tmp_path / "list.csv", holdout_fraction=0.2).data, seed=0)
    assert splits.num_classes == 10
    assert splits.class_names == [f"digit_{d}" for d in range(10)]
    assert isinstance(splits.holdout, ImageFiles)
    for dataset in (splits.train, splits.holdout):
        assert isinstance(dataset, ImageFiles)
        for file, label in zip(dataset.files, dataset.labels, strict=True):
            assert splits.class_names[label] == f"digit_{file.parent.name}"


def test_bad_manifests_are_refused_before_training(tmp_path: Path) -> None:
    unlabelled_folder(tmp_path / "data", 4)
    outside = tmp_path / "outside.png"
    save_image(digit_images(1)[0][0], outside)
    cases = {
        "missing.txt": ("data/a.png\ndata/b.png\n", "lists 2 of 2 files that do not exist"),
        "escape.txt": ("../outside.png\n", "1 entries resolve outside the data folder"),
        "nopath.csv": ("file,label\nx.png,a\n", "needs a 'path' column"),
        "empty.txt": ("# nothing\n", "lists no images"),
        "list.json": ("[]", "neither a folder nor a manifest"),
    }
    folder = tmp_path / "manifests"
    folder.mkdir()
    for name, (text, reason) in cases.items():
        (folder / name).write_text(text)
        with pytest.raises(ValueError, match=reason):
            build_run(files_config(folder / name))


def test_a_parquet_manifest_lists_paths_with_or_without_labels(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    labelled_folder(tmp_path / "images", 40)
    files = sorted((tmp_path / "images").rglob("*.png"))
    listed = [str(f.relative_to(tmp_path)) for f in files]
    digits = [int(f.parent.name) for f in files]
    pq.write_table(pa.table({"path": listed, "label": digits}), tmp_path / "labelled.parquet")
    splits = build_splits(files_config(tmp_path / "labelled.parquet").data, seed=0)
    assert splits.class_names == [str(d) for d in range(10)]  # integers read as names
    assert isinstance(splits.train, ImageFiles) and isinstance(splits.holdout, ImageFiles)
    assert sorted(splits.train.files + splits.holdout.files) == files
    for dataset in (splits.train, splits.holdout):
        for file, label in zip(dataset.files, dataset.labels, strict=True):
            assert splits.class_names[label] == file.parent.name

    pq.write_table(pa.table({"path": listed[::-1]}), tmp_path / "paths.parquet")
    splits = build_splits(files_config(tmp_path / "paths.parquet").data, seed=0)
    assert isinstance(splits.train, ImageFiles) and splits.num_classes == 0
    assert splits.train.files == files[::-1]  # the listed order

    save_image(digit_images(1)[0][0], tmp_path / "outside.png")
    (tmp_path / "m").mkdir()
    cases = {
        "escape.parquet": (pa.table({"path": ["../outside.png"]}), "1 entries resolve outside"),
        "nopath.parquet": (pa.table({"file": ["x.png"]}), "needs a 'path' column"),
        "numbers.parquet": (pa.table({"path": [1, 2]}), "path column holds int64"),
        "empty.parquet": (pa.table({"path": pa.array([], pa.string())}), "lists no images"),
        "blank.parquet": (pa.table({"path": ["../images/0/0000.png", None]}), "row 1: empty"),
        "packed.parquet": (pa.table({"image": [b"x"]}), r"lacks the column\(s\) of a pack"),
    }
    for name, (table, reason) in cases.items():
        pq.write_table(table, tmp_path / "m" / name)
        with pytest.raises(ValueError, match=reason):
            build_run(files_config(tmp_path / "m" / name))
    (tmp_path / "m" / "text.parquet").write_text("path\nx.png\n")
    with pytest.raises(ValueError, match="cannot be read as Parquet"):
        build_run(files_config(tmp_path / "m" / "text.parquet"))
