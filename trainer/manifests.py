"""Where the images of ``data.kind: files`` are: a folder, a glob, or a manifest.

- a folder: every image file (`IMAGE_EXTENSIONS`, case-insensitive) at any depth, hidden
  files and folders skipped, in sorted order; no labels;
- a folder and ``data.pattern``: the files the glob matches (relative to the folder);
- a manifest: ``.txt`` (one path per line; blank lines and ``#`` comments skipped),
  ``.csv`` (a header with a ``path`` column and optionally ``label``; labels are class
  names, numbered in sorted order) or ``.parquet`` (the same columns: ``path`` strings,
  ``label`` strings or integers read as names). Listed paths are relative to the
  manifest's folder; a ``.parquet`` with an ``image`` column is a packed dataset
  (`trainer.packing`), not a manifest;
- an ``s3://bucket/prefix``: the same, on object storage (`trainer.object_store`): the
  image objects under the prefix, or the manifest object it names. Listed keys must not
  leave the manifest's prefix (no ``..``, no absolute paths or URIs).

Every listed file must exist (all missing ones are counted, the first few named, before
anything trains); whether each resolves inside the data folder is checked by the caller
(`trainer.data.check_confined`), as for imagefolder.
"""

from __future__ import annotations

import csv
import fnmatch
import io
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

from trainer.object_store import is_object_uri, path_of, process_filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
"""File types read as images (decoded by Pillow, `trainer.data.decode_rgb`)."""
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
UNLABELLED = -1
"""The label of an image without one."""
SHOWN = 5


@dataclass(frozen=True)
class FoundImages:
    """Image files (paths, or ``s3://`` URIs), their labels (`UNLABELLED` for all when
    there are none) and class names; ``root`` is the folder local files must stay in."""

    root: Path | None
    files: list[Path | str]
    labels: list[int]
    class_names: list[str]


