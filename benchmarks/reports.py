"""Helpers the benchmark scripts share for their results files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves half a report."""
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=1))
    os.replace(partial, path)
