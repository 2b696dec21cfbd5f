"""Alembic migrations of the provider's SQL schema (SQLite and PostgreSQL alike).

``SqlState`` runs them to head when it opens a database, under a lock, so replicas starting at once
cannot race a migration and an upgraded binary never meets an old schema. New revision::

    alembic -c provider/migrations/alembic.ini revision -m "what changes"
"""
