"""Rows rendered by an older renderer are brought up to date from their raw bytes, in
the background, once, however many processes run the job (real PostgreSQL)."""

import psycopg2
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.core.ingest import RENDER_VERSION
from agentpost.jobs.rerender import RenderRefresh
from agentpost.storage.database import Database
from tests.helpers import execute as _execute
from tests.helpers import query
from tests.mailfactory import make_message

_COLUMNS = ("imap_envelope", "imap_bodystructure", "imap_body", "imap_sections",
            "sort_subject", "from_text", "sent_date", "render_version")


def _age(dsn: str) -> None:
    """What rows stored before the renderer fix look like: version 0, old renderings."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("UPDATE messages SET render_version = 0, imap_envelope = 'stale', "
                    "imap_bodystructure = NULL, imap_body = 'stale', sort_subject = '', "
                    "from_text = NULL, sent_date = NULL")
    conn.close()


def _rows(dsn: str) -> list[tuple]:
    return query(dsn, f"SELECT id, {', '.join(_COLUMNS)} FROM messages ORDER BY id")


async def _seed(server, count: int) -> None:
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "rerender"},
                                   key=key)).json
    for n in range(count):
        raw = make_message(subject=f"Re: report {n}", body=f"body {n}\n",
                           msgid=f"<r{n}@example.com>",
                           attachments=[(f"f{n}.txt", "text/plain", b"x" * 10)])
        await server.deliver(raw, [inbox["email"]])


@pytest_twisted.ensureDeferred
async def test_new_rows_carry_the_current_version_and_copies_keep_it(server, db_dsn):
    await _seed(server, 2)
    assert {r[-1] for r in _rows(db_dsn)} == {RENDER_VERSION}
    assert RENDER_VERSION >= 1


@pytest_twisted.ensureDeferred
async def test_stale_rows_are_rendered_again_from_their_raw_bytes(server, db_dsn):
    await _seed(server, 5)
    fresh = _rows(db_dsn)
    _age(db_dsn)
    assert all(r[1] == "stale" for r in _rows(db_dsn))

    job = RenderRefresh(server.core.db, server.core.blobs, task.Clock(), reactor, batch=2)
    assert await job.run_once() == 5
    assert _rows(db_dsn) == fresh
    assert await job.run_once() == 0  # nothing left: the stale index is empty
    assert fresh[0][5] == "report 0"  # the RFC 5256 base subject, not the old ''


@pytest_twisted.ensureDeferred
async def test_an_unreadable_blob_is_passed_over_and_retried(server, db_dsn):
    await _seed(server, 3)
    _age(db_dsn)
    victim = _rows(db_dsn)[1][0]
    [(key,)] = query(db_dsn, "SELECT raw_blob_key FROM messages WHERE id = %s", (victim,))
    # The stored bytes are lost (a partial restore, say): a small message's are in its
    # blob row, a larger one's in the store.
    assert key.startswith("db/")
    _execute(db_dsn, "UPDATE blobs SET data = NULL WHERE key = %s", (key,))
    job = RenderRefresh(server.core.db, server.core.blobs, task.Clock(), reactor, batch=1)
    assert await job.run_once() == 2
    left = {r[0]: r[-1] for r in _rows(db_dsn)}
    assert left.pop(victim) == 0
    assert set(left.values()) == {RENDER_VERSION}


@pytest_twisted.ensureDeferred
async def test_two_processes_share_the_work_and_render_each_row_once(server, db_dsn):
    """Each job has its own database pool, as two processes would; SKIP LOCKED splits
    the rows between them and the version check makes a second update a no-op."""
    await _seed(server, 12)
    _age(db_dsn)
    pools = [Database(db_dsn, clock=task.Clock(), reactor=reactor, pool_size=2)
             for _ in range(2)]
    try:
        jobs = [RenderRefresh(db, server.core.blobs, task.Clock(), reactor, batch=3)
                for db in pools]
        counts = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(job.run_once()) for job in jobs])
    finally:
        for db in pools:
            await db.close()
    assert sum(counts) == 12
    assert {r[-1] for r in _rows(db_dsn)} == {RENDER_VERSION}


@pytest_twisted.ensureDeferred
async def test_the_timer_runs_on_the_injected_clock(server, db_dsn):
    await _seed(server, 1)
    _age(db_dsn)
    clock = task.Clock()
    job = RenderRefresh(server.core.db, server.core.blobs, clock, reactor, interval_s=60)
    job.start()
    try:
        while job._periodic.running is not None:
            await job._periodic.running
        assert _rows(db_dsn)[0][-1] == RENDER_VERSION
        _age(db_dsn)
        clock.advance(60)
        while job._periodic.running is not None:
            await job._periodic.running
        assert _rows(db_dsn)[0][-1] == RENDER_VERSION
    finally:
        await job.stop()
