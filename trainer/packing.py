"""Packed datasets: image files as Parquet shards of their encoded bytes (``klssl data pack``).

A million small files are slow to list and to read one by one, on a shared disk and on
object storage alike; a few hundred large shards are not. The format:

- a pack is a folder (local, or an ``s3://`` prefix) of shards ``part-00000.parquet``,
  ``part-00001.parquet``, ... (numbered from 0, in order); a single shard file is also
  read as a pack;
- every shard has the columns ``index`` (int64: the row's position in the whole pack,
  0..N-1 across the shards in order), ``path`` (string: the source file's path relative
  to the source folder, or to the manifest's folder), ``image`` (binary: the file's bytes,
  unchanged: JPEG, PNG, ...; decoded on use) and ``label`` (int64: the class number,
  `UNLABELLED` = -1 in a pack without labels);
- the schema metadata key ``klssl.class_names`` holds a JSON list of the class names,
  numbered in that order (empty when unlabelled);
- rows follow the source's sorted (or listed) order; a shard holds about ``shard_bytes``
  of image bytes (default 256 MiB) in row groups of about ``row_group_bytes`` (default
  1 MiB: random access reads the row group of the image it wants, not the shard); the
  ``image`` column is stored uncompressed (the images are compressed already).

Writing (`pack_images`): the destination must be empty (or not exist) and must not lie
inside the source folder. Shards are written under hidden temporary names
(``.part-00000.parquet.tmp``) and renamed only once every shard is complete, so an
interrupted pack shows no ``part-*`` file at all, and a failed one removes its
temporaries. With ``verify`` (the default) every file is decoded as training decodes it
(`trainer.data.rgb_pixels`, Pillow); files that cannot be read or decoded are left out and
reported (their count, the first paths and reasons), never packed silently.
``verify=False`` packs the bytes unchecked (faster); training then counts the undecodable
ones like any unreadable image (``data.max_unreadable_fraction``).

Labels: ``labels="source"`` keeps the labels of a labelled manifest (.csv, .parquet) and
packs anything else unlabelled; ``labels="folders"`` treats the source folder as an
imagefolder root: each image's class is its first folder below the source
(``root/<class>/...``), classes numbered in sorted order.

Reading (`read_pack`): the shards' schemas, class names and ``index`` continuity are
checked up front (a missing or foreign shard is an error, not a silently smaller set);
only ``index`` and ``label`` are read then, the image bytes later, a row group at a time
(`trainer.data.PackedImages`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from trainer.manifests import UNLABELLED, find_image_files
from trainer.object_store import is_object_uri, path_of, process_filesystem

CLASS_NAMES_KEY = b"klssl.class_names"
"""Schema metadata key: the JSON list of class names (empty: unlabelled)."""
SHARD_NAME = re.compile(r"^part-(?P<number>\d+)\.parquet$")
SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
    ]
)
DEFAULT_SHARD_BYTES = 256 * 2**20
MAX_SHARD_BYTES = 4 * 2**30
DEFAULT_ROW_GROUP_BYTES = 2**20
MAX_IMAGE_BYTES = 512 * 2**20
"""A larger file is not packed (reported unreadable): one value of a binary column must
stay well under Arrow's 2 GiB, and no photo is that large."""
DEFAULT_READERS = 8
MAX_READERS = 64
SHOWN = 5

LabelSource = Literal["source", "folders"]
Progress = Callable[[int, int], None]
"""Called with (files done, files in all) as packing goes."""


def shard_name(number: int) -> str:
    """The file name of shard ``number``: ``part-00042.parquet``."""
    return f"part-{number:05d}.parquet"


@dataclass(frozen=True)
class PackSummary:
    """What `pack_images` wrote: rows, shards (paths or URIs), their bytes on storage, the
    class names, and the files left out as unreadable ((path, reason), in source order)."""

    images: int
    shards: list[str]
    bytes: int
    class_names: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)


# --- writing ------------------------------------------------------------------------------


