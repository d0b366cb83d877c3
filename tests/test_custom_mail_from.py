"""A domain's custom MAIL FROM on the smarthost transport (issue 11, "Domains").

A verified domain with ``mail_from_subdomain = "bounce"``: what its inboxes send through
the smtp transport leaves with the envelope sender ``alice@bounce.example.test`` (SMTP
submission and the send API alike; the Sent copy keeps ``alice@example.test``), and the
MX takes the bounces to that address back into alice's inbox. Without the subdomain, on
a shared domain, or with the ses transport (SES rewrites the envelope itself) the
envelope sender stays the inbox's; an unverified domain sends nothing. Real
PostgreSQL, a real DNS server for the verification, a real ESMTP sink as smarthost,
smtplib against submission and the MX.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import make_config, start_server
from tests.helpers import query
from tests.test_domain_verify import _execute, key_file, publish, zone  # noqa: F401
from tests.test_outbound_smarthost import PASSWORD, USER, _settle, sink_factory  # noqa: F401
from tests.test_smtp_submission import _login, _msg

_BOUNCE = (b"From: MAILER-DAEMON@far.test\r\nTo: {to}\r\nSubject: {subject}\r\n"
           b"Message-ID: <{subject}@far.test>\r\n\r\nYour message could not be delivered.\r\n")


@pytest_twisted.async_yield_fixture
async def mf(db_dsn, openapi_checker, zone, key_file, sink_factory, dev_tls,  # noqa: F811
             tmp_path):
    """The service with the smtp transport (own DKIM keys) pointed at a sink, and its
    resolver asking the test zone; the verification timer stopped (the tests verify)."""
    sink = sink_factory()
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    config = make_config(
        db_dsn, secrets={"key_file": key_file},
        domains={"dns_servers": [zone.address], "dns_timeout": "2s"},
        outbound={"transport": "smtp", "smtp_host": "localhost", "smtp_port": sink.port,
                  "smtp_ca_file": str(dev_tls.ca_cert), "smtp_username": USER,
                  "smtp_password_file": str(tmp_path / "pw"), "poll_interval": "200ms"})
    running = await start_server(config, openapi_checker)
    await running.core.domain_verify.stop()
    running.sink = sink
    yield running
    await running.service.stopService()


def _dsn(server: Any) -> str:
    return server.service.config.database.url


async def _domain(server: Any, zone: Any, key: str, name: str,  # noqa: F811
                  sub: str | None, *, verify: bool = True) -> dict[str, Any]:
    """A domain of the key's organization; published in DNS and verified by the API."""
    body: dict[str, Any] = {"name": name}
    if sub is not None:
        body["mail_from_subdomain"] = sub
    made = await server.api.post("/api/v1/domains", body, key=key)
    assert made.status == 201, made
    if not verify:
        return made.json
    publish(zone, made.json)
    done = await server.api.post(f"/api/v1/domains/{made.json['id']}/verify", key=key)
    assert done.status == 200 and done.json["verified"] is True, done
    return done.json


async def _inbox(server: Any, key: str, username: str, domain: str | None = None
                 ) -> dict[str, Any]:
    body = {"username": username, **({"domain": domain} if domain else {})}
    made = await server.api.post("/api/v1/inboxes", body, key=key)
    assert made.status == 201, made
    return made.json


async def _send_api(server: Any, key: str, inbox: dict[str, Any], to: str,
                    subject: str) -> str:
    resp = await server.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", {
        "to": to, "subject": subject, "text_body": "hello"}, key=key)
    assert resp.status == 201, resp
    return resp.json["id"]


def _submit(port: int, address: str, key: str, to: str, subject: str) -> None:
    smtp = _login(port, address, key)
    try:
        smtp.sendmail(address, [to], _msg(address, to, subject, subject))
    finally:
        smtp.quit()


async def _left(server: Any, subject: str) -> Any:
    """The sink's message with ``subject`` (once the queue worker handed it over)."""
    marker = f"Subject: {subject}\r\n".encode()
    assert await _settle(lambda: any(marker in m.data for m in server.sink.messages),
                         rounds=1500), f"{subject} never reached the smarthost"
    [got] = [m for m in server.sink.messages if marker in m.data]
    return got


def _mail_lines(server: Any) -> list[str]:
    return [c.line for c in server.sink.commands if c.verb == "MAIL"]


def _queue_from(server: Any, message_id: str) -> list[str]:
    return [r[0] for r in query(_dsn(server), "SELECT mail_from FROM outbound_queue "
                                "WHERE message_id = %s", (message_id,))]


async def _raw(server: Any, message_id: str, key: str) -> email.message.EmailMessage:
    raw = (await server.api.get(f"/api/v1/messages/{message_id}/raw", key=key)).body
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore


