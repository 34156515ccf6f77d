"""Tables created and migrated on start-up, with the version each part is at recorded.

Each part of the program that owns tables (the host, the module's stores) has
a :class:`Schema`: a name and a list of migrations, one per version, each
written for SQLite and for PostgreSQL. ``prepare`` runs in one transaction:
it records which version a database is at in ``schema_versions``, applies the
migrations it lacks, and refuses a database written by a newer program. Two
processes starting at once take turns (SQLite's write lock; an advisory lock
on PostgreSQL), so a migration runs once.
"""

from __future__ import annotations

from dataclasses import dataclass

from login_token_module.stores.engines.connection import Conn

# Any fixed number: it names our lock among the database's advisory locks.
_MIGRATION_LOCK = 0x4C544D5F534348


class SchemaError(Exception):
    """The database cannot be used by this program (for example, it is newer)."""


@dataclass(frozen=True)
class Migration:
    """One version's statements, per engine (no statement may hold a ';')."""

    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


@dataclass(frozen=True)
class Schema:
    component: str
    migrations: tuple[Migration, ...]

    @property
    def version(self) -> int:
        return len(self.migrations)


def prepare(conn: Conn, schema: Schema) -> int:
    """Bring ``schema.component``'s tables to the newest version; returns the version found."""

    def run(txn: Conn) -> int:
        if txn.engine == "postgres":
            txn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
        txn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        row = txn.execute(
            "SELECT version FROM schema_versions WHERE component = ?", (schema.component,)
        ).fetchone()
        found = 0 if row is None else int(row[0])
        if found > schema.version:
            raise SchemaError(
                f"the database holds {schema.component} tables at schema version {found}, newer than"
                f" this program knows ({schema.version}); run the newer program or another database"
            )
        for migration in schema.migrations[found:]:
            for statement in migration.sqlite if txn.engine == "sqlite" else migration.postgres:
                txn.execute(statement)
        if found != schema.version:
            txn.execute(
                "INSERT INTO schema_versions (component, version) VALUES (?, ?)"
                " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (schema.component, schema.version),
            )
        return found

    return conn.transaction(run)


def recorded_version(conn: Conn, component: str) -> int | None:
    """The version recorded for ``component``, or None if it has none."""
    row = conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
    return None if row is None else int(row[0])
