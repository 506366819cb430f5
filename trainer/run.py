"""``python -m trainer.run CONFIG``: the entry point of a training job on Ray.

This is what the service submits through the Ray Jobs API, and what a user runs by hand
for a multi-worker job. It connects to ``RAY_ADDRESS`` when set (with the cluster's
token from ``RAY_AUTH_TOKEN``), otherwise starts a local Ray; it tracks into
``KLSSL_MLFLOW_TRACKING_URI`` / ``MLFLOW_TRACKING_URI``, otherwise into a SQLite store
under ``--output``; checkpoints go to ``--storage-path``, ``KLSSL_STORAGE_PATH`` or
``<output>/ray``. The last line on stdout is a JSON summary of the run.

Exit codes: 0 done, 1 training failed, 2 invalid config, 3 the run could not start
(cluster too small, storage unreachable, Ray unreachable).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from trainer.config import ConfigError, TrainConfig, load_config

if TYPE_CHECKING:
    from trainer.launch import LaunchResult

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
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


def default_storage_path(output: Path) -> str:
    """``KLSSL_STORAGE_PATH``, else ``<output>/ray`` (absolute: Ray workers run elsewhere)."""
    return os.environ.get("KLSSL_STORAGE_PATH") or str(output.resolve() / "ray")


def launch_or_exit(config: TrainConfig, **launch_options: Any) -> LaunchResult:
    """`launch_training`, turning its failures into a message and this module's exit codes."""
    # The launch module prepares Ray's environment, so it is imported before Ray is.
    from trainer.launch import LaunchError, TrainingFailedError, launch_training

    try:
        return launch_training(config, **launch_options)
    except LaunchError as error:
        console.print(f"[red]cannot start the run: {error}[/]")
        raise typer.Exit(3) from None
    except TrainingFailedError as error:
        console.print(f"[red]training failed: {error}[/]")
        raise typer.Exit(1) from None


@app.command()
def main(
    config_path: Annotated[Path, typer.Argument(help="Training config, YAML or JSON.")],
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
) -> None:
    """Train CONFIG data-parallel with Ray Train and track it in MLflow."""
    try:
        config = load_config(config_path, overrides or [])
    except ConfigError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    if alias is not None and register_as is None:
        raise typer.BadParameter("--alias needs --register-as", param_hint="--alias")
    run_tags = _parse_tags(tags or [])

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
