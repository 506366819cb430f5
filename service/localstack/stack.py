"""The embedded local stack behind ``klssl up``: Ray, MLflow and the API on loopback.

It mirrors the compose topology (docs/deploy.md) with native processes: a Ray head
(dashboard and Jobs API, token authentication on) plus optional extra Ray nodes (the
compose file's ``ray-worker``), an MLflow tracking server (SQLite or PostgreSQL backend,
local artifact directory) and the API (uvicorn). Everything lives in one state directory:

    <state-dir>/stack.json     ports, URLs and options of the running stack
    <state-dir>/run/NAME.pid   "pid start-time" of every process the stack started
    <state-dir>/logs/NAME.log  each process's output
    <state-dir>/api-token      the generated API token (mode 0600), also ray-token
    <state-dir>/jobs.db, mlflow.db, mlartifacts/, checkpoints/
    <state-dir>/ray/           Ray's temp dir (sockets, session logs), when the path is
                               short enough for Ray's unix sockets; else a private
                               folder in /tmp (`LocalStack.ray_temp_dir`)

Private to the user who runs it: the state dir and its folders are 0700, its files 0600
(the processes run with umask 077). Ray makes its temp dir and session folders 0777 and
does so again as it runs (no option turns that off), so that dir always lies inside a
0700 folder: the state dir, or /tmp/klssl-<hash>/ for long paths.

On loopback only: MLflow and the API listen on 127.0.0.1, and so does every Ray server
(GCS, raylet, object manager, dashboard and its agents, metrics exporters, the Ray client
server): Ray binds them to loopback when a node's IP is 127.0.0.1, which
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps it at (a stack without extra nodes only:
Ray 2.60 will not join a head with it set).

Each process leads a process group of its own, so `LocalStack.down` stops exactly what
`LocalStack.up` started (by pid and start time, never by name) with everything they
spawned, and nothing else; each stop is bounded (`processes.STOP_BOUND_S`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.localstack.processes import (
    HOST,
    STOP_BOUND_S,
    clean_env,
    free_port,
    is_alive,
    open_private_log,
    process_state,
    spawn,
    stop_group,
)

BIN = Path(sys.executable).parent
STATE_FILE = "stack.json"
TOKEN_BYTES = 32
# Ray's unix sockets live under its temp dir; their paths must stay under 107 bytes.
MAX_RAY_TEMP_DIR = 48
# The order components start in; they stop in reverse (the API first: it talks to Ray).
HEAD, MLFLOW, API = "ray-head", "mlflow", "api"


class StackError(RuntimeError):
    """The stack cannot start (or stop) as asked; the message says why and what to do."""


@dataclass(frozen=True)
class PortOption:
    """How a user changes one of the stack's public ports."""

    what: str
    flag: str
    env: str


PORT_OPTIONS = {
    "api_port": PortOption("the API", "--api-port", "KLSSL_UP_API_PORT"),
    "mlflow_port": PortOption("MLflow", "--mlflow-port", "KLSSL_UP_MLFLOW_PORT"),
    "dashboard_port": PortOption(
        "the Ray dashboard", "--dashboard-port", "KLSSL_UP_DASHBOARD_PORT"
    ),
    "ray_port": PortOption("Ray's GCS", "--ray-port", "KLSSL_UP_RAY_PORT"),
}


@dataclass(frozen=True)
class StackOptions:
    """What to start. The defaults are the ports of the compose file."""

    state_dir: Path = Path(".klssl")
    api_port: int = 8000
    mlflow_port: int = 5000
    dashboard_port: int = 8265
    ray_port: int = 6379
    head_cpus: int | None = None  # None: every core of this machine
    extra_nodes: int = 0  # more Ray nodes joining the head, like compose's ray-worker
    node_cpus: int = 1
    database_url: str | None = None  # None: SQLite in the state dir
    mlflow_backend_uri: str | None = None  # None: SQLite in the state dir
    storage_path: str | None = None  # None: <state-dir>/checkpoints
    data_roots: tuple[Path, ...] = ()
    max_concurrent_jobs: int = 2
    dispatch_interval_s: float = 2.0
    api_workers: int = 1
    # Training is batch work and the API is interactive: on a machine they share, Ray's
    # processes run at a lower CPU priority so status reads stay fast under training.
    ray_niceness: int = 10
    ready_timeout_s: float = 240.0

    @classmethod
    def on_free_ports(cls, state_dir: Path, **options: Any) -> StackOptions:
        """Options whose public ports are free ones (tests, benchmarks, several stacks)."""
        ports = {key: free_port() for key in PORT_OPTIONS}
        return cls(state_dir=state_dir, **{**ports, **options})

    def resolved(self) -> StackOptions:
        """The options with an absolute state dir (the processes run inside it)."""
        return StackOptions(**{**asdict(self), "state_dir": self.state_dir.expanduser().resolve()})


