"""Local processes for the stack: free loopback ports, readiness waits, clean stops.

Used by the end-to-end tests and the load benchmark, which start a Ray head, an MLflow
server and the API as child processes on 127.0.0.1 and must stop exactly what they
started (a whole process group, then any descendant left behind).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

HOST = "127.0.0.1"
# What `stop_group` waits: for the group leader after SIGTERM, for the rest of its tree,
# and after SIGKILL. Each stop therefore ends within `STOP_BOUND_S` of its start.
STOP_GRACE_S = 10.0
TREE_GRACE_S = 2.0
KILL_WAIT_S = 10.0
STOP_BOUND_S = STOP_GRACE_S + TREE_GRACE_S + KILL_WAIT_S
# Files the stack's processes create are private to the user who runs it: 0600 and 0700.
PRIVATE_UMASK = 0o077


def free_port() -> int:
    """A port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, probe: Callable[[], bool], timeout: float, every: float = 0.5) -> None:
    """Poll ``probe`` until it returns True (errors count as not yet); TimeoutError after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if probe():
                return
        time.sleep(every)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), including ones in other sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid``; None when gone.

    The start time tells a process from a later one that reused its pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie), and is the process that started at ``start_time``."""
    state = process_state(pid)
    if state is None or state[0] in ("Z", "X"):
        return False
    return start_time is None or state[1] == start_time


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(is_alive(pid) for pid in pids):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_group(pid: int, grace: float = STOP_GRACE_S) -> bool:
    """SIGTERM the process group led by ``pid``, then SIGKILL what is left of its tree.

    ``pid`` must lead its own group (started with `spawn`), so the signal reaches what it
    spawned and nothing else; descendants that left the group are found through /proc.
    Every wait is bounded: this returns within ``grace + TREE_GRACE_S + KILL_WAIT_S``
    seconds, however loaded the machine or stuck the processes. Whether all are gone.
    """
    tree = descendants(pid)  # before they are orphaned
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    if _wait_gone([pid], grace) and _wait_gone(tree, TREE_GRACE_S):
        return True
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for child in [pid, *tree, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    return _wait_gone([pid, *tree], KILL_WAIT_S)


def stop_tree(process: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """`stop_group` for a child process of ours, which is then reaped."""
    if process.poll() is not None:
        return
    stop_group(process.pid, grace)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without RAY_/MLFLOW_/KLSSL_ variables, plus ``extra``."""
    prefixes = ("RAY_", "MLFLOW_", "KLSSL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | extra


def open_private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending bytes, created readable by its owner only (0600)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def spawn(args: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` in a session (and process group) of its own, output appended to ``log``.

    Its own group lets `stop_tree` stop it with everything it spawned, and nothing else.
    It runs with umask 077: its files are 0600 and its folders 0700 (unless it sets modes
    itself), and so are those of what it spawns.
    """
    output = open_private_log(log)  # stays open as long as the process writes to it
    return subprocess.Popen(
        args,
        env=env,
        cwd=cwd,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        umask=PRIVATE_UMASK,
    )
