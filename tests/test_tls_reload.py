"""SIGHUP's TLS reload: new handshakes get the new certificate, open connections live on."""

import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from agentpost.dev.tls import ensure_dev_tls
from agentpost.listening import listen_tcp
from agentpost.tls import ReloadableServerTLS


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


def _peer_cert(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


@pytest_twisted.ensureDeferred
async def test_reload_swaps_certificate_for_new_connections(tmp_path):
    first = ensure_dev_tls(tmp_path / "a", hostnames=("localhost",))
    second = ensure_dev_tls(tmp_path / "b", hostnames=("localhost",))
    live = tmp_path / "live"
    live.mkdir()
    (live / "cert.pem").write_bytes(first.cert.read_bytes())
    (live / "key.pem").write_bytes(first.key.read_bytes())
    tls = ReloadableServerTLS(str(live / "cert.pem"), str(live / "key.pem"))
    port = await listen_tcp(reactor, Factory.forProtocol(Echo), "127.0.0.1", 0, tls_options=tls)
    number = port.getHost().port
    try:
        before = await deferToThread(_peer_cert, number, str(first.ca_cert))
        # an open connection made before the reload
        ctx = ssl.create_default_context(cafile=str(first.ca_cert))
        raw = socket.create_connection(("127.0.0.1", number), timeout=10)
        old = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
        await deferToThread(old.do_handshake)

        (live / "cert.pem").write_bytes(second.cert.read_bytes())
        (live / "key.pem").write_bytes(second.key.read_bytes())
        tls.reload()
        after = await deferToThread(_peer_cert, number, str(second.ca_cert))
        assert before != after

        def echo():
            old.sendall(b"still here")
            return old.recv(100)

        assert await deferToThread(echo) == b"still here"
        old.close()

        # unusable files: reload raises, the current certificate stays
        (live / "key.pem").write_bytes(b"garbage")
        with pytest.raises(Exception):  # noqa: B017 - whatever OpenSSL raises
            tls.reload()
        assert await deferToThread(_peer_cert, number, str(second.ca_cert)) == after
    finally:
        await port.stopListening()
