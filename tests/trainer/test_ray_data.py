"""``data.loader: ray``: training batches decoded, augmented and streamed by Ray Data.

A real Ray cluster of two nodes (2 + 1 CPUs: two training workers and a CPU for Ray
Data's tasks) serves the module. Two workers read their shards of one Ray Dataset
through the production `ShardLoader`: in every epoch the union of the images they see
is the training split, each image exactly once. A tracked 2-worker run trains from a
manifest with a corrupt file, which is counted and replaced. `make_views` (the Ray Data
task) and the capacity check are unit-tested without Ray.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from tests import factories
from tests.trainer.test_files import digit_images
from trainer.augment import MultiCropAugmentation
from trainer.config import ConfigError, TrainConfig
from trainer.data import (
    ImageFiles,
    PackedImages,
    TensorImages,
    UnreadableImagesError,
    build_splits,
)
from trainer.distributed.cluster import Placement, check_cluster_capacity, plan_placement
from trainer.distributed.errors import InsufficientResourcesError
from trainer.distributed.launcher import launch_training
from trainer.distributed.ray_data import (
    TRAIN_DATASET,
    ShardLoader,
    make_views,
    source_table,
    train_dataset,
)
from trainer.packing import pack_images

pytestmark = pytest.mark.slow

# Workers unpickle the loops defined here (tests/ is not installed on them).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def labelled_manifest(root: Path, count: int, corrupt: int = 0) -> Path:
    """``count`` digit PNGs listed with their labels in ``root/manifest.csv``; the first
    ``corrupt`` of them are not images."""
    images, labels = digit_images(count)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label"]
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = root / f"img_{index:04d}.png"
        if index < corrupt:
            path.write_bytes(b"not a png")
        else:
            factories.save_image(image, path)
        lines.append(f"{path.name},{label}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def ray_config(path: Path, **sections: dict[str, Any]) -> TrainConfig:
    data = {
        "kind": "files",
        "path": str(path),
        "loader": "ray",
        "max_samples": None,
        "batch_size": 8,
        "holdout_fraction": 0.2,
        **sections.pop("data", {}),
    }
    return factories.tiny_config(
        name="ray-data-test",
        data=data,
        model={"head_layers": 2},
        schedule={"epochs": 2, "warmup_epochs": 0},
        eval={"knn_k": [5]},
        runtime={"device": "cpu", "log_every_steps": 1},
        **sections,
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with factories.ray_cluster(2, 1) as nodes:
        yield nodes


# ------------------------------------------------------------------ every image once


def shard_ids_loop(loop_config: dict[str, Any]) -> None:
    """Reads two epochs of this worker's shard through `ShardLoader`; writes the ids of
    every epoch's batches to ``<out>/rank_<N>.json``."""
    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    assert shard is not None
    loader = ShardLoader(shard, config.data, loop_config["dataset_size"], context.get_world_size())
    epochs = []
    for _ in range(2):
        ids: list[int] = []
        shapes = set()
        for batch in loader.batches():
            ids += batch["id"].tolist()
            shapes |= {tuple(batch[f"view_{v}"].shape) for v in range(config.data.num_views)}
        epochs.append({"ids": ids, "shapes": sorted(shapes), "steps": len(loader)})
    out = Path(loop_config["out"]) / f"rank_{context.get_world_rank()}.json"
    out.write_text(json.dumps(epochs))


def test_two_workers_see_every_image_exactly_once_per_epoch(cluster: Any, tmp_path: Path) -> None:
    manifest = labelled_manifest(tmp_path, 80)
    config = ray_config(manifest)
    size = len(build_splits(config.data, seed=0).train)  # 64 after the 20% holdout
    assert size % (2 * config.data.batch_size) == 0  # so that no incomplete batch drops
    trainer = ray.train.torch.TorchTrainer(
        shard_ids_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "dataset_size": size,
            "out": str(tmp_path),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "storage")),
        datasets={TRAIN_DATASET: train_dataset(config)},
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    orders = []
    for epoch in range(2):
        seen = [ranks[rank][epoch] for rank in (0, 1)]
        for shard in seen:
            assert shard["steps"] == size // 2 // config.data.batch_size
            assert len(shard["ids"]) == size // 2
            assert shard["shapes"] == [[8, 3, 8, 8], [8, 3, 16, 16]]
        union = seen[0]["ids"] + seen[1]["ids"]
        assert sorted(union) == list(range(size))  # the whole split, each image once
        orders.append(union)
    assert orders[0] != orders[1]  # reshuffled between epochs


# ------------------------------------------------------------------ a tracked run


def test_a_tracked_two_worker_run_streams_counts_the_corrupt_file_and_evaluates(
    cluster: Any, tmp_path: Path
) -> None:
    manifest = labelled_manifest(tmp_path / "images", 80, corrupt=1)
    config = ray_config(manifest, data={"max_unreadable_fraction": 0.05})
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = launch_training(
        config, workers=2, storage_path=str(tmp_path / "storage"), tracking_uri=tracking_uri
    )
    assert result.metrics["epoch"] == 2.0
    assert 0.0 <= result.metrics["knn_top1"] <= 100.0
    assert "random_init_knn_top1" in result.metrics
    # The corrupt file is in the training split (the first file of class 0 in this
    # order is trained on) and read once per epoch by one of the workers.
    assert result.metrics["unreadable_images"] == 1.0
    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(result.mlflow_run_id, "unreadable_images")
    assert [metric.value for metric in history] == [1.0, 1.0]
    assert client.get_run(result.mlflow_run_id).data.params["data.loader"] == "ray"


