"""``python -m service.cli``: the ``klssl`` command without its console script."""

from service.cli import app

app()
