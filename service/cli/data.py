"""``klssl data pack SRC DST``: image files into Parquet shards (`trainer.packing`).

A pack lists and reads as a few large files where the source is many small ones; point
``data.path`` (``kind: files``) at it. `register` adds the ``data`` command group to
the ``klssl`` Typer app.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trainer.object_store import uri_problem

console = Console(stderr=True)
data_app = typer.Typer(
    help="Prepare own images for training: pack them into Parquet shards.",
    no_args_is_help=True,
)
SHOWN = 5
MAX_SHARD_MB = 4096


class Labels(StrEnum):
    """Where the labels of a pack come from."""

    source = "source"
    folders = "folders"


@data_app.command("pack")
def pack(
    source: Annotated[
        str,
        typer.Argument(
            help="Images: a folder (searched recursively), a .txt/.csv/.parquet manifest "
            "of paths, or s3://bucket/prefix (or a manifest object).",
            show_default=False,
        ),
    ],
    destination: Annotated[
        str,
        typer.Argument(
            help="A new or empty folder (or s3:// prefix) outside the source, for the "
            "shards part-00000.parquet, ...",
            show_default=False,
        ),
    ],
    pattern: Annotated[
        str | None,
        typer.Option(help="Only the files this glob matches, relative to SOURCE ('**/*.jpg')."),
    ] = None,
    labels: Annotated[
        Labels,
        typer.Option(
            help="source: a labelled manifest's labels (else none); folders: SOURCE/<class>/... "
            "(the first folder names the class)."
        ),
    ] = Labels.source,
    shard_mb: Annotated[
        int,
        typer.Option(min=1, max=MAX_SHARD_MB, help="Image megabytes (MiB) per shard, about."),
    ] = 256,
    verify: Annotated[
        bool,
        typer.Option(
            help="Decode every image first; leave out and report those that cannot be. "
            "--no-verify packs the bytes unchecked (training then counts bad ones)."
        ),
    ] = True,
    readers: Annotated[
        int, typer.Option(min=1, max=64, help="Threads reading (and decoding) files.")
    ] = 8,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Pack images into Parquet shards of their encoded bytes, in sorted (listed) order.

    Exit codes: 0 packed (files that cannot be read are left out and listed), 2 refused
    (no images, a destination that is not empty or lies inside the source, ...), 1 a
    failure while writing. Nothing is left at the destination unless it succeeds.
    """
    for name, location in (("SRC", source), ("DST", destination)):
        problem = uri_problem(location)
        if problem is not None:
            console.print(f"[red]{name}: {problem}[/]")
            raise typer.Exit(2)
    from trainer.packing import pack_images  # pyarrow (and, verifying, torch) load here

    bar = Progress(
        TextColumn("packing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
    )
    task = bar.add_task("packing", total=None)

    def advance(done: int, total: int) -> None:
        if done == 1:  # the source is listed and the destination accepted: show the bar
            bar.start()
        bar.update(task, completed=done, total=total)

    try:
        summary = pack_images(
            source,
            destination,
            pattern=pattern,
            labels=labels.value,
            shard_bytes=shard_mb * 2**20,
            verify=verify,
            readers=readers,
            progress=advance,
        )
    except ValueError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from None
    except OSError as error:
        console.print(f"[red]pack failed: {error}[/]")
        raise typer.Exit(1) from None
    finally:
        bar.stop()
    if summary.unreadable:
        console.print(
            f"[yellow]{len(summary.unreadable)} file(s) cannot be read and were left out:[/]"
        )
        for path, reason in summary.unreadable[:SHOWN]:
            console.print(f"[yellow]  {path}: {reason}[/]")
        if len(summary.unreadable) > SHOWN:
            console.print(f"[yellow]  ... and {len(summary.unreadable) - SHOWN} more[/]")
    names = summary.class_names
    classes = (
        f"{len(names)} classes ({', '.join(names[:SHOWN])}{', ...' if len(names) > SHOWN else ''})"
        if names
        else "unlabelled"
    )
    typer.echo(
        f"packed {summary.images} images into {len(summary.shards)} shard(s), "
        f"{_size(summary.bytes)}, {classes}; "
        f"{len(summary.unreadable)} left out as unreadable"
    )
    typer.echo(f"pack in {destination} (data.kind: files, data.path: {destination})")


def _size(count: int) -> str:
    if count >= 2**30:
        return f"{count / 2**30:.1f} GiB"
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group (``klssl data pack``) to the ``klssl`` app."""
    app.add_typer(data_app, name="data")
