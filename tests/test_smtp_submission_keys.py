"""SMTP submission AUTH refuses every key that may not send from the inbox with
`535 5.7.8` -- expired, another organization's, restricted to another environment --
audits each attempt, and shares the failed-login allowances with IMAP (an attacker who
switches protocols keeps the allowance he has spent)."""

from __future__ import annotations

import base64
import imaplib
import smtplib
import ssl
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS, make_config, start_server
from tests.helpers import query


def _ctx() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=_DEV_TLS["ca"])


def _auth(port: int, user: str, password: str) -> tuple[int, bytes]:
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with smtplib.SMTP_SSL("127.0.0.1", port, context=_ctx(), timeout=30) as smtp:
        smtp.ehlo()
        return smtp.docmd("AUTH", "PLAIN " + plain)


async def _key(server, owner, **fields) -> dict:
    made = await server.api.post("/api/v1/api-keys", {"scopes": ["messages:send"], **fields},
                                 key=owner)
    assert made.status == 201, made
    return made.json


def _expire(db_dsn: str, key_id: str) -> None:
    conn = psycopg2.connect(db_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' "
                    "WHERE id = %s", (key_id,))
    conn.close()


@pytest_twisted.ensureDeferred
async def test_expired_foreign_and_other_environment_keys_get_535_and_are_audited(
        server, db_dsn):
    _, owner = await server.new_org()
    sender = (await server.api.post("/api/v1/inboxes", {"username": "guarded"},
                                    key=owner)).json
    _, stranger_owner = await server.new_org("Stranger")
    foreign = await _key(server, stranger_owner, name="foreign")
    env = (await server.api.post("/api/v1/environments", {"name": "Elsewhere"},
                                 key=owner)).json
    elsewhere = await _key(server, owner, name="elsewhere", environment_ids=[env["id"]])
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    expiring = await _key(server, owner, name="expiring", expires_at=soon)
    port = server.submissions_port
    assert (await deferToThread(_auth, port, sender["email"], expiring["key"]))[0] == 235
    await deferToThread(_expire, db_dsn, expiring["id"])

    for password in (foreign["key"], elsewhere["key"]):
        code, text = await deferToThread(_auth, port, sender["email"], password)
        assert (code, text[:5]) == (535, b"5.7.8"), (code, text)
    # The expiry reaches the process's key cache by NOTIFY: bounded by attempts.
    for _ in range(100):
        code, text = await deferToThread(_auth, port, sender["email"], expiring["key"])
        if code != 235:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert (code, text[:5]) == (535, b"5.7.8"), (code, text)

    for _ in range(300):
        outcomes = [r[0] for r in query(db_dsn, "SELECT outcome FROM audit_log "
                                        "WHERE action = 'smtp.auth'")]
        if outcomes.count("denied") >= 3:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert outcomes.count("denied") >= 3 and outcomes.count("allowed") >= 1, outcomes


@pytest_twisted.ensureDeferred
async def test_imap_failures_spend_the_allowance_smtp_auth_draws_on(db_dsn, openapi_checker):
    config = make_config(db_dsn, login={"pair_failures_per_minute": 1,
                                        "source_failures_per_minute": 100})
    running = await start_server(config, openapi_checker)
    try:
        _, owner = await running.new_org()
        inbox = (await running.api.post("/api/v1/inboxes", {"username": "shared"},
                                        key=owner)).json
        key = (await _key(running, owner, name="send"))["key"]

        def imap_failure() -> str:
            imap = imaplib.IMAP4("127.0.0.1", running.imap_port, timeout=20)
            imap.starttls(ssl_context=_ctx())
            try:
                imap.login(inbox["email"], "ap_sk_wrong")
            except imaplib.IMAP4.error as exc:
                return str(exc)
            finally:
                imap.shutdown()
            return "logged in"

        assert "AUTHENTICATIONFAILED" in await deferToThread(imap_failure)
        # The pair's one failure was spent over IMAP: SMTP AUTH, even with the right
        # key, is throttled for this source and account.
        code, text = await deferToThread(_auth, running.submissions_port, inbox["email"], key)
        assert code == 454 and text.startswith(b"4.7.0"), (code, text)
    finally:
        await running.service.stopService()
