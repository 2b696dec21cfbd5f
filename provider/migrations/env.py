"""Runs migrations on the connection the provider hands over (never opens its own, never logs config)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only the provider's own upgrade path runs this module
    raise RuntimeError("run provider migrations through zkunlearn.provider.state.upgrade_schema")
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
