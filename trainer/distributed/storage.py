"""The checkpoint storage of runs: a local or shared directory, or ``s3://``.

``KLSSL_STORAGE_PATH`` is read here only (`default_storage_path`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs

from trainer.distributed.errors import StorageUnavailableError
from trainer.object_store import is_object_uri, path_of, s3_endpoint, s3_filesystem

STORAGE_ENV_VAR = "KLSSL_STORAGE_PATH"


def default_storage_path(output: Path = Path("runs")) -> str:
    """``KLSSL_STORAGE_PATH``, else ``<output>/ray`` (absolute: Ray workers run elsewhere)."""
    return os.environ.get(STORAGE_ENV_VAR, "").strip() or str(output.resolve() / "ray")


def resolve_storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """The (filesystem, path) pair Ray Train should use for ``storage_path``.

    ``s3://`` paths get an S3 filesystem with the endpoint override of
    ``KLSSL_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL[_S3]``) for MinIO; other URIs are
    left to Ray; a local path is made absolute.
    """
    if is_object_uri(storage_path):
        if s3_endpoint() is None:
            return None, storage_path
        return s3_filesystem(), path_of(storage_path)
    if "://" in storage_path:
        return None, storage_path
    return None, str(Path(storage_path).expanduser().resolve())


def check_storage(storage_path: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """Resolve ``storage_path`` and prove it writable, before anything starts.

    Writes, reads back and deletes a marker file (Ray Train does the same, but only
    once the workers are up).

    Returns:
        `resolve_storage`'s (filesystem, path) for the `RunConfig`.

    Raises:
        StorageUnavailableError: with the path and the filesystem's reason.
    """
    filesystem, path = resolve_storage(storage_path)
    marker_name = f".klssl-storage-check-{uuid.uuid4().hex}"
    try:
        checked = filesystem
        if checked is None:
            checked, path_on_fs = pyarrow.fs.FileSystem.from_uri(
                path if "://" in path else Path(path).as_uri()
            )
        else:
            path_on_fs = path
        checked.create_dir(path_on_fs, recursive=True)
        marker = f"{path_on_fs.rstrip('/')}/{marker_name}"
        with checked.open_output_stream(marker) as stream:
            stream.write(b"ok")
        with checked.open_input_stream(marker) as stream:
            if stream.read() != b"ok":
                raise OSError("the marker read back differs from what was written")
        checked.delete_file(marker)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise StorageUnavailableError(
            f"checkpoint storage {storage_path!r} is not writable or not reachable: {error}"
        ) from error
    return filesystem, path


def storage_uri(storage_path: str, filesystem: pyarrow.fs.FileSystem | None) -> str:
    """A URI for a path on the run's storage (for MLflow and the REST API)."""
    if filesystem is not None and filesystem.type_name == "s3":
        return f"s3://{storage_path}"
    if "://" in storage_path:
        return storage_path
    return Path(storage_path).as_uri()