@dataclass
class ProcessRecord:
    """One process the stack started."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        """Whether it still runs (and is the same process, not a reused pid)."""
        return is_alive(self.pid, self.start_time)


@dataclass
class StackInfo:
    """How to reach a running stack (what ``stack.json`` holds)."""

    state_dir: str
    api_url: str
    mlflow_url: str
    dashboard_url: str
    ray_address: str
    components: list[str]
    ray_ports: dict[str, dict[str, int]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def api_token(self) -> str:
        """The API token generated for this stack."""
        return (Path(self.state_dir) / "api-token").read_text().strip()

    @property
    def ray_token(self) -> str:
        """The Ray cluster's token."""
        return (Path(self.state_dir) / "ray-token").read_text().strip()


def read_stack_info(state_dir: Path) -> StackInfo | None:
    """The stack recorded in ``state_dir``, or None when none was started there."""
    path = state_dir.expanduser() / STATE_FILE
    if not path.exists():
        return None
    return StackInfo(**json.loads(path.read_text()))


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (0700), created when missing.

    Raises:
        StackError: ``path`` is a symlink or belongs to another user (in /tmp, someone
            else may have made it first).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or path.stat().st_uid != os.getuid():
        raise StackError(
            f"{path} is a symlink or another user's folder; remove it or choose another --state-dir"
        )
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only (0600), whatever its mode was."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def secret_file(path: Path) -> str:
    """The token in ``path``, created (readable by the owner only) on first use."""
    if not path.exists():
        private_dir(path.parent)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
    path.chmod(0o600)
    return path.read_text().strip()