def pack_images(
    source: str | Path,
    destination: str | Path,
    *,
    pattern: str | None = None,
    labels: LabelSource = "source",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    verify: bool = True,
    readers: int = DEFAULT_READERS,
    progress: Progress | None = None,
) -> PackSummary:
    """Pack the images of ``source`` into Parquet shards under ``destination``.

    Args:
        source: anything `trainer.manifests.find_image_files` reads: a folder (with
            ``pattern``, a glob), a .txt/.csv/.parquet manifest, an ``s3://`` prefix or
            manifest.
        destination: a new or empty local folder, or an empty ``s3://`` prefix.
        labels: ``"source"`` (a manifest's labels, if any) or ``"folders"`` (the first
            folder below the source names the class).
        shard_bytes: image bytes per shard, about (1 byte .. 4 GiB).
        row_group_bytes: image bytes per row group, about (at least one image each; at
            most ``shard_bytes``).
        verify: decode every image first and leave out (and report) unreadable ones.
        readers: threads reading (and verifying) files ahead of the writer (1..64).
        progress: called with (files done, files in all).

    Raises:
        ValueError: a source without images, a destination that is not empty or lies
            inside the source, labels that cannot be derived, bad sizes, or no image
            readable at all. Nothing is left at the destination.
        OSError: the destination cannot be written (its temporaries are removed).
    """
    if not 1 <= shard_bytes <= MAX_SHARD_BYTES:
        raise ValueError(f"shard size {shard_bytes} bytes is not in [1, {MAX_SHARD_BYTES}]")
    if not 1 <= row_group_bytes <= MAX_SHARD_BYTES:
        raise ValueError(f"row group size {row_group_bytes} is not in [1, {MAX_SHARD_BYTES}]")
    row_group_bytes = min(row_group_bytes, shard_bytes)  # a group never spans shards
    if not 1 <= readers <= MAX_READERS:
        raise ValueError(f"readers {readers} is not in [1, {MAX_READERS}]")
    found = find_image_files(source, pattern)
    base = _source_base(source)
    relative = [_relative(file, base) for file in found.files]
    numbers, class_names = _labels_of(relative, found.labels, found.class_names, labels, source)
    target = _Target.of(destination)
    target.refuse_inside(base)
    target.refuse_non_empty()
    writer = _ShardWriter(target, class_names, shard_bytes, row_group_bytes)
    unreadable: list[tuple[str, str]] = []
    try:
        with contextlib.closing(_load_all(found.files, verify, readers)) as loaded:
            for position, (data, problem) in enumerate(loaded):
                if data is None:
                    unreadable.append((relative[position], problem))
                else:
                    writer.add(relative[position], data, numbers[position])
                if progress is not None:
                    progress(position + 1, len(found.files))
        if writer.rows == 0:
            shown = "; ".join(f"{path}: {reason}" for path, reason in unreadable[:SHOWN])
            raise ValueError(f"pack: none of the {len(unreadable)} images can be read ({shown})")
        shards = writer.finish()
    except BaseException:
        writer.discard()
        raise
    stored = sum(info.size or 0 for info in target.filesystem.get_file_info(shards))
    names = [target.uri(shard) for shard in shards]
    return PackSummary(writer.rows, names, stored, class_names, unreadable)


def _source_base(source: str | Path) -> str:
    """The folder (or prefix) source paths are made relative to: the source folder, or
    the manifest's folder."""
    if isinstance(source, str) and is_object_uri(source):
        base = path_of(source)
        info = process_filesystem().get_file_info(base)
        is_file = info.type == pyarrow.fs.FileType.File
        return f"s3://{base.rpartition('/')[0] if is_file else base}"
    path = Path(source).expanduser().absolute()
    return str(path if path.is_dir() else path.parent)


def _relative(file: Path | str, base: str) -> str:
    if isinstance(file, str):  # an s3:// URI under the base prefix
        return file.removeprefix(base).lstrip("/")
    return Path(os.path.relpath(file.absolute(), base)).as_posix()


def _labels_of(
    relative: list[str],
    found_labels: list[int],
    found_names: list[str],
    labels: LabelSource,
    source: str | Path,
) -> tuple[list[int], list[str]]:
    if labels == "source":
        return found_labels, found_names
    if labels != "folders":
        raise ValueError(f"labels {labels!r}: expected 'source' or 'folders'")
    if found_names:
        raise ValueError(f"pack: {source} is a labelled manifest; labels='folders' is for folders")
    loose = [path for path in relative if "/" not in path or path.startswith("../")]
    if loose:
        raise ValueError(
            f"pack: labels from folders need every image in a class folder "
            f"(<source>/<class>/...); {len(loose)} are not: {', '.join(loose[:SHOWN])}"
        )
    classes = [path.split("/", 1)[0] for path in relative]
    names = sorted(set(classes))
    number = {name: index for index, name in enumerate(names)}
    return [number[name] for name in classes], names


