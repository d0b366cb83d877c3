"""Scheduled sends: due drafts leave once, on the injected clock, whoever races for them."""

import time
from datetime import UTC, datetime, timedelta

import pytest_twisted
from twisted.internet import defer, task

from agentpost.jobs.scheduled_send import ScheduledSend
from tests.helpers import query

HOUR = 3600.0


async def _setup(server, username):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username}, key=key)).json
    return inbox, key


async def _scheduled(server, key, inbox, subject="Later", hours=1.0):
    """A draft scheduled ``hours`` from the (real) time the server uses."""
    draft = (await server.api.post(f"/api/v1/inboxes/{inbox['id']}/drafts", {
        "to": ["bob@example.com"], "subject": subject, "text_body": "see you"},
        key=key)).json
    when = (datetime.now(UTC) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {"send_at": when},
                                 key=key)
    assert resp.status == 200 and resp.json["status"] == "scheduled", resp
    return draft


def _jobs(server, count=2):
    """``count`` scheduled-send jobs on one database and one test clock, as separate
    processes would run them (each its own worker id)."""
    clock = task.Clock()
    clock.advance(time.time())
    jobs = [ScheduledSend(server.core.db, server.core.draft_sending, clock,
                          interval_s=15, lease_s=300, batch=1) for _ in range(count)]
    return clock, jobs


async def _tick(clock, jobs, seconds):
    """Advance the clock and wait until no job is running (a wake-up during a run
    starts one more right after it)."""
    clock.advance(seconds)
    while True:
        running = [j.periodic.running for j in jobs if j.periodic.running is not None]
        if not running:
            return
        await defer.gatherResults(running, consumeErrors=True)


async def _stop(jobs):
    for job in jobs:
        await job.stop()


@pytest_twisted.ensureDeferred
async def test_due_draft_is_sent_exactly_once_by_two_racing_jobs(server, db_dsn):
    """Two jobs wake on the same tick; FOR UPDATE SKIP LOCKED gives the draft to one,
    which stores one Sent copy, queues it once and deletes the draft with it."""
    inbox, key = await _setup(server, "racer")
    drafts = [await _scheduled(server, key, inbox, subject=f"due {i}") for i in range(3)]
    clock, jobs = _jobs(server)
    for job in jobs:
        job.start()
    await _tick(clock, jobs, 0)
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]  # not due yet
    await _tick(clock, jobs, HOUR - 60)
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]
    await _tick(clock, jobs, 120)
    await _tick(clock, jobs, 15)  # one more round: nothing left to send twice
    await _stop(jobs)
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(3,)]
    sent = query(db_dsn, "SELECT m.subject FROM messages m JOIN folders f "
                         "ON f.id = m.folder_id WHERE f.name = 'Sent' ORDER BY m.subject")
    assert sent == [("due 0",), ("due 1",), ("due 2",)]
    assert query(db_dsn, "SELECT count(*) FROM drafts") == [(0,)]
    for draft in drafts:
        assert (await server.api.get(f"/api/v1/drafts/{draft['id']}", key=key)).status == 404


@pytest_twisted.ensureDeferred
async def test_cancelled_before_due_sends_nothing(server, db_dsn):
    """Cancel (POST /cancel or PATCH send_at null) before the time: nothing leaves, the
    draft stays a draft."""
    inbox, key = await _setup(server, "canceller")
    one = await _scheduled(server, key, inbox, subject="one")
    two = await _scheduled(server, key, inbox, subject="two")
    assert (await server.api.post(f"/api/v1/drafts/{one['id']}/cancel", {},
                                  key=key)).json["status"] == "draft"
    assert (await server.api.patch(f"/api/v1/drafts/{two['id']}", {"send_at": None},
                                   key=key)).json["status"] == "draft"
    clock, jobs = _jobs(server)
    for job in jobs:
        job.start()
    await _tick(clock, jobs, 2 * HOUR)
    await _stop(jobs)
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]
    assert sorted(query(db_dsn, "SELECT status FROM drafts")) == [("draft",), ("draft",)]


