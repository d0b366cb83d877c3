"""DKIM signing for the smarthost: RSA and Ed25519 signatures that dkimpy verifies with a
DNS look-up function serving the public key, oversigned From, the per-(org, domain) key
cache on the injected clock, broken keys, and a signed message through the transport
into the sink (after 8-bit conversion, so the signature covers the bytes sent)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import reactor, task

from agentpost.outbound.dkim_signing import (
    DkimKeyError,
    DkimSigner,
    from_domain,
    prepare_key,
    sign_message,
)
from agentpost.outbound.smarthost import SmarthostSettings, SmarthostTransport
from agentpost.outbound.transports import DEFERRED, SENT, Envelope
from tests.smtp_sink import SinkScript, SMTPSink

MESSAGE = (b"From: Agent <agent@example.com>\r\nTo: someone@far.test\r\n"
           b"Subject: signed\r\nDate: Thu, 03 Dec 2026 04:00:00 +0000\r\n"
           b"Message-ID: <s1@example.com>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nX-Other: not signed\r\n\r\n"
           b"Hello,\r\n\r\nthis is signed.\r\n")


@dataclass(frozen=True)
class Key:
    """Shaped like agentpost.core.domains.DkimKey."""

    domain: str
    selector: str
    algorithm: str
    private_key_pem: bytes


def _rsa() -> tuple[Key, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    return Key("example.com", "ap1", "rsa", pem), record


def _ed25519() -> tuple[Key, bytes]:
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)
    return Key("example.com", "ap2", "ed25519", pem), record


RSA_KEY, RSA_RECORD = _rsa()
ED_KEY, ED_RECORD = _ed25519()


def _dns(records: dict[str, bytes]):
    def lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.rstrip("."))
    return lookup


def _verify(signed: bytes) -> bool:
    return dkim.verify(signed, dnsfunc=_dns({"ap1._domainkey.example.com": RSA_RECORD,
                                             "ap2._domainkey.example.com": ED_RECORD}))


class Keys:
    """A DkimKeys source that counts look-ups."""

    def __init__(self, key=RSA_KEY) -> None:
        self.key = key
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, org_id, domain):
        self.calls.append((org_id, domain))
        return self.key if (org_id, domain) == ("org_a", "example.com") else None


@pytest.mark.parametrize(("key", "tag"), [(RSA_KEY, b"a=rsa-sha256"),
                                          (ED_KEY, b"a=ed25519-sha256")])
def test_a_signature_verifies_with_the_published_key(key, tag):
    header = sign_message(MESSAGE, "example.com", prepare_key(key))
    signed = header + MESSAGE
    assert header.startswith(b"DKIM-Signature:") and header.endswith(b"\r\n")
    assert tag in header and b"c=relaxed/relaxed" in header
    assert _verify(signed)
    assert not _verify(signed.replace(b"this is signed", b"this is forged"))


def test_the_listed_headers_are_signed_and_from_is_oversigned():
    header = sign_message(MESSAGE, "example.com", prepare_key(RSA_KEY))
    tags = dict(part.strip().split("=", 1) for part in
                header.decode().split(":", 1)[1].replace("\r\n", "").split(";") if "=" in part)
    signed = [h.strip() for h in tags["h"].replace(" ", "").split(":")]
    assert signed == ["from", "to", "subject", "date", "message-id", "mime-version",
                      "content-type", "from"]
    assert tags["d"] == "example.com" and tags["s"] == "ap1"
    # A second From added after signing breaks the signature (oversigning).
    body_at = MESSAGE.index(b"\r\n\r\n")
    tampered = MESSAGE[:body_at] + b"\r\nFrom: evil@attacker.test" + MESSAGE[body_at:]
    assert not _verify(header + tampered)
    # An unsigned field may change without breaking it.
    assert _verify(header + MESSAGE.replace(b"X-Other: not signed", b"X-Other: changed"))


def test_the_from_domain_is_what_selects_the_key():
    assert from_domain(MESSAGE) == "example.com"
    assert from_domain(b"From: \"A, B\" <x@Sub.Example.ORG>\r\n\r\nbody") == "sub.example.org"
    assert from_domain(b"To: x@y\r\n\r\nbody") is None


def test_a_key_of_the_wrong_kind_is_refused():
    wrong = Key("example.com", "s", "ed25519", RSA_KEY.private_key_pem)
    with pytest.raises(DkimKeyError):
        prepare_key(wrong)
    with pytest.raises(DkimKeyError):
        prepare_key(Key("example.com", "s", "rsa", b"not a pem"))
    assert "PRIVATE" not in repr(prepare_key(RSA_KEY))


@pytest_twisted.ensureDeferred
async def test_the_signer_signs_only_with_the_organizations_key_and_caches_it():
    keys = Keys()
    clock = task.Clock()
    signer = DkimSigner(keys, clock, reactor, cache_ttl_s=300.0)
    signed = await signer.sign("org_a", MESSAGE)
    assert signed.startswith(b"DKIM-Signature:") and _verify(signed)
    assert await signer.sign("org_b", MESSAGE) == MESSAGE  # not org_b's domain
    await signer.sign("org_a", MESSAGE)
    assert keys.calls == [("org_a", "example.com"), ("org_b", "example.com")]
    clock.advance(301)
    await signer.sign("org_a", MESSAGE)
    assert len(keys.calls) == 3  # looked up again once the cache entry is stale
    assert await signer.sign("org_a", b"To: x@y\r\n\r\nno from\r\n") == b"To: x@y\r\n\r\n" \
        b"no from\r\n"


LATIN1 = (b"From: agent@example.com\r\nTo: a@far.test\r\nSubject: prix\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
          b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xe9 cr\xe8me\r\n.dot line\r\n")


@pytest.fixture
def sink(dev_tls):
    sink = SMTPSink(str(dev_tls.cert), str(dev_tls.key),
                    SinkScript(eightbitmime=False, users={"u": "p"}))
    port = reactor.listenTCP(0, sink, interface="127.0.0.1")
    sink.port = port.getHost().port
    yield sink
    pytest_twisted.blockon(port.stopListening())


def _transport(sink, dev_tls, keys) -> SmarthostTransport:
    settings = SmarthostSettings(host="localhost", port=sink.port, helo="mx.test",
                                 ca_file=str(dev_tls.ca_cert), username="u", password="p")
    return SmarthostTransport(settings, clock=task.Clock(), reactor=reactor,
                              signer=DkimSigner(keys, task.Clock(), reactor))


@pytest_twisted.ensureDeferred
async def test_mail_through_the_smarthost_arrives_signed_after_8bit_conversion(sink,
                                                                              dev_tls):
    transport = _transport(sink, dev_tls, Keys(ED_KEY))
    try:
        handoff = await transport.send(
            Envelope("obq_1", "org_a", "agent@example.com", ("a@far.test",), "msg_1"), LATIN1)
    finally:
        transport.stop()
    assert handoff.outcomes[0].status == SENT
    [got] = sink.messages
    assert got.data.startswith(b"DKIM-Signature:") and got.data.isascii()
    assert b"Caf=E9" in got.data and _verify(got.data)


@pytest_twisted.ensureDeferred
async def test_a_broken_key_defers_instead_of_sending_unsigned(sink, dev_tls):
    broken = Key("example.com", "s", "rsa", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                 b"-----END PRIVATE KEY-----\n")
    transport = _transport(sink, dev_tls, Keys(broken))
    try:
        handoff = await transport.send(
            Envelope("obq_2", "org_a", "agent@example.com", ("a@far.test",), "msg_2"),
            MESSAGE)
        [outcome] = handoff.outcomes
        assert outcome.status == DEFERRED and "DKIM" in outcome.diagnostic
        assert not sink.messages
        assert transport.pool.idle == 1  # the connection itself was fine
    finally:
        transport.stop()


def test_the_domains_key_type_is_what_the_signer_takes():
    from agentpost.core.domains import DkimKey as StoredKey

    for key in (RSA_KEY, ED_KEY):
        stored = StoredKey(key.domain, key.selector, key.algorithm, key.private_key_pem)
        assert _verify(sign_message(MESSAGE, "example.com", prepare_key(stored)) + MESSAGE)


@pytest_twisted.ensureDeferred
async def test_the_service_signs_with_the_organizations_sealed_key(
        db_dsn, openapi_checker, sink, dev_tls, tmp_path):
    """The whole chain: setup.build_transport -> the key sealed in PostgreSQL, opened
    with secrets.key_file -> a signature that verifies against the domain's record."""
    from agentpost.auth.sealing import generate_key_file, load_sealer
    from agentpost.core.domains import generate_key, key_context
    from agentpost.model.ids import new_id
    from agentpost.storage import domains as domain_store
    from tests.conftest import make_config, start_server

    key_file = tmp_path / "secrets.key"
    generate_key_file(key_file)
    config = make_config(db_dsn, secrets={"key_file": str(key_file)}, outbound={
        "transport": "smtp", "smtp_host": "localhost", "smtp_port": sink.port,
        "smtp_ca_file": str(dev_tls.ca_cert), "smtp_username": "u", "smtp_password": "p",
        "poll_interval": "1h"})
    running = await start_server(config, openapi_checker)
    try:
        org, api_key = await running.new_org()
        inbox = (await running.api.post("/api/v1/inboxes", {"username": "signer"},
                                        key=api_key)).json
        pem, public = generate_key("rsa")
        domain_id = new_id("dom")
        sealed = load_sealer(key_file).seal(pem, key_context(org["id"], domain_id))
        await running.core.db.run_interaction(
            "test.domain", lambda txn: domain_store.insert_domain(
                txn, org_id=org["id"], domain_id=domain_id,
                environment_id=inbox["environment_id"], name="signed.example",
                mail_from_subdomain=None, dkim_mode="own", dkim_selector="ap9",
                dkim_algorithm="rsa", dkim_public_key=public, dkim_private_sealed=sealed))
        raw = MESSAGE.replace(b"agent@example.com", b"agent@signed.example")
        transport = running.core.outbound.transport
        handoff = await transport.send(Envelope("obq_s", org["id"], "agent@signed.example",
                                                ("a@far.test",), "msg_s"), raw)
        other_org = await transport.send(Envelope("obq_t", "org_other", "agent@signed.example",
                                                  ("a@far.test",), "msg_t"), raw)
    finally:
        await running.service.stopService()
    assert handoff.outcomes[0].status == SENT and other_org.outcomes[0].status == SENT
    signed, unsigned = (m.data for m in sink.messages)
    record = b"v=DKIM1; k=rsa; p=" + public.encode()
    assert dkim.verify(signed, dnsfunc=_dns({"ap9._domainkey.signed.example": record}))
    assert not unsigned.startswith(b"DKIM-Signature:")  # another tenant's mail: not signed
