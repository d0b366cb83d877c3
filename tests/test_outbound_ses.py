"""The ses transport against moto in server mode, with a test-owned fault proxy in front
for what moto cannot do: one SES call per attempt, the error classification, the send
rate, the thread pool, the 8-bit re-encoding, and the configuration's endpoint rules.

See ../shared/notes/aws-local-testing.md for moto's behaviour (identities verified at
creation, sent mail readable from /moto-api/data.json, no Throttling of its own)."""

from __future__ import annotations

import email
import email.policy
import logging
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.config.loader import ConfigError, parse_config
from agentpost.outbound.eightbit import encode_8bit_parts, is_utf8, strip_return_path
from agentpost.outbound.ses import (
    DAILY_QUOTA_RETRY_AFTER_S,
    OPERATOR_RETRY_AFTER_S,
    SendRateLimiter,
    SESTransport,
    classify_client_error,
)
from agentpost.outbound.transports import DEFERRED, FAILED, SENT, Envelope
from tests.aws import (
    AWS_ACCESS_KEY_ID,
    AWS_REGION,
    AWS_SECRET_ACCESS_KEY,
    ses_outbound,
    sesv2_client,
)
from tests.aws_faults import SEND_EMAIL
from tests.helpers import query
from tests.mailfactory import make_message
from tests.test_outbound_queue import _clock, _dsn, _enqueue, _recipients, _sent_message, _worker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(server):
    """The running service without its own queue worker: these tests drive a worker of
    their own (task.Clock, the ses transport) against its database."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


@pytest.fixture
def transports():
    """Builds started SES transports and stops them after the test."""
    made: list[SESTransport] = []

    def build(endpoint_url: str, clock=None, **kw) -> SESTransport:
        kw.setdefault("max_send_rate", 1000.0)
        kw.setdefault("read_timeout_s", 10.0)
        transport = SESTransport(region=AWS_REGION, clock=clock or _clock(), reactor=reactor,
                                 endpoint_url=endpoint_url, access_key_id=AWS_ACCESS_KEY_ID,
                                 secret_access_key=AWS_SECRET_ACCESS_KEY,
                                 connect_timeout_s=2.0, **kw)
        transport.start()
        made.append(transport)
        return transport

    yield build
    for transport in made:
        transport.stop()


def _envelope(*recipients: str, mail_from: str = "sender@agents.test") -> Envelope:
    return Envelope("obq_test", "org_test", mail_from, recipients, "msg_test")


def _row(server, queue_id):
    [row] = query(_dsn(server), "SELECT status, next_attempt_at, attempts FROM outbound_queue "
                  "WHERE id = %s", (queue_id,))
    return row


def _rcpt(server, queue_id):
    [row] = query(_dsn(server), "SELECT address, status, smtp_code, status_code, diagnostic, "
                  "transport_id FROM outbound_recipients WHERE queue_id = %s", (queue_id,))
    return dict(zip(("address", "status", "smtp_code", "status_code", "diagnostic",
                     "transport_id"), row, strict=True))


# ---------------------------------------------------------------------- the 8-bit step

LATIN1_MIXED = (
    b"From: a@agents.test\r\nTo: b@example.org\r\nSubject: prices\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="BB"\r\n\r\npreamble\r\n'
    b"--BB\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xe9 cr\xe8me = 3\xa4 \r\nsecond line\r\n"
    b"--BB\r\nContent-Type: application/octet-stream\r\n\r\n\xff\xfe\x00\x01binary\r\n"
    b"--BB\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nCaf\xc3\xa9 (already UTF-8)\r\n--BB--\r\nepilogue\r\n")


def test_seven_bit_and_utf8_messages_are_passed_byte_for_byte():
    plain = make_message(body="plain ascii\n")
    utf8 = make_message(subject="Café", body="Grüße, 東京\n")
    utf8_8bit = (b"From: a@b\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n")
    for raw in (plain, utf8, utf8_8bit):
        assert encode_8bit_parts(raw) is raw


def test_non_utf8_parts_are_transfer_encoded_and_decode_to_the_same_bytes():
    out = encode_8bit_parts(LATIN1_MIXED)
    assert is_utf8(out) and out.isascii() is False  # the UTF-8 part is left as it was
    before = [p.get_payload(decode=True) for p in email.message_from_bytes(
        LATIN1_MIXED, policy=email.policy.compat32).walk() if not p.is_multipart()]
    parsed = email.message_from_bytes(out, policy=email.policy.compat32)
    leaves = [p for p in parsed.walk() if not p.is_multipart()]
    assert [p.get_payload(decode=True) for p in leaves] == before
    assert [p["Content-Transfer-Encoding"] for p in leaves] == [
        "quoted-printable", "base64", "8bit"]
    assert b"Caf=E9 cr=E8me =3D 3=A4=20\r\nsecond line\r\n--BB\r\n" in out
    # Everything outside the re-encoded parts is as it came.
    assert out.startswith(LATIN1_MIXED[:LATIN1_MIXED.index(b"--BB\r\n")])
    assert out.endswith(b"\r\n--BB\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xc3\xa9 (already UTF-8)"
                        b"\r\n--BB--\r\nepilogue\r\n")


def test_a_single_part_latin1_body_becomes_quoted_printable():
    raw = (b"From: a@b\r\nContent-Type: text/plain; charset=latin-1\r\n"
           b"Content-Transfer-Encoding: 8bit\r\nSubject: x\r\n\r\n\xe9t\xe9\r\n")
    assert encode_8bit_parts(raw) == (
        b"From: a@b\r\nContent-Type: text/plain; charset=latin-1\r\nSubject: x\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9t=E9\r\n")


def test_a_leading_return_path_is_dropped_and_nothing_else():
    raw = b"Return-Path: <a@b>\r\nReceived: x\r\nFrom: a@b\r\n\r\nReturn-Path: body\r\n"
    assert strip_return_path(raw) == b"Received: x\r\nFrom: a@b\r\n\r\nReturn-Path: body\r\n"
    assert strip_return_path(b"From: a@b\r\n\r\nx") == b"From: a@b\r\n\r\nx"


# ---------------------------------------------------------------------- classification

@pytest.mark.parametrize(("code", "http", "status", "status_code", "retry_at_least"), [
    ("MessageRejected", 400, FAILED, "5.7.1", None),
    ("MailFromDomainNotVerifiedException", 400, FAILED, "5.1.8", None),
    ("BadRequestException", 400, FAILED, "5.6.0", None),
    ("NotFoundException", 404, DEFERRED, "4.3.5", 3600.0),
    ("Throttling", 400, DEFERRED, "4.7.0", 60.0),
    ("TooManyRequestsException", 429, DEFERRED, "4.7.0", 60.0),
    ("LimitExceededException", 400, DEFERRED, "4.7.0", 60.0),
    ("AccountSuspendedException", 400, DEFERRED, "4.3.2", OPERATOR_RETRY_AFTER_S),
    ("SendingPausedException", 400, DEFERRED, "4.3.2", OPERATOR_RETRY_AFTER_S),
    ("AccessDeniedException", 403, DEFERRED, "4.3.5", OPERATOR_RETRY_AFTER_S),
    ("InternalFailure", 500, DEFERRED, "4.3.0", None),
    ("SomethingNew", 503, DEFERRED, "4.3.0", None),
    ("SomethingNew", 429, DEFERRED, "4.7.0", 60.0),
    ("SomethingNew", 400, DEFERRED, "4.0.0", None),  # unknown: never bounce on a guess
])
def test_ses_errors_are_classified_as_aws_documents_them(code, http, status, status_code,
                                                         retry_at_least):
    verdict = classify_client_error(code, http, "whatever")
    assert (verdict.status, verdict.status_code) == (status, status_code)
    assert (verdict.retry_after_s or 0) >= (retry_at_least or 0)
    assert verdict.smtp_code == (451 if status == DEFERRED else verdict.smtp_code)


def test_the_daily_quota_surfaces_as_throttling_and_waits_an_hour():
    verdict = classify_client_error("Throttling", 400, "Daily message quota exceeded.")
    assert verdict.status == DEFERRED and verdict.retry_after_s == DAILY_QUOTA_RETRY_AFTER_S
    assert verdict.operator


# ---------------------------------------------------------------------- the send rate

def test_the_rate_limiter_makes_senders_wait_in_order_rather_than_fail():
    clock = task.Clock()
    bucket = SendRateLimiter(2.0, clock)
    assert [bucket.reserve(1), bucket.reserve(1)] == [0.0, 0.0]  # one second's burst
    assert bucket.reserve(1) == pytest.approx(0.5)
    assert bucket.reserve(1) == pytest.approx(1.0)  # queued behind the previous one
    clock.advance(10)
    assert bucket.reserve(2) == 0.0
    assert bucket.reserve(50) == pytest.approx(25.0)  # a big batch runs into debt
    done = []
    d = defer.ensureDeferred(SendRateLimiter(1.0, clock).take(3))
    d.addCallback(done.append)
    clock.advance(1.99)
    assert not done
    clock.advance(0.02)
    assert done == [None]


def test_throttling_pauses_the_bucket():
    clock = task.Clock()
    bucket = SendRateLimiter(10.0, clock)
    bucket.pause(1.0)
    assert bucket.reserve(1) == pytest.approx(1.1)


# ---------------------------------------------------------------------- against moto

@pytest_twisted.ensureDeferred
async def test_large_handoffs_are_split_into_calls_of_fifty(ses_faults, ses_account,
                                                            transports):
    transport = transports(ses_faults.endpoint_url)
    recipients = tuple(f"r{n}@example.org" for n in range(120))
    # No To: header (moto counts header addresses too, real SES the envelope's).
    raw = b"From: sender@agents.test\r\nSubject: many\r\n\r\nhello\r\n"
    handoff = await transport.send(_envelope(*recipients), raw)
    assert [o.status for o in handoff.outcomes] == [SENT] * 120, handoff.outcomes[0]
    assert ses_faults.attempts(SEND_EMAIL) == 3
    sent = await task.deferLater(reactor, 0, ses_account.sent)
    assert len(sent) == 3 and len({o.transport_id for o in handoff.outcomes}) == 3
    assert sorted(len(m["destinations"]) for m in sent.values()) == [20, 50, 50]


@pytest_twisted.ensureDeferred
async def test_boto3_never_runs_on_the_reactor_thread(ses_account, transports):
    reactor_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []

    class Watched:
        def __init__(self) -> None:
            seen.append(("build", threading.get_ident()))
            self._client = sesv2_client(ses_account.endpoint_url)

        def send_email(self, **request):
            seen.append(("send", threading.get_ident()))
            return self._client.send_email(**request)

    transport = transports(ses_account.endpoint_url, client_factory=Watched)
    handoff = await transport.send(_envelope("a@example.org"), make_message())
    assert handoff.outcomes[0].status == SENT
    assert [kind for kind, _ in seen] == ["build", "send"]
    assert all(ident != reactor_thread for _, ident in seen)


@pytest_twisted.ensureDeferred
async def test_the_send_rate_makes_a_handoff_wait_on_the_clock_not_fail(ses_faults,
                                                                         ses_account,
                                                                         transports):
    clock = task.Clock()
    transport = transports(ses_faults.endpoint_url, clock=clock, max_send_rate=2.0)
    first = [await transport.send(_envelope(f"r{n}@example.org"), make_message())
             for n in range(2)]
    assert [h.outcomes[0].status for h in first] == [SENT, SENT]
    third = defer.ensureDeferred(transport.send(_envelope("r2@example.org"), make_message()))
    await task.deferLater(reactor, 0.3, lambda: None)
    assert not third.called and ses_faults.attempts(SEND_EMAIL) == 2  # waiting, not failed
    clock.advance(0.5)
    handoff = await third
    assert handoff.outcomes[0].status == SENT and ses_faults.attempts(SEND_EMAIL) == 3


@pytest_twisted.ensureDeferred
async def test_a_latin1_8bit_message_reaches_ses_transfer_encoded(ses_account, transports):
    transport = transports(ses_account.endpoint_url)
    handoff = await transport.send(_envelope("b@example.org", mail_from="a@agents.test"),
                                   LATIN1_MIXED)
    [outcome] = handoff.outcomes
    assert outcome.status == SENT, outcome  # moto answers 500 to non-UTF-8 raw data
    sent = (await task.deferLater(reactor, 0, ses_account.sent))[outcome.transport_id]
    assert sent["raw"] == encode_8bit_parts(LATIN1_MIXED)
    parsed = email.message_from_bytes(sent["raw"], policy=email.policy.compat32)
    first = next(p for p in parsed.walk() if not p.is_multipart())
    assert first.get_payload(decode=True) == b"Caf\xe9 cr\xe8me = 3\xa4 \r\nsecond line"


# ---------------------------------------------------------------------- through the queue

@pytest_twisted.ensureDeferred
async def test_a_queued_message_reaches_ses_byte_exact_once_with_its_message_id(
        server, ses_faults, ses_account, transports):
    message, _, _ = await _sent_message(server, "sender")
    [queue_id] = await _enqueue(server, message, ["friend@example.org", "other@example.org"])
    clock = _clock()
    worker = _worker(server, transports(ses_faults.endpoint_url, clock=clock), clock)
    assert await worker.drain() == 1
    assert _recipients(server, queue_id) == {"friend@example.org": "sent",
                                             "other@example.org": "sent"}
    assert ses_faults.attempts(SEND_EMAIL) == 1
    sent = await task.deferLater(reactor, 0, ses_account.sent)
    [(ses_id, mail)] = sent.items()
    stored = await server.core.blobs.get_bytes(message.raw_blob_key)
    assert mail["raw"] == stored == make_message(to="x@example.com", subject="outbound",
                                                 msgid="<sender@x>")
    assert mail["source"] == "sender@agents.test"
    assert set(mail["destinations"]) >= {"friend@example.org", "other@example.org"}
    rows = query(_dsn(server), "SELECT transport_id, status_code FROM outbound_recipients "
                 "WHERE queue_id = %s", (queue_id,))
    assert rows == [(ses_id, "2.0.0")] * 2
    assert await worker.drain() == 0  # nothing twice


@pytest_twisted.ensureDeferred
async def test_throttling_defers_then_the_message_leaves_when_the_clock_passes_the_retry(
        server, ses_faults, ses_account, transports):
    message, _, _ = await _sent_message(server, "throttled")
    [queue_id] = await _enqueue(server, message, ["friend@example.org"])
    ses_faults.inject(SEND_EMAIL, status=400, error_type="Throttling",
                      message="Maximum sending rate exceeded.")
    clock = _clock()
    worker = _worker(server, transports(ses_faults.endpoint_url, clock=clock), clock)
    assert await worker.drain_once() == 1
    rcpt = _rcpt(server, queue_id)
    assert (rcpt["status"], rcpt["smtp_code"], rcpt["status_code"]) == ("deferred", 451,
                                                                         "4.7.0")
    assert "Throttling" in rcpt["diagnostic"]
    assert ses_faults.attempts(SEND_EMAIL) == 1  # botocore did not retry on its own
    clock.advance(59)
    assert await worker.drain_once() == 0
    clock.advance(2)
    assert await worker.drain_once() == 1
    assert _recipients(server, queue_id) == {"friend@example.org": "sent"}
    assert ses_faults.attempts(SEND_EMAIL) == 2
    assert len(await task.deferLater(reactor, 0, ses_account.sent)) == 1


@pytest.mark.parametrize(("fault", "status_code"), [
    ({"status": 500, "error_type": "InternalFailure"}, "4.3.0"),
    ({"status": 503, "error_type": "ServiceUnavailable"}, "4.3.0"),
    ({"status": 429, "error_type": "TooManyRequestsException"}, "4.7.0"),
    ({"status": 400, "error_type": "LimitExceededException"}, "4.7.0"),
    ({"mode": "delay", "delay_s": 2.0}, "4.4.2"),  # read timeout
    ({"mode": "drop"}, "4.4.2"),
])
@pytest_twisted.ensureDeferred
async def test_ses_trouble_defers_after_exactly_one_call(server, ses_faults, ses_account,
                                                         transports, fault, status_code):
    message, _, _ = await _sent_message(server, "unlucky")
    [queue_id] = await _enqueue(server, message, ["friend@example.org"])
    ses_faults.inject(SEND_EMAIL, **fault)
    clock = _clock()
    transport = transports(ses_faults.endpoint_url, clock=clock, read_timeout_s=0.5)
    assert await _worker(server, transport, clock).drain_once() == 1
    rcpt = _rcpt(server, queue_id)
    assert (rcpt["status"], rcpt["status_code"], rcpt["transport_id"]) == (
        "deferred", status_code, None)
    assert ses_faults.attempts(SEND_EMAIL) == 1
    assert await task.deferLater(reactor, 0, ses_account.sent) == {}


@pytest_twisted.ensureDeferred
async def test_an_unverified_sender_is_rejected_by_ses_and_bounces_with_a_dsn(
        server, ses_faults, ses_account, transports):
    message, inbox, key = await _sent_message(server, "unverified")
    [queue_id] = await _enqueue(server, message, ["friend@example.org"])
    await task.deferLater(reactor, 0, lambda: ses_account.client.delete_email_identity(
        EmailIdentity="agents.test"))  # real moto behaviour: MessageRejected
    clock = _clock()
    assert await _worker(server, transports(ses_faults.endpoint_url, clock=clock),
                         clock).drain() == 1
    rcpt = _rcpt(server, queue_id)
    assert (rcpt["status"], rcpt["smtp_code"], rcpt["status_code"]) == ("bounced", 554,
                                                                        "5.7.1")
    assert "MessageRejected" in rcpt["diagnostic"]
    assert ses_faults.attempts(SEND_EMAIL) == 1
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                   key=key)).json["data"]
    [dsn] = [m for m in listed if m["subject"] == "Undelivered Mail Returned to Sender"]
    raw = (await server.api.get(f"/api/v1/messages/{dsn['id']}/raw", key=key)).body
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    recipient = status.get_payload()[1]
    assert recipient["Final-Recipient"] == "rfc822; friend@example.org"
    assert recipient["Status"] == "5.7.1"
    assert "554" in recipient["Diagnostic-Code"]


@pytest.mark.parametrize("error_type", ["AccountSuspendedException", "SendingPausedException"])
@pytest_twisted.ensureDeferred
async def test_a_suspended_account_keeps_mail_queued_for_long_and_says_so_loudly(
        server, ses_faults, ses_account, transports, caplog, error_type):
    message, _, _ = await _sent_message(server, "paused")
    [queue_id] = await _enqueue(server, message, ["friend@example.org"])
    ses_faults.inject(SEND_EMAIL, status=400, error_type=error_type, message="paused")
    clock = _clock()
    caplog.set_level(logging.WARNING, logger="agentpost.outbound.ses")
    assert await _worker(server, transports(ses_faults.endpoint_url, clock=clock),
                         clock).drain_once() == 1
    status, next_attempt_at, _ = _row(server, queue_id)
    now = datetime.fromtimestamp(clock.seconds(), UTC)
    assert status == "deferred"
    assert (next_attempt_at - now).total_seconds() >= OPERATOR_RETRY_AFTER_S
    assert _rcpt(server, queue_id)["status_code"] == "4.3.2"
    assert any(r.levelno == logging.ERROR and "operator must act" in r.getMessage()
               for r in caplog.records)
    assert ses_faults.attempts(SEND_EMAIL) == 1


# ---------------------------------------------------------------------- configuration

def _config(environment: str, **outbound):
    return parse_config({"server": {"environment": environment},
                         "outbound": {"transport": "ses", **outbound}}, environ={})


def test_the_ses_endpoint_must_be_https_unless_explicitly_allowed_outside_production():
    assert _config("production").outbound.ses_endpoint == ""
    assert _config("production", ses_endpoint="https://email.eu-west-1.amazonaws.com")
    with pytest.raises(ConfigError) as plain:
        _config("development", ses_endpoint="http://127.0.0.1:5000")
    assert plain.value.key == "outbound.ses_endpoint"
    assert _config("development", ses_endpoint="http://127.0.0.1:5000",
                   ses_allow_insecure_endpoint=True)
    with pytest.raises(ConfigError) as prod:
        _config("production", ses_endpoint="http://127.0.0.1:5000",
                ses_allow_insecure_endpoint=True)
    assert prod.value.key == "outbound.ses_allow_insecure_endpoint"
    with pytest.raises(ConfigError):
        _config("production", ses_access_key_id="AKIA...")  # without its secret
    with pytest.raises(ConfigError):
        _config("production", ses_region="Frankfurt")


def test_check_config_refuses_an_insecure_ses_endpoint_in_production(tmp_path):
    path = tmp_path / "agentpost.toml"
    path.write_text('[server]\nenvironment = "production"\n[database]\nurl = "postgresql:///x"\n'
                    '[outbound]\ntransport = "ses"\nses_endpoint = "http://127.0.0.1:5000"\n'
                    "ses_allow_insecure_endpoint = true\n")
    result = subprocess.run([sys.executable, "-m", "agentpost.cli", "--config", str(path),
                             "check-config"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result
    assert "outbound.ses_allow_insecure_endpoint" in result.stderr


def test_the_secret_can_come_from_the_environment():
    config = parse_config({"outbound": {"transport": "ses", "ses_access_key_id": "AKIA1"}},
                          environ={"AGENTPOST_SES_SECRET_ACCESS_KEY": "s3cret"})
    assert config.outbound.ses_secret_access_key == "s3cret"



@pytest_twisted.ensureDeferred
async def test_the_configured_service_sends_through_ses_and_stops_its_pool(
        db_dsn, openapi_checker, ses_account):
    """`[outbound] transport = "ses"` end to end: the composition root builds the
    transport, starts its thread pool with the service and stops it with the service."""
    from tests.conftest import make_config, start_server

    config = make_config(db_dsn, outbound=ses_outbound(ses_account.endpoint_url))
    running = await start_server(config, openapi_checker)
    transport = running.core.outbound.transport
    try:
        assert isinstance(transport, SESTransport)
        message, _, _ = await _sent_message(running, "configured")
        [queue_id] = await _enqueue(running, message, ["friend@example.org"])
        await wait_sent(running, queue_id)
        [mail] = (await task.deferLater(reactor, 0, ses_account.sent)).values()
        assert mail["source"] == "configured@agents.test"
    finally:
        await running.service.stopService()
    assert not transport._pool.started


async def wait_sent(running, queue_id: str) -> None:
    """Until the running service's own worker has sent the queue row to its one
    recipient, friend@example.org (at most ~10 s)."""
    for _ in range(200):
        if _recipients(running, queue_id) == {"friend@example.org": "sent"}:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    assert _recipients(running, queue_id) == {"friend@example.org": "sent"}
