"""``klssl submit | status | logs | cancel | list | sweep``: the REST API from a shell.

The service URL and token come from ``--url`` / ``--token`` or ``KLSSL_API_URL`` /
``KLSSL_API_TOKEN``; without them, from the local stack that ``klssl up`` started
(``KLSSL_STATE_DIR``, default ``.klssl``). `register` adds these commands to the
``klssl`` Typer app.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.localstack.stack import read_stack_info
from trainer.config import ConfigError, apply_overrides, read_config_file
from trainer.summary import result_lines

console = Console(stderr=True)
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}

Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="KLSSL_API_URL",
        help="Base URL of the klssl service [default: the local stack's, else "
        "http://127.0.0.1:8000].",
        show_default=False,
    ),
]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="KLSSL_API_TOKEN", help="API bearer token.", show_default=False),
]
JobId = Annotated[str, typer.Argument(help="Job id.")]
Priority = Annotated[
    int,
    typer.Option(
        min=-1000, max=1000, help="Higher runs first among queued work (then the oldest)."
    ),
]
Notify = Annotated[
    list[str] | None,
    typer.Option(
        "--notify",
        help="Webhook URL (https) that gets a JSON POST at the end and on a collapse "
        "verdict; Slack-compatible (repeatable).",
    ),
]
DEFAULT_URL = "http://127.0.0.1:8000"


def connection(url: str | None, token: str | None) -> tuple[str, str | None]:
    """The service URL and token: as given, else those of the local stack (``klssl up``)."""
    stack = read_stack_info(Path(os.environ.get("KLSSL_STATE_DIR", ".klssl")))
    if url is None:
        url = stack.api_url if stack is not None else DEFAULT_URL
    if token is None and stack is not None and stack.api_url == url.rstrip("/"):
        with contextlib.suppress(OSError):
            token = stack.api_token
    return url, token


def client(url: str | None, token: str | None) -> httpx.Client:
    """An HTTP client for the service (see `connection` for the defaults)."""
    url, token = connection(url, token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30.0)


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful response; otherwise print the error and exit."""
    if response.is_success:
        return response.json()
    try:
        detail = response.json()["detail"]
    except (ValueError, KeyError, TypeError):
        detail = response.text
    if isinstance(detail, list):
        for item in detail:
            location = ".".join(str(part) for part in item["loc"] if part != "body")
            console.print(f"[red]{location}: {item['msg']}[/]")
    else:
        console.print(f"[red]{response.status_code}: {detail}[/]")
    raise typer.Exit(2 if response.status_code == 422 else 1)


def describe(job: dict[str, Any]) -> str:
    """One line about a job."""
    progress = job["progress"]
    metrics = progress["metrics"]
    parts = [f"{job['id']}  {job['state']:<9}  {job['name']}"]
    if progress["epoch"] is not None:
        parts.append(f"epoch {progress['epoch']}")
    for key in ("loss", "effective_clusters", "knn_top1"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4g}")
    health = health_text(progress)
    if health:
        parts.append(f"health {health}")
    return "  ".join(parts)


def health_text(progress: dict[str, Any]) -> str:
    """``ok``, ``collapsed at step N``, or empty before the trainer's first verdict."""
    if progress.get("health") == "collapsed":
        return f"collapsed at step {progress.get('collapse_step')}"
    return str(progress.get("health") or "")


def print_result(job: dict[str, Any]) -> None:
    """A finished job's quality beside its baselines, and its health verdict."""
    # The stored config is the validated TrainConfig: its eval section is always there.
    for line in result_lines(job["progress"]["metrics"], job["config"]["eval"]["knn_k"][0]):
        typer.echo(line)


