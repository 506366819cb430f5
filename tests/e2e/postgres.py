"""A throwaway PostgreSQL server for tests, from Debian's ``postgresql`` package.

The package is installed with apt when it is missing and we may (root, apt available);
the server runs as the ``postgres`` user on a free loopback port with a data directory
of its own, and is stopped by its process group when the test is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.localstack.processes import HOST, free_port, spawn, stop_tree, wait_for

APT_TIMEOUT_S = 600


def server_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb``, if installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
    return found[-1].parent if found else None


def ensure_installed() -> Path:
    """The server binaries, installing Debian's ``postgresql`` package if needed.

    Raises:
        RuntimeError: not installed, and it cannot be installed here (the message says why).
    """
    binaries = server_binaries()
    if binaries is not None:
        return binaries
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("PostgreSQL is not installed and apt-get (as root) is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        subprocess.run(command, check=True, env=env, timeout=APT_TIMEOUT_S, capture_output=True)
    binaries = server_binaries()
    if binaries is None:
        raise RuntimeError("apt-get installed postgresql but no initdb was found")
    return binaries


@dataclass(frozen=True)
class Postgres:
    """A running server; `url` names a database on it."""

    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{HOST}:{self.port}/{database}"


def as_postgres(args: list[str]) -> list[str]:
    """``args`` run as the ``postgres`` user when we are root (initdb refuses root)."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def postgres_server(base: Path, databases: tuple[str, ...]) -> Iterator[Postgres]:
    """A fresh server with ``databases`` created, for the duration of the block."""
    binaries = ensure_installed()
    data, sockets = base / "pgdata", base / "pgsock"
    if os.geteuid() == 0:
        base.chmod(0o711)  # the postgres user must reach its directories (mkdtemp: 0700)
    for directory in (data, sockets):
        directory.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    subprocess.run(
        as_postgres([str(binaries / "initdb"), "-D", str(data), "-U", user, "--auth=trust"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    server = spawn(
        as_postgres([
            str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-h", HOST,
            "-k", str(sockets), "-c", "max_connections=200", "-c", "fsync=off",
        ]),
        env=dict(os.environ), cwd=base, log=base / "postgres.log",
    )  # fmt: skip
    try:
        ready = [str(binaries / "pg_isready"), "-h", HOST, "-p", str(port)]
        wait_for(
            "PostgreSQL", lambda: subprocess.run(ready, capture_output=True).returncode == 0, 60
        )
        for database in databases:
            subprocess.run(
                [str(binaries / "createdb"), "-h", HOST, "-p", str(port), "-U", user, database],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        yield Postgres(port, user)
    finally:
        stop_tree(server)
