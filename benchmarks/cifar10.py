"""The CIFAR-10 ImageFolder the benchmarks train on, unpacked from the shared archive.

Kept apart from the Ray-based sweep benchmark so that benchmarks which run without Ray
(`quality.py`, `gpu.py`) can import it.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train.tar.gz"
DATA = ROOT / ".data" / "train"


def ensure_data(archive: Path = ARCHIVE, target: Path = DATA) -> Path:
    """The CIFAR-10 ImageFolder, unpacked from the shared archive on first use."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target.parent, filter="data")
    return target
