"""Own images and checkpoints on object storage (``s3://``), against a real S3 server.

moto's server mode (a real HTTP S3 endpoint, started here on a free port) serves a
bucket of images: a prefix of unlabelled nested images trains (in this process with
loader worker processes, and on Ray Train with checkpoints in the same bucket); manifests
list keys relative to themselves; a corrupt object is counted and replaced; missing keys,
keys that leave the manifest's prefix and URIs outside the allowed prefixes are errors
before anything trains.
"""

from __future__ import annotations

import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import pytest
from PIL import Image

from tests.factories import ray_cluster, tiny_config
from tests.trainer.test_files import Quiet, digit_images
from trainer.config import TrainConfig
from trainer.data import ImageFiles, build_splits
from trainer.distributed.launcher import launch_training
from trainer.loop import build_run, run_training
from trainer.object_store import s3_filesystem
from trainer.preflight import PreflightError, preflight

BUCKET = "klssl-data"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def s3() -> Iterator[pyarrow.fs.S3FileSystem]:
    """A real S3 endpoint with one bucket; the environment points klssl at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "KLSSL_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "klssl-test",
        "AWS_SECRET_ACCESS_KEY": "klssl-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        import boto3  # moto's own dependency: the bucket is made as a user would

        boto3.client("s3", endpoint_url=env["KLSSL_S3_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield s3_filesystem()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def put_png(filesystem: pyarrow.fs.S3FileSystem, key: str, image: Any) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB").save(buffer, format="PNG")
    with filesystem.open_output_stream(f"{BUCKET}/{key}") as stream:
        stream.write(buffer.getvalue())


def put_text(filesystem: pyarrow.fs.S3FileSystem, key: str, text: str) -> None:
    with filesystem.open_output_stream(f"{BUCKET}/{key}") as stream:
        stream.write(text.encode())


def put_images(filesystem: pyarrow.fs.S3FileSystem, prefix: str, count: int) -> list[str]:
    """``count`` digit images under ``prefix`` in nested, class-free folders."""
    keys = []
    for index, image in enumerate(digit_images(count)[0]):
        key = f"{prefix}/roll_{index % 3}/img_{index:04d}.png"
        put_png(filesystem, key, image)
        keys.append(key)
    put_text(filesystem, f"{prefix}/README.txt", "not an image")
    return keys


def s3_config(path: str, **data: Any) -> TrainConfig:
    return tiny_config(
        data={"kind": "files", "path": path, "max_samples": None, **data},
        schedule={"epochs": 1, "warmup_epochs": 0},
    )


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_prefix_of_unlabelled_images_trains(
    s3: pyarrow.fs.S3FileSystem, loader_workers: int
) -> None:
    keys = put_images(s3, f"photos-{loader_workers}", 64)
    put_text(s3, f"photos-{loader_workers}/roll_0/img_0000.png", "corrupt")  # overwritten
    config = s3_config(
        f"s3://{BUCKET}/photos-{loader_workers}",
        loader_workers=loader_workers,
        max_unreadable_fraction=0.05,
    )
    splits = build_splits(config.data, seed=0)
    assert isinstance(splits.train, ImageFiles)
    assert splits.train.files == sorted(f"s3://{BUCKET}/{key}" for key in keys)
    metrics = run_training(build_run(config), Quiet())
    assert metrics["unreadable_images"] == 1  # the corrupt object, from any process
    assert "target_mutual_info" in metrics and "knn_top1" not in metrics


def test_manifests_on_object_storage(s3: pyarrow.fs.S3FileSystem) -> None:
    images, labels = digit_images(40)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        put_png(s3, f"sets/a/{label}/{index:03d}.png", image)
    rows = [f"{label}/{index:03d}.png,digit_{label}" for index, label in enumerate(labels)]
    put_text(s3, "sets/a/labels.csv", "path,label\n" + "\n".join(rows) + "\n")
    splits = build_splits(s3_config(f"s3://{BUCKET}/sets/a/labels.csv").data, seed=0)
    assert splits.num_classes == 10 and len(splits.train) + len(splits.holdout) == 40

    cases = {
        "missing.txt": ("0/000.png\nnope/1.png\n", "lists 1 of 2 objects that do not exist"),
        "escape.txt": ("../b/x.png\n", "1 entries leave its prefix"),
        "absolute.txt": ("s3://other/x.png\n", "1 entries leave its prefix"),
    }
    for name, (text, reason) in cases.items():
        put_text(s3, f"sets/a/{name}", text)
        with pytest.raises(ValueError, match=reason):
            build_splits(s3_config(f"s3://{BUCKET}/sets/a/{name}").data, seed=0)
    with pytest.raises(ValueError, match="no images"):
        build_splits(s3_config(f"s3://{BUCKET}/nothing-here").data, seed=0)


def test_uris_outside_the_allowed_prefixes_are_refused() -> None:
    allowed = [f"s3://{BUCKET}/photos"]
    ok = preflight(s3_config(f"s3://{BUCKET}/photos/2026"), allowed_uris=allowed)
    assert ok.data.path == f"s3://{BUCKET}/photos/2026"
    for uri, reason in (
        (f"s3://{BUCKET}/photosynthesis", "outside the allowed data URIs"),
        (f"s3://{BUCKET}/photos/../secrets", "'..' segments"),
        ("s3://another-bucket/photos", "outside the allowed data URIs"),
    ):
        with pytest.raises(PreflightError) as error:
            preflight(s3_config(uri), allowed_uris=allowed)
        assert [field for field, _ in error.value.fields] == ["data.path"]
        assert reason in str(error.value)
    with pytest.raises(PreflightError, match="none configured"):
        preflight(s3_config(f"s3://{BUCKET}/photos"), allowed_uris=[])


@pytest.mark.slow
def test_ray_train_reads_the_data_and_writes_checkpoints_to_the_bucket(
    s3: pyarrow.fs.S3FileSystem, tmp_path: Path
) -> None:
    put_images(s3, "ray-photos", 64)
    config = s3_config(f"s3://{BUCKET}/ray-photos", batch_size=16).model_copy(deep=True)
    # The node inherits the S3 environment, and so do its workers.
    with ray_cluster(2):
        result = launch_training(
            config,
            workers=1,
            storage_path=f"s3://{BUCKET}/checkpoints",
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            run_name="s3-run",
        )
    assert result.storage_uri.startswith(f"s3://{BUCKET}/checkpoints")
    assert result.checkpoints, "no checkpoint recorded"
    stored = s3.get_file_info(
        pyarrow.fs.FileSelector(f"{BUCKET}/checkpoints/s3-run", recursive=True)
    )
    names = {Path(info.path).name for info in stored}
    assert {"state.pt", "config.json"} <= names
    assert "target_mutual_info" in result.metrics
