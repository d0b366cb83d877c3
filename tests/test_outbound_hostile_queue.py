"""Hostile review of the outbound queue (issue 11): what the worker reports and how
often, on a real PostgreSQL with test-owned transports and an injected clock.

* A queue row whose recipients fail at different attempts (one refused at once, one
  deferred until the message's lifetime runs out) must report each failed recipient in
  exactly one DSN: the second DSN names only the recipient that failed since the first.
"""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest_twisted

from agentpost.outbound.dsn import FailedRecipient, build_dsn
from agentpost.outbound.local import LocalFirstTransport
from agentpost.outbound.transports import DEFERRED, FAILED, LogTransport
from tests import test_outbound_queue as queue_tests
from tests.helpers import query
from tests.test_outbound_queue import (
    Sink,
    _clock,
    _dsn,
    _enqueue,
    _recipients,
    _sent_message,
    _worker,
)

# The running service without its own queue worker (these tests drive their own).
server = queue_tests.server


def _dsns(server, inbox_id: str) -> list[bytes]:
    """The raw DSNs in ``inbox_id``, oldest first."""
    rows = query(_dsn(server), "SELECT raw_blob_key FROM messages WHERE inbox_id = %s AND "
                 "subject = 'Undelivered Mail Returned to Sender' ORDER BY id", (inbox_id,))
    return [key for (key,) in rows]


def _reported(raw: bytes) -> list[str]:
    """The Final-Recipient addresses of a DSN."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    return sorted(str(block["Final-Recipient"]).split(";", 1)[1].strip()
                  for block in status.get_payload()[1:])


@pytest_twisted.ensureDeferred
async def test_each_failed_recipient_is_reported_in_exactly_one_dsn(server):
    message, inbox, _ = await _sent_message(server, "twofold")
    [queue_id] = await _enqueue(server, message, ["gone@d.test", "slow@d.test"])
    sink = Sink(lambda env: {r: (FAILED if r.startswith("gone") else DEFERRED)
                             for r in env.recipients})
    clock = _clock()
    worker = _worker(server, sink, clock)
    assert await worker.drain_once() == 1  # gone@ bounces at once: the first DSN
    clock.advance(2000)  # past the lifetime: slow@ is given up on (4.4.7)
    assert await worker.drain_once() == 1
    assert _recipients(server, queue_id) == {"gone@d.test": "bounced",
                                             "slow@d.test": "bounced"}
    keys = _dsns(server, inbox["id"])
    assert len(keys) == 2
    reports = [_reported(await server.core.blobs.get_bytes(k)) for k in keys]
    assert sorted(reports) == [["gone@d.test"], ["slow@d.test"]], reports
    assert await worker.drain_once() == 0
    assert len(_dsns(server, inbox["id"])) == 2


def test_a_dsn_keeps_its_structure_whatever_the_original_and_the_relay_say():
    """RFC 3464: three parts; a remote diagnostic with line breaks and field names, and
    an original header that imitates a boundary or a status block, stay inside their
    own part and line."""
    original = (b"From: a@agents.test\r\nSubject: =?utf-8?q?x=0D=0ABcc:_victim@x.test?=\r\n"
                b"X-Trick: --=_dsn_000000000000000000000000\r\n"
                b"X-Fake: Final-Recipient: rfc822; forged@x.test\r\n\r\nbody\r\n")
    evil = "no\r\nFinal-Recipient: rfc822; forged@x.test\r\n\r\nX-Injected: 1"
    raw = build_dsn(hostname="mx.test", sender="a@agents.test", original=original,
                    recipients=[FailedRecipient("gone@d.test", "5.1.1", 550, evil)],
                    arrival=datetime(2030, 1, 1, tzinfo=UTC),
                    now=datetime(2030, 1, 2, tzinfo=UTC))
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["Auto-Submitted"] == "auto-replied" and str(parsed["To"]) == "a@agents.test"
    assert "X-Injected" not in parsed and "Bcc" not in parsed
    parts = parsed.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = parts[1].get_payload()
    assert len(blocks) == 2  # the per-message block and ONE recipient
    assert str(blocks[1]["Final-Recipient"]) == "rfc822; gone@d.test"
    assert "\n" not in str(blocks[1]["Diagnostic-Code"])
    assert b"body" not in raw  # the header only, never the body


@pytest_twisted.ensureDeferred
async def test_a_hosted_recipient_who_blocks_the_sender_bounces_once(server):
    """Internal delivery applies the receiving inbox's (another tenant's) filters: a
    block is a permanent 5.7.1 with one DSN, not a retry loop; its neighbour still gets
    the message."""
    message, sender, _ = await _sent_message(server, "blocked-sender")
    _, other = await server.new_org()
    guarded = (await server.api.post("/api/v1/inboxes", {"username": "guarded"},
                                     key=other)).json
    open_ = (await server.api.post("/api/v1/inboxes", {"username": "open"},
                                   key=other)).json
    rule = await server.api.post("/api/v1/filter-rules", {
        "direction": "receive", "action": "block", "match_type": "address",
        "value": sender["email"], "inbox_id": guarded["id"]}, key=other)
    assert rule.status == 201, rule
    [queue_id] = await _enqueue(server, message, [guarded["email"], open_["email"]])
    clock = _clock()
    core = server.core
    transport = LocalFirstTransport(core.router, core.ingest, LogTransport(),
                                    hostname="mx.test", clock=clock)
    worker = _worker(server, transport, clock)
    assert await worker.drain() == 1
    assert _recipients(server, queue_id) == {guarded["email"]: "bounced",
                                             open_["email"]: "sent"}
    for inbox_id, count in ((guarded["id"], 0), (open_["id"], 1)):
        assert query(_dsn(server), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                     (inbox_id,)) == [(count,)]
    [key] = _dsns(server, sender["id"])
    assert _reported(await core.blobs.get_bytes(key)) == [guarded["email"]]
    clock.advance(3600)
    assert await worker.drain() == 0


@pytest_twisted.ensureDeferred
async def test_a_dsn_for_a_deleted_sending_inbox_is_dropped_once_and_quietly(server):
    message, sender, key = await _sent_message(server, "gone-sender")
    [queue_id] = await _enqueue(server, message, ["gone@d.test"])
    deleted = await server.api.delete(f"/api/v1/inboxes/{sender['id']}", key=key)
    assert deleted.status in (200, 204), deleted
    worker = _worker(server, Sink(lambda env: {r: FAILED for r in env.recipients}),
                     _clock())
    assert await worker.drain() == 1
    assert _recipients(server, queue_id) == {"gone@d.test": "bounced"}
    assert query(_dsn(server), "SELECT bounce_pending FROM outbound_queue WHERE id = %s",
                 (queue_id,)) == [(False,)]
    assert query(_dsn(server), "SELECT count(*) FROM messages WHERE subject = "
                 "'Undelivered Mail Returned to Sender' AND org_id = %s",
                 (message.org_id,)) == [(0,)]
