"""The README's configuration reference matches the pydantic models."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.reference import END, START, render, replace_block

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_reference_is_generated_from_the_current_models() -> None:
    text = README.read_text()
    assert replace_block(text, render()) == text, (
        "README.md's configuration reference is stale: run "
        "`.venv/bin/python -m service.reference --write README.md`"
    )


def test_every_config_field_is_in_the_reference() -> None:
    block = render()
    for path in ("objective.teacher_temp", "objective.prior_momentum", "runtime.num_workers"):
        assert f"`{path}`" in block
    for setting in ("KLSSL_DATABASE_URL", "KLSSL_RAY_AUTH_TOKEN", "KLSSL_API_TOKENS"):
        assert f"`{setting}`" in block
    assert "`asha.grace_period`" in block and "`collapse.threshold`" in block


def test_a_file_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match=START.split()[0]):
        replace_block("no markers here", "x")
    assert replace_block(f"a{START}old{END}b", "new") == f"a{START}new{END}b"
