"""Metadata in SQL through SQLAlchemy 2.0: tables, migrations and named queries. The only writer of SQL."""

from tuneforge.store.db import Database, open_database

__all__ = ["Database", "open_database"]
