"""A recipient suppressed after its message was queued (a hard bounce or complaint of
another message, or a manual entry) is never tried again: the next claim fails it with
5.7.1 without handing it off, the others of the row still go, and the sender's DSN
says why. Found by the outbound review: suppressions were checked at the doors only."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from tests.helpers import execute as _execute
from tests.helpers import query
from tests.test_send_api import _dsn, _send_path, _setup, _wait_for, outbox, sub  # noqa: F401


async def _states(server, message_id: str) -> dict[str, str]:
    rows = query(_dsn(server), "SELECT r.address, r.status FROM outbound_recipients r "
                 "JOIN outbound_queue q ON q.id = r.queue_id WHERE q.message_id = %s",
                 (message_id,))
    return dict(rows)


@pytest_twisted.ensureDeferred
async def test_a_recipient_suppressed_while_queued_is_failed_not_sent(sub, outbox):  # noqa: F811
    owner, sender, _, key = await _setup(sub)
    made = await sub.api.post(_send_path(sender), {
        "to": ["r1@remote.example", "r2@remote.example"], "subject": "q",
        "text_body": "x"}, key=key)
    assert made.status in (200, 201), made.json
    message_id = made.json["id"]

    async def all_sent() -> bool:
        return set((await _states(sub, message_id)).values()) == {"sent"}

    assert await _wait_for(lambda: defer.ensureDeferred(all_sent()))
    [eml] = outbox.glob("*.eml")  # one row (one domain), both recipients
    assert b"Envelope-To: <r2@remote.example>" in eml.read_bytes()
    # r2 is suppressed; the row is made due again (as a retry would find it), holding
    # its blob reference again.
    assert (await sub.api.post("/api/v1/suppressions", {"email": "R2@remote.example"},
                               key=owner)).status == 201
    _execute(_dsn(sub), "UPDATE blobs SET refcount = refcount + 1 WHERE key = (SELECT "
             "raw_blob_key FROM outbound_queue WHERE message_id = %s)", (message_id,))
    _execute(_dsn(sub), "UPDATE outbound_recipients SET status = 'queued' WHERE queue_id ="
             " (SELECT id FROM outbound_queue WHERE message_id = %s)", (message_id,))
    _execute(_dsn(sub), "UPDATE outbound_queue SET status = 'queued', next_attempt_at = "
             "now() WHERE message_id = %s", (message_id,))

    async def settled() -> bool:
        states = await _states(sub, message_id)
        return states.get("r2@remote.example") in ("failed", "bounced") and \
            states.get("r1@remote.example") == "sent"

    assert await _wait_for(lambda: defer.ensureDeferred(settled()))
    # The log transport rewrote the row's .eml: its envelope names r1 alone this time.
    [eml] = outbox.glob("*.eml")
    envelope_to = [line for line in eml.read_bytes().split(b"\r\n")
                   if line.startswith(b"X-AgentPost-Envelope-To:")]
    assert envelope_to == [b"X-AgentPost-Envelope-To: <r1@remote.example>"], envelope_to
    codes = query(_dsn(sub), "SELECT r.status_code FROM outbound_recipients r JOIN "
                  "outbound_queue q ON q.id = r.queue_id WHERE q.message_id = %s AND "
                  "r.address = 'r2@remote.example'", (message_id,))
    assert codes == [("5.7.1",)]