def _load_all(
    files: list[Path | str], verify: bool, readers: int
) -> Generator[tuple[bytes | None, str], None, None]:
    """(bytes, "") or (None, reason) for every file, in order, read ``readers`` at a time."""
    check = _decoder() if verify else None
    window = 4 * readers
    with ThreadPoolExecutor(readers, thread_name_prefix="klssl-pack") as pool:
        pending: deque[Future[tuple[bytes | None, str]]] = deque()
        for file in files:
            pending.append(pool.submit(_load, file, check))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decoder() -> Callable[[bytes], object]:
    # trainer.data imports this module: imported on use. Its Pillow step alone, so that
    # reader threads run no torch operation (whose own threads would oversubscribe).
    from trainer.data import rgb_pixels

    return lambda data: rgb_pixels(io.BytesIO(data))


def _load(file: Path | str, check: Callable[[bytes], object] | None) -> tuple[bytes | None, str]:
    try:
        if isinstance(file, str):
            with process_filesystem().open_input_stream(path_of(file)) as stream:
                data: bytes = stream.read(MAX_IMAGE_BYTES + 1)
        else:
            with open(file, "rb") as handle:
                data = handle.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:
        return None, f"cannot be read: {error}"
    if len(data) > MAX_IMAGE_BYTES:
        return None, f"larger than {MAX_IMAGE_BYTES // 2**20} MiB"
    if check is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            check(data)
        except UnidentifiedImageError:  # its message names an in-memory buffer
            return None, "cannot be decoded: not an image format Pillow knows"
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return None, f"cannot be decoded: {error}"
    return data, ""


@dataclass(frozen=True)
class _Target:
    """Where a pack is written: a filesystem (local or S3) and the folder on it."""

    filesystem: pyarrow.fs.FileSystem
    base: str
    is_object: bool

    @classmethod
    def of(cls, destination: str | Path) -> _Target:
        if isinstance(destination, str) and is_object_uri(destination):
            return cls(process_filesystem(), path_of(destination), True)
        local = Path(destination).expanduser().absolute()
        return cls(pyarrow.fs.LocalFileSystem(), str(local), False)

    def uri(self, path: str) -> str:
        return f"s3://{path}" if self.is_object else path

    def refuse_inside(self, source_base: str) -> None:
        """A pack inside its source folder would be read back as part of it."""
        if self.is_object != source_base.startswith("s3://"):
            return
        if self.is_object:
            inside = f"{self.base}/".startswith(f"{path_of(source_base)}/")
        else:
            inside = Path(self.base).resolve().is_relative_to(Path(source_base).resolve())
        if inside:
            raise ValueError(
                f"pack: destination {self.uri(self.base)} lies inside the source folder "
                f"{source_base}; write the pack elsewhere"
            )

    def refuse_non_empty(self) -> None:
        info = self.filesystem.get_file_info(self.base)
        if info.type == pyarrow.fs.FileType.File:
            raise ValueError(f"pack: destination {self.uri(self.base)} is a file, not a folder")
        if info.type != pyarrow.fs.FileType.Directory:
            return
        entries = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.base))
        if entries:
            shown = ", ".join(Path(entry.path).name for entry in entries[:SHOWN])
            raise ValueError(
                f"pack: destination {self.uri(self.base)} is not empty ({len(entries)} "
                f"entries: {shown}); pack into a new or empty folder"
            )


