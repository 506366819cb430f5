"""Two API processes on one job store: one dispatcher between them (issue 11).

Real uvicorn processes share a SQLite job store; Ray is not even reachable (dispatching
is not what is measured: who holds the dispatcher lease is). One holds it at a time, a
stopped holder hands it over at once, and a killed one when its lease expires.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.localstack.processes import clean_env, free_port, spawn, stop_tree, wait_for

pytestmark = pytest.mark.e2e
LEASE_S = 3.0


def lease_holder(database: Path) -> str | None:
    """The current, unexpired holder of the dispatcher lease, as the store records it."""
    with sqlite3.connect(database) as connection:
        row = connection.execute(
            "SELECT holder FROM leases WHERE name = 'dispatcher'"
            " AND expires_at > strftime('%Y-%m-%d %H:%M:%f', 'now')"
        ).fetchone()
    return None if row is None else str(row[0])


def pid_of(holder: str | None) -> int | None:
    """The process id in a holder name (``host:pid:suffix``)."""
    return None if holder is None else int(holder.split(":")[1])


@pytest.fixture
def two_apis() -> Iterator[tuple[Path, dict[int, object]]]:
    base = Path(tempfile.mkdtemp(prefix="klssl-apis-", dir="/tmp"))
    database = base / "jobs.db"
    env = clean_env(
        KLSSL_DATABASE_URL=f"sqlite:///{database}",
        KLSSL_MLFLOW_TRACKING_URI=f"sqlite:///{base / 'mlflow.db'}",
        KLSSL_RAY_ADDRESS="http://127.0.0.1:9",  # nothing there: jobs would stay queued
        KLSSL_API_TOKENS=json.dumps({"token-alice-0123456789": "alice"}),
        KLSSL_DISPATCH_INTERVAL_S="0.2",
        KLSSL_DISPATCHER_LEASE_S=str(LEASE_S),
        KLSSL_STORAGE_PATH=str(base / "storage"),
    )
    processes = {}
    try:
        for index in range(2):
            port = free_port()
            args = [sys.executable, "-m", "uvicorn", "service.app:app_from_env", "--factory",
                    "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
            process = spawn(args, env=env, cwd=Path.cwd(), log=base / f"api{index}.log")
            processes[process.pid] = process
            url = f"http://127.0.0.1:{port}/healthz"
            wait_for(f"API {index}", lambda u=url: httpx.get(u).status_code == 200, timeout=120)
        yield database, processes
    finally:
        for process in processes.values():
            stop_tree(process)  # type: ignore[arg-type]


def test_one_dispatcher_leads_and_another_takes_over(
    two_apis: tuple[Path, dict[int, object]],
) -> None:
    database, processes = two_apis
    wait_for("a lease holder", lambda: pid_of(lease_holder(database)) in processes, timeout=30)
    leader = pid_of(lease_holder(database))
    assert leader is not None
    follower = next(pid for pid in processes if pid != leader)

    # The holder keeps renewing: the follower never gets it while the holder lives.
    for _ in range(3):
        wait_for("a renewal", lambda: pid_of(lease_holder(database)) == leader, timeout=10)

    # Killed without a word: the follower leads once the lease expires.
    os.kill(leader, signal.SIGKILL)
    wait_for(
        "the follower to lead",
        lambda: pid_of(lease_holder(database)) == follower,
        timeout=LEASE_S + 30,
    )
