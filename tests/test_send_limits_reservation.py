"""Send limits charged as a reservation of their own, before the send's transaction.

The charge is one statement outside the transaction that stores and queues the message
(core.send_limits), so the organization's row is not held locked until that transaction
commits. These tests pin what that must not change: a send that fails after its
reservation gives it back exactly; a scope that refuses leaves the other scope as it
was; two processes at the boundary never overspend and count exactly; the early
refusal at RCPT reads the buckets in the same statement as the other send checks.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from agentpost.core.context import RequestContext
from agentpost.core.send_limits import Limit, SendLimits
from agentpost.model.errors import DailyQuotaExceeded, SendRateLimited
from agentpost.storage.database import Database
from tests.helpers import query
from tests.test_send_limits import (
    MESSAGE,
    _clock_at,
    _dsn,
    _inbox_and_key,
    _sender,
    _submission,
    _submit,
)


def _buckets(server, sender) -> tuple[list, list]:
    url = _dsn(server)
    inbox = query(url, "SELECT tokens, day_count FROM send_limits_inbox WHERE inbox_id = %s",
                  (sender.inbox_id,))
    org = query(url, "SELECT tokens, day_count FROM send_limits_org WHERE org_id = %s",
                (sender.org_id,))
    return inbox, org


@pytest_twisted.ensureDeferred
async def test_a_send_that_fails_after_its_reservation_gives_it_back(server):
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(rate=0.001, burst=5, daily=50),
                        inbox=Limit(rate=0.001, burst=4, daily=40))
    submission = _submission(server, limits)
    await _submit(submission, sender, ["a@remote.example"])
    assert _buckets(server, sender) == ([(3.0, 1)], [(4.0, 1)])
    seen = []

    async def fail(txn, submitted):
        # Inside the send's transaction the reservation is already made (and visible
        # to other sessions: it committed on its own).
        seen.append(_buckets(server, sender))
        raise RuntimeError("the send fails after its reservation")

    with pytest.raises(RuntimeError):
        await submission.submit(sender, sender.address, ["b@remote.example",
                                                         "c@remote.example"],
                                io.BytesIO(MESSAGE.format(frm=sender.address).encode()),
                                RequestContext("req_test", "127.0.0.1", "test.send"),
                                also=fail)
    assert seen == [([(1.0, 3)], [(2.0, 3)])]
    assert _buckets(server, sender) == ([(3.0, 1)], [(4.0, 1)])  # given back exactly
    stored = query(_dsn(server), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                   (sender.inbox_id,))
    assert stored == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_scope_that_refuses_leaves_the_other_as_it_was(server):
    sender, _ = await _sender(server, "small")
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    # The inbox refuses first: the organization is not charged at all.
    limits = SendLimits(server.core.db, clock, org=Limit(daily=10), inbox=Limit(daily=2))
    submission = _submission(server, limits)
    await _submit(submission, sender, ["a@remote.example", "b@remote.example"])
    with pytest.raises(DailyQuotaExceeded) as refused:
        await _submit(submission, sender, ["c@remote.example"])
    assert refused.value.details == {"scope": "inbox"}
    assert _buckets(server, sender) == ([(0.0, 2)], [(0.0, 2)])
    # The organization refuses after the inbox was charged: the inbox gets it back.
    other, _ = await _sender(server, "big")  # another organization: a fresh bucket
    limits = SendLimits(server.core.db, clock, org=Limit(rate=0.001, burst=3),
                        inbox=Limit(daily=100))
    submission = _submission(server, limits)
    await _submit(submission, other, ["a@remote.example", "b@remote.example"])
    with pytest.raises(SendRateLimited) as refused:
        await _submit(submission, other, ["c@remote.example", "d@remote.example"])
    assert refused.value.details == {"scope": "organization"}
    inbox, _ = _buckets(server, other)
    assert inbox == [(0.0, 2)]


@pytest_twisted.ensureDeferred
async def test_two_processes_at_the_daily_boundary_count_every_recipient_once(server):
    """Two Submission cores with their own pools, both scopes limited: an inbox quota
    of 9 recipients against sends of one and two recipients, an organization bucket of
    12. Whatever interleaving, the counts are exactly what was stored."""
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    url = _dsn(server)
    dbs = [Database(url, clock=reactor, reactor=reactor, pool_size=4) for _ in range(2)]
    try:
        cores = [_submission(server, SendLimits(db, clock, org=Limit(rate=0.001, burst=12),
                                                inbox=Limit(daily=9)), db)
                 for db in dbs]
        sizes = [1, 2] * 6
        attempts = [defer.ensureDeferred(_submit(
            cores[i % 2], sender, [f"r{i}-{j}@remote.example" for j in range(n)]))
            for i, n in enumerate(sizes)]
        results = await defer.DeferredList(attempts, consumeErrors=True)
    finally:
        for db in dbs:
            await db.close()
    sent = sum(n for (ok, _), n in zip(results, sizes, strict=True) if ok)
    refused = [r.value for ok, r in results if not ok]
    assert refused and all(isinstance(e, DailyQuotaExceeded | SendRateLimited)
                           for e in refused), refused
    assert 8 <= sent <= 9  # the quota is filled but for at most one recipient
    recipients = query(url, "SELECT count(*) FROM outbound_recipients r JOIN outbound_queue q"
                            " ON q.id = r.queue_id WHERE q.inbox_id = %s",
                       (sender.inbox_id,))
    assert recipients == [(sent,)]
    inbox, org = _buckets(server, sender)
    assert inbox[0][1] == sent and org[0][1] == sent
    assert org[0][0] == pytest.approx(12.0 - sent, abs=0.01)


@pytest_twisted.ensureDeferred
async def test_rcpt_reads_the_buckets_with_the_other_checks(server):
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(), inbox=Limit(rate=0.5, burst=1))
    submission = _submission(server, limits)
    await submission.check_recipients(sender, ["a@remote.example"])  # no row yet: fine
    await _submit(submission, sender, ["a@remote.example"])
    with pytest.raises(SendRateLimited) as refused:
        await submission.check_recipients(sender, ["b@remote.example"])
    assert refused.value.details == {"scope": "inbox"}
    assert refused.value.retry_after_s == pytest.approx(2.0)
    clock.advance(2.0)
    await submission.check_recipients(sender, ["b@remote.example"])


@pytest_twisted.ensureDeferred
async def test_the_send_api_reads_its_inbox_with_the_checks_and_keeps_404_first(server):
    """The send API finds the inbox and reads every check in one statement; a foreign
    inbox is still 404 before any complaint about the body's recipients, and a paused
    inbox is still refused."""
    inbox, _, owner = await _inbox_and_key(server, "api")
    _, stranger = await server.new_org()
    path = f"/api/v1/inboxes/{inbox['id']}/messages"
    for body in ({"to": "a@remote.example", "text_body": "hi"}, {"text_body": "hi"},
                 {"to": [f"r{i}@remote.example" for i in range(600)]}):
        resp = await server.api.post(path, body, key=stranger)
        assert resp.status == 404, (body, resp)
    assert (await server.api.post(path, {"text_body": "hi"}, key=owner)).status == 400
    sent = await server.api.post(path, {"to": "a@remote.example", "text_body": "hi"},
                                 key=owner)
    assert sent.status == 201 and sent.json["send_status"] == "queued", sent
    await server.api.patch(f"/api/v1/inboxes/{inbox['id']}", {"send_paused": True},
                           key=owner)
    paused = await server.api.post(path, {"to": "a@remote.example", "text_body": "hi"},
                                   key=owner)
    assert paused.status == 403 and paused.json["error"]["type"] == "sending_paused", paused