class _ShardWriter:
    """Rows into row groups into shards, under temporary names until `finish`."""

    def __init__(
        self, target: _Target, class_names: list[str], shard_bytes: int, row_group_bytes: int
    ) -> None:
        self.target = target
        self.schema = SCHEMA.with_metadata({CLASS_NAMES_KEY: json.dumps(class_names).encode()})
        self.shard_bytes = shard_bytes
        self.row_group_bytes = row_group_bytes
        self.rows = 0
        self.written: list[str] = []  # temporary names, in shard order
        self.created = target.filesystem.get_file_info(target.base).type
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._group: dict[str, list[object]] = {name: [] for name in SCHEMA.names}
        self._in_group = 0

    def add(self, path: str, data: bytes, label: int) -> None:
        for name, value in zip(SCHEMA.names, (self.rows, path, data, label), strict=True):
            self._group[name].append(value)
        self.rows += 1
        self._in_group += len(data) + len(path)
        if self._in_group >= self.row_group_bytes:
            self._write_group()
        if self._in_shard >= self.shard_bytes:
            self._close_shard()

    def finish(self) -> list[str]:
        """Write what is buffered, then give every shard its final name (in order)."""
        self._write_group()
        self._close_shard()
        finals = []
        for number, temporary in enumerate(self.written):
            final = f"{self.target.base}/{shard_name(number)}"
            self.target.filesystem.move(temporary, final)
            finals.append(final)
        self.written = []
        return finals

    def discard(self) -> None:
        """Remove every temporary (and the destination folder when this made it)."""
        # Each step may fail on a folder already gone; what can be removed still is.
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        for temporary in self.written:
            with contextlib.suppress(OSError):
                self.target.filesystem.delete_file(temporary)
        self.written = []
        if self.created == pyarrow.fs.FileType.NotFound and not self.target.is_object:
            with contextlib.suppress(OSError):
                self.target.filesystem.delete_dir(self.target.base)

    def _write_group(self) -> None:
        if not self._group["index"]:
            return
        if self._writer is None:
            if not self.target.is_object:  # object stores have no folders to make
                self.target.filesystem.create_dir(self.target.base, recursive=True)
            temporary = f"{self.target.base}/.{shard_name(len(self.written))}.tmp"
            self.written.append(temporary)
            self._writer = pq.ParquetWriter(
                temporary,
                self.schema,
                filesystem=self.target.filesystem,
                compression={
                    "index": "snappy",
                    "path": "snappy",
                    "image": "none",
                    "label": "snappy",
                },
                use_dictionary=["label"],
                write_statistics=["index", "label"],
            )
        table = pa.Table.from_pydict(self._group, schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._in_shard += self._in_group
        self._group = {name: [] for name in SCHEMA.names}
        self._in_group = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._in_shard = 0


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PackLayout:
    """A pack's shards and where each row lives; the image bytes stay in the shards.

    ``first`` is the ``index`` of the first row (0 for a folder; a single shard file
    may start anywhere); ``labels[i]`` is the label of the row with index ``first + i``.
    Row group ``g`` (over the whole pack) is row group ``group_numbers[g]`` of shard
    ``group_shards[g]`` and starts at index ``group_starts[g]``.
    """

    shards: list[str]
    class_names: list[str]
    first: int
    labels: np.ndarray
    group_starts: np.ndarray
    group_shards: np.ndarray
    group_numbers: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def locate(self, index: int) -> tuple[int, int, int]:
        """(shard number, row group in that shard, row in that group) of pack ``index``."""
        group = int(np.searchsorted(self.group_starts, index, side="right")) - 1
        offset = index - int(self.group_starts[group])
        return int(self.group_shards[group]), int(self.group_numbers[group]), offset


def is_pack(location: str | Path) -> bool:
    """Whether ``location`` is a packed dataset: a folder (prefix) holding
    ``part-N.parquet`` shards, or a ``.parquet`` file with an ``image`` column (a
    ``.parquet`` without one is a manifest of paths)."""
    if isinstance(location, str) and is_object_uri(location):
        base = path_of(location)
        info = process_filesystem().get_file_info(base)
        if info.type == pyarrow.fs.FileType.File:
            return base.lower().endswith(".parquet") and _has_image_column(location)
        return bool(_object_shards(base))
    path = Path(location).expanduser()
    if path.is_dir():
        return any(SHARD_NAME.match(entry.name) for entry in path.iterdir())
    return path.suffix.lower() == ".parquet" and path.is_file() and _has_image_column(str(path))


def _has_image_column(shard: str) -> bool:
    try:
        with open_shard(shard) as handle:
            return "image" in handle.schema_arrow.names
    except (OSError, pa.ArrowException):  # not Parquet: find_image_files says what it is
        return False


def open_shard(shard: str) -> pq.ParquetFile:
    """A shard (a local path or an ``s3://`` URI) opened for reading, footer read."""
    if is_object_uri(shard):
        return pq.ParquetFile(process_filesystem().open_input_file(path_of(shard)))
    return pq.ParquetFile(shard)


def _object_shards(base: str) -> list[str]:
    selector = pyarrow.fs.FileSelector(base, recursive=False, allow_not_found=True)
    entries = process_filesystem().get_file_info(selector)
    return [
        f"s3://{entry.path}"
        for entry in entries
        if entry.type == pyarrow.fs.FileType.File
        and SHARD_NAME.match(entry.path.rpartition("/")[2])
    ]


def _shard_number(shard: str) -> int:
    match = SHARD_NAME.match(shard.rpartition("/")[2])
    assert match is not None  # listed because it matched
    return int(match["number"])


def _shards_of(location: str | Path) -> tuple[list[str], bool]:
    """The shards of a pack in order, and whether the location is a folder (prefix)."""
    if isinstance(location, str) and is_object_uri(location):
        base = path_of(location)
        shards = _object_shards(base)
        if not shards:
            return [location], False
    else:
        path = Path(location).expanduser()
        if not path.is_dir():
            return [str(path)], False
        shards = [str(entry) for entry in path.iterdir() if SHARD_NAME.match(entry.name)]
        if not shards:
            raise ValueError(f"pack {location}: no shards ({shard_name(0)}, ...) in the folder")
    number = {shard: _shard_number(shard) for shard in shards}
    ordered = sorted(shards, key=number.__getitem__)
    expected = list(range(len(ordered)))
    if [number[shard] for shard in ordered] != expected:
        missing = sorted(set(expected) - set(number.values()))
        raise ValueError(
            f"pack {location}: shards are not numbered 0..{len(ordered) - 1} "
            f"(missing: {', '.join(shard_name(n) for n in missing[:SHOWN]) or 'none'}; "
            f"found up to {shard_name(max(number.values()))})"
        )
    return ordered, True


def read_pack(location: str | Path) -> PackLayout:
    """The layout of the pack at ``location`` (a folder, an ``s3://`` prefix, or one shard).

    Raises:
        ValueError: no shards, a shard that is not Parquet or lacks a column (or has
            one of the wrong type), class names that differ between shards or are not
            a JSON list of strings, ``index`` values that do not continue from shard to
            shard (a shard missing or out of place), or labels out of range.
    """
    shards, folder = _shards_of(location)
    class_names: list[str] | None = None
    labels: list[np.ndarray] = []
    starts: list[int] = []
    group_shards: list[int] = []
    group_numbers: list[int] = []
    first = next_index = 0
    for number, shard in enumerate(shards):
        try:
            with open_shard(shard) as handle:
                schema, metadata = handle.schema_arrow, handle.metadata
                _check_schema(shard, schema)
                table = handle.read(columns=["index", "label"])
        except (OSError, pa.ArrowException) as error:
            raise ValueError(f"pack shard {shard} cannot be read as Parquet: {error}") from None
        names = _class_names(shard, schema.metadata)
        if class_names is None:
            class_names = names
        elif names != class_names:
            raise ValueError(
                f"pack shard {shard}: its class names differ from those of {shards[0]}"
            )
        index = table.column("index").to_numpy().astype(np.int64, copy=False)
        if number == 0:
            first = next_index = 0 if folder else (int(index[0]) if len(index) else 0)
        if not np.array_equal(index, np.arange(next_index, next_index + len(index))):
            raise ValueError(
                f"pack shard {shard}: its index does not run {next_index}.."
                f"{next_index + len(index) - 1} in order (a shard missing or out of place?)"
            )
        for group in range(metadata.num_row_groups):
            starts.append(next_index)
            group_shards.append(number)
            group_numbers.append(group)
            next_index += metadata.row_group(group).num_rows
        labels.append(table.column("label").to_numpy().astype(np.int64, copy=False))
    all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    names = class_names or []
    if len(all_labels) == 0:
        raise ValueError(f"pack {location} holds no images")
    low, high = (0, len(names) - 1) if names else (UNLABELLED, UNLABELLED)
    bad = np.flatnonzero((all_labels < low) | (all_labels > high))
    if len(bad):
        raise ValueError(
            f"pack {location}: {len(bad)} rows have labels outside [{low}, {high}] "
            f"({len(names)} class names), the first at index {first + int(bad[0])}"
        )
    return PackLayout(
        shards,
        names,
        first,
        all_labels,
        np.asarray(starts, dtype=np.int64),
        np.asarray(group_shards, dtype=np.int64),
        np.asarray(group_numbers, dtype=np.int64),
    )


def _check_schema(shard: str, schema: pa.Schema) -> None:
    kinds = {
        "index": pa.types.is_integer,
        "path": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "image": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t),
        "label": pa.types.is_integer,
    }
    wrong = [
        f"{name} ({schema.field(name).type if name in schema.names else 'missing'})"
        for name, fits in kinds.items()
        if name not in schema.names or not fits(schema.field(name).type)
    ]
    if wrong:
        raise ValueError(
            f"pack shard {shard} lacks the column(s) of a pack or has them of another type: "
            f"{', '.join(wrong)} (expected index int64, path string, image binary, "
            "label int64)"
        )


def _class_names(shard: str, metadata: dict[bytes, bytes] | None) -> list[str]:
    raw = (metadata or {}).get(CLASS_NAMES_KEY)
    if raw is None:
        return []
    try:
        names = json.loads(raw)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(
            f"pack shard {shard}: {CLASS_NAMES_KEY.decode()} is not a JSON list of strings"
        )
    return names
