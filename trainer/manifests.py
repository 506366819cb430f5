"""Where the images of ``data.kind: files`` are: a folder, a glob, or a manifest.

- a folder: every image file (`IMAGE_EXTENSIONS`, case-insensitive) at any depth, hidden
  files and folders skipped, in sorted order; no labels;
- a folder and ``data.pattern``: the files the glob matches (relative to the folder);
- a manifest: ``.txt`` (one path per line; blank lines and ``#`` comments skipped) or
  ``.csv`` (a header with a ``path`` column and optionally ``label``; labels are class
  names, numbered in sorted order). Listed paths are relative to the manifest's folder.

Every listed file must exist (all missing ones are counted, the first few named, before
anything trains); whether each resolves inside the data folder is checked by the caller
(`trainer.data.check_confined`), as for imagefolder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
"""File types read as images (decoded by Pillow, `trainer.data.decode_rgb`)."""
MANIFEST_SUFFIXES = (".txt", ".csv")
UNLABELLED = -1
"""The label of an image without one."""
SHOWN = 5


@dataclass(frozen=True)
class FoundImages:
    """Image files, their labels (`UNLABELLED` for all when there are none) and names."""

    root: Path
    files: list[Path]
    labels: list[int]
    class_names: list[str]


def find_image_files(path: Path, pattern: str | None = None) -> FoundImages:
    """The images ``path`` (a folder or a manifest) and ``pattern`` stand for.

    Raises:
        ValueError: no images, a manifest of another type, a malformed manifest, or
            listed files that do not exist.
    """
    if path.is_dir():
        return _from_folder(path, pattern)
    if pattern is not None:
        raise ValueError(f"data.pattern applies to a folder; {path} is a file")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(
            f"files: {path} is neither a folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
    entries = _read_txt(path) if path.suffix.lower() == ".txt" else _read_csv(path)
    return _from_entries(path, entries)


def is_image(path: Path) -> bool:
    """An image file by its name: a known extension, not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _from_folder(root: Path, pattern: str | None) -> FoundImages:
    candidates = root.glob(pattern) if pattern is not None else root.rglob("*")
    files = sorted(
        file
        for file in candidates
        if is_image(file)
        and file.is_file()
        and not any(part.startswith(".") for part in file.relative_to(root).parts)
    )
    if not files:
        wanted = f"matching {pattern!r}" if pattern else f"({', '.join(IMAGE_EXTENSIONS)})"
        raise ValueError(f"files: no images {wanted} under {root}")
    return FoundImages(root, files, [UNLABELLED] * len(files), [])


def _read_txt(path: Path) -> list[tuple[str, str | None]]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [(line, None) for line in lines if line and not line.startswith("#")]


def _read_csv(path: Path) -> list[tuple[str, str | None]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "path" not in columns:
            raise ValueError(
                f"files: manifest {path} needs a 'path' column (found: {', '.join(columns)})"
            )
        labelled = "label" in columns
        entries = []
        for number, row in enumerate(reader, start=2):
            file = (row.get("path") or "").strip()
            label = (row.get("label") or "").strip() if labelled else None
            if not file or (labelled and not label):
                raise ValueError(f"files: manifest {path} line {number}: empty path or label")
            entries.append((file, label))
    return entries


def _from_entries(manifest: Path, entries: list[tuple[str, str | None]]) -> FoundImages:
    if not entries:
        raise ValueError(f"files: manifest {manifest} lists no images")
    root = manifest.parent
    files = [root / file for file, _ in entries]
    missing = [file for file in files if not file.is_file()]
    if missing:
        shown = ", ".join(str(file) for file in missing[:SHOWN])
        raise ValueError(
            f"files: manifest {manifest} lists {len(missing)} of {len(files)} files that do "
            f"not exist: {shown}{', ...' if len(missing) > SHOWN else ''}"
        )
    names = sorted({label for _, label in entries if label is not None})
    if not names:
        return FoundImages(root, files, [UNLABELLED] * len(files), [])
    number = {name: index for index, name in enumerate(names)}
    labels = [number[label] for _, label in entries if label is not None]
    return FoundImages(root, files, labels, names)
