"""``python -m trainer.run --spec FILE`` or ``CONFIG``: the entry point of a training job.

The service submits ``--spec spec.json`` (a `trainer.spec.TrainJobSpec`: the config, the
job id that names the Ray Train run, the MLflow run, the storage, the registration)
through the Ray Jobs API; a user runs ``CONFIG`` with options by hand for a multi-worker
job. It connects to ``RAY_ADDRESS`` when set (with the cluster's
token from ``RAY_AUTH_TOKEN``), otherwise starts a local Ray; it tracks into
``KLSSL_MLFLOW_TRACKING_URI`` / ``MLFLOW_TRACKING_URI``, otherwise into a SQLite store
under ``--output``; checkpoints go to ``--storage-path``, ``KLSSL_STORAGE_PATH`` or
``<output>/ray``. The last line on stdout is a JSON summary of the run.

Exit codes: 0 done, 1 training failed, 2 invalid config, 3 the run could not start
(cluster too small, storage unreachable, Ray unreachable), 4 the job was cancelled (its
MLflow run was closed as KILLED, before or during training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from trainer.bounds import MAX_CAPACITY_WAIT_S
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.distributed.storage import default_storage_path
from trainer.mlflow_names import JOB_ID_TAG, OWNER_TAG
from trainer.spec import TrainJobSpec, read_spec_file

if TYPE_CHECKING:
    from trainer.distributed.launcher import LaunchResult

__all__ = ["app", "default_storage_path", "launch_or_exit"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

CapacityWait = Annotated[
    float,
    typer.Option(
        min=0,
        max=MAX_CAPACITY_WAIT_S,
        help="Seconds to wait for an autoscaling cluster to grow to the job's size "
        "(0: fail at once when it is too small).",
    ),
]
"""``--capacity-wait`` of the job entry points (this one and `tuning.run`)."""
console = Console(stderr=True)


def _parse_tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"{pair!r}: a tag must look like key=value", param_hint="--tag"
            )
        tags[key] = value
    return tags


def launch_or_exit(config: TrainConfig, **launch_options: Any) -> LaunchResult:
    """`launch_training`, turning its failures into a message and this module's exit codes."""
    from trainer.distributed.environment import ensure_ray_env

    ensure_ray_env()  # before Ray is imported
    from trainer.distributed.cancel import CANCELLED_EXIT_CODE, RunCancelledError
    from trainer.distributed.errors import LaunchError
    from trainer.distributed.launcher import TrainingFailedError, launch_training
    from trainer.preflight import PreflightError

    try:
        return launch_training(config, **launch_options)
    except PreflightError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    except RunCancelledError as error:
        console.print(f"[yellow]{error}[/]")
        raise typer.Exit(CANCELLED_EXIT_CODE) from None
    except LaunchError as error:
        console.print(f"[red]cannot start the run: {error}[/]")
        raise typer.Exit(3) from None
    except TrainingFailedError as error:
        console.print(f"[red]training failed: {error}[/]")
        raise typer.Exit(1) from None


@app.command()
def main(
    config_path: Annotated[
        Path | None, typer.Argument(help="Training config, YAML or JSON (or --spec).")
    ] = None,
    spec_path: Annotated[
        Path | None,
        typer.Option("--spec", help="A job spec (JSON) as the service writes it."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set schedule.epochs=2 (repeatable)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", "-w", min=1, help="Workers (default: runtime.num_workers)."),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Local directory for the default stores.")
    ] = Path("runs"),
    storage_path: Annotated[
        str | None,
        typer.Option(help="Checkpoint storage: a shared directory or s3://bucket/prefix."),
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(help="Ray Train run name; an interrupted run's name resumes it."),
    ] = None,
    mlflow_run_id: Annotated[
        str | None, typer.Option(help="Log into this existing MLflow run.")
    ] = None,
    tags: Annotated[
        list[str] | None, typer.Option("--tag", help="MLflow run tag key=value (repeatable).")
    ] = None,
    register_as: Annotated[
        str | None, typer.Option(help="Register the exported backbone under this name.")
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="Alias for the registered version (with --register-as).")
    ] = None,
    tracking: Annotated[bool, typer.Option(help="Track the run in MLflow.")] = True,
    capacity_wait: CapacityWait = 0.0,
) -> None:
    """Train CONFIG (or the job of --spec) data-parallel with Ray Train, tracked in MLflow."""
    if (config_path is None) == (spec_path is None):
        raise typer.BadParameter("give either CONFIG or --spec FILE", param_hint="CONFIG")
    spec: TrainJobSpec | None = None
    try:
        if spec_path is not None:
            read = read_spec_file(spec_path, TrainJobSpec)
            assert isinstance(read, TrainJobSpec)
            spec, config = read, read.config
        else:
            config = load_config(config_path, overrides or [])
    except ConfigError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    if alias is not None and register_as is None:
        raise typer.BadParameter("--alias needs --register-as", param_hint="--alias")
    run_tags = _parse_tags(tags or [])
    if spec is not None:
        run_name = spec.job_id or run_name
        mlflow_run_id = spec.mlflow_run_id or mlflow_run_id
        storage_path = spec.storage_path or storage_path
        capacity_wait = spec.capacity_wait_s or capacity_wait
        register_as, alias = spec.register_as or register_as, spec.register_alias or alias
        run_tags |= spec.tags
        if spec.job_id is not None:
            run_tags[JOB_ID_TAG] = spec.job_id
        if spec.owner is not None:
            run_tags[OWNER_TAG] = spec.owner

    # Ray, torch and MLflow load only once the arguments are known to be valid.
    from trainer.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(output) if tracking else None
    result = launch_or_exit(
        config,
        workers=workers,
        storage_path=storage_path or default_storage_path(output),
        tracking_uri=tracking_uri,
        run_name=run_name,
        mlflow_run_id=mlflow_run_id,
        tags=run_tags,
        register_as=register_as,
        register_alias=alias,
        capacity_wait_s=capacity_wait,
    )
    if "knn_top1" in result.metrics:
        console.print(f"k-NN top-1 (k={config.eval.knn_k[0]}): {result.metrics['knn_top1']:.2f}%")
    summary = {
        "run_name": result.run_name,
        "storage": result.storage_uri,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": result.mlflow_run_id,
        "backbone_model_uri": result.backbone_model_uri,
        "checkpoints": [record["uri"] for record in result.checkpoints],
        "metrics": result.metrics,
    }
    typer.echo(json.dumps(summary))


if __name__ == "__main__":
    app()