def follow_job(http: httpx.Client, job_id: str, poll_s: float = 2.0) -> dict[str, Any]:
    """Show a live progress bar (epoch, loss, effective clusters, health) until the job ends."""
    job: dict[str, Any] = check(http.get(f"/v1/jobs/{job_id}"))
    epochs = int(job["config"]["schedule"]["epochs"])
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}  {task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job["state"], total=epochs, info="")
        while True:
            metrics = job["progress"]["metrics"]
            shown = [key for key in ("loss", "effective_clusters") if key in metrics]
            info = "  ".join(f"{key} {metrics[key]:.4g}" for key in shown)
            health = health_text(job["progress"])
            if health:
                info += f"  health {health}"
            bar.update(
                task,
                completed=min(job["progress"]["epoch"] or 0, epochs),
                description=job["state"],
                info=info,
            )
            if job["state"] in FINAL:
                return job
            time.sleep(poll_s)
            job = check(http.get(f"/v1/jobs/{job_id}"))


def create(
    http: httpx.Client,
    route: str,
    path: Path,
    overrides: list[str] | None,
    overridden: str | None,
    name: str | None,
    idempotency_key: str | None,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST the config file at ``path`` (with ``--set`` overrides) to ``route``.

    Args:
        overridden: the key of the config the overrides apply to (a sweep's ``base``), or
            None for the config itself.
        extra: more body fields (a training job's model registration).
    """
    try:
        raw = read_config_file(path)
        if overrides and overridden is None:
            raw = apply_overrides(raw, overrides)
        elif overrides and overridden is not None:
            raw[overridden] = apply_overrides(raw.get(overridden) or {}, overrides)
    except ConfigError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    body: dict[str, Any] = {"config": raw} | ({"name": name} if name else {}) | (extra or {})
    created: dict[str, Any] = check(http.post(route, json=body, headers=headers))
    return created


def submission_fields(priority: int, notify: list[str] | None) -> dict[str, Any]:
    """The request fields jobs and sweeps share (`service.schemas.Submission`)."""
    return {"priority": priority} | ({"notify": notify} if notify else {})


def submit(
    config_path: Annotated[Path, typer.Argument(help="Training config, YAML or JSON.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set schedule.epochs=2 (repeatable)."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Display name of the job.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe key: the same key returns the same job.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Follow until it ends.")] = False,
    register_as: Annotated[
        str | None,
        typer.Option(help="Register the trained backbone in MLflow under this model name."),
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="Alias of the registered version (with --register-as).")
    ] = None,
    priority: Priority = 0,
    notify: Notify = None,
    url: Url = None,
    token: Token = None,
) -> None:
    """Submit CONFIG as a job to the service (it is validated there)."""
    registration = {"register_as": register_as, "register_alias": alias}
    extra = {key: value for key, value in registration.items() if value is not None}
    extra |= submission_fields(priority, notify)
    with client(url, token) as http:
        job = create(http, "/v1/jobs", config_path, overrides, None, name, idempotency_key, extra)
        typer.echo(job["id"])
        if follow:
            job = follow_job(http, job["id"])
            typer.echo(describe(job))
            if job["state"] != "SUCCEEDED":
                console.print(f"[red]{job['state']}: {job['error']}[/]")
                raise typer.Exit(1)
            print_result(job)


def status(job_id: JobId, url: Url = None, token: Token = None) -> None:
    """Print a job's record as JSON."""
    with client(url, token) as http:
        typer.echo(json.dumps(check(http.get(f"/v1/jobs/{job_id}")), indent=2))


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent-event stream."""
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").removeprefix(" "))


def logs(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends.")] = False,
    url: Url = None,
    token: Token = None,
) -> None:
    """Print a job's log (with -f, keep streaming until the job ends)."""
    with client(url, token) as http:
        if not follow:
            response = http.get(f"/v1/jobs/{job_id}/logs")
            if not response.is_success:
                check(response)
            typer.echo(response.text, nl=False)
            return
        with http.stream(
            "GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}, timeout=None
        ) as response:
            if not response.is_success:
                response.read()
                check(response)
            for event, data in sse_events(response.iter_lines()):
                if event == "log":
                    typer.echo(data)
                elif event == "end":
                    console.print(f"job ended: {data}")


def cancel(job_id: JobId, url: Url = None, token: Token = None) -> None:
    """Cancel a job."""
    with client(url, token) as http:
        typer.echo(describe(check(http.post(f"/v1/jobs/{job_id}/cancel"))))


def retry(job_id: JobId, url: Url = None, token: Token = None) -> None:
    """Run a FAILED or CANCELLED job again (it resumes from its last checkpoint)."""
    with client(url, token) as http:
        typer.echo(describe(check(http.post(f"/v1/jobs/{job_id}/retry"))))


def list_jobs(
    state: Annotated[
        list[str] | None, typer.Option("--state", help="Only jobs in this state (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    url: Url = None,
    token: Token = None,
) -> None:
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if state:
        params["state"] = [value.upper() for value in state]
    with client(url, token) as http:
        page = check(http.get("/v1/jobs", params=params))
    for job in page["items"]:
        typer.echo(describe(job))
    console.print(f"{len(page['items'])} of {page['total']} job(s)")


def trials_table(sweep: dict[str, Any]) -> Table:
    """The trials of a sweep: sampled values, state, epochs and the objective, best marked."""
    metric = sweep["metric"]
    paths = list(sweep["config"]["space"])
    best = (sweep["best_trial"] or {}).get("trial_id")
    table = Table(title=f"{sweep['id']}  {sweep['state']}  ({metric}, {sweep['mode']})")
    for column in ("trial", *(path.rsplit(".", 1)[-1] for path in paths), "state", "epoch"):
        table.add_column(column)
    table.add_column(metric, justify="right")
    for trial in sweep["trials"]:
        state = trial["state"] + (f" ({trial['stop_reason']})" if trial["stop_reason"] else "")
        values = [f"{trial['params'].get(path, '')!s:.6}" for path in paths]
        epoch = trial["metrics"].get("epoch")
        objective = trial["metrics"].get(metric)
        table.add_row(
            ("* " if trial["trial_id"] == best else "") + trial["trial_id"],
            *values,
            state,
            "" if epoch is None else f"{epoch:.0f}",
            "" if objective is None else f"{objective:.4g}",
        )
    return table


def follow_sweep(http: httpx.Client, sweep_id: str, poll_s: float = 3.0) -> dict[str, Any]:
    """A live table of the sweep's trials until the sweep ends."""
    sweep: dict[str, Any] = check(http.get(f"/v1/sweeps/{sweep_id}"))
    with Live(trials_table(sweep), console=console, refresh_per_second=1) as live:
        while sweep["state"] not in FINAL:
            time.sleep(poll_s)
            sweep = check(http.get(f"/v1/sweeps/{sweep_id}"))
            live.update(trials_table(sweep))
    return sweep


def sweep(
    sweep_path: Annotated[Path, typer.Argument(help="Sweep config, YAML or JSON.")],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a base config field: --set schedule.epochs=2."),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Display name of the sweep.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe key: the same key returns the same sweep.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Show a live table of trials until it ends.")
    ] = False,
    priority: Priority = 0,
    notify: Notify = None,
    url: Url = None,
    token: Token = None,
) -> None:
    """Submit SWEEP (a base config and a search space) to the service; it is validated there."""
    extra = submission_fields(priority, notify)
    with client(url, token) as http:
        created = create(
            http, "/v1/sweeps", sweep_path, overrides, "base", name, idempotency_key, extra
        )
        typer.echo(created["id"])
        if not follow:
            return
        final = follow_sweep(http, created["id"])
    best = final["best_trial"]
    if best is not None:
        values = ", ".join(f"{key}={value}" for key, value in best["params"].items())
        typer.echo(
            f"best trial {best['trial_id']}: {final['metric']} "
            f"{best['metrics'][final['metric']]:.4g} ({values})"
        )
        typer.echo(f"MLflow: {final['mlflow_run_url']}")
    if final["state"] != "SUCCEEDED":
        console.print(f"[red]{final['state']}: {final['error']}[/]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the service commands to the ``klssl`` app."""
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command()(cancel)
    app.command()(retry)
    app.command("list")(list_jobs)
    app.command()(sweep)
