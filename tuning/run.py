"""``python -m tuning.run --spec FILE`` or ``SWEEP``: the entry point of a sweep job on Ray.

What the service submits through the Ray Jobs API for ``POST /v1/sweeps`` (``--spec``, a
`tuning.spec.SweepJobSpec`), and what a user runs by hand (``SWEEP`` with options).
Like ``python -m trainer.run`` it connects to ``RAY_ADDRESS`` when set
(with the cluster's token from ``RAY_AUTH_TOKEN``), otherwise starts a local Ray; it
tracks into ``KLSSL_MLFLOW_TRACKING_URI`` / ``MLFLOW_TRACKING_URI``, otherwise into a
SQLite store under ``--output``; the experiment and the trials' checkpoints go to
``--storage-path``, ``KLSSL_STORAGE_PATH`` or ``<output>/ray``. Running a sweep id again
resumes that sweep. The last line on stdout is a JSON summary with the best trial.

Exit codes: 0 at least one trial finished, 1 no trial finished (or the sweep was
interrupted: rerun it with the same ``--sweep-id``), 2 invalid sweep, 3 the sweep could
not start (cluster too small for one trial, storage unreachable, Ray unreachable), 4 the
sweep was cancelled (its parent MLflow run was closed as KILLED).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trainer.config import ConfigError
from trainer.distributed.storage import default_storage_path
from trainer.run import CapacityWait
from trainer.spec import read_spec_file
from tuning.config import SweepConfig, load_sweep
from tuning.spec import SweepJobSpec

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console(stderr=True)


def default_sweep_id(sweep: SweepConfig) -> str:
    """A sweep id unique per job: the sweep name, a UTC timestamp and a random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{sweep.sweep_name}-{stamp}-{uuid.uuid4().hex[:6]}"


@app.command()
def main(
    sweep_path: Annotated[
        Path | None, typer.Argument(help="Sweep config, YAML or JSON (or --spec).")
    ] = None,
    spec_path: Annotated[
        Path | None,
        typer.Option("--spec", help="A sweep job spec (JSON) as the service writes it."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a base config field: --set schedule.epochs=2."),
    ] = None,
    sweep_id: Annotated[
        str | None,
        typer.Option(help="Sweep id (Tune experiment name); an existing id resumes it."),
    ] = None,
    mlflow_run_id: Annotated[
        str | None, typer.Option(help="The sweep's existing MLflow parent run.")
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Local directory for the default stores.")
    ] = Path("runs"),
    storage_path: Annotated[
        str | None,
        typer.Option(help="Experiment and checkpoint storage: a shared dir or s3://..."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Resume an existing experiment of --sweep-id.")
    ] = True,
    capacity_wait: CapacityWait = 0.0,
) -> None:
    """Run the sweep SWEEP_PATH (or the job of --spec) with Ray Tune, tracked in MLflow."""
    owner: str | None = None
    if (sweep_path is None) == (spec_path is None):
        raise typer.BadParameter("give either SWEEP or --spec FILE", param_hint="SWEEP")
    try:
        if spec_path is not None:
            spec = read_spec_file(spec_path, SweepJobSpec)
            assert isinstance(spec, SweepJobSpec)
            sweep = spec.config
            sweep_id = spec.job_id or sweep_id
            mlflow_run_id = spec.mlflow_run_id or mlflow_run_id
            storage_path = spec.storage_path or storage_path
            owner = spec.owner
            capacity_wait = spec.capacity_wait_s or capacity_wait
        else:
            assert sweep_path is not None
            sweep = load_sweep(sweep_path, overrides or [])
    except ConfigError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None

    # Ray, torch and MLflow load only once the sweep is known to be valid.
    from trainer.distributed.environment import ensure_ray_env

    ensure_ray_env()  # before Ray is imported
    from trainer.distributed.cancel import CANCELLED_EXIT_CODE, RunCancelledError
    from trainer.distributed.errors import LaunchError
    from trainer.preflight import PreflightError
    from trainer.tracking import resolve_tracking_uri
    from tuning.driver import run_sweep

    tracking_uri = resolve_tracking_uri(output)
    name = sweep_id or default_sweep_id(sweep)
    try:
        result = run_sweep(
            sweep,
            tracking_uri=tracking_uri,
            storage_path=storage_path or default_storage_path(output),
            sweep_id=name,
            parent_run_id=mlflow_run_id,
            resume=resume,
            owner=owner,
            capacity_wait_s=capacity_wait,
        )
    except PreflightError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    except RunCancelledError as error:
        console.print(f"[yellow]{error}[/]")
        raise typer.Exit(CANCELLED_EXIT_CODE) from None
    except LaunchError as error:
        console.print(f"[red]cannot start the sweep: {error}[/]")
        raise typer.Exit(3) from None
    best = result.best
    if best is not None:
        console.print(
            f"best trial {best.trial_id} ({result.metric} = {best.metrics[result.metric]:.4g}): "
            + ", ".join(f"{key}={value}" for key, value in best.params.items())
        )
    states: dict[str, int] = {}
    for record in result.trials:
        key = record.stop_reason or record.state.lower()
        states[key] = states.get(key, 0) + 1
    summary = {
        "sweep_id": result.sweep_id,
        "tracking_uri": result.tracking_uri,
        "mlflow_run_id": result.parent_run_id,
        "experiment": result.experiment_path,
        "metric": result.metric,
        "mode": result.mode,
        "trials": states,
        "interrupted": result.interrupted,
        "best": best.model_dump(exclude={"config"}) if best is not None else None,
    }
    typer.echo(json.dumps(summary))
    if result.interrupted:
        console.print(f"[yellow]interrupted: rerun with --sweep-id {name} to resume[/]")
        raise typer.Exit(1)
    if result.finished == 0:
        console.print("[red]no trial finished[/]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