def port_in_use(port: int) -> bool:
    """Whether something listens on ``port`` of the loopback interface (or it is unbindable)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (empty when there is none)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LocalStack:
    """Start, inspect and stop the processes of one state directory."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options.resolved()
        self.state_dir = self.options.state_dir
        self.logs = self.state_dir / "logs"
        self.pids = self.state_dir / "run"

    # -- what runs ----------------------------------------------------------------------

    @property
    def components(self) -> list[str]:
        """Names of the processes, in start order."""
        nodes = [f"ray-node-{i}" for i in range(1, self.options.extra_nodes + 1)]
        return [MLFLOW, HEAD, *nodes, API]

    def record(self, name: str) -> ProcessRecord | None:
        """The pid file of ``name``, if any."""
        path = self.pids / f"{name}.pid"
        if not path.exists():
            return None
        pid, start_time = path.read_text().split()
        return ProcessRecord(int(pid), int(start_time))

    def running(self) -> dict[str, bool]:
        """Every recorded process and whether it still runs."""
        names = sorted(path.stem for path in self.pids.glob("*.pid")) if self.pids.exists() else []
        return {name: bool((rec := self.record(name)) and rec.alive()) for name in names}

    def is_running(self) -> bool:
        """Whether every process of a stack started from this state dir runs."""
        running = self.running()
        return bool(running) and all(running.values())

    # -- start --------------------------------------------------------------------------

    def up(self, report: Callable[[str], None] = print) -> StackInfo:
        """Start every component and wait until each is healthy.

        Returns the running stack's info; when the whole stack already runs from this
        state dir, says so and returns it without starting anything.

        Raises:
            StackError: a port is taken, a component did not become healthy (its log tail
                is in the message), or a stack from this state dir runs only in part.
                Whatever this call started is stopped again.
        """
        info = read_stack_info(self.state_dir)
        if info is not None and self.is_running():
            report(f"the stack in {self.state_dir} is already running")
            return info
        running = self.running()
        if any(running.values()):
            alive = ", ".join(name for name, up in running.items() if up)
            raise StackError(
                f"part of the stack in {self.state_dir} still runs ({alive}); "
                f"stop it with `klssl down --state-dir {self.state_dir}` first"
            )
        self._check_ports()
        for stale in self.pids.glob("*.pid") if self.pids.exists() else []:
            stale.unlink()
        self.make_private()
        info = self._plan()
        try:
            for name in self.components:
                report(f"starting {name}")
                self.start(name, info)
            write_private(self.state_dir / STATE_FILE, json.dumps(asdict(info), indent=2))
            for name in self.components:
                self.wait_healthy(name, info)
                report(f"{name} is healthy")
        except BaseException:  # Ctrl-C included: leave nothing half-started
            self.down()
            raise
        return info

    def make_private(self) -> None:
        """The state dir and its folders 0700, the files it holds 0600 (from older stacks
        too); what the processes create later is private through their umask."""
        for folder in (self.state_dir, self.logs, self.pids, self.ray_temp_dir().parent):
            private_dir(folder)
        for name in ("mlartifacts", "checkpoints", "ray"):
            if (self.state_dir / name).is_dir():
                private_dir(self.state_dir / name)
        for folder in (self.state_dir, self.logs, self.pids):
            for path in folder.iterdir():
                if path.is_file() and not path.is_symlink():
                    path.chmod(0o600)

    def _check_ports(self) -> None:
        taken = [
            f"port {getattr(self.options, key)} ({option.what}) is in use; choose another "
            f"with {option.flag} or {option.env}"
            for key, option in PORT_OPTIONS.items()
            if port_in_use(getattr(self.options, key))
        ]
        if taken:
            raise StackError("; ".join(taken))

    def _plan(self) -> StackInfo:
        options = self.options
        # Ray's internal ports: free ones, so several stacks (and nodes) fit on one machine.
        internal = ("client", "agent_http", "agent_grpc", "runtime_env", "metrics")
        nodes = ["head", *(f"node-{i}" for i in range(1, options.extra_nodes + 1))]
        ray_ports = {node: {name: free_port() for name in internal} for node in nodes}
        return StackInfo(
            state_dir=str(self.state_dir),
            api_url=f"http://{HOST}:{options.api_port}",
            mlflow_url=f"http://{HOST}:{options.mlflow_port}",
            dashboard_url=f"http://{HOST}:{options.dashboard_port}",
            ray_address=f"{HOST}:{options.ray_port}",
            components=self.components,
            ray_ports=ray_ports,
            options={key: str(value) for key, value in asdict(options).items()},
        )

    def start(self, name: str, info: StackInfo) -> ProcessRecord:
        """Start one component (it must not run) and write its pid file."""
        args, env = self._command(name, info)
        log = self.logs / f"{name}.log"
        with open_private_log(log) as handle:
            handle.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        process = spawn(args, env=env, cwd=self.state_dir, log=log)
        state = process_state(process.pid)
        record = ProcessRecord(process.pid, state[1] if state else 0)
        write_private(self.pids / f"{name}.pid", f"{record.pid} {record.start_time}\n")
        return record

    def stop(self, name: str) -> bool:
        """Stop one component by its pid file; whether it was running.

        Bounded: SIGTERM to its process group, SIGKILL to what is left of its tree after
        the grace period, so this returns within `processes.STOP_BOUND_S` seconds.
        """
        record = self.record(name)
        was_running = record is not None and record.alive()
        if record is not None and was_running:
            stop_group(record.pid)
        (self.pids / f"{name}.pid").unlink(missing_ok=True)
        return was_running

    def stop_bound_s(self) -> float:
        """The longest `down` can take: every component's bounded stop, one after another."""
        return STOP_BOUND_S * len(self.components)

    def down(self) -> list[str]:
        """Stop every process this state dir started, API first; the names that ran."""
        recorded = self.running()
        info = read_stack_info(self.state_dir)
        order = list(reversed(info.components)) if info else []
        order += sorted(name for name in recorded if name not in order)
        return [name for name in order if name in recorded and self.stop(name)]

    # -- commands -----------------------------------------------------------------------

    def ray_temp_dir(self) -> Path:
        """Ray's temp dir: in the state dir when its path is short enough for sockets,
        else in a folder of /tmp that only this user can enter (`make_private`)."""
        inside = self.state_dir / "ray"
        if len(str(inside)) <= MAX_RAY_TEMP_DIR:
            return inside
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:10]
        return Path(f"/tmp/klssl-{digest}/ray")

    def _ray_env(self) -> dict[str, str]:
        token = secret_file(self.state_dir / "ray-token")
        env = clean_env(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=token,
            RAY_USAGE_STATS_ENABLED="0",
            # No Serve here to drain: on SIGTERM, stop at once instead of draining 30 s.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        )
        if self.options.extra_nodes == 0:
            # Keeps 127.0.0.1 as the node IP in `ray start` and in every driver and
            # worker, which inherit it: Ray then binds every server to loopback. Ray 2.60
            # refuses to join a head with it set, and has no other bind option, so a
            # stack with extra nodes binds the host's address (docs/deploy.md).
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def _command(self, name: str, info: StackInfo) -> tuple[list[str], dict[str, str]]:
        options, state = self.options, self.state_dir
        if name == MLFLOW:
            backend = options.mlflow_backend_uri or f"sqlite:///{state / 'mlflow.db'}"
            args = [
                str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(options.mlflow_port),
                "--backend-store-uri", backend,
                "--artifacts-destination", str(state / "mlartifacts"), "--workers", "1",
            ]  # fmt: skip
            return args, clean_env()
        if name == HEAD:
            ports = info.ray_ports["head"]
            cpus = [] if options.head_cpus is None else ["--num-cpus", str(options.head_cpus)]
            args = [
                *self._nice(), str(BIN / "ray"), "start", "--head", "--block",
                "--disable-usage-stats",
                "--node-ip-address", HOST, "--port", str(options.ray_port),
                "--dashboard-host", HOST, "--dashboard-port", str(options.dashboard_port),
                "--include-dashboard", "true", "--temp-dir", str(self.ray_temp_dir()),
                *self._ray_internal_ports(ports), *cpus,
            ]  # fmt: skip
            return args, self._ray_env()
        if name.startswith("ray-node-"):
            ports = info.ray_ports[name.removeprefix("ray-")]
            args = [
                *self._nice(), str(BIN / "ray"), "start", "--block", "--disable-usage-stats",
                "--address", info.ray_address, "--node-ip-address", HOST,
                "--num-cpus", str(options.node_cpus), *self._ray_internal_ports(ports),
            ]  # fmt: skip
            return args, self._ray_env()
        if name == API:
            args = [
                sys.executable, "-m", "uvicorn", "--factory", "service.app:app_from_env",
                "--host", HOST, "--port", str(options.api_port),
                "--workers", str(options.api_workers), "--log-level", "warning",
            ]  # fmt: skip
            return args, clean_env(**self.api_settings(info))
        raise StackError(f"unknown component {name!r}; the stack has {self.components}")

    def _nice(self) -> list[str]:
        niceness = self.options.ray_niceness
        return ["nice", "-n", str(niceness)] if niceness else []

    @staticmethod
    def _ray_internal_ports(ports: dict[str, int]) -> list[str]:
        return [
            "--ray-client-server-port", str(ports["client"]),
            "--dashboard-agent-listen-port", str(ports["agent_http"]),
            "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
            "--runtime-env-agent-port", str(ports["runtime_env"]),
            "--metrics-export-port", str(ports["metrics"]),
        ]  # fmt: skip

    def api_settings(self, info: StackInfo) -> dict[str, str]:
        """The API's ``KLSSL_*`` environment (service.settings.Settings reads it)."""
        options, state = self.options, self.state_dir
        owner = os.environ.get("USER") or "local"
        roots = [str(root.expanduser().resolve()) for root in options.data_roots]
        return {
            "KLSSL_DATABASE_URL": options.database_url or f"sqlite:///{state / 'jobs.db'}",
            "KLSSL_RAY_ADDRESS": info.dashboard_url,
            "KLSSL_RAY_AUTH_TOKEN": secret_file(state / "ray-token"),
            "KLSSL_MLFLOW_TRACKING_URI": info.mlflow_url,
            "KLSSL_STORAGE_PATH": options.storage_path or str(state / "checkpoints"),
            "KLSSL_API_TOKENS": json.dumps({secret_file(state / "api-token"): owner}),
            "KLSSL_ALLOWED_DATA_ROOTS": json.dumps(roots),
            "KLSSL_MAX_CONCURRENT_JOBS": str(options.max_concurrent_jobs),
            "KLSSL_DISPATCH_INTERVAL_S": str(options.dispatch_interval_s),
            "KLSSL_PYTHON_EXECUTABLE": sys.executable,
        }

    # -- health -------------------------------------------------------------------------

    def probe(self, name: str, info: StackInfo) -> bool:
        """One health check of ``name`` (False while it is not ready yet)."""
        http = httpx.Client(timeout=5.0, trust_env=False)
        with http:
            if name == MLFLOW:
                return http.get(f"{info.mlflow_url}/health").is_success
            if name == API:
                return http.get(f"{info.api_url}/readyz").is_success
            headers = {"Authorization": f"Bearer {info.ray_token}"}
            if name == HEAD:
                return http.get(f"{info.dashboard_url}/api/jobs/", headers=headers).is_success
            response = http.get(f"{info.dashboard_url}/nodes?view=summary", headers=headers)
            alive = [
                node
                for node in response.json()["data"]["summary"]
                if node["raylet"]["state"] == "ALIVE"
            ]
            return len(alive) >= 1 + int(name.rsplit("-", 1)[1])

    def wait_healthy(self, name: str, info: StackInfo) -> None:
        """Wait until ``name`` is healthy; StackError (with its log) when it died or timed out."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        log = self.logs / f"{name}.log"
        while time.monotonic() < deadline:
            record = self.record(name)
            if record is None or not record.alive():
                raise StackError(f"{name} exited while starting; its log ({log}):\n{log_tail(log)}")
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, OSError):
                if self.probe(name, info):
                    return
            time.sleep(0.5)
        raise StackError(
            f"{name} not healthy after {self.options.ready_timeout_s:.0f} s; "
            f"its log ({log}):\n{log_tail(log)}"
        )
