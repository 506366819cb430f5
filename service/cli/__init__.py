"""The ``klssl`` command: `app`, assembled from its command modules.

`service.cli.train` (``train``, ``eval``: in this process), `service.cli.client`
(``submit``, ``status``, ``logs``, ``cancel``, ``list``, ``sweep``: the REST API),
`service.cli.stack` (``up``, ``down``: the local stack) and `service.cli.data`
(``data pack``: images into Parquet shards).
"""

from __future__ import annotations

import typer

from service.cli import client, data, stack, train

__all__ = ["app"]

app = typer.Typer(
    name="klssl",
    help="Self-supervised learning by clustering: train, submit and compare runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
train.register(app)
client.register(app)
stack.register(app)
data.register(app)
