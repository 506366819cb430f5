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

HOST = "127.0.0.1"


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


def stop_tree(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM a process started in its own group, then SIGKILL what is left of its tree."""
    if process.poll() is not None:
        return
    tree = descendants(process.pid)  # before they are orphaned
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without RAY_/MLFLOW_/KLSSL_ variables, plus ``extra``."""
    prefixes = ("RAY_", "MLFLOW_", "KLSSL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)} | extra


def spawn(args: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` in a session (and process group) of its own, output appended to ``log``.

    Its own group lets `stop_tree` stop it with everything it spawned, and nothing else.
    """
    output = log.open("ab")  # stays open as long as the process writes to it
    return subprocess.Popen(
        args, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )
