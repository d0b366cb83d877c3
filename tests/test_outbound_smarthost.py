"""The smtp (smarthost) transport against a real ESMTP sink on loopback: STARTTLS with a
verified certificate, AUTH, pipelining, one pooled connection for many hand-offs,
per-recipient outcomes through the real queue worker (retries on task.Clock, bounces
with a DSN), the deadline and idle timeout on the injected clock, 8-bit handling, the
configuration's rules, and a full run of the service with ``transport = "smtp"``."""

from __future__ import annotations

import email
import email.policy
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.config.loader import ConfigError
from agentpost.dev.tls import ensure_dev_tls
from agentpost.outbound.smarthost import Reply as SMTPReply
from agentpost.outbound.smarthost import SmarthostSettings, SmarthostTransport, queue_id_of
from agentpost.outbound.transports import DEFERRED, FAILED, SENT, Envelope
from tests.helpers import query
from tests.smtp_sink import SinkScript, SMTPSink
from tests.test_outbound_queue import _clock, _dsn, _enqueue, _recipients, _sent_message, _worker

USER, PASSWORD = "relay-user", "s3cret-relay-pass"


@pytest.fixture
def server(server):
    """The running service without its own queue worker (these tests drive their own)."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


@pytest.fixture
def sink_factory(dev_tls):
    """Starts sinks on loopback; stops them (and the transports' pools) afterwards."""
    ports = []
    transports: list[SmarthostTransport] = []

    def start(**script):
        script.setdefault("users", {USER: PASSWORD})
        sink = SMTPSink(str(dev_tls.cert), str(dev_tls.key), SinkScript(**script))
        if sink.script.implicit_tls:
            port = reactor.listenSSL(0, sink, sink.tls_options, interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, sink, interface="127.0.0.1")
        ports.append(port)
        sink.port = port.getHost().port
        return sink

    def transport(sink, clock=None, **kw):
        kw.setdefault("ca_file", str(dev_tls.ca_cert))
        kw.setdefault("username", USER)
        kw.setdefault("password", PASSWORD)
        settings = SmarthostSettings(host="localhost", port=sink.port, helo="mx.test", **kw)
        made = SmarthostTransport(settings, clock=clock or task.Clock(), reactor=reactor)
        transports.append(made)
        return made

    start.transport = transport
    yield start
    for made in transports:
        made.stop()
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def _envelope(*recipients, mail_from="sender@agents.test", queue_id="obq_test"):
    return Envelope(queue_id, "org_test", mail_from, recipients, "msg_test")


MESSAGE = (b"Return-Path: <sender@agents.test>\r\nFrom: sender@agents.test\r\n"
           b"To: a@far.test\r\nSubject: hello\r\nMessage-ID: <m1@agents.test>\r\n\r\n"
           b"line one\r\n.leading dot\r\n")


def _row_error(server, queue_id):
    return query(_dsn(server), "SELECT last_error FROM outbound_queue WHERE id = %s",
                 (queue_id,))[0][0]


async def _settle(predicate, rounds=400):
    for _ in range(rounds):
        if predicate():
            return True
        await task.deferLater(reactor, 0.01, lambda: None)
    return False


# ---------------------------------------------------------------------- the wire


@pytest_twisted.ensureDeferred
async def test_several_recipients_go_in_one_pipelined_transaction_over_verified_tls(
        sink_factory):
    sink = sink_factory()
    transport = sink_factory.transport(sink)
    handoff = await transport.send(_envelope("a@far.test", "b@far.test", "c@far.test"),
                                   MESSAGE)
    assert [(o.address, o.status, o.transport_id) for o in handoff.outcomes] == [
        ("a@far.test", SENT, "Q1"), ("b@far.test", SENT, "Q1"), ("c@far.test", SENT, "Q1")]
    assert handoff.outcomes[0].status_code == "2.0.0"
    assert sink.connections == 1 and len(sink.messages) == 1
    [got] = sink.messages
    assert got.tls and got.user == USER
    assert got.recipients == ["a@far.test", "b@far.test", "c@far.test"]
    assert not got.data.startswith(b"Return-Path:")  # never carried by mail in transit
    assert b"\r\n.leading dot\r\n" in got.data  # dot-stuffing undone by the sink
    # MAIL, the three RCPTs and DATA reached the sink in one read: pipelined.
    batch = [c for c in sink.commands if c.verb in ("MAIL", "RCPT", "DATA")]
    assert [c.verb for c in batch] == ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
    assert len({c.read for c in batch}) == 1
    assert sink.verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert "AUTH PLAIN" in [c.line for c in sink.commands]  # the token is not logged


@pytest_twisted.ensureDeferred
async def test_without_pipelining_each_command_waits_for_its_reply(sink_factory):
    sink = sink_factory(pipelining=False)
    transport = sink_factory.transport(sink)
    handoff = await transport.send(_envelope("a@far.test", "b@far.test"), MESSAGE)
    assert {o.status for o in handoff.outcomes} == {SENT}
    batch = [c for c in sink.commands if c.verb in ("MAIL", "RCPT", "DATA")]
    assert len({c.read for c in batch}) == len(batch)


@pytest_twisted.ensureDeferred
async def test_auth_login_is_used_when_plain_is_not_offered(sink_factory):
    sink = sink_factory(auth="LOGIN")
    transport = sink_factory.transport(sink)
    handoff = await transport.send(_envelope("a@far.test"), MESSAGE)
    assert handoff.outcomes[0].status == SENT and sink.messages[0].user == USER
    assert "AUTH LOGIN" in [c.line for c in sink.commands]


@pytest_twisted.ensureDeferred
async def test_per_recipient_replies_map_to_sent_deferred_and_bounced(sink_factory):
    sink = sink_factory(rcpt={"busy@far.test": ["450 4.2.1 mailbox busy"],
                              "gone@far.test": ["550 5.1.1 no such user here"]})
    transport = sink_factory.transport(sink)
    handoff = await transport.send(
        _envelope("ok@far.test", "busy@far.test", "gone@far.test"), MESSAGE)
    by = {o.address: o for o in handoff.outcomes}
    assert by["ok@far.test"].status == SENT
    assert (by["busy@far.test"].status, by["busy@far.test"].smtp_code,
            by["busy@far.test"].status_code) == (DEFERRED, 450, "4.2.1")
    assert (by["gone@far.test"].status, by["gone@far.test"].status_code) == (FAILED, "5.1.1")
    assert "no such user here" in by["gone@far.test"].diagnostic
    assert sink.messages[0].recipients == ["ok@far.test"]


@pytest_twisted.ensureDeferred
async def test_all_recipients_refused_resets_and_keeps_the_connection(sink_factory):
    sink = sink_factory(rcpt={"gone@far.test": ["550 5.1.1 no such user"]})
    transport = sink_factory.transport(sink)
    first = await transport.send(_envelope("gone@far.test"), MESSAGE)
    assert first.outcomes[0].status == FAILED
    assert "RSET" in sink.verbs() and not sink.messages
    second = await transport.send(_envelope("ok@far.test"), MESSAGE)
    assert second.outcomes[0].status == SENT
    assert sink.connections == 1


@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_defers_and_nothing_goes_in_clear(sink_factory):
    other_ca = ensure_dev_tls(Path(tempfile.mkdtemp(prefix="other-ca-")) / "tls").ca_cert
    sink = sink_factory()
    transport = sink_factory.transport(sink, ca_file=str(other_ca))
    handoff = await transport.send(_envelope("a@far.test"), MESSAGE)
    [outcome] = handoff.outcomes
    assert outcome.status == DEFERRED and "TLS" in outcome.diagnostic
    assert "nothing was sent in clear" in outcome.diagnostic
    assert not sink.messages and "MAIL" not in sink.verbs() and not sink.auth_attempts


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_is_refused(sink_factory, dev_tls):
    sink = sink_factory()
    settings = SmarthostSettings(host="127.0.0.2", port=sink.port, helo="mx.test",
                                 ca_file=str(dev_tls.ca_cert))
    transport = SmarthostTransport(settings, clock=task.Clock(), reactor=reactor)
    try:
        handoff = await transport.send(_envelope("a@far.test"), MESSAGE)
    finally:
        transport.stop()
    assert handoff.outcomes[0].status == DEFERRED and not sink.messages


@pytest_twisted.ensureDeferred
async def test_replies_smuggled_behind_the_starttls_answer_drop_the_connection(sink_factory):
    """A man in the middle appending plain-text replies after the 220 must not have
    them read as answers inside TLS (RFC 3207 section 6)."""
    sink = sink_factory(inject_after_starttls=True)
    transport = sink_factory.transport(sink)
    [outcome] = (await transport.send(_envelope("a@far.test"), MESSAGE)).outcomes
    assert outcome.status == DEFERRED
    assert "data after its STARTTLS reply" in outcome.diagnostic
    assert "MAIL" not in sink.verbs() and not sink.auth_attempts and not sink.messages


@pytest_twisted.ensureDeferred
async def test_an_address_with_a_line_break_never_reaches_the_wire(sink_factory):
    sink = sink_factory()
    transport = sink_factory.transport(sink)
    handoff = await transport.send(
        _envelope("ok@far.test", "x@far.test>\r\nRSET\r\nRCPT TO:<evil@far.test"), MESSAGE)
    by = {o.address: o for o in handoff.outcomes}
    assert by["ok@far.test"].status == SENT
    assert [o.status_code for o in handoff.outcomes if o.status == FAILED] == ["5.1.3"]
    assert sink.messages[0].recipients == ["ok@far.test"] and "RSET" not in sink.verbs()


@pytest_twisted.ensureDeferred
async def test_no_starttls_with_tls_required_defers(sink_factory):
    sink = sink_factory(starttls=False)
    transport = sink_factory.transport(sink)
    [outcome] = (await transport.send(_envelope("a@far.test"), MESSAGE)).outcomes
    assert outcome.status == DEFERRED and "does not offer STARTTLS" in outcome.diagnostic
    assert "MAIL" not in sink.verbs() and not sink.auth_attempts


@pytest_twisted.ensureDeferred
async def test_opportunistic_tls_never_sends_credentials_in_clear(sink_factory):
    sink = sink_factory(starttls=False)
    transport = sink_factory.transport(sink, tls="opportunistic")
    [outcome] = (await transport.send(_envelope("a@far.test"), MESSAGE)).outcomes
    assert outcome.status == DEFERRED and "credentials" in outcome.diagnostic
    assert "AUTH" not in sink.verbs()
    anonymous = sink_factory.transport(sink, tls="opportunistic", username=None)
    [outcome] = (await anonymous.send(_envelope("a@far.test"), MESSAGE)).outcomes
    assert outcome.status == SENT and not sink.messages[0].tls


@pytest_twisted.ensureDeferred
async def test_a_refused_auth_defers_with_a_clear_error_and_no_password(server,
                                                                        sink_factory):
    sink = sink_factory()
    transport = sink_factory.transport(sink, password="wrong-password")
    message, _, _ = await _sent_message(server, "authfail")
    [queue_id] = await _enqueue(server, message, ["a@far.test"])
    await _worker(server, transport, _clock()).drain()
    assert _recipients(server, queue_id) == {"a@far.test": "deferred"}
    error = _row_error(server, queue_id)
    assert "refused AUTH" in error and "535 5.7.8" in error and USER in error
    assert "wrong-password" not in error
    assert not sink.messages


@pytest_twisted.ensureDeferred
async def test_mail_refused_for_missing_auth_waits_rather_than_bounces(sink_factory):
    sink = sink_factory(require_auth=True)
    transport = sink_factory.transport(sink, username=None)
    [outcome] = (await transport.send(_envelope("a@far.test"), MESSAGE)).outcomes
    assert (outcome.status, outcome.smtp_code) == (DEFERRED, 530)


# ---------------------------------------------------------------------- the pool


@pytest_twisted.ensureDeferred
async def test_two_queue_rows_reuse_one_connection(server, sink_factory):
    sink = sink_factory()
    transport = sink_factory.transport(sink)
    message, _, _ = await _sent_message(server, "reuse")
    ids = await _enqueue(server, message, ["a@one.test", "b@two.test"])
    assert len(ids) == 2
    await _worker(server, transport, _clock(), concurrency=1).drain()
    assert all(_recipients(server, q) == {r: "sent"} for q, r in
               zip(ids, ["a@one.test", "b@two.test"], strict=True))
    assert sink.connections == 1 and len(sink.messages) == 2
    assert sink.verbs().count("EHLO") == 2  # before and after STARTTLS, once
    [(transport_id,)] = query(_dsn(server), "SELECT transport_id FROM outbound_recipients "
                              "WHERE queue_id = %s", (ids[0],))
    assert transport_id == "Q1"


@pytest_twisted.ensureDeferred
async def test_the_pool_is_bounded_and_hand_offs_wait_for_a_connection(sink_factory):
    sink = sink_factory()
    transport = sink_factory.transport(sink, pool_size=2)
    results = await defer.gatherResults([
        defer.ensureDeferred(transport.send(_envelope(f"r{n}@far.test"), MESSAGE))
        for n in range(6)])
    assert all(h.outcomes[0].status == SENT for h in results)
    assert sink.connections == 2 and len(sink.messages) == 6
    assert transport.pool.idle == 2


@pytest_twisted.ensureDeferred
async def test_idle_connections_close_on_the_injected_clock(sink_factory):
    sink = sink_factory()
    clock = task.Clock()
    transport = sink_factory.transport(sink, clock=clock, idle_timeout_s=30.0)
    await transport.send(_envelope("a@far.test"), MESSAGE)
    assert transport.pool.idle == 1
    clock.advance(29)
    assert transport.pool.idle == 1
    clock.advance(1)
    assert transport.pool.idle == 0
    assert await _settle(lambda: sink.quits == 1 and not sink.open)
    await transport.send(_envelope("b@far.test"), MESSAGE)
    assert sink.connections == 2


@pytest_twisted.ensureDeferred
async def test_a_connection_the_smarthost_closed_is_replaced(sink_factory):
    sink = sink_factory()
    transport = sink_factory.transport(sink)
    await transport.send(_envelope("a@far.test"), MESSAGE)
    sink.drop_all()
    assert await _settle(lambda: transport.pool.idle == 0)
    [outcome] = (await transport.send(_envelope("b@far.test"), MESSAGE)).outcomes
    assert outcome.status == SENT and sink.connections == 2


@pytest_twisted.ensureDeferred
async def test_the_deadline_defers_a_hand_off_the_smarthost_never_answers(sink_factory):
    sink = sink_factory(hang_after_data=True)
    clock = task.Clock()
    transport = sink_factory.transport(sink, clock=clock, deadline_s=120.0)
    pending = defer.ensureDeferred(transport.send(_envelope("a@far.test"), MESSAGE))
    assert await _settle(lambda: len(sink.messages) == 1)
    assert not pending.called
    clock.advance(120)
    [outcome] = (await pending).outcomes
    assert outcome.status == DEFERRED and "within 120 s" in outcome.diagnostic
    assert transport.pool.idle == 0  # that connection is not reused


# ---------------------------------------------------------------------- 8-bit


LATIN1 = (b"From: sender@agents.test\r\nTo: a@far.test\r\nSubject: prix\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
          b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xe9\r\n")
UTF8 = LATIN1.replace(b"iso-8859-1", b"utf-8").replace(b"Caf\xe9", b"Caf\xc3\xa9")


@pytest_twisted.ensureDeferred
async def test_8bit_goes_as_8bitmime_when_offered(sink_factory):
    sink = sink_factory()
    transport = sink_factory.transport(sink)
    await transport.send(_envelope("a@far.test"), UTF8)
    assert "BODY=8BITMIME" in sink.messages[0].mail_params
    assert sink.messages[0].data == UTF8


@pytest_twisted.ensureDeferred
async def test_without_8bitmime_latin1_is_encoded_and_utf8_bounces(sink_factory):
    sink = sink_factory(eightbitmime=False)
    transport = sink_factory.transport(sink)
    [sent] = (await transport.send(_envelope("a@far.test"), LATIN1)).outcomes
    assert sent.status == SENT
    data = sink.messages[0].data
    assert data.isascii() and b"Caf=E9" in data and "BODY" not in sink.messages[0].mail_params
    [refused] = (await transport.send(_envelope("a@far.test"), UTF8)).outcomes
    assert (refused.status, refused.status_code) == (FAILED, "5.6.3")


@pytest_twisted.ensureDeferred
async def test_a_non_ascii_address_needs_smtputf8(sink_factory):
    sink = sink_factory(smtputf8=False)
    transport = sink_factory.transport(sink)
    [outcome] = (await transport.send(_envelope("jürgen@far.test"), MESSAGE)).outcomes
    assert (outcome.status, outcome.status_code) == (FAILED, "5.6.7")
    with_utf8 = sink_factory(smtputf8=True)
    transport = sink_factory.transport(with_utf8)
    [outcome] = (await transport.send(_envelope("jürgen@far.test"), MESSAGE)).outcomes
    assert outcome.status == SENT and "SMTPUTF8" in with_utf8.messages[0].mail_params


def test_queue_ids_are_read_from_common_250_texts():
    def reply(text):
        return SMTPReply(250, (text,))

    assert queue_id_of(reply("2.0.0 Ok: queued as 4Xq1Z2abc")) == "4Xq1Z2abc"
    assert queue_id_of(reply("Ok 0100018b2f-abc-000000")) == "0100018b2f-abc-000000"
    assert queue_id_of(reply("OK id=1rAbCd-0004Xy-Q1")) == "1rAbCd-0004Xy-Q1"
    assert queue_id_of(reply("2.0.0 Ok")) is None


# ---------------------------------------------------------------------- through the worker


@pytest_twisted.ensureDeferred
async def test_450_is_deferred_then_sent_on_the_retry(server, sink_factory):
    sink = sink_factory(rcpt={"busy@far.test": ["450 4.2.1 mailbox busy", "250 2.1.5 Ok"]})
    transport = sink_factory.transport(sink)
    message, _, _ = await _sent_message(server, "retry450")
    [queue_id] = await _enqueue(server, message, ["busy@far.test"])
    clock = _clock()
    worker = _worker(server, transport, clock)
    assert await worker.drain_once() == 1
    assert _recipients(server, queue_id) == {"busy@far.test": "deferred"}
    assert "450 4.2.1 mailbox busy" in _row_error(server, queue_id)
    clock.advance(59)
    assert await worker.drain_once() == 0
    clock.advance(1)
    assert await worker.drain_once() == 1
    assert _recipients(server, queue_id) == {"busy@far.test": "sent"}
    assert len(sink.messages) == 1 and sink.connections == 1


@pytest_twisted.ensureDeferred
async def test_550_bounces_with_a_dsn_in_the_senders_inbox(server, sink_factory):
    sink = sink_factory(rcpt={"gone@far.test": ["550 5.1.1 <gone@far.test>: no such user"]})
    transport = sink_factory.transport(sink)
    message, inbox, key = await _sent_message(server, "bounce550")
    [queue_id] = await _enqueue(server, message, ["gone@far.test", "ok@far.test"])
    await _worker(server, transport, _clock()).drain()
    assert _recipients(server, queue_id) == {"gone@far.test": "bounced", "ok@far.test": "sent"}
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                   key=key)).json["data"]
    [dsn] = [m for m in listed if m["subject"] == "Undelivered Mail Returned to Sender"]
    raw = (await server.api.get(f"/api/v1/messages/{dsn['id']}/raw", key=key)).body
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    [status] = [p for p in parsed.walk() if p.get_content_type() == "message/delivery-status"]
    block = status.get_payload()[1]
    assert block["Final-Recipient"] == "rfc822; gone@far.test"
    assert block["Status"] == "5.1.1" and "no such user" in block["Diagnostic-Code"]


