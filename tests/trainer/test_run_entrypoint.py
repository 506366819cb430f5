"""``python -m trainer.run`` against a running Ray cluster that requires a token.

The cluster is owned by a helper process (started with ``RAY_AUTH_MODE=token``) so that
its token settings never leak into this test process; the job processes get only
``RAY_ADDRESS`` and ``RAY_AUTH_TOKEN``, as the service gives them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

TOKEN = "klssl-test-token-5f0c3a9e2b7d4c1f8a6e0b3d"
OWNER = """
import sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes this pipe
cluster.shutdown()
"""
CONFIG = """
name: entrypoint-test
data: {kind: digits, max_samples: 96, global_crop_size: 16, local_crop_size: 8,
       num_local_crops: 2, batch_size: 32}
model: {backbone: vit_tiny_patch16_224, patch_size: 4, backbone_kwargs: {depth: 1},
        head_hidden_dim: 32, head_bottleneck_dim: 16, head_layers: 2}
objective: {num_clusters: 32}
schedule: {epochs: 1, warmup_epochs: 0}
eval: {knn_k: [5]}
runtime: {device: cpu, log_every_steps: 1}
"""


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[str]:
    """The address of a one-node Ray cluster with token authentication on."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert owner.stdout is not None and owner.stdin is not None
    address = owner.stdout.readline().strip()
    try:
        assert address, "the cluster owner did not start"
        yield address
    finally:
        owner.stdin.close()
        owner.wait(timeout=60)


def run_job(address: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_AUTH", "MLFLOW_", "KLSSL_"))
    }
    env |= {"RAY_ADDRESS": address, "RAY_AUTH_TOKEN": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "trainer.run", str(config), "--output", str(tmp_path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # relative paths must not depend on the repository
    )


def test_job_connects_with_the_token_trains_and_tracks(token_cluster: str, tmp_path: Path) -> None:
    job = run_job(token_cluster, tmp_path, "--workers", "1", "--tag", "klssl.job_id=j-42")
    assert job.returncode == 0, job.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in job.stderr
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert summary["storage"].startswith((tmp_path / "ray").resolve().as_uri())
    assert summary["metrics"]["epoch"] == 1.0 and "knn_top1" in summary["metrics"]
    assert len(summary["checkpoints"]) == 1
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["klssl.job_id"] == "j-42"
    assert run.data.params["data.max_samples"] == "96"


def test_job_asking_for_more_than_the_cluster_exits_3(token_cluster: str, tmp_path: Path) -> None:
    job = run_job(token_cluster, tmp_path, "--workers", "2")
    assert job.returncode == 3, job.stderr[-3000:]
    message = " ".join(job.stderr.split())  # rich wraps long lines
    assert "asks for 2 workers" in message and "CPU=1 in total" in message
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
        f"sqlite:///{tmp_path / 'mlflow.db'}"
    ).search_experiments(filter_string="name = 'entrypoint-test'")
