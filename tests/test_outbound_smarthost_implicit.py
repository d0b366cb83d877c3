"""The smarthost transport with implicit TLS (RFC 8314, port 465) against the test-owned
ESMTP sink listening with TLS from the first byte: verified certificate and SNI, AUTH,
pipelining, the pool, the deadline on the injected clock, failures that defer before a
byte of SMTP, and the configuration's rules."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from agentpost.config.loader import ConfigError
from agentpost.dev.tls import ensure_dev_tls
from agentpost.outbound.smarthost import SmarthostSettings, SmarthostTransport
from agentpost.outbound.transports import DEFERRED, SENT
from tests import test_outbound_smarthost as base
from tests.test_outbound_smarthost import MESSAGE, USER, _config, _envelope, _settle

sink_factory = base.sink_factory  # the sink fixture, shared with the STARTTLS tests


@pytest_twisted.ensureDeferred
async def test_implicit_tls_sends_pipelined_with_auth_and_sni(sink_factory):
    sink = sink_factory(implicit_tls=True)
    transport = sink_factory.transport(sink, tls="implicit")
    handoff = await transport.send(_envelope("a@far.test", "b@far.test"), MESSAGE)
    assert [o.status for o in handoff.outcomes] == [SENT, SENT]
    assert handoff.outcomes[0].transport_id == "Q1"
    [got] = sink.messages
    assert got.tls and got.user == USER and got.recipients == ["a@far.test", "b@far.test"]
    # Inside TLS from the first byte: EHLO once, no STARTTLS, then AUTH.
    assert sink.verbs()[:2] == ["EHLO", "AUTH"] and "STARTTLS" not in sink.verbs()
    assert sink.server_names == [b"localhost"]  # SNI carries the configured name
    batch = [c for c in sink.commands if c.verb in ("MAIL", "RCPT", "DATA")]
    assert [c.verb for c in batch] == ["MAIL", "RCPT", "RCPT", "DATA"]
    assert len({c.read for c in batch}) == 1  # pipelined


@pytest_twisted.ensureDeferred
async def test_implicit_tls_reuses_one_pooled_connection_and_idles_out(sink_factory):
    sink = sink_factory(implicit_tls=True)
    clock = task.Clock()
    transport = sink_factory.transport(sink, tls="implicit", clock=clock, pool_size=2,
                                       idle_timeout_s=30.0)
    for n in range(3):
        [outcome] = (await transport.send(_envelope(f"r{n}@far.test"), MESSAGE)).outcomes
        assert outcome.status == SENT
    assert sink.connections == 1 and len(sink.messages) == 3
    results = await defer.gatherResults([
        defer.ensureDeferred(transport.send(_envelope(f"p{n}@far.test"), MESSAGE))
        for n in range(5)])
    assert all(h.outcomes[0].status == SENT for h in results) and sink.connections == 2
    clock.advance(30)
    assert transport.pool.idle == 0
    assert await _settle(lambda: sink.quits == 2 and not sink.open)


@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_defers_before_any_smtp(sink_factory):
    other_ca = ensure_dev_tls(Path(tempfile.mkdtemp(prefix="other-ca-")) / "tls").ca_cert
    sink = sink_factory(implicit_tls=True)
    transport = sink_factory.transport(sink, tls="implicit", ca_file=str(other_ca))
    [outcome] = (await transport.send(_envelope("a@far.test"), MESSAGE)).outcomes
    assert outcome.status == DEFERRED and outcome.status_code == "4.7.5"
    assert "certificate verify failed" in outcome.diagnostic
    assert not sink.commands and not sink.messages and not sink.auth_attempts


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_is_refused(sink_factory, dev_tls):
    sink = sink_factory(implicit_tls=True)
    settings = SmarthostSettings(host="127.0.0.2", port=sink.port, helo="mx.test",
                                 tls="implicit", ca_file=str(dev_tls.ca_cert))
    transport = SmarthostTransport(settings, clock=task.Clock(), reactor=reactor)
    try:
        [outcome] = (await transport.send(_envelope("a@far.test"), MESSAGE)).outcomes
    finally:
        transport.stop()
    assert outcome.status == DEFERRED and not sink.commands


@pytest_twisted.ensureDeferred
async def test_implicit_tls_against_a_plain_server_defers(sink_factory):
    sink = sink_factory()  # plain text greeting: not a TLS server
    clock = task.Clock()
    transport = sink_factory.transport(sink, tls="implicit", clock=clock, deadline_s=60.0)
    pending = defer.ensureDeferred(transport.send(_envelope("a@far.test"), MESSAGE))
    # Either the handshake fails on the plain greeting or it waits: the deadline ends it.
    await _settle(lambda: pending.called, rounds=50)
    if not pending.called:
        clock.advance(60)
    [outcome] = (await pending).outcomes
    assert outcome.status == DEFERRED and not sink.messages and not sink.auth_attempts
    assert "EHLO" not in sink.verbs()


@pytest_twisted.ensureDeferred
async def test_the_deadline_applies_inside_implicit_tls(sink_factory):
    sink = sink_factory(implicit_tls=True, hang_after_data=True)
    clock = task.Clock()
    transport = sink_factory.transport(sink, tls="implicit", clock=clock, deadline_s=90.0)
    pending = defer.ensureDeferred(transport.send(_envelope("a@far.test"), MESSAGE))
    assert await _settle(lambda: len(sink.messages) == 1)
    clock.advance(90)
    [outcome] = (await pending).outcomes
    assert outcome.status == DEFERRED and "within 90 s" in outcome.diagnostic


def test_the_configuration_accepts_implicit_and_production_keeps_verification():
    from agentpost.config.loader import parse_config

    ok = _config(transport="smtp", smtp_host="relay.example", smtp_port=465,
                 smtp_tls="implicit")
    assert ok.outbound.smtp_tls == "implicit"
    prod = parse_config({"server": {"environment": "production"},
                         "outbound": {"smtp_tls": "implicit"}}, environ={})
    assert prod.outbound.smtp_tls == "implicit"
    for values in ({"smtp_tls": "implicit", "smtp_tls_verify": False}, {"smtp_tls": "none"}):
        with pytest.raises(ConfigError) as caught:
            parse_config({"server": {"environment": "production"}, "outbound": values},
                         environ={})
        assert caught.value.key == "outbound.smtp_tls"