# ------------------------------------------------------------------------- the envelope


@pytest_twisted.ensureDeferred
async def test_a_verified_custom_mail_from_is_the_envelope_sender_through_the_smarthost(
        mf, zone):  # noqa: F811
    _, key = await mf.new_org("Acme")
    await _domain(mf, zone, key, "example.test", "bounce")
    alice = await _inbox(mf, key, "alice", "example.test")
    assert alice["email"] == "alice@example.test"

    sent_id = await _send_api(mf, key, alice, "friend@far.test", "via-api")
    await deferToThread(_submit, mf.submission_port, alice["email"], key,
                        "friend@far.test", "via-smtp")
    for subject in ("via-api", "via-smtp"):
        got = await _left(mf, subject)
        assert got.mail_from == "alice@bounce.example.test"
        assert got.recipients == ["friend@far.test"]
    lines = _mail_lines(mf)
    assert len(lines) == 2
    assert all(line.startswith("MAIL FROM:<alice@bounce.example.test>") for line in lines)
    assert _queue_from(mf, sent_id) == ["alice@bounce.example.test"]
    # Only the envelope: the Sent copy's envelope sender and From are the inbox's own.
    sent = await _raw(mf, sent_id, key)
    assert "Return-Path" not in sent
    assert sent["From"].addresses[0].addr_spec == "alice@example.test"
    assert query(_dsn(mf), "SELECT envelope_from FROM messages WHERE id = %s",
                 (sent_id,)) == [("alice@example.test",)]


@pytest_twisted.ensureDeferred
async def test_without_a_verified_custom_mail_from_the_envelope_is_the_inbox(mf, zone):  # noqa: F811
    _, key = await mf.new_org("Plain")
    await _domain(mf, zone, key, "plain.test", None)
    await _domain(mf, zone, key, "pending.test", "bounce", verify=False)
    bob = await _inbox(mf, key, "bob", "plain.test")
    carol = await _inbox(mf, key, "carol")  # the shared domain
    dave = await _inbox(mf, key, "dave", "pending.test")

    await _send_api(mf, key, bob, "friend@far.test", "plain-api")
    await deferToThread(_submit, mf.submission_port, carol["email"], key,
                        "friend@far.test", "shared-smtp")
    assert (await _left(mf, "plain-api")).mail_from == "bob@plain.test"
    assert (await _left(mf, "shared-smtp")).mail_from == carol["email"]
    # An unverified domain does not send at all (so its MAIL FROM is never used).
    refused = await mf.api.post(f"/api/v1/inboxes/{dave['id']}/messages", {
        "to": "friend@far.test", "subject": "pending", "text_body": "x"}, key=key)
    assert refused.status == 403, refused
    assert refused.json["error"]["type"] == "domain_not_verified", refused
    assert query(_dsn(mf), "SELECT count(*) FROM outbound_queue WHERE inbox_id = %s",
                 (dave["id"],)) == [(0,)]
    assert not any("bounce." in line for line in _mail_lines(mf))


@pytest_twisted.ensureDeferred
async def test_with_ses_the_queue_keeps_the_inbox_address(db_dsn, openapi_checker,
                                                          ses_account):
    """SES rewrites the envelope to the custom MAIL FROM itself
    (PutEmailIdentityMailFromAttributes): the queue row and SES's source stay the
    inbox's."""
    from tests.aws import ses_outbound

    config = make_config(db_dsn, outbound=ses_outbound(ses_account.endpoint_url))
    running = await start_server(config, openapi_checker)
    try:
        _, key = await running.new_org("Ses")
        erin = await _inbox(running, key, "erin")
        # The SES-signed domain, verified, with a custom MAIL FROM (as the API and the
        # verification would leave it against real SES), erin's inbox on it.
        _execute(_dsn(running), "INSERT INTO domains (org_id, id, environment_id, name, "
                 "created_at, verified_at, mail_from_subdomain, dkim_mode) SELECT org_id, "
                 "'dom_ses_mf', environment_id, 'ses.test', now(), now(), 'bounce', 'ses' "
                 "FROM inboxes WHERE id = %s", (erin["id"],))
        _execute(_dsn(running), "UPDATE inboxes SET domain = 'ses.test', "
                 "email = 'erin@ses.test' WHERE id = %s", (erin["id"],))
        sent_id = await _send_api(running, key, erin, "friend@far.test", "via-ses")
        assert _queue_from(running, sent_id) == ["erin@ses.test"]
    finally:
        await running.service.stopService()


# ------------------------------------------------------------------------- bounces back


