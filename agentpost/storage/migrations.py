"""Numbered, immutable SQL migrations applied under an advisory lock.

Migrations run from the command line (and from `make run`) on a plain blocking
psycopg2 connection before any reactor work starts: there is nothing to overlap
with, and a blocking run is simpler to reason about while the schema changes.
Each file's SHA-256 is recorded, so an edited, already-applied migration is caught.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg2

MIGRATION_LOCK_KEY = 0x4147505354  # "AGPST"; any constant shared by every process
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """The database and the code disagree about the schema."""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file, recorded when applied."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def available_migrations() -> list[Migration]:
    """Every migration shipped with this code, in order."""
    found = []
    for entry in resources.files("agentpost.storage").joinpath("migrations").iterdir():
        match = _NAME_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration numbering has a gap before {migration.version:04d}")
    return found


def code_schema_version() -> int:
    """The newest schema version this code knows."""
    migrations = available_migrations()
    return migrations[-1].version if migrations else 0


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""


def _applied(cur: psycopg2.extensions.cursor) -> dict[int, str]:
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = cur.fetchone()
    if row is None or not row[0]:
        return {}
    cur.execute("SELECT version, checksum FROM schema_migrations")
    return dict(cur.fetchall())


def migrate(dsn: str) -> list[int]:
    """Apply every pending migration; return the versions applied (empty if none)."""
    migrations = available_migrations()
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            try:
                cur.execute(_CREATE_TABLE)
                applied = _applied(cur)
                _check_compatible(applied, migrations)
                done = []
                for migration in migrations:
                    if migration.version in applied:
                        continue
                    conn.autocommit = False
                    cur.execute(migration.sql)
                    cur.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) "
                        "VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                    conn.commit()
                    conn.autocommit = True
                    done.append(migration.version)
                return done
            finally:
                if conn.autocommit is False:
                    conn.rollback()
                    conn.autocommit = True
                cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    finally:
        conn.close()


def _check_compatible(applied: dict[int, str], migrations: list[Migration]) -> None:
    known = {m.version: m for m in migrations}
    newer = sorted(v for v in applied if v not in known)
    if newer:
        raise MigrationError(
            f"the database schema is at version {max(applied)}, newer than this code "
            f"({code_schema_version()}); upgrade AgentPost before starting it"
        )
    for version, checksum in applied.items():
        if known[version].checksum != checksum:
            raise MigrationError(
                f"migration {version:04d}_{known[version].name} was changed after it was "
                "applied; migrations are immutable, add a new one instead"
            )


def check_schema(dsn: str) -> None:
    """Refuse to serve a database that is not migrated to exactly this code's schema."""
    migrations = available_migrations()
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            applied = _applied(cur)
    finally:
        conn.close()
    _check_compatible(applied, migrations)
    missing = [m.version for m in migrations if m.version not in applied]
    if missing:
        raise MigrationError(
            f"the database lacks migrations {missing}; run `agentpost migrate` first"
        )


def ensure_database(admin_dsn: str, name: str) -> None:
    """Create database ``name`` if it does not exist (used by `make run`)."""
    conn = psycopg2.connect(admin_dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
