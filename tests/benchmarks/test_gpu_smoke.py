"""benchmarks/gpu.py --smoke: every section runs tiny on the CPU, without Ray or MLflow.

The script runs in a subprocess whose imports of Ray, MLflow and the service's other
dependencies fail, as on the bare GPU machine it is written for (torch, torchvision,
timm, numpy, pydantic, PyYAML, Pillow and scikit-learn only).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
ABSENT_ON_THE_GPU_MACHINE = (
    "ray",
    "mlflow",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "psycopg",
    "alembic",
    "pydantic_settings",
    "typer",
    "prometheus_client",
    "optuna",
    "pyarrow",
    "boto3",
    "matplotlib",
)
SECTIONS = (
    "vit_s16",
    "vit_s16_compiled",
    "resnet18_cifar",
    "input_bound",
    "augmentation",
    "quality",
)

# Runs the script as `python benchmarks/gpu.py ...` would, with the modules above missing.
RUNNER = """
import importlib.abc, runpy, sys

ABSENT = set(sys.argv[1].split(","))

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)")
        return None

sys.meta_path.insert(0, Absent())
script = sys.argv[2]
sys.argv = sys.argv[2:]
sys.path.insert(0, script.rsplit("/", 1)[0])
runpy.run_path(script, run_name="__main__")
"""


def run_gpu_benchmark(*args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    environment = os.environ | {"PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(ABSENT_ON_THE_GPU_MACHINE), str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=300,
    )
    output = Path(args[args.index("--output") + 1])
    report = json.loads((output / "gpu.json").read_text()) if (output / "gpu.json").exists() else {}
    return completed, report


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("gpu-smoke")
    completed, report = run_gpu_benchmark("--smoke", "--output", str(output))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return report


def result(report: dict[str, Any], name: str) -> dict[str, Any]:
    entry = report["sections"][name]
    assert entry["status"] == "ok", entry.get("traceback")
    assert entry["seconds"] > 0
    section: dict[str, Any] = entry["result"]
    return section


def test_every_section_ran_and_none_failed(smoke: dict[str, Any]) -> None:
    assert smoke["smoke"] is True
    assert set(SECTIONS) <= set(smoke["sections"])
    assert smoke["failed"] == []
    assert smoke["environment"]["gpu"] is None


@pytest.mark.parametrize("name", ["vit_s16", "vit_s16_compiled", "resnet18_cifar"])
def test_step_sections_report_throughput_and_mfu(smoke: dict[str, Any], name: str) -> None:
    step = result(smoke, name)
    assert step["images_per_s"] > 0 and step["timed_steps"] >= 1
    assert step["flops_per_step"] > 0
    assert 0 < step["mfu"] <= 1
    assert step["peak_tflops"] == 989.0
    assert step["peak_memory_gib"] is None  # no CUDA memory on the CPU
    assert math.isclose(step["images_per_s"], step["batch"] / (step["step_ms"] / 1e3), rel_tol=1e-3)
    # The CPU keeps the plain code: no channels_last, no fused optimiser.
    assert not step["channels_last"] and not step["fused_optimizer"]


def test_the_vit_steps_run_in_bf16_and_the_compiled_one_compiles(smoke: dict[str, Any]) -> None:
    eager, compiled = result(smoke, "vit_s16"), result(smoke, "vit_s16_compiled")
    for step in (eager, compiled):
        assert step["precision"] == "bf16" and step["backbone_compute_dtype"] == "bfloat16"
        assert step["views"] == "2x16+10x8"
    assert eager["compile_backend"] is None
    assert compiled["compile_backend"] == "eager"
    assert compiled["flops_per_step"] == eager["flops_per_step"]


def test_the_input_bound_section_measures_the_loader_wait(smoke: dict[str, Any]) -> None:
    loader = result(smoke, "input_bound")
    assert loader["loader_workers"] == 1 and loader["batches"] >= 2
    assert 0 <= loader["loader_wait_share"] <= 1
    assert loader["input_bound"] == (loader["loader_wait_share"] > loader["input_bound_threshold"])
    assert loader["images_per_s"] > 0


def test_the_augmentation_section_compares_the_device_with_one_core(
    smoke: dict[str, Any],
) -> None:
    views = result(smoke, "augmentation")
    assert views["device_images_per_s"] > 0 and views["cpu_one_core_images_per_s"] > 0
    ratio = views["device_images_per_s"] / views["cpu_one_core_images_per_s"]
    assert math.isclose(views["ratio_device_over_one_core"], ratio, rel_tol=1e-6)
    assert views["target_met"] is None  # judged on CUDA only


def test_the_quality_run_reports_knn_beside_its_baselines(smoke: dict[str, Any]) -> None:
    run = result(smoke, "quality")
    assert run["epochs"] >= 1 and run["steps"] >= 1
    for key in ("knn_top1", "random_init_knn_top1", "pixels_knn_top1"):
        assert 0 <= run[key] <= 100
    assert run["final"]["knn_top1"] == run["knn_top1"]


def test_a_failing_section_is_recorded_and_fails_the_command(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    completed, report = run_gpu_benchmark(
        "--smoke", "--only", "input_bound", "--data", str(missing), "--output", str(tmp_path)
    )
    assert completed.returncode == 1
    entry = report["sections"]["input_bound"]
    assert entry["status"] == "error"
    assert str(missing) in entry["error"]
    assert report["failed"] == ["input_bound"]
