"""Alembic environment: migrations run on a connection handed over by `service.store`."""

from __future__ import annotations

from alembic import context

from service.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through service.store.migrate(engine)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
