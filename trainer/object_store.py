"""Object storage (``s3://``) as pyarrow filesystems: one set of conventions for data and
checkpoints.

The endpoint comes from ``KLSSL_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``; MinIO in the compose stack, a test's own S3 server); credentials
and region from the AWS SDK's usual variables (``AWS_ACCESS_KEY_ID``, ...). Without an
endpoint, AWS S3 itself.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config validation uses this module's URI checks: pyarrow loads on use
    import pyarrow.fs

S3_ENDPOINT_ENV_VARS = ("KLSSL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<key>.*))?$")
"""An ``s3://bucket[/key]`` URI (S3's bucket naming rules)."""


def is_object_uri(location: str) -> bool:
    """Whether ``location`` names object storage rather than a local path."""
    return location.startswith("s3://")


def uri_problem(location: str) -> str | None:
    """Why ``location``, written as a URI, is not one klssl reads (None: a fine one)."""
    if "://" not in location:
        return None
    if S3_URI.match(location) is None:
        return (
            f"{location!r}: object storage is read as s3://<bucket>/<prefix> (a bucket of "
            "3-63 lowercase letters, digits, dots and hyphens); other schemes are not read"
        )
    return None


def s3_endpoint() -> str | None:
    """The S3 endpoint override of the environment, if any."""
    return next((os.environ[name] for name in S3_ENDPOINT_ENV_VARS if os.environ.get(name)), None)


def s3_filesystem(endpoint: str | None = None) -> pyarrow.fs.S3FileSystem:
    """An S3 filesystem for ``endpoint`` (default: `s3_endpoint`), with short timeouts."""
    import pyarrow.fs

    endpoint = endpoint if endpoint is not None else s3_endpoint()
    if endpoint is None:
        return pyarrow.fs.S3FileSystem(connect_timeout=5, request_timeout=20)
    scheme, _, host = endpoint.partition("://")
    return pyarrow.fs.S3FileSystem(
        endpoint_override=host or scheme,
        scheme=scheme if host else "https",
        connect_timeout=5,
        request_timeout=20,
    )


def path_of(uri: str) -> str:
    """``bucket/key`` of an ``s3://bucket/key`` URI: the path on an `s3_filesystem`."""
    return uri.removeprefix("s3://").rstrip("/")


_FILESYSTEMS: dict[tuple[int, str | None], pyarrow.fs.S3FileSystem] = {}


def process_filesystem() -> pyarrow.fs.S3FileSystem:
    """This process's S3 filesystem for the environment's endpoint (a forked loader
    worker builds its own: the AWS SDK's connections must not be shared across a fork)."""
    key = (os.getpid(), s3_endpoint())
    if key not in _FILESYSTEMS:
        _FILESYSTEMS[key] = s3_filesystem(key[1])
    return _FILESYSTEMS[key]


def read_object(uri: str) -> bytes:
    """The bytes of the object at ``uri`` (``OSError`` when it cannot be read)."""
    with process_filesystem().open_input_stream(path_of(uri)) as stream:
        data: bytes = stream.read()
    return data
