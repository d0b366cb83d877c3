"""SES delivery feedback through SNS, end to end: real HTTPS certificate fetches from a
test-owned certificate host (tests/sns_fake.py), real PostgreSQL, and for the full flow
the SES transport against moto.

Covered: SignatureVersion 1 and 2 accepted (with and without Subject); tampered,
foreign-topic, stale, http://, off-pattern and rogue-certificate messages refused with
nothing changed; subscriptions confirmed only after verification; each SES event kind
mapped to recipient state, events and delivery_events; idempotency on the SNS
MessageId; the suppression list refusing the next send (SMTP 550 5.7.1, API 422); the
retention sweep of delivery events on the injected clock.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from agentpost.jobs.retention import RetentionSweep
from agentpost.outbound.sns import (
    MAX_CERT_BYTES,
    CertificateCache,
    FetchFailed,
    FetchRefused,
    GuardedFetcher,
    load_trust_root,
)
from agentpost.outbound.transports import SENT, Envelope, HandOff, Outcome
from tests.conftest import make_config, start_server
from tests.helpers import query
from tests.sns_fake import TOPIC, CertHost, SNSSigner, TestPKI, post, ses_event, sns_time
from tests.test_outbound_queue import _clock, _dsn, _enqueue, _sent_message, _worker
from tests.test_outbound_ses import transports  # noqa: F401 - a fixture used below
from tests.test_smtp_submission import _login

SNS_PATH = "/api/v1/webhooks/ses"


@pytest.fixture(scope="session")
def pki():
    folder = Path(tempfile.mkdtemp(prefix="agentpost-sns-"))
    yield TestPKI(folder)
    shutil.rmtree(folder, ignore_errors=True)


def sns_config(pki: TestPKI) -> dict:
    return {"sns_topic_arns": [TOPIC], "sns_cert_host_pattern": r"^127\.0\.0\.1$",
            "sns_ca_file": str(pki.ca_file), "sns_allow_private_addresses": True,
            "sns_fetch_timeout": "5s"}


@pytest_twisted.async_yield_fixture
async def server(db_dsn, openapi_checker, pki):
    """A running server accepting the test topic, certificates from 127.0.0.1 signed by
    the test CA; its own queue worker stopped (tests drive workers themselves)."""
    running = await start_server(make_config(db_dsn, outbound=sns_config(pki)),
                                 openapi_checker)
    await running.core.outbound.stop()
    yield running
    await running.service.stopService()


@pytest_twisted.async_yield_fixture
async def host(pki):
    cert_host = CertHost(pki, reactor)
    yield cert_host
    await cert_host.stop()


@pytest.fixture
def signer(pki, host):
    return SNSSigner(pki, host.serve_cert(pki.signing))


class FixedId:
    """A transport that "sends" and reports a fixed SES MessageId per hand-off."""

    name = "fixed"

    def __init__(self, transport_id: str) -> None:
        self.transport_id = transport_id

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        return HandOff([Outcome(r, SENT, 250, "2.0.0", "ok", self.transport_id)
                        for r in envelope.recipients])


async def _sent_via(server, transport_id: str, recipients: list[str], username="sender"):
    """A message queued and handed off to ``recipients`` with SES id ``transport_id``."""
    message, inbox, key = await _sent_message(server, username)
    [queue_id] = await _enqueue(server, message, recipients)
    clock = _clock()
    await _worker(server, FixedId(transport_id), clock).drain()
    return message, inbox, key, queue_id


def _url(server) -> str:
    return server.base_url + SNS_PATH


def _counts(server) -> dict:
    dsn = _dsn(server)
    return {table: query(dsn, f"SELECT count(*) FROM {table}")[0][0]
            for table in ("delivery_events", "sns_receipts", "suppressions", "events")} | {
        "statuses": query(dsn, "SELECT address, delivery_status FROM outbound_recipients "
                               "ORDER BY address")}


def _rows(server, sql, params=()):
    return query(_dsn(server), sql, params)


# ------------------------------------------------------------------ signatures


@pytest_twisted.ensureDeferred
async def test_v1_and_v2_signatures_are_accepted_and_the_certificate_is_fetched_once(
        server, host, signer):
    for version, subject in (("1", None), ("2", None), ("2", "With a subject"),
                             ("1", "Ümlaut\nand a newline")):
        message = signer.notification({"eventType": "Send", "mail": {"messageId": "nope"}},
                                      version=version, subject=subject)
        status, body = await post(_url(server), message)
        assert status == 200, (version, subject, body)
        assert body == {"status": "unknown_message"}
    assert host.hits_of(signer.cert_url) == 1  # cached after the first


@pytest.mark.parametrize("case", [
    "flipped_message_byte", "wrong_topic", "stale", "future", "http_cert_url",
    "cert_host_outside_pattern", "lookalike_host", "non_sns_cert_path", "v1_labelled_v2",
    "version_3", "rogue_key", "untrusted_tls_host", "expired_cert", "subject_added",
    "subject_removed", "cert_not_found", "not_base64"])
@pytest_twisted.ensureDeferred
async def test_untrusted_messages_are_refused_and_change_nothing(server, host, signer, pki,
                                                                 case):
    await _sent_via(server, "ses-known-1", ["bouncy@example.org"])
    body = ses_event("Bounce", "ses-known-1", ["bouncy@example.org"])
    port = host.port.getHost().port
    kw: dict = {}
    if case == "wrong_topic":
        kw["topic"] = "arn:aws:sns:us-east-1:123456789012:someone-else"
    elif case == "stale":
        kw["timestamp"] = sns_time(dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
    elif case == "future":
        kw["timestamp"] = sns_time(dt.datetime.now(dt.UTC) + dt.timedelta(hours=2))
    elif case == "http_cert_url":
        kw["cert_url"] = signer.cert_url.replace("https://", "http://")
    elif case == "cert_host_outside_pattern":
        kw["cert_url"] = signer.cert_url.replace("127.0.0.1", "localhost")
    elif case == "lookalike_host":
        kw["cert_url"] = f"https://127.0.0.1.evil.test:{port}/SimpleNotificationService-a.pem"
    elif case == "non_sns_cert_path":
        kw["cert_url"] = host.serve("/cert.pem", pki.signing.public_bytes(Encoding.PEM))
    elif case == "rogue_key":
        kw["key"] = pki.rogue_key
    elif case == "untrusted_tls_host":  # right host name, TLS not from a trusted CA
        rogue_host = CertHost(pki, reactor, untrusted_tls=True)
        kw["key"] = pki.rogue_key
        kw["cert_url"] = rogue_host.serve_cert(pki.rogue)
    elif case == "expired_cert":
        kw["cert_url"] = host.serve_cert(pki.expired)
    elif case == "cert_not_found":
        kw["cert_url"] = host.origin + "/SimpleNotificationService-missing.pem"
    elif case == "subject_removed":
        kw["subject"] = "signed with a subject"
    message = signer.notification(body, **kw)
    if case == "flipped_message_byte":
        text = message["Message"]
        message["Message"] = text[:10] + chr(ord(text[10]) ^ 1) + text[11:]
    elif case == "v1_labelled_v2":
        message = signer.sign(message, "1")
        message["SignatureVersion"] = "2"
    elif case == "version_3":
        message["SignatureVersion"] = "3"
    elif case == "subject_added":
        message["Subject"] = "added after signing"
    elif case == "subject_removed":
        del message["Subject"]
    elif case == "not_base64":
        message["Signature"] = "!!!" + message["Signature"]
    before = _counts(server)
    status, answer = await post(_url(server), message)
    if case == "untrusted_tls_host":
        await rogue_host.stop()
        assert rogue_host.hits == []  # the TLS handshake failed: no request was made
    assert status in (400, 403), (status, answer)
    assert set(answer) == {"error"} and answer["error"]["type"] and "Traceback" not in str(answer)
    assert _counts(server) == before
    if case in ("http_cert_url", "cert_host_outside_pattern", "lookalike_host", "wrong_topic",
                "stale", "future", "version_3"):
        assert host.hits == []  # refused before anything was fetched


@pytest_twisted.ensureDeferred
async def test_malformed_bodies_get_json_errors_never_a_traceback(server):
    for raw in (b"", b"not json", b"[1, 2]", b"{\"Type\": \"Notification\"}",
                b"{\"Type\": 5}", b"\xff\xfe", b"[" * 5000):
        status, answer = await post(_url(server), {}, raw=raw)
        assert status == 400, (raw[:20], status, answer)
        assert answer["error"]["type"] == "invalid_sns_message"
    # The message type header must agree with the body.
    status, answer = await post(_url(server), {"Type": "Notification"},
                                header_type="SubscriptionConfirmation")
    assert status == 400


# ------------------------------------------------------------------ subscriptions


@pytest_twisted.ensureDeferred
async def test_a_subscription_is_confirmed_only_after_verification(server, host, signer):
    subscribe = host.serve("/", b"<ok/>") + f"?Action=ConfirmSubscription&TopicArn={TOPIC}"
    # SubscribeURL swapped after signing: refused, never visited.
    forged = signer.confirmation(subscribe)
    forged["SubscribeURL"] = host.origin + "/?Action=ConfirmSubscription&Token=evil"
    status, _ = await post(_url(server), forged)
    assert status == 403 and host.hits_of("/") == 0
    # Properly signed but pointing outside the allowed hosts: refused, never visited.
    elsewhere = signer.confirmation(subscribe.replace("127.0.0.1", "localhost"))
    status, _ = await post(_url(server), elsewhere)
    assert status == 403 and host.hits_of("/") == 0
    # Another topic: refused.
    status, _ = await post(_url(server), signer.confirmation(subscribe, topic=TOPIC + "x"))
    assert status == 403 and host.hits_of("/") == 0
    # The genuine one (v1 and v2): visited, confirmed.
    for version in ("1", "2"):
        status, body = await post(_url(server), signer.confirmation(subscribe,
                                                                    version=version))
        assert (status, body) == (200, {"status": "confirmed"})
    assert host.hits_of("/") == 2
    # An UnsubscribeConfirmation is verified and acknowledged; nothing is visited.
    status, body = await post(_url(server), signer.confirmation(
        subscribe, kind="UnsubscribeConfirmation"))
    assert (status, body) == (200, {"status": "acknowledged"}) and host.hits_of("/") == 2


@pytest_twisted.ensureDeferred
async def test_a_subscribe_url_that_fails_is_a_503_so_sns_may_retry(server, host, signer):
    missing = host.origin + "/confirm-missing"
    status, answer = await post(_url(server), signer.confirmation(missing))
    assert status == 503 and answer["error"]["type"] == "sns_confirmation_failed"
    assert host.hits_of("/confirm-missing") == 1


# ------------------------------------------------------------------ the mapping


@pytest_twisted.ensureDeferred
async def test_each_ses_event_kind_maps_to_status_events_and_rows(server, signer):
    rcpts = ["a@example.org", "b@example.org", "c@example.org"]
    message, _, key, queue_id = await _sent_via(server, "ses-kinds", rcpts)

    async def send(kind, who, **kw):
        status, body = await post(_url(server), signer.notification(
            ses_event(kind, "ses-kinds", who, **kw)))
        assert status == 200, body
        return body["status"]

    assert await send("Send", rcpts) == "processed"
    assert await send("Delivery", ["A@Example.org"]) == "processed"  # case-insensitive
    assert await send("DeliveryDelay", ["a@example.org", "b@example.org"]) == "processed"
    assert await send("Bounce", ["b@example.org"], bounce_type="Transient") == "processed"
    assert await send("Complaint", ["a@example.org"], form="notificationType") == "processed"
    assert await send("Reject", ["c@example.org"]) == "processed"
    assert dict(_rows(server, "SELECT address, delivery_status FROM outbound_recipients "
                              "WHERE queue_id = %s", (queue_id,))) == {
        "a@example.org": "complained", "b@example.org": "bounced",
        "c@example.org": "rejected"}
    # A transient bounce suppresses nothing; a complaint does.
    assert _rows(server, "SELECT email, reason, source_message_id FROM suppressions") == [
        ("a@example.org", "complaint", message.message_id)]
    types = [r[0] for r in _rows(server, "SELECT type FROM events WHERE type LIKE "
                                         "'message.%%' AND type <> 'message.received' "
                                         "ORDER BY id")]
    assert types == ["message.delivered", "message.delayed", "message.bounced",
                     "message.complained", "message.rejected"]
    [bounced] = _rows(server, "SELECT data FROM events WHERE type = 'message.bounced'")
    assert bounced[0]["bounce_type"] == "Transient" and bounced[0]["suppressed"] is False
    assert bounced[0]["message_id"] == message.message_id
    assert bounced[0]["recipients"] == [{"address": "b@example.org", "smtp_code": 550,
                                         "status_code": "5.1.1",
                                         "diagnostic": "smtp; 550 5.1.1 user unknown"}]
    kinds = _rows(server, "SELECT type, count(*) FROM delivery_events GROUP BY type "
                          "ORDER BY type")
    assert kinds == [("bounce", 1), ("complaint", 1), ("delivery", 1),
                     ("delivery_delay", 2), ("reject", 1), ("send", 3)]
    # The stored feedback never holds the message's headers.
    feedback = _rows(server, "SELECT feedback::text FROM delivery_events")
    assert not any("private subject" in f[0] for f in feedback)
    # The deliveries API shows it per recipient.
    answer = await server.api.get(f"/api/v1/messages/{message.message_id}/deliveries",
                                  key=key)
    assert answer.status == 200, answer
    by_rcpt = {d["recipient"]: d for d in answer.json["data"]}
    assert by_rcpt["a@example.org"]["delivery_status"] == "complained"
    assert by_rcpt["a@example.org"]["transport_id"] == "ses-kinds"
    assert [e["type"] for e in by_rcpt["a@example.org"]["events"]] == [
        "send", "delivery", "delivery_delay", "complaint"]
    assert by_rcpt["b@example.org"]["events"][-1]["bounce_type"] == "Transient"


@pytest_twisted.ensureDeferred
async def test_a_late_delay_does_not_undo_a_delivery_and_unknown_ids_are_ignored(server,
                                                                                 signer):
    _, _, _, queue_id = await _sent_via(server, "ses-order", ["x@example.org"])
    for kind in ("Delivery", "DeliveryDelay"):
        status, _ = await post(_url(server), signer.notification(
            ses_event(kind, "ses-order", ["x@example.org"])))
        assert status == 200
    assert _rows(server, "SELECT delivery_status FROM outbound_recipients "
                         "WHERE queue_id = %s", (queue_id,)) == [("delivered",)]
    before = _counts(server)
    status, body = await post(_url(server), signer.notification(
        ses_event("Bounce", "ses-unknown", ["x@example.org"])))
    assert (status, body) == (200, {"status": "unknown_message"})
    after = _counts(server)
    assert after["sns_receipts"] == before["sns_receipts"] + 1
    assert {k: v for k, v in after.items() if k != "sns_receipts"} == \
        {k: v for k, v in before.items() if k != "sns_receipts"}
    # A notification that is not a SES event at all is acknowledged and ignored.
    status, body = await post(_url(server), signer.notification("plain text test message"))
    assert (status, body) == (200, {"status": "ignored"})


@pytest_twisted.ensureDeferred
async def test_deliveries_are_tenant_scoped(server, signer):
    message, _, _, _ = await _sent_via(server, "ses-tenancy", ["t@example.org"], "mine")
    _, other_key = await server.new_org("Other")
    answer = await server.api.get(f"/api/v1/messages/{message.message_id}/deliveries",
                                  key=other_key)
    assert answer.status == 404
    answer = await server.api.get("/api/v1/messages/msg_01JQ8X5K2M3N4P5R6S7T8V9W0X/"
                                  "deliveries", key=other_key)
    assert answer.status == 404


# ------------------------------------------------------------------ the full flow


@pytest_twisted.ensureDeferred
async def test_a_ses_bounce_suppresses_the_address_for_every_later_send(
        server, signer, ses_account, transports):  # noqa: F811
    message, inbox, owner = await _sent_message(server, "sender")
    [queue_id] = await _enqueue(server, message, ["bouncy@example.org"])
    clock = _clock()
    worker = _worker(server, transports(ses_account.endpoint_url, clock=clock), clock)
    assert await worker.drain() == 1
    [(ses_id, status)] = _rows(server, "SELECT transport_id, status FROM outbound_recipients "
                                       "WHERE queue_id = %s", (queue_id,))
    sent = await task.deferLater(reactor, 0, ses_account.sent)
    assert status == "sent" and ses_id in sent

    bounce = signer.notification(ses_event("Bounce", ses_id, ["bouncy@example.org"]),
                                 version="1")
    assert await post(_url(server), bounce) == (200, {"status": "processed"})
    assert _rows(server, "SELECT delivery_status FROM outbound_recipients WHERE queue_id = %s",
                 (queue_id,)) == [("bounced",)]
    assert _rows(server, "SELECT org_id, email, reason, source_message_id FROM suppressions"
                 ) == [(message.org_id, "bouncy@example.org", "bounce", message.message_id)]
    [(data,)] = _rows(server, "SELECT data FROM events WHERE type = 'message.bounced'")
    assert data["bounce_type"] == "Permanent" and data["suppressed"] is True
    [row] = _rows(server, "SELECT org_id, message_id, recipient, type, bounce_type, "
                          "smtp_code, status_code, transport_id, feedback->'bounce'->>"
                          "'bounceType' FROM delivery_events")
    assert row == (message.org_id, message.message_id, "bouncy@example.org", "bounce",
                   "Permanent", 550, "5.1.1", ses_id, "Permanent")
    # SNS redelivers: nothing happens twice.
    before = _counts(server)
    assert await post(_url(server), bounce) == (200, {"status": "duplicate"})
    assert _counts(server) == before

    # The next send to that address is refused at every door.
    made = await server.api.post("/api/v1/api-keys", {"name": "smtp", "scopes": [
        "messages:send", "messages:read"]}, key=owner)
    send_key = made.json["key"]

    def smtp_session():
        with _login(server.submission_port, inbox["email"], send_key) as smtp:
            smtp.mail(inbox["email"])
            refused = smtp.rcpt("Bouncy@EXAMPLE.org")
            allowed = smtp.rcpt("someone-else@example.org")
            smtp.rset()
            return refused, allowed

    refused, allowed = await deferToThread(smtp_session)
    assert refused[0] == 550 and refused[1].startswith(b"5.7.1"), refused
    assert allowed[0] == 250, allowed
    response = await treq.post(
        f"{server.base_url}/api/v1/inboxes/{inbox['id']}/messages",
        data=json.dumps({"to": ["bouncy@example.org"], "subject": "again",
                         "text_body": "hello"}).encode(),
        headers={"Authorization": [f"Bearer {send_key}"],
                 "Content-Type": ["application/json"]})
    answer = json.loads(await response.content())
    assert response.code == 422, answer
    assert answer["error"]["type"] == "suppressed_recipient"
    # Taking it off the list lets mail through again.
    removed = await server.api.delete("/api/v1/suppressions/bouncy@example.org", key=owner)
    assert removed.status == 204

    def smtp_again():
        with _login(server.submission_port, inbox["email"], send_key) as smtp:
            smtp.mail(inbox["email"])
            return smtp.rcpt("bouncy@example.org")

    assert (await deferToThread(smtp_again))[0] == 250


# ------------------------------------------------------------------ retention


@pytest_twisted.ensureDeferred
async def test_delivery_events_are_swept_after_their_retention(server, signer):
    await _sent_via(server, "ses-old", ["old@example.org"])
    status, _ = await post(_url(server), signer.notification(
        ses_event("Delivery", "ses-old", ["old@example.org"])))
    assert status == 200
    config = server.service.config.retention
    clock = task.Clock()
    clock.advance(dt.datetime.now(dt.UTC).timestamp())
    sweep = RetentionSweep(server.core.db, clock, config)
    await sweep.sweep_once()
    assert _rows(server, "SELECT count(*) FROM delivery_events") == [(1,)]
    clock.advance(config.delivery_events + 3600)
    await sweep.sweep_once()
    assert _rows(server, "SELECT count(*) FROM delivery_events") == [(0,)]
    assert _rows(server, "SELECT count(*) FROM sns_receipts") == [(0,)]
    # The recipient's state outlives its events.
    assert _rows(server, "SELECT delivery_status FROM outbound_recipients "
                         "WHERE address = 'old@example.org'") == [("delivered",)]



# ------------------------------------------------------------------ outbound reach


@pytest_twisted.ensureDeferred
async def test_fetches_refuse_private_addresses_redirects_and_oversized_answers(host, pki):
    trust = load_trust_root(str(pki.ca_file))
    url = host.serve_cert(pki.signing)
    guarded = GuardedFetcher(reactor, trust_root=trust, allow_private=False, timeout_s=5)
    with pytest.raises(FetchRefused):
        await guarded.get(url, MAX_CERT_BYTES)
    assert host.hits == []  # refused before connecting
    fetcher = GuardedFetcher(reactor, trust_root=trust, allow_private=True, timeout_s=5)
    target = host.serve("/target", b"secret")
    moved = host.serve("/moved", b"", status=302, headers={"Location": target})
    with pytest.raises(FetchFailed, match="302"):
        await fetcher.get(moved, MAX_CERT_BYTES)
    assert host.hits_of("/target") == 0
    big = host.serve("/big", b"x" * (MAX_CERT_BYTES + 1))
    with pytest.raises(FetchFailed, match="too large"):
        await fetcher.get(big, MAX_CERT_BYTES)
    with pytest.raises(FetchRefused):
        await fetcher.get(url.replace("https://", "http://"), MAX_CERT_BYTES)
    assert await fetcher.get(url, MAX_CERT_BYTES) == pki.signing.public_bytes(Encoding.PEM)


@pytest_twisted.ensureDeferred
async def test_the_certificate_cache_is_bounded_and_shares_concurrent_fetches(host, pki):
    fetcher = GuardedFetcher(reactor, trust_root=load_trust_root(str(pki.ca_file)),
                             allow_private=True, timeout_s=5)
    cache = CertificateCache(fetcher, size=2)
    url = host.serve_cert(pki.signing)
    together = await defer.gatherResults([defer.ensureDeferred(cache.certificate(url))
                                          for _ in range(5)])
    assert len({id(c) for c in together}) == 1 and host.hits_of(url) == 1
    others = [host.serve_cert(pki.signing) for _ in range(2)]
    for other in others:
        await cache.certificate(other)
    await cache.certificate(url)  # pushed out by the two newer ones: fetched again
    assert host.hits_of(url) == 2 and cache.fetches == 4


def test_the_sns_settings_are_validated(pki):
    from agentpost.config.loader import ConfigError, parse_config

    good = parse_config({"outbound": sns_config(pki),
                         "server": {"environment": "development"}}, "<t>", environ={})
    assert good.outbound.sns_topic_arns == [TOPIC]
    for bad in ({"sns_allow_private_addresses": True},  # production refuses it
                {"sns_path": "no-slash"}, {"sns_path": "/a/../b c"},
                {"sns_cert_host_pattern": "("}, {"sns_topic_arns": ["not-an-arn"]},
                {"sns_ca_file": "/nonexistent/ca.pem"}, {"sns_max_age": "0s"}):
        with pytest.raises(ConfigError):
            parse_config({"outbound": bad, "server": {"environment": "production"}},
                         "<t>", environ={})
