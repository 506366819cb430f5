"""``klssl up`` and ``klssl down``: the embedded local stack from a shell.

``klssl up --demo`` (what ``make run`` runs) also submits the digits demo through the
REST API, follows it to the end and prints its k-NN accuracy and MLflow run.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.table import Table

from service.cli.client import check, client, console, describe, follow_job, print_result
from service.localstack.stack import (
    LocalStack,
    StackError,
    StackInfo,
    StackOptions,
    read_stack_info,
)
from trainer.config import ConfigError, apply_overrides, read_config_file

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="KLSSL_STATE_DIR",
        help="Directory of the stack's pid files, logs, databases, artifacts and tokens.",
    ),
]
DEFAULT_STATE_DIR = Path(".klssl")
DEMO_CONFIG = Path("configs/digits-demo.yaml")


def show(info: StackInfo) -> None:
    """Where everything is."""
    table = Table(title=f"klssl local stack ({info.state_dir})", show_header=False)
    table.add_row("API", f"{info.api_url}  (OpenAPI: {info.api_url}/docs)")
    table.add_row("API token", f"{info.state_dir}/api-token")
    table.add_row("MLflow UI", info.mlflow_url)
    table.add_row("Ray dashboard", info.dashboard_url)
    table.add_row("Ray address", info.ray_address)
    table.add_row("logs", f"{info.state_dir}/logs/")
    console.print(table)
    console.print(
        f"[dim]export KLSSL_API_URL={info.api_url} "
        f"KLSSL_API_TOKEN=$(cat {info.state_dir}/api-token)   # for klssl submit, status, ...[/]"
    )


def run_demo(info: StackInfo, config_path: Path, overrides: list[str]) -> None:
    """Submit ``config_path`` through the REST API, follow it, print k-NN and the run URL."""
    try:
        raw = apply_overrides(read_config_file(config_path), overrides)
    except ConfigError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    with client(info.api_url, info.api_token) as http:
        job = check(http.post("/v1/jobs", json={"config": raw, "name": "demo"}))
        console.print(f"submitted {job['id']} ({config_path})")
        job = follow_job(http, job["id"])
    typer.echo(describe(job))
    if job["state"] != "SUCCEEDED":
        console.print(f"[red]{job['state']}: {job['error']}[/]  (klssl logs {job['id']})")
        raise typer.Exit(1)
    print_result(job)
    typer.echo(f"MLflow run: {job['mlflow_run_url']}")


# Signals that stop a foreground `up`: Ctrl-C, `kill`, and the terminal closing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL_S = 0.2  # how soon a signal is acted upon
CHECK_EVERY_S = 1.0  # how often the components are checked


def wait_for_interrupt(stack: LocalStack) -> None:
    """Block until Ctrl-C, SIGTERM or SIGHUP, or until a component dies; the caller stops
    the stack.

    The handlers are installed here, before the prompt, whatever this process inherited:
    started in the background of a non-interactive shell (``make test &``, CI), a process
    inherits SIGINT *ignored*, Python then installs no KeyboardInterrupt handler, and
    Ctrl-C would never stop the stack. They only note the signal (nothing blocks or
    raises inside a handler), and stay installed while the caller stops the stack, so a
    second Ctrl-C cannot cut `LocalStack.down` short; each of its stops is bounded.
    """
    received: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, note)
    console.print("running in the foreground; Ctrl-C stops the stack")
    next_check = 0.0
    while not received:
        if time.monotonic() >= next_check:
            running = stack.running()
            if not running:
                console.print("[red]the stack was stopped from elsewhere[/]")
                return
            dead = [name for name, alive in running.items() if not alive]
            if dead:
                console.print(f"[red]{', '.join(dead)} exited; stopping the stack[/]")
                return
            next_check = time.monotonic() + CHECK_EVERY_S
        time.sleep(POLL_S)
    console.print(f"{signal.Signals(received[0]).name}: stopping the stack")


def up(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    api_port: Annotated[
        int, typer.Option(envvar="KLSSL_UP_API_PORT", help="Port of the API.")
    ] = 8000,
    mlflow_port: Annotated[
        int, typer.Option(envvar="KLSSL_UP_MLFLOW_PORT", help="Port of the MLflow server.")
    ] = 5000,
    dashboard_port: Annotated[
        int,
        typer.Option(
            envvar="KLSSL_UP_DASHBOARD_PORT", help="Port of the Ray dashboard and Jobs API."
        ),
    ] = 8265,
    ray_port: Annotated[
        int,
        typer.Option(envvar="KLSSL_UP_RAY_PORT", help="Port of Ray's GCS (the cluster address)."),
    ] = 6379,
    cpus: Annotated[
        int | None, typer.Option(min=1, help="CPUs of the Ray head (default: all).")
    ] = None,
    extra_nodes: Annotated[
        int, typer.Option(min=0, help="More Ray nodes joining the head (compose's ray-worker).")
    ] = 0,
    node_cpus: Annotated[int, typer.Option(min=1, help="CPUs of each extra node.")] = 1,
    database_url: Annotated[
        str | None, typer.Option(help="Job store URL (default: SQLite in the state dir).")
    ] = None,
    mlflow_backend_uri: Annotated[
        str | None, typer.Option(help="MLflow backend store (default: SQLite in the state dir).")
    ] = None,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(help="Directory jobs may read datasets from (repeatable; default: cwd)."),
    ] = None,
    max_concurrent_jobs: Annotated[int, typer.Option(min=1)] = 2,
    ray_niceness: Annotated[
        int,
        typer.Option(
            min=0, max=19, help="CPU niceness of Ray (training), so the API stays responsive."
        ),
    ] = 10,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Stay attached; Ctrl-C stops the stack.")
    ] = False,
    demo: Annotated[
        bool, typer.Option("--demo", help="Also run the digits demo through the REST API.")
    ] = False,
    demo_config: Annotated[Path, typer.Option(help="Config the demo submits.")] = DEMO_CONFIG,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field of the demo config.")
    ] = None,
) -> None:
    """Start Ray, MLflow and the API on loopback, wait until each is healthy, print URLs."""
    options = StackOptions(
        state_dir=state_dir,
        api_port=api_port,
        mlflow_port=mlflow_port,
        dashboard_port=dashboard_port,
        ray_port=ray_port,
        head_cpus=cpus,
        extra_nodes=extra_nodes,
        node_cpus=node_cpus,
        database_url=database_url,
        mlflow_backend_uri=mlflow_backend_uri,
        data_roots=tuple(data_root or [Path.cwd()]),
        max_concurrent_jobs=max_concurrent_jobs,
        ray_niceness=ray_niceness,
    )
    stack = LocalStack(options)
    if stack.is_running():
        console.print(f"the stack in {state_dir} is already running")
    try:
        with console.status("starting the local stack") as status:
            info = stack.up(report=lambda message: status.update(message))
    except StackError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(1) from None
    show(info)
    try:
        if demo:
            run_demo(info, demo_config, overrides or [])
        if foreground:
            wait_for_interrupt(stack)
    finally:
        if foreground:
            console.print(f"stopped: {', '.join(stack.down()) or 'nothing'}")
    if not foreground:
        console.print(f"the stack keeps running; stop it with: klssl down --state-dir {state_dir}")


def down(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Stop exactly the processes ``klssl up`` started from this state dir."""
    if read_stack_info(state_dir) is None and not (state_dir / "run").exists():
        console.print(f"no stack was started from {state_dir}")
        return
    stopped = LocalStack(StackOptions(state_dir=state_dir)).down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


def register(app: typer.Typer) -> None:
    """Add ``up`` and ``down`` to the ``klssl`` app."""
    app.command()(up)
    app.command()(down)
