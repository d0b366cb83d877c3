"""Migrations: from empty, re-run, tamper detection, newer-schema refusal."""

import subprocess
import sys

import psycopg2
import pytest

from agentpost.storage.migrations import (
    MigrationError,
    available_migrations,
    check_schema,
    code_schema_version,
    migrate,
)


def _tables(dsn):
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def test_migrate_from_empty_then_rerun_is_a_no_op(empty_dsn):
    """An empty database gets every migration once; a second run applies nothing."""
    with pytest.raises(MigrationError):
        check_schema(empty_dsn)  # an unmigrated database is refused
    applied = migrate(empty_dsn)
    assert applied == [m.version for m in available_migrations()]
    assert {"organizations", "environments", "users", "org_memberships", "env_memberships",
            "api_keys", "api_key_environments", "admin_keys", "shared_domains", "domains",
            "inboxes", "audit_log", "schema_migrations"} <= _tables(empty_dsn)
    assert migrate(empty_dsn) == []
    check_schema(empty_dsn)


def test_every_tenant_table_carries_org_id_not_null(empty_dsn):
    """Rule 2 of the house, checked against the real catalogue."""
    migrate(empty_dsn)
    conn = psycopg2.connect(empty_dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT table_name, is_nullable FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND column_name = 'org_id'")
        cols = dict(cur.fetchall())
    conn.close()
    tenant = {"environments", "org_memberships", "env_memberships", "api_keys",
              "api_key_environments", "domains", "inboxes"}
    assert tenant <= set(cols)
    assert all(cols[t] == "NO" for t in tenant)


def test_newer_schema_is_refused(db_dsn):
    """A database migrated by newer code is not served by this code."""
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    conn.cursor().execute("INSERT INTO schema_migrations (version, name, checksum) "
                          "VALUES (%s, 'from_the_future', 'x')", (code_schema_version() + 1,))
    conn.close()
    with pytest.raises(MigrationError, match="newer than this code"):
        check_schema(db_dsn)
    with pytest.raises(MigrationError, match="newer than this code"):
        migrate(db_dsn)


def test_edited_migration_is_detected(db_dsn):
    """An applied migration whose file changed afterwards is reported, not silently skipped."""
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    conn.cursor().execute("UPDATE schema_migrations SET checksum = 'tampered' WHERE version = 1")
    conn.close()
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate(db_dsn)


def test_concurrent_migrate_runs_apply_once(empty_dsn):
    """Two `agentpost migrate` processes at once: the advisory lock serializes them."""
    env = {"AGENTPOST_DATABASE_URL": empty_dsn, "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-m", "agentpost.cli", "migrate"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    texts = sorted(o[0].strip() for o in outs)
    everything = ", ".join(f"{m.version:04d}" for m in available_migrations())
    assert texts == [f"applied migrations: {everything}", "database schema is up to date"]
