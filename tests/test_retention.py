"""Audit retention by tier, on the injected clock, safe with several processes."""

from datetime import UTC, datetime, timedelta

import psycopg2
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.config.sections import RetentionSection
from agentpost.jobs.retention import RetentionSweep
from agentpost.storage.database import Database


def _seed(dsn, now):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    for org, tier in (("org_free", "free"), ("org_ent", "enterprise")):
        cur.execute("INSERT INTO organizations (id, name, tier, created_at, updated_at) "
                    "VALUES (%s, %s, %s, now(), now())", (org, org, tier))
    rows = [("aud_1", "org_free", 8), ("aud_2", "org_free", 6), ("aud_3", "org_ent", 8),
            ("aud_4", "org_ent", 800), ("aud_5", None, 31), ("aud_6", None, 1)]
    for rid, org, days in rows:
        cur.execute("INSERT INTO audit_log (id, occurred_at, org_id, actor_type, action, outcome)"
                    " VALUES (%s, %s, %s, 'api_key', 'x', 'allowed')",
                    (rid, now - timedelta(days=days), org))
    conn.close()


def _ids(dsn):
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM audit_log ORDER BY id")
        ids = [r[0] for r in cur.fetchall()]
    conn.close()
    return ids


def _config(**kw):
    cfg = RetentionSection(**kw)
    for f in ("interval", "audit_free", "audit_developer", "audit_startup", "audit_business",
              "audit_enterprise", "audit_unscoped", "delivery_events"):
        from agentpost.config.units import parse_duration

        value = getattr(cfg, f)
        if isinstance(value, str):
            setattr(cfg, f, parse_duration(value))
    return cfg


@pytest_twisted.ensureDeferred
async def test_audit_rows_expire_by_tier(db_dsn):
    """Free keeps 7 days, enterprise 2 years, organization-less rows 30 days."""
    clock = task.Clock()
    now = datetime.now(UTC)
    clock.advance(now.timestamp())
    _seed(db_dsn, now)
    db = Database(db_dsn, clock=clock, reactor=reactor, pool_size=2)
    sweep = RetentionSweep(db, clock, _config(batch_size=1))
    try:
        deleted = await sweep.sweep_once()
        assert deleted == 3
        assert _ids(db_dsn) == ["aud_2", "aud_3", "aud_6"]
        clock.advance(timedelta(days=2).total_seconds())  # aud_2 passes 7 days
        assert await sweep.sweep_once() == 1
        assert _ids(db_dsn) == ["aud_3", "aud_6"]
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_two_processes_sweeping_at_once_do_not_conflict(db_dsn):
    """Two sweepers on one database: one deletes, the other steps aside; nothing errors."""
    clock = task.Clock()
    now = datetime.now(UTC)
    clock.advance(now.timestamp())
    _seed(db_dsn, now)
    dbs = [Database(db_dsn, clock=clock, reactor=reactor, pool_size=2) for _ in range(2)]
    sweeps = [RetentionSweep(db, clock, _config(batch_size=1)) for db in dbs]
    try:
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(s.sweep_once()) for s in sweeps])
        assert sum(results) == 3
        assert _ids(db_dsn) == ["aud_2", "aud_3", "aud_6"]
    finally:
        for db in dbs:
            await db.close()


@pytest_twisted.ensureDeferred
async def test_sweep_runs_on_the_clock(db_dsn):
    """start() sweeps at once and again every interval of the injected clock."""
    clock = task.Clock()
    now = datetime.now(UTC)
    clock.advance(now.timestamp())
    _seed(db_dsn, now)
    db = Database(db_dsn, clock=clock, reactor=reactor, pool_size=2)
    sweep = RetentionSweep(db, clock, _config(interval="86460s"))
    try:
        sweep.start()
        if sweep._periodic.running is not None:
            await sweep._periodic.running
        assert _ids(db_dsn) == ["aud_2", "aud_3", "aud_6"]
        clock.advance(86400 + 60)  # a day later aud_2 is past 7 days; the timer sweeps again
        if sweep._periodic.running is not None:
            await sweep._periodic.running
        assert _ids(db_dsn) == ["aud_3", "aud_6"]
    finally:
        await sweep.stop()
        await db.close()


@pytest_twisted.ensureDeferred
async def test_idle_login_allowances_are_forgotten(db_dsn):
    """Failed-login buckets untouched for a day are removed by the sweep; fresh ones stay."""
    from agentpost.storage import logins

    clock = task.Clock()
    now = datetime.now(UTC)
    clock.advance(now.timestamp())
    db = Database(db_dsn, clock=clock, reactor=reactor, pool_size=2)
    try:
        def buckets(*keys):
            return [logins.Allowance(k, 0.1, 10) for k in keys]

        await db.run_interaction("t", logins.spend, buckets("old"), now - timedelta(days=2))
        await db.run_interaction("t", logins.spend, buckets("new", "old2"),
                                 now - timedelta(hours=1))
        await db.run_interaction("t", logins.spend, buckets("new"), now)
        # an hour refilled the bucket (0.1/s, 10 at most), then one more failure
        assert await db.run_read("t", logins.tokens_left, buckets("new"), now) == {"new": 9.0}
        await RetentionSweep(db, clock, _config()).sweep_once()
        conn = psycopg2.connect(db_dsn)
        with conn.cursor() as cur:
            cur.execute("SELECT key FROM login_failures ORDER BY key")
            assert [r[0] for r in cur.fetchall()] == ["new", "old2"]
        conn.close()
    finally:
        await db.close()