@pytest_twisted.ensureDeferred
async def test_refused_scheduled_send_fails_and_keeps_the_draft(server, db_dsn):
    """send_paused set meanwhile, or the scheduling key revoked: the draft is 'failed'
    with last_error, not lost; cancel returns it to 'draft'."""
    inbox, key = await _setup(server, "refused")
    paused = await _scheduled(server, key, inbox, subject="paused")
    other = (await server.api.post("/api/v1/api-keys", {
        "scopes": ["messages:read", "messages:write", "messages:send"]}, key=key)).json
    revoked = (await server.api.post(f"/api/v1/inboxes/{inbox['id']}/drafts", {
        "to": "bob@example.com", "subject": "revoked"}, key=other["key"])).json
    when = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (await server.api.post(f"/api/v1/drafts/{revoked['id']}/send", {"send_at": when},
                                  key=other["key"])).status == 200
    assert (await server.api.delete(f"/api/v1/api-keys/{other['id']}", key=key)).status == 200
    await server.api.patch(f"/api/v1/inboxes/{inbox['id']}", {"send_paused": True}, key=key)
    clock, jobs = _jobs(server, 1)
    jobs[0].start()
    await _tick(clock, jobs, 2 * HOUR)
    await _stop(jobs)
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]
    got = (await server.api.get(f"/api/v1/drafts/{paused['id']}", key=key)).json
    assert got["status"] == "failed" and got["last_error"].startswith("sending_paused")
    gone_key = (await server.api.get(f"/api/v1/drafts/{revoked['id']}", key=key)).json
    assert gone_key["status"] == "failed" and "revoked" in gone_key["last_error"]
    back = (await server.api.post(f"/api/v1/drafts/{paused['id']}/cancel", {},
                                  key=key)).json
    assert back["status"] == "draft" and back["last_error"] is None


@pytest_twisted.ensureDeferred
async def test_a_dead_jobs_lease_runs_out_and_the_draft_leaves_once(server, db_dsn):
    """A job that claimed a draft and died leaves it 'sending'; after the lease another
    job sends it, once; the dead job's late hook would find its lease gone."""
    from agentpost.storage import drafts as draft_store

    inbox, key = await _setup(server, "phoenix")
    draft = await _scheduled(server, key, inbox, subject="survivor")
    clock, [job] = _jobs(server, 1)
    now = datetime.fromtimestamp(clock.seconds(), UTC) + timedelta(hours=2)

    async def claim(txn):
        return await draft_store.claim_due(txn, now, now + timedelta(seconds=300), "dead", 5)

    [claimed] = await server.core.db.run_interaction("test.claim", claim)
    assert claimed["id"] == draft["id"]
    assert (await server.api.get(f"/api/v1/drafts/{draft['id']}",
                                 key=key)).json["status"] == "sending"
    # Meanwhile it cannot be edited or cancelled.
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/cancel", {}, key=key)
    assert resp.status == 409
    job.start()
    await _tick(clock, [job], 2 * HOUR)  # lease still held by "dead"
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]
    await _tick(clock, [job], 301)
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(1,)]
    # The dead job wakes up and tries: its lease is gone, nothing is sent twice.
    outcome = await server.core.draft_sending.send_claimed(claimed, "dead")
    await job.stop()
    assert outcome == "gone"
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_scheduled_draft_moved_out_of_drafts_is_not_sent(server, db_dsn):
    """An IMAP client moves a scheduled draft's copy to Trash: when it comes due
    nothing leaves, and its schedule ends (the row waits, a plain draft, in case the
    copy is moved back)."""
    import imaplib
    import ssl

    from twisted.internet.threads import deferToThread

    from tests.conftest import _DEV_TLS

    inbox, key = await _setup(server, "mover")
    await _scheduled(server, key, inbox, subject="moved")

    def move():
        imap = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=20)
        imap.starttls(ssl_context=ssl.create_default_context(cafile=_DEV_TLS["ca"]))
        imap.login(inbox["email"], key)
        imap.select("Drafts")
        typ, data = imap.uid("MOVE", "1:*", "Trash")
        imap.logout()
        assert typ == "OK", data

    await deferToThread(move)
    clock, jobs = _jobs(server, 1)
    jobs[0].start()
    await _tick(clock, jobs, 2 * HOUR)
    await _stop(jobs)
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue") == [(0,)]
    assert query(db_dsn, "SELECT status, send_at FROM drafts") == [("draft", None)]