# ---------------------------------------------------------------------- configuration


def _config(**outbound):
    from tests.conftest import make_config

    return make_config("postgresql://unused/x", outbound=outbound)


def test_the_configuration_is_checked(tmp_path):
    ok = _config(transport="smtp", smtp_host="relay.example", smtp_username="u",
                 smtp_password="p")
    assert ok.outbound.smtp_tls == "required" and ok.outbound.smtp_deadline == 100.0
    bad = [
        ({"transport": "smtp"}, "outbound.smtp_host"),
        ({"smtp_tls": "sometimes"}, "outbound.smtp_tls"),
        ({"smtp_username": "u"}, "outbound.smtp_password"),
        ({"smtp_password": "p", "smtp_password_file": str(tmp_path / "pw")},
         "outbound.smtp_password_file"),
        ({"smtp_ca_file": str(tmp_path / "missing.pem")}, "outbound.smtp_ca_file"),
        ({"smtp_pool_size": 0}, "outbound.smtp_pool_size"),
    ]
    (tmp_path / "pw").write_text("secret\n")
    for values, key in bad:
        with pytest.raises(ConfigError) as caught:
            _config(**values)
        assert caught.value.key == key


@pytest.mark.parametrize("values", [{"smtp_tls": "none"}, {"smtp_tls": "opportunistic"},
                                    {"smtp_tls_verify": False}])
