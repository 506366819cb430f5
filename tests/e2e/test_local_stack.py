"""``klssl up --demo`` (what ``make run`` runs) end to end, then ``klssl down``.

The stack is started the way ``make run`` starts it, as a separate ``klssl`` process on
free ports (given through the environment, as a user would); the demo job goes through
the REST API; its MLflow run is then checked with MLflow's own client, and ``down`` must
leave no process of the stack behind. While it runs, every socket the stack's processes
listen on is on loopback, and its state (databases, tokens, logs, Ray's temp dir) is
private: folders 0700, files 0600.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow.tracking import MlflowClient

from service.localstack.processes import clean_env, descendants, free_port, is_alive
from service.localstack.stack import LocalStack, StackOptions, read_stack_info

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
KLSSL = str(Path(sys.executable).parent / "klssl")
Completed = subprocess.CompletedProcess[str]
DEMO = ["--set", "schedule.epochs=1", "--set", "data.max_samples=400"]


def klssl(*args: str, env: dict[str, str], timeout: float = 600) -> Completed:
    return subprocess.run(
        [KLSSL, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="klssl-up-", dir="/tmp"))
    try:
        yield base / "state"
    finally:
        LocalStack(StackOptions(state_dir=base / "state")).down()  # only if a test failed
        shutil.rmtree(base, ignore_errors=True)


def test_up_demo_then_down_leaves_nothing(state_dir: Path) -> None:
    ports = {
        "KLSSL_UP_API_PORT": free_port(),
        "KLSSL_UP_MLFLOW_PORT": free_port(),
        "KLSSL_UP_DASHBOARD_PORT": free_port(),
        "KLSSL_UP_RAY_PORT": free_port(),
    }
    env = clean_env(**{key: str(port) for key, port in ports.items()})
    up = klssl("up", "--state-dir", str(state_dir), "--cpus", "2", "--demo", *DEMO, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    accuracy = re.search(
        r"k-NN top-1 \(k=20\): ([\d.]+)%  \(random init ([\d.]+)%, raw pixels ([\d.]+)%\)",
        up.stdout,
    )
    health = re.search(r"^health: (ok|collapsed at step (\d+))$", up.stdout, re.MULTILINE)
    run_url = re.search(r"MLflow run: (\S+)/#/experiments/(\d+)/runs/(\w+)", up.stdout)
    assert accuracy and health and run_url, up.stdout
    assert "linear top-1: " in up.stdout

    info = read_stack_info(state_dir)
    assert info is not None and info.api_url.endswith(str(ports["KLSSL_UP_API_PORT"]))
    assert (state_dir / "api-token").stat().st_mode & 0o777 == 0o600
    run = MlflowClient(info.mlflow_url).get_run(run_url.group(3))
    assert run.info.status == "FINISHED"
    assert run.data.params["data.kind"] == "digits"
    assert run.data.metrics["knn_top1"] == pytest.approx(float(accuracy.group(1)), abs=0.006)
    assert run.data.metrics["random_init_knn_top1"] == pytest.approx(
        float(accuracy.group(2)), abs=0.006
    )
    assert run.data.tags["klssl.job_id"].startswith("job-")
    # One verdict everywhere: the CLI's last lines, the MLflow tag and the REST record.
    verdict = "ok" if health.group(1) == "ok" else "collapsed"
    assert run.data.tags["klssl.health"] == verdict
    job = httpx.get(
        f"{info.api_url}/v1/jobs/{run.data.tags['klssl.job_id']}",
        headers={"Authorization": f"Bearer {info.api_token}"},
        timeout=10,
    ).json()
    assert job["progress"]["health"] == verdict
    assert job["progress"]["collapse_step"] == (None if verdict == "ok" else int(health.group(2)))

    again = klssl("up", "--state-dir", str(state_dir), env=env, timeout=60)
    assert again.returncode == 0 and "already running" in again.stderr, again.stderr
    taken = klssl("up", "--state-dir", str(state_dir.parent / "other"), env=env, timeout=60)
    assert taken.returncode == 1
    message = " ".join(taken.stderr.split())
    assert f"port {ports['KLSSL_UP_API_PORT']} (the API) is in use" in message
    assert "--api-port or KLSSL_UP_API_PORT" in message

    stack = LocalStack(StackOptions(state_dir=state_dir))
    records = [stack.record(name) for name in info.components]
    started = [record.pid for record in records if record is not None]
    assert len(started) == len(info.components) and all(r and r.alive() for r in records)
    tree = [pid for pid in started for pid in (pid, *descendants(pid))]
    listening = listening_sockets(tree)
    assert {str(port) for port in ports.values()} <= {port for *_, port in listening}, listening
    assert {"gcs_server", "raylet"} <= {name for name, *_ in listening}, listening
    assert [socket for socket in listening if not on_loopback(socket[1])] == []
    assert_private(state_dir, stack.ray_temp_dir())
    down = klssl("down", "--state-dir", str(state_dir), env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in tree if is_alive(pid)]
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _mentions(pid, state_dir)]


def listening_sockets(pids: list[int]) -> list[tuple[str, str, str]]:
    """(process name, address, port) of every TCP socket listening, and every UDP socket,
    of ``pids``."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            name = process.name()
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN or connection.type == 2:  # SOCK_DGRAM
                found.append((name, connection.laddr.ip, str(connection.laddr.port)))
    return found


