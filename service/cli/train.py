"""``klssl train | eval``: training and evaluation in this process (no service).

``klssl train CONFIG`` runs in this process (or, with ``--workers``, on Ray); the service
commands (submit, status, ...) are in `service.cli.client`. `register` adds these
commands to the ``klssl`` Typer app.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from trainer.config import ConfigError, TrainConfig, load_config
from trainer.preflight import preflight
from trainer.summary import result_lines

console = Console(stderr=True)

ConfigPath = Annotated[
    Path, typer.Argument(help="Training config, YAML or JSON (the TrainConfig schema).")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a field, validated like the file: --set schedule.epochs=2 (repeatable).",
    ),
]


def train(
    config_path: ConfigPath,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for checkpoints and metrics.")
    ] = Path("runs/latest"),
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-w",
            min=1,
            help="Train on Ray with N workers (RAY_ADDRESS, else a local Ray), tracked in MLflow.",
        ),
    ] = None,
) -> None:
    """Train a config and print the k-NN accuracy.

    Without --workers the run stays in this process (no Ray, no MLflow); with it, it runs
    data-parallel on Ray Train and is recorded in MLflow (KLSSL_MLFLOW_TRACKING_URI, else
    a SQLite store in --output).
    """
    try:
        config = preflight(load_config(config_path, overrides or []))
    except ConfigError as error:  # invalid, or cannot run here (a PreflightError)
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    if workers is None and config.data.loader == "ray":
        console.print(
            "[red]data.loader 'ray' streams the data through Ray Data: add --workers N "
            "(Ray Train), or set data.loader=torch to train in this process[/]"
        )
        raise typer.Exit(2)
    if workers is not None:
        metrics = _train_on_ray(config, output, workers)
    else:
        from trainer.local import train_locally  # torch and timm load only when training

        try:
            metrics = train_locally(config, output, resume=resume, show_progress=progress)
        except FileNotFoundError as error:
            console.print(f"[red]{error}[/]")
            raise typer.Exit(1) from None
    summary = {key: round(value, 4) for key, value in metrics.items()}
    console.print(f"final metrics: {json.dumps(summary)}")
    for line in result_lines(metrics, config.eval.knn_k[0]):
        typer.echo(line)
    typer.echo(f"outputs in {output}")


def _train_on_ray(config: TrainConfig, output: Path, workers: int) -> dict[str, float]:
    """Run ``config`` with Ray Train, tracked in MLflow (exit codes of ``trainer.run``)."""
    from trainer.run import default_storage_path, launch_or_exit
    from trainer.tracking import resolve_tracking_uri

    result = launch_or_exit(
        config,
        workers=workers,
        storage_path=default_storage_path(output),
        tracking_uri=resolve_tracking_uri(output),
    )
    console.print(f"MLflow run {result.mlflow_run_id} in {resolve_tracking_uri(output)}")
    return result.metrics


def evaluate_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint directory (epoch_NNNN).")],
) -> None:
    """k-NN and linear-probe accuracy of a checkpoint's teacher backbone (held-out split)."""
    from trainer.checkpoint import load_checkpoint_config, load_payload
    from trainer.loop import build_run, evaluate

    try:
        config = preflight(load_checkpoint_config(checkpoint))
        payload = load_payload(checkpoint)
    except (FileNotFoundError, ConfigError) as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    run = build_run(config)
    run.state.teacher.load_state_dict(payload["teacher"])
    for name, value in evaluate(run).items():
        typer.echo(f"{name}: {value:.2f}%")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``eval`` to the ``klssl`` app."""
    app.command()(train)
    app.command("eval")(evaluate_checkpoint)