def _mx(port: int, rcpt: str, subject: str) -> tuple[int, bytes]:
    """A bounce to ``rcpt`` (null reverse path), as a remote MTA sends it."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("far.test")
        s.mail("<>")
        code, text = s.rcpt(rcpt)
        if code == 250:
            raw = (_BOUNCE.replace(b"{to}", rcpt.encode())
                   .replace(b"{subject}", subject.encode()))
            code, text = s.data(raw)
        return code, text


def _subjects(server: Any, inbox_id: str) -> list[str]:
    return [r[0] for r in query(_dsn(server), "SELECT subject FROM messages "
                                "WHERE inbox_id = %s ORDER BY subject", (inbox_id,))]


@pytest_twisted.ensureDeferred
async def test_the_mx_takes_bounces_to_the_custom_mail_from_into_the_inbox(mf, zone):  # noqa: F811
    _, key = await mf.new_org("Acme")
    await _domain(mf, zone, key, "example.test", "bounce")
    alice = await _inbox(mf, key, "alice", "example.test")
    _, other_key = await mf.new_org("Other")
    await _domain(mf, zone, other_key, "other.test", "bounce")
    bob = await _inbox(mf, other_key, "bob", "other.test")
    await _domain(mf, zone, key, "plain.test", None)

    ok = await deferToThread(_mx, mf.mx_port, "Alice@Bounce.Example.Test", "bounced-1")
    assert ok[0] == 250, ok
    assert _subjects(mf, alice["id"]) == ["bounced-1"]

    refused = {
        # no such inbox on the domain
        "nobody@bounce.example.test": b"5.1.1",
        # another organization's bounce name: its own inboxes only
        "alice@bounce.other.test": b"5.1.1",
        # a domain without a custom MAIL FROM, and a name under it that is not the one
        "alice@bounce.plain.test": b"5.7.1",
        "alice@other.example.test": b"5.7.1",
        "alice@x.bounce.example.test": b"5.7.1",
    }
    for rcpt, status in refused.items():
        code, text = await deferToThread(_mx, mf.mx_port, rcpt, "refused")
        assert code == 550 and text.startswith(status), (rcpt, code, text)
    assert _subjects(mf, alice["id"]) == ["bounced-1"]
    assert _subjects(mf, bob["id"]) == []

    # The other organization's own bounces reach its own inbox.
    assert (await deferToThread(_mx, mf.mx_port, "bob@bounce.other.test", "bob-1"))[0] == 250
    assert _subjects(mf, bob["id"]) == ["bob-1"]


@pytest_twisted.ensureDeferred
async def test_an_inbox_left_on_a_name_another_tenant_holds_gets_no_bounces(mf, zone):  # noqa: F811
    """The MX's ownership rule holds under the custom MAIL FROM too: an inbox whose own
    organization does not hold the verified name is unknown there."""
    _, owner_key = await mf.new_org("Owner")
    await _domain(mf, zone, owner_key, "victim.test", "bounce")
    _, squat_key = await mf.new_org("Squatter")
    squatter = await _inbox(mf, squat_key, "ceo")
    _execute(_dsn(mf), "UPDATE inboxes SET domain = 'victim.test', email = 'ceo@victim.test' "
             "WHERE id = %s", (squatter["id"],))
    code, text = await deferToThread(_mx, mf.mx_port, "ceo@bounce.victim.test", "squat")
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    assert _subjects(mf, squatter["id"]) == []


@pytest_twisted.ensureDeferred
async def test_a_dsn_names_the_sending_inbox_not_the_custom_mail_from(mf, zone):  # noqa: F811
    """The envelope was alice@bounce.example.test; the DSN is addressed (To:) to the
    inbox that sent, alice@example.test, and stored in that inbox as before."""
    _, key = await mf.new_org("Acme")
    await _domain(mf, zone, key, "example.test", "bounce")
    alice = await _inbox(mf, key, "alice", "example.test")
    mf.sink.script.rcpt["gone@far.test"] = ["550 5.1.1 <gone@far.test>: no such user"]
    sent_id = await _send_api(mf, key, alice, "gone@far.test", "to-nobody")
    assert _queue_from(mf, sent_id) == ["alice@bounce.example.test"]
    subject = "Undelivered Mail Returned to Sender"

    def dsn_ids() -> list[str]:
        return [r[0] for r in query(_dsn(mf), "SELECT id FROM messages WHERE inbox_id = %s "
                                    "AND subject = %s", (alice["id"], subject))]

    assert await _settle(lambda: bool(dsn_ids()), rounds=1500), "no DSN in alice's inbox"
    [dsn_id] = dsn_ids()
    dsn = await _raw(mf, dsn_id, key)
    assert [a.addr_spec for a in dsn["To"].addresses] == ["alice@example.test"], dsn["To"]
    assert "bounce." not in str(dsn["To"])
    [status] = [p for p in dsn.walk() if p.get_content_type() == "message/delivery-status"]
    assert status.get_payload()[1]["Final-Recipient"] == "rfc822; gone@far.test"