def on_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def assert_private(state_dir: Path, ray_temp_dir: Path) -> None:
    """Folders 0700 and files 0600 (or stricter) in the state dir; Ray's temp dir inside a
    0700 folder.

    Ray makes its temp dir and session folders 0777 itself, again as it runs (no option
    turns that off): the 0700 folder above them keeps everyone else out.
    """
    for folder in (state_dir, state_dir / "logs", state_dir / "run", ray_temp_dir.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert ray_temp_dir.is_dir()
    for name in ("jobs.db", "mlflow.db", "stack.json", "api-token", "ray-token"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    open_to_others = []
    for root, folders, files in os.walk(state_dir):
        if Path(root) == ray_temp_dir:
            folders.clear()
            continue
        for name in [*folders, *files]:
            path = Path(root) / name
            if path == ray_temp_dir:
                continue
            if not path.is_symlink() and path.stat().st_mode & 0o077:
                open_to_others.append((str(path), oct(stat.S_IMODE(path.stat().st_mode))))
    assert open_to_others == []


def _mentions(pid: str, state_dir: Path) -> bool:
    """Whether a live process has the state dir on its command line."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(state_dir) in command and is_alive(int(pid))


class Lines:
    """The lines a process writes to a pipe, read by a thread until it closes, so the
    process never blocks on a full pipe however little the test reads."""

    def __init__(self, pipe: Iterator[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: Iterator[str]) -> None:
        for line in pipe:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether a line with ``text`` came within ``timeout`` s (False at the end)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            self.seen.append(line)
            if text in line:
                return True
        return False


def test_ctrl_c_on_a_foreground_up_stops_the_stack(state_dir: Path) -> None:
    """Ctrl-C stops everything, within the bound `down` guarantees, even when `up` was
    started with SIGINT ignored, as a background job of a non-interactive shell is
    (`make test &`): that once left it running forever."""
    ports = ("--api-port", "--mlflow-port", "--dashboard-port", "--ray-port")
    args = [KLSSL, "up", "--state-dir", str(state_dir), "--foreground", "--cpus", "1"]
    args += [part for flag in ports for part in (flag, str(free_port()))]
    shell = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *args]  # exec keeps SIGINT ignored
    up = subprocess.Popen(shell, cwd=REPO, env=clean_env(), stderr=subprocess.PIPE, text=True)
    stack = LocalStack(StackOptions(state_dir=state_dir))
    # Bounds from what the stack itself allows: each component's readiness, then `down`.
    ready_bound = stack.options.ready_timeout_s * len(stack.components) + 60
    stop_bound = stack.stop_bound_s() + 30  # + the CLI's own exit on a loaded machine
    try:
        assert up.stderr is not None
        output = Lines(up.stderr)
        ready = output.wait_for("Ctrl-C stops the stack", ready_bound)
        assert ready, "".join(output.seen)
        assert stack.is_running()
        records = [stack.record(name) for name in stack.running()]
        tree = [pid for r in records if r for pid in (r.pid, *descendants(r.pid))]
        tree += descendants(up.pid)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=stop_bound) == 0, "".join(output.seen)
    finally:
        up.kill()
    assert not [pid for pid in tree if is_alive(pid)]
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _mentions(pid, state_dir)]
    assert not stack.running()
