"""The repository's structural contracts: pure validation, one-way layers, no side effects.

Each check runs in a fresh interpreter where it is about what an import loads or changes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"trainer": set(), "tuning": {"trainer"}, "service": {"trainer", "tuning"}}
"""Each package and the klssl packages it may import: trainer <- tuning <- service."""


def run_python(code: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_validating_configs_imports_no_torch_timm_or_ray() -> None:
    run_python(
        "import sys\n"
        "from trainer.config import validate_config\n"
        "from tuning.config import validate_sweep\n"
        "from trainer.spec import TrainJobSpec\n"
        "config = validate_config({'model': {'backbone': 'vit_small_patch16_224'},"
        " 'data': {'kind': 'imagefolder', 'path': '/not/here'}})\n"
        "TrainJobSpec(config=config)\n"
        "validate_sweep({'base': {}, 'space': {'objective.teacher_temp':"
        " {'type': 'uniform', 'low': 0.02, 'high': 0.07}}})\n"
        "loaded = {'torch', 'timm', 'ray'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )


def test_the_distributed_modules_have_no_side_effects_at_import() -> None:
    # Ray and torch set variables of their own as they load: import them first, so the
    # snapshot sees only what klssl's modules would change.
    run_python(
        "import os\n"
        "import mlflow, pyarrow.fs, ray, ray.train.torch, ray.tune, timm, torch\n"
        "before = dict(os.environ)\n"
        "import trainer.distributed.launcher, trainer.distributed.worker\n"
        "import tuning.driver\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
    )


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names, at any depth of the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_point_one_way_and_use_no_private_ray_modules() -> None:
    wrong = []
    for package, allowed in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imports_of(path):
                top = name.split(".")[0]
                if top in LAYERS and top != package and top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
                if top == "ray" and any(part.startswith("_") for part in name.split(".")):
                    wrong.append(f"{path.relative_to(ROOT)} imports private {name}")
    assert not wrong, "\n".join(wrong)


def test_the_repository_cites_no_file_outside_it() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    citing = [
        name
        for name in tracked
        if name.endswith((".py", ".md", ".yaml", ".yml", ".toml"))
        and "shared/DESIGN.md" in (ROOT / name).read_text(errors="replace")
        and name != "tests/test_layers.py"
    ]
    assert not citing, citing
