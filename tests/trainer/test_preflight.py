"""Preflight: the environment checks that validation leaves out (paths, backbone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer.config import TrainConfig, validate_config
from trainer.preflight import (
    ALLOWED_ROOTS_ENV_VAR,
    PreflightError,
    allowed_roots_from_env,
    preflight,
)


def folder_config(path: Path | str, backbone: str = "resnet18") -> TrainConfig:
    """A config whose data is an image folder at ``path`` (validated, never read)."""
    return validate_config(
        {"data": {"kind": "imagefolder", "path": str(path)}, "model": {"backbone": backbone}}
    )


def problems(config: TrainConfig, roots: list[Path] | None = None) -> dict[str, str]:
    with pytest.raises(PreflightError) as caught:
        preflight(config, allowed_roots=roots)
    return dict(caught.value.fields)


def test_validation_alone_accepts_a_missing_path_and_an_unknown_backbone() -> None:
    config = folder_config("/no/such/dir", backbone="resnet19")
    assert config.data.path == Path("/no/such/dir")
    found = problems(config)
    assert found["data.path"] == "path '/no/such/dir' does not exist"
    assert "unknown backbone 'resnet19'; close timm names: resnet18" in found["model.backbone"]


def test_close_names_are_suggested_for_a_misspelt_vit() -> None:
    config = validate_config({"model": {"backbone": "vit_smal_patch16_224"}})
    assert "vit_small_patch16" in problems(config)["model.backbone"]


def test_a_path_inside_a_root_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "data" / "a").mkdir(parents=True)
    ready = preflight(folder_config(tmp_path / "data" / "." / "a"), allowed_roots=[tmp_path])
    assert ready.data.path == (tmp_path / "data" / "a").resolve()


def test_outside_reads_the_same_whether_or_not_the_path_exists(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    existing = problems(folder_config(tmp_path / "secret"), [root])["data.path"]
    missing = problems(folder_config(tmp_path / "nothing"), [root])["data.path"]
    assert "resolves outside the allowed data roots" in existing
    assert existing.replace("secret", "X") == missing.replace("nothing", "X")


def test_a_symlink_out_of_a_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert (
        "outside the allowed data roots"
        in problems(folder_config(root / "link"), [root])["data.path"]
    )


def test_a_home_relative_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pictures").mkdir()
    assert preflight(folder_config("~/pictures")).data.path == (tmp_path / "pictures").resolve()


def test_worker_roots_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOWED_ROOTS_ENV_VAR, raising=False)
    assert allowed_roots_from_env() is None
    monkeypatch.setenv(ALLOWED_ROOTS_ENV_VAR, '["/data", "/srv/images"]')
    assert allowed_roots_from_env() == [Path("/data"), Path("/srv/images")]
    monkeypatch.setenv(ALLOWED_ROOTS_ENV_VAR, os.pathsep.join(["/a", "/b"]))
    assert allowed_roots_from_env() == [Path("/a"), Path("/b")]
    monkeypatch.setenv(ALLOWED_ROOTS_ENV_VAR, "[not json")
    with pytest.raises(ValueError, match="not a JSON list"):
        allowed_roots_from_env()