# ------------------------------------------------------------------ units, no Ray


def test_views_replace_an_unreadable_image_by_a_readable_one_of_the_batch(
    tmp_path: Path,
) -> None:
    manifest = labelled_manifest(tmp_path, 6, corrupt=2)
    config = ray_config(manifest)
    dataset = ImageFiles([tmp_path / f"img_{i:04d}.png" for i in range(6)], [0, 1, 2, 3, 4, 5])
    table = source_table(dataset, seed=0).to_pydict()
    batch = {
        key: np.array(values, dtype=object if key == "path" else None)
        for key, values in table.items()
    }
    out = make_views(batch, MultiCropAugmentation(config.data), seed=0)
    corrupt = np.isin(out["id"], [0, 1])
    assert out["unreadable"].tolist() == corrupt.tolist()
    assert set(out["label"][corrupt]) <= {2, 3, 4, 5}  # a readable image's own label
    assert out["label"][~corrupt].tolist() == out["id"][~corrupt].tolist()
    assert out["view_0"].shape == (6, 3, 16, 16) and out["view_0"].dtype == np.float32
    assert out["view_2"].shape == (6, 3, 8, 8)


def test_a_batch_without_a_readable_image_fails_naming_one(tmp_path: Path) -> None:
    manifest = labelled_manifest(tmp_path, 2, corrupt=2)
    config = ray_config(manifest)
    dataset = ImageFiles([tmp_path / "img_0000.png", tmp_path / "img_0001.png"], [0, 1])
    table = source_table(dataset, seed=0).to_pydict()
    batch = {
        key: np.array(values, dtype=object if key == "path" else None)
        for key, values in table.items()
    }
    with pytest.raises(UnreadableImagesError, match="img_000"):
        make_views(batch, MultiCropAugmentation(config.data), seed=0)


def test_in_memory_images_travel_as_pixels_in_a_seeded_order() -> None:
    pixels = torch.arange(10 * 3 * 4 * 4, dtype=torch.int64).reshape(10, 3, 4, 4) % 256
    dataset = TensorImages(pixels.to(torch.uint8), torch.arange(10))
    first, again = source_table(dataset, seed=3), source_table(dataset, seed=3)
    assert first.equals(again)
    ids = first.column("id").to_pylist()
    assert sorted(ids) == list(range(10)) and ids != list(range(10))
    rows = first.column("pixels").combine_chunks().to_numpy()
    for index, row in zip(ids, rows, strict=True):
        assert (row == dataset.images[index].numpy()).all()
    assert first.column("label").to_pylist() == ids


def test_the_ray_loader_needs_a_free_cpu_beside_the_workers() -> None:
    config = factories.tiny_config(data={"loader": "ray"})
    placement = plan_placement(config, 2, cluster_has_gpus=False)
    assert placement.loader_cpus == 1.0
    two_cpus = [{"Alive": True, "Resources": {"CPU": 1.0}}] * 2
    with pytest.raises(InsufficientResourcesError, match=r"data\.loader 'ray'"):
        check_cluster_capacity(placement, two_cpus)
    check_cluster_capacity(placement, [*two_cpus, {"Alive": True, "Resources": {"CPU": 1.0}}])
    torch_loader = Placement(2, False, {"CPU": 1.0}, "PACK")
    check_cluster_capacity(torch_loader, two_cpus)


def test_training_in_process_refuses_the_ray_loader(tmp_path: Path) -> None:
    from service.cli import app

    config = tmp_path / "config.yaml"
    config.write_text("data:\n  kind: digits\n  loader: ray\n")
    result = CliRunner().invoke(app, ["train", str(config), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--workers" in result.output


def test_in_memory_images_stream_as_views(cluster: Any) -> None:
    config = factories.tiny_config(data={"loader": "ray", "max_samples": 40})
    rows = train_dataset(config).take_all()
    assert sorted(row["id"] for row in rows) == list(range(40))
    assert all(not row["unreadable"] for row in rows)
    sizes = [config.data.global_crop_size] * 2 + [config.data.local_crop_size] * 2
    for view, size in enumerate(sizes):
        assert {row[f"view_{view}"].shape for row in rows} == {(3, size, size)}


def test_a_packed_split_streams_from_its_shards(cluster: Any, tmp_path: Path) -> None:
    manifest = labelled_manifest(tmp_path / "images", 40, corrupt=1)
    pack_images(manifest, tmp_path / "packed", verify=False, shard_bytes=4096)
    config = ray_config(tmp_path / "packed")
    train = build_splits(config.data, seed=0).train
    assert isinstance(train, PackedImages) and len(train.shards) > 1
    rows = train_dataset(config).take_all()
    # Every training image once (held-out rows dropped), with its own label, and the
    # corrupt one (pack index 0, trained on) flagged where it was replaced.
    assert sorted(row["id"] for row in rows) == list(range(len(train)))
    flagged = [row for row in rows if row["unreadable"]]
    assert [train.rows[row["id"]] for row in flagged] == [0]
    for row in rows:
        if not row["unreadable"]:
            assert row["label"] == train.labels[row["id"]]


def test_ray_data_makes_its_views_on_cpus() -> None:
    with pytest.raises(ConfigError, match=r"cannot go with data\.loader 'ray'"):
        factories.tiny_config(data={"loader": "ray", "augment_device": "device"})
    factories.tiny_config(data={"loader": "ray", "augment_device": "auto"})