def test_production_refuses_anything_but_verified_required_tls(values):
    from agentpost.config.loader import parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"environment": "production"}, "outbound": values},
                     environ={})
    assert caught.value.key == "outbound.smtp_tls"


def test_the_password_may_come_from_a_file_and_is_not_in_the_repr(tmp_path):
    (tmp_path / "pw").write_text("from-the-file\nignored\n")
    config = _config(transport="smtp", smtp_host="relay.example", smtp_username="u",
                     smtp_password_file=str(tmp_path / "pw"))
    transport = SmarthostTransport.from_config(config.outbound, hostname="mx.test",
                                               clock=task.Clock(), reactor=reactor)
    assert transport.settings.password == "from-the-file"
    assert "from-the-file" not in repr(transport.settings)


# ---------------------------------------------------------------------- the whole service


def smarthost_config(db_dsn, sink, dev_tls, tmp_path, poll_interval: str):
    """The service's config with the smtp transport pointed at ``sink`` (AUTH, the dev CA)."""
    from tests.conftest import make_config

    (tmp_path / "pw").write_text(PASSWORD + "\n")
    return make_config(db_dsn, outbound={
        "transport": "smtp", "smtp_host": "localhost", "smtp_port": sink.port,
        "smtp_ca_file": str(dev_tls.ca_cert), "smtp_username": USER,
        "smtp_password_file": str(tmp_path / "pw"), "poll_interval": poll_interval})


@pytest_twisted.ensureDeferred
async def test_the_service_with_transport_smtp_delivers_into_the_sink(
        db_dsn, openapi_checker, sink_factory, dev_tls, tmp_path):
    from tests.conftest import start_server

    sink = sink_factory()
    config = smarthost_config(db_dsn, sink, dev_tls, tmp_path, "1h")
    running = await start_server(config, openapi_checker)
    try:
        message, _, _ = await _sent_message(running, "fullrun")
        [queue_id] = await _enqueue(running, message, ["friend@example.org",
                                                       "other@example.org"])
        assert await _settle(lambda: _recipients(running, queue_id) == {
            "friend@example.org": "sent", "other@example.org": "sent"}, rounds=1000)
    finally:
        await running.service.stopService()
    [got] = sink.messages
    assert got.mail_from == "fullrun@agents.test" and got.tls and got.user == USER
    assert sorted(got.recipients) == ["friend@example.org", "other@example.org"]
    assert b"Subject: outbound" in got.data
