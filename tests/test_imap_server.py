"""Integration tests of the IMAP listeners: real sockets on 127.0.0.1, real TLS, imaplib.

imaplib blocks, so it runs in a thread (``deferToThread``) while the reactor serves
it. The backend is the in-memory fake of the protocol tests: this file tests the
IMAP door (framing, TLS, listener wiring), not the store behind it.
"""

from __future__ import annotations

import imaplib
import socket
import ssl
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from agentpost.dev.tls import ensure_dev_tls
from agentpost.imap.listener import IMAPFactory, listen_imap
from agentpost.tls import server_tls_options
from tests.test_imap_protocol import MSG_UTF8, FakeBackend, FakeStore, _plain


@pytest.fixture(scope="module")
def dev_tls(tmp_path_factory):
    return ensure_dev_tls(tmp_path_factory.mktemp("imap-tls"))


@pytest.fixture
def client_context(dev_tls):
    """A verifying client context that trusts only the dev CA."""
    return ssl.create_default_context(cafile=str(dev_tls.ca_cert))


@pytest.fixture
def backend():
    store = FakeStore()
    store.deliver("INBOX", _plain(1))
    store.deliver("INBOX", MSG_UTF8)
    return FakeBackend(store)


@pytest_twisted.async_yield_fixture
async def serve(dev_tls, backend):
    ports: list[Any] = []

    async def start(*, implicit: bool = False) -> int:
        options = server_tls_options(str(dev_tls.cert), str(dev_tls.key))
        factory = IMAPFactory(backend, hostname="localhost", clock=reactor,
                              tls_options=None if implicit else options,
                              implicit_tls=options if implicit else None)
        port = await listen_imap(reactor, factory, "127.0.0.1", 0)
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_imaplib_over_starttls(serve, client_context, backend):
    port = await serve()

    def client() -> dict[str, Any]:
        out: dict[str, Any] = {}
        imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        out["caps_before"] = imap.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("agent@example.com", "secret")
        imap.starttls(ssl_context=client_context)
        out["caps_after"] = imap.capabilities
        imap.login("agent@example.com", "secret")
        out["select"] = imap.select("INBOX")
        out["fetch"] = imap.fetch("1:*", "(UID FLAGS BODY.PEEK[])")
        out["header"] = imap.uid("FETCH", "2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out["store"] = imap.store("1", "+FLAGS", "(\\Flagged)")
        out["append"] = imap.append("Sent", "(\\Seen)", None, b"Subject: x\r\n\r\nhi\r\n")
        out["append_missing"] = imap.append("Nope", None, None, b"Subject: x\r\n\r\nhi\r\n")
        out["copy"] = imap.copy("1:2", "Trash")
        out["search"] = imap.search(None, "FLAGGED")
        imap.store("2", "+FLAGS.SILENT", "(\\Deleted)")
        out["expunge"] = imap.expunge()
        out["logout"] = imap.logout()
        return out

    out = await deferToThread(client)
    assert b"LOGINDISABLED" not in b" ".join(c.encode() for c in out["caps_after"])
    assert "LOGINDISABLED" in out["caps_before"] and "STARTTLS" in out["caps_before"]
    assert "AUTH=PLAIN" in out["caps_after"]
    assert out["select"] == ("OK", [b"2"])
    typ, data = out["fetch"]
    assert typ == "OK"
    assert data[0][1] == _plain(1) and data[2][1] == MSG_UTF8
    assert out["header"][1][0][1] == (b"Subject: =?utf-8?q?first?=\r\n"
                                      b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n\r\n")
    assert out["store"][0] == "OK"
    assert out["append"] == ("OK", [b"[APPENDUID 1000 1] APPEND completed"])
    assert out["append_missing"] == ("NO", [b"[TRYCREATE] Mailbox does not exist"])
    assert out["copy"] == ("OK", [b"[COPYUID 1000 1:2 1:2] COPY completed"])
    assert out["search"] == ("OK", [b"1"])
    assert out["expunge"] == ("OK", [b"2"])
    assert out["logout"][0] == "BYE"
    assert backend.shared.folders["Sent"].messages[1].flags == {"\\Seen"}


@pytest_twisted.ensureDeferred
async def test_imaplib_over_implicit_tls(serve, client_context, backend):
    port = await serve(implicit=True)

    def client() -> dict[str, Any]:
        out: dict[str, Any] = {}
        imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_context, timeout=10)
        out["caps"] = imap.capabilities
        imap.login("agent@example.com", "secret")
        out["list"] = imap.list()
        out["examine"] = imap.select("INBOX", readonly=True)
        out["fetch"] = imap.fetch("2", "(BODY[TEXT] FLAGS)")
        imap.logout()
        return out

    out = await deferToThread(client)
    assert "STARTTLS" not in out["caps"] and "AUTH=PLAIN" in out["caps"]
    assert out["list"][1][0] == b'(\\HasNoChildren) "/" "INBOX"'
    assert out["examine"][0] == "OK"
    body = MSG_UTF8[MSG_UTF8.index(b"\r\n\r\n") + 4:]
    assert out["fetch"][1][0][1] == body
    assert backend.shared.folders["INBOX"].messages[2].flags == frozenset()  # EXAMINE: peek


@pytest_twisted.ensureDeferred
async def test_starttls_injection_over_socket(serve, client_context, backend):
    port = await serve()

    def client() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.recv(4096)
            sock.sendall(b"a STARTTLS\r\nb LOGIN agent@example.com secret\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                reply += sock.recv(4096)
            assert reply == b"a OK Begin TLS negotiation now\r\n"
            tls = client_context.wrap_socket(sock, server_hostname="127.0.0.1")
            tls.sendall(b"c NOOP\r\n")
            return tls.recv(4096)

    assert await deferToThread(client) == b"c OK NOOP completed\r\n"
    assert backend.attempts == []
