"""``klssl data pack`` as a user runs it: progress, summary, refusals and exit codes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from typer.testing import CliRunner

from service.cli import app as klssl
from tests.trainer.test_files import files_config, labelled_folder, unlabelled_folder
from trainer.data import PackedImages, build_splits
from trainer.packing import read_pack

runner = CliRunner()


def test_pack_shows_progress_and_a_summary_of_a_readable_pack(tmp_path: Path) -> None:
    labelled_folder(tmp_path / "digits", 30)
    (tmp_path / "digits" / "3" / "broken.jpg").write_bytes(b"not a JPEG")
    packed = runner.invoke(
        klssl,
        ["data", "pack", str(tmp_path / "digits"), str(tmp_path / "pack"), "--labels", "folders"],
    )
    assert packed.exit_code == 0, packed.output
    assert "packing" in packed.stderr and "31/31" in packed.stderr  # the bar's last state
    assert "1 file(s) cannot be read and were left out" in packed.stderr
    assert "3/broken.jpg: cannot be decoded" in packed.stderr
    assert packed.stdout.startswith("packed 30 images into 1 shard(s), ")
    assert "10 classes (0, 1, 2, 3, 4, ...); 1 left out as unreadable" in packed.stdout
    assert os.listdir(tmp_path / "pack") == ["part-00000.parquet"]
    layout = read_pack(tmp_path / "pack")
    assert len(layout) == 30 and layout.class_names == [str(digit) for digit in range(10)]


def test_pack_refusals_exit_2_with_the_reason_and_write_nothing(tmp_path: Path) -> None:
    unlabelled_folder(tmp_path / "photos", 6)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    (tmp_path / "nothing").mkdir()
    cases = {
        ("photos", "full"): "destination .*full is not empty \\(1 entries: mine.txt\\)",
        ("photos", "photos/pack"): "lies inside the source folder",
        ("nothing", "out"): "files: no images",
        ("photos", "s3://A/b"): "DST: 's3://A/b': object storage is read as",
    }
    for (source, destination), reason in cases.items():
        target = destination if "://" in destination else str(tmp_path / destination)
        result = runner.invoke(klssl, ["data", "pack", str(tmp_path / source), target])
        assert result.exit_code == 2, result.output
        assert re.search(reason, " ".join(result.stderr.split())), result.stderr
        assert "packing" not in result.stderr  # refused before any file is read
    assert os.listdir(tmp_path / "full") == ["mine.txt"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "photos" / "pack").exists()

    bad = runner.invoke(klssl, ["data", "pack", str(tmp_path / "photos"), "x", "--shard-mb", "0"])
    assert bad.exit_code == 2 and "--shard-mb" in bad.stderr

    unchecked = runner.invoke(
        klssl,
        [
            "data",
            "pack",
            str(tmp_path / "photos"),
            str(tmp_path / "p"),
            "--no-verify",
            "--no-progress",
        ],
    )
    assert unchecked.exit_code == 0 and "packing" not in unchecked.stderr
    assert "packed 6 images into 1 shard(s)" in unchecked.stdout
    splits = build_splits(files_config(tmp_path / "p").data, seed=0)
    assert isinstance(splits.train, PackedImages) and len(splits.train) == 6
