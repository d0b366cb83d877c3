"""The database going away while mail is sent: the send API answers 503, SMTP submission
451 4.3.0, and nothing is stored or queued half-way -- proven with the real database
failing (PostgreSQL stopped, or the backend killed in the middle of the queue insert by
a test-owned trigger), not with our own code patched. Once PostgreSQL is back the same
server sends again without a restart, and an Idempotency-Key is free for the retry."""

from __future__ import annotations

import smtplib
import ssl

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS
from tests.helpers import execute as _execute
from tests.helpers import query

MESSAGE = (b"From: {frm}\r\nTo: bob@remote.example\r\nSubject: during trouble\r\n"
           b"Date: Sun, 29 Nov 2026 07:00:00 +0000\r\nMessage-ID: <{mid}@client.test>\r\n"
           b"\r\nHello.\r\n")

#: Kills its own backend in the middle of the statement that writes the queue rows (the
#: Sent copy's row is already written in that transaction): a connection lost half-way.
KILL_ON_QUEUE_INSERT = """
CREATE FUNCTION test_kill_backend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_terminate_backend(pg_backend_pid());
    PERFORM pg_sleep(5);
    RETURN NEW;
END $$;
CREATE TRIGGER test_kill_backend BEFORE INSERT ON outbound_queue
    FOR EACH ROW WHEN (NEW.inbox_id = %s) EXECUTE FUNCTION test_kill_backend();
"""


def _ctx() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=_DEV_TLS["ca"])


def _stored(dsn: str, inbox_id: str) -> tuple[int, int, int]:
    """(messages, queue rows, message.sent events) of the inbox."""
    [(messages,)] = query(dsn, "SELECT count(*) FROM messages WHERE inbox_id = %s",
                          (inbox_id,))
    [(queued,)] = query(dsn, "SELECT count(*) FROM outbound_queue WHERE inbox_id = %s",
                        (inbox_id,))
    [(events,)] = query(dsn, "SELECT count(*) FROM events WHERE type = 'message.sent'")
    return messages, queued, events


async def _setup(server, username):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username},
                                   key=owner)).json
    made = await server.api.post("/api/v1/api-keys", {
        "name": "send", "scopes": ["messages:send", "messages:read"]}, key=owner)
    assert made.status == 201, made
    return inbox, made.json["key"]


def _open_transaction(port: int, address: str, key: str) -> smtplib.SMTP:
    """An authenticated session with MAIL and RCPT accepted: only DATA is left."""
    smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=_ctx(), timeout=60)
    smtp.ehlo("client.test")
    smtp.login(address, key)
    assert smtp.mail(address)[0] == 250
    assert smtp.rcpt("bob@remote.example")[0] == 250
    return smtp


def _data(smtp: smtplib.SMTP, address: str, mid: str) -> tuple[int, bytes]:
    code, text = smtp.data(MESSAGE.replace(b"{frm}", address.encode())
                           .replace(b"{mid}", mid.encode()))
    try:
        smtp.quit()
    except smtplib.SMTPException:
        pass
    return code, text


def _send(port: int, address: str, key: str, mid: str) -> tuple[int, bytes]:
    return _data(_open_transaction(port, address, key), address, mid)


@pytest_twisted.ensureDeferred
async def test_postgresql_stopped_api_503_smtp_451_nothing_stored_then_it_sends(
        server, pg, db_dsn):
    inbox, key = await _setup(server, "outage")
    path = f"/api/v1/inboxes/{inbox['id']}/messages"
    body = {"to": "bob@remote.example", "subject": "during the outage", "text_body": "x"}
    hdr = {"Idempotency-Key": "outage-1"}
    smtp = await deferToThread(_open_transaction, server.submissions_port, inbox["email"],
                               key)
    pg.stop()
    try:
        resp = await server.api.post(path, body, key=key, headers=hdr)
        assert resp.status == 503, resp
        assert resp.json["error"]["type"] == "temporarily_unavailable"
        code, text = await deferToThread(_data, smtp, inbox["email"], "outage-smtp")
        assert code == 451 and text.startswith(b"4.3.0"), (code, text)
    finally:
        pg.start()
    assert _stored(db_dsn, inbox["id"]) == (0, 0, 0)

    await _both_send_once_back(server, db_dsn, inbox, key, (path, body, hdr), "after-outage")


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_during_the_queue_insert_leaves_nothing_half_way(
        server, db_dsn):
    inbox, key = await _setup(server, "halfway")
    path = f"/api/v1/inboxes/{inbox['id']}/messages"
    body = {"to": "bob@remote.example", "subject": "half way", "text_body": "x"}
    hdr = {"Idempotency-Key": "halfway-1"}
    await deferToThread(_execute, db_dsn, KILL_ON_QUEUE_INSERT, (inbox["id"],))
    try:
        resp = await server.api.post(path, body, key=key, headers=hdr)
        assert resp.status == 503, resp
        assert resp.json["error"]["type"] == "temporarily_unavailable"
        code, text = await deferToThread(_send, server.submissions_port, inbox["email"], key,
                                         "halfway-smtp")
        assert code == 451 and text.startswith(b"4.3.0"), (code, text)
        assert _stored(db_dsn, inbox["id"]) == (0, 0, 0)
    finally:
        await deferToThread(_execute, db_dsn,
                            "DROP TRIGGER test_kill_backend ON outbound_queue; "
                            "DROP FUNCTION test_kill_backend()")
    await _both_send_once_back(server, db_dsn, inbox, key, (path, body, hdr), "halfway-after")


async def _both_send_once_back(server, db_dsn, inbox, key, request, subject) -> None:
    """Once the database is back: the refused API send, retried under its Idempotency
    Key, is a new 201 (the refusal stored nothing to replay), submission answers 250,
    and exactly those two messages are stored with their queue rows."""
    path, body, hdr = request
    again = await server.api.post(path, body, key=key, headers=hdr)
    assert again.status == 201, again
    assert again.headers.get("idempotent-replayed") is None
    code, text = await deferToThread(_send, server.submissions_port, inbox["email"], key,
                                     subject)
    assert code == 250, (code, text)
    assert _stored(db_dsn, inbox["id"]) == (2, 2, 2)