def find_image_files(location: str | Path, pattern: str | None = None) -> FoundImages:
    """The images ``location`` (a folder, a prefix or a manifest) and ``pattern`` stand for.

    Raises:
        ValueError: no images, a manifest of another type, a malformed manifest, or
            listed files that do not exist.
    """
    if isinstance(location, str) and is_object_uri(location):
        return _from_object_store(location, pattern)
    path = Path(location).expanduser()
    if path.is_dir():
        return _from_folder(path, pattern)
    if pattern is not None:
        raise ValueError(f"data.pattern applies to a folder; {path} is a file")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(
            f"files: {path} is neither a folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
    entries = _read_manifest(path.read_bytes(), path)
    return _from_entries(path, entries)


def is_image(path: PurePath) -> bool:
    """An image file by its name: a known extension, not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _from_folder(root: Path, pattern: str | None) -> FoundImages:
    candidates = root.glob(pattern) if pattern is not None else root.rglob("*")
    files: list[Path | str] = sorted(
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


def _read_manifest(data: bytes, name: str | Path) -> list[tuple[str, str | None]]:
    """(path, label or None) of every entry of a ``.txt``, ``.csv`` or ``.parquet``
    manifest's bytes."""
    suffix = str(name).lower()
    if suffix.endswith(".parquet"):
        return _read_parquet(data, name)
    text = data.decode()
    if suffix.endswith(".txt"):
        lines = (line.strip() for line in text.splitlines())
        return [(line, None) for line in lines if line and not line.startswith("#")]
    return _read_csv(io.StringIO(text), name)


def _read_csv(handle: io.StringIO, path: str | Path) -> list[tuple[str, str | None]]:
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


def _read_parquet(data: bytes, path: str | Path) -> list[tuple[str, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        manifest = pq.ParquetFile(pa.BufferReader(data))
        columns = manifest.schema_arrow.names
        if "image" in columns:
            raise ValueError(
                f"files: {path} is a packed dataset (it has an image column), not a manifest "
                "of paths; point data.path at it as it is"
            )
        if "path" not in columns:
            raise ValueError(
                f"files: manifest {path} needs a 'path' column (found: {', '.join(columns)})"
            )
        labelled = "label" in columns
        table = manifest.read(columns=["path", "label"] if labelled else ["path"])
    except (OSError, pa.ArrowException) as error:
        raise ValueError(f"files: manifest {path} cannot be read as Parquet: {error}") from None
    if not pa.types.is_string(table.schema.field("path").type) and not pa.types.is_large_string(
        table.schema.field("path").type
    ):
        raise ValueError(
            f"files: manifest {path}: the path column holds {table.schema.field('path').type}, "
            "not strings"
        )
    files = table.column("path").to_pylist()
    labels = table.column("label").to_pylist() if labelled else [None] * len(files)
    entries = []
    for number, (file, label) in enumerate(zip(files, labels, strict=True)):
        file = (file or "").strip()
        name = None if label is None else str(label).strip()
        if not file or (labelled and not name):
            raise ValueError(f"files: manifest {path} row {number}: empty path or label")
        entries.append((file, name))
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
    return _labelled(root, list(files), entries)


def _labelled(
    root: Path | None, files: list[Path | str], entries: list[tuple[str, str | None]]
) -> FoundImages:
    """Files with the manifest's labels numbered in sorted order of their names."""
    names = sorted({label for _, label in entries if label is not None})
    if not names:
        return FoundImages(root, files, [UNLABELLED] * len(files), [])
    number = {name: index for index, name in enumerate(names)}
    labels = [number[label] for _, label in entries if label is not None]
    return FoundImages(root, files, labels, names)


# --- object storage ----------------------------------------------------------------------


def _from_object_store(uri: str, pattern: str | None) -> FoundImages:
    import pyarrow.fs

    filesystem = process_filesystem()
    base = path_of(uri)
    info = filesystem.get_file_info(base)
    if info.type == pyarrow.fs.FileType.File:
        if pattern is not None:
            raise ValueError(f"data.pattern applies to a prefix; {uri} is an object")
        if not base.lower().endswith(MANIFEST_SUFFIXES):
            raise ValueError(f"files: {uri} is neither a prefix nor a manifest")
        with filesystem.open_input_stream(base) as stream:
            data = stream.read()
        return _from_object_entries(uri, _read_manifest(data, base))
    selector = pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True)
    keys = sorted(
        entry.path
        for entry in filesystem.get_file_info(selector)
        if entry.type == pyarrow.fs.FileType.File
        and is_image(PurePosixPath(entry.path))
        and not any(part.startswith(".") for part in PurePosixPath(entry.path).parts)
        and (pattern is None or fnmatch.fnmatch(entry.path[len(base) + 1 :], pattern))
    )
    if not keys:
        wanted = f"matching {pattern!r}" if pattern else f"({', '.join(IMAGE_EXTENSIONS)})"
        raise ValueError(f"files: no images {wanted} under {uri}")
    files: list[Path | str] = [f"s3://{key}" for key in keys]
    return FoundImages(None, files, [UNLABELLED] * len(files), [])


def _from_object_entries(manifest: str, entries: list[tuple[str, str | None]]) -> FoundImages:
    import pyarrow.fs

    if not entries:
        raise ValueError(f"files: manifest {manifest} lists no images")
    escaping = [
        file
        for file, _ in entries
        if file.startswith("/") or "://" in file or ".." in file.split("/")
    ]
    if escaping:
        raise ValueError(
            f"files: manifest {manifest}: {len(escaping)} entries leave its prefix "
            f"({', '.join(escaping[:SHOWN])}); list keys relative to the manifest"
        )
    prefix = path_of(manifest).rpartition("/")[0]
    keys = [f"{prefix}/{file}" for file, _ in entries]
    infos = process_filesystem().get_file_info(keys)
    missing = [f"s3://{info.path}" for info in infos if info.type != pyarrow.fs.FileType.File]
    if missing:
        shown = ", ".join(missing[:SHOWN])
        raise ValueError(
            f"files: manifest {manifest} lists {len(missing)} of {len(keys)} objects that do "
            f"not exist: {shown}{', ...' if len(missing) > SHOWN else ''}"
        )
    files: list[Path | str] = [f"s3://{key}" for key in keys]
    return _labelled(None, files, entries)
