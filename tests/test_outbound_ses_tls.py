"""The SES endpoint's certificate is verified: an HTTPS endpoint whose certificate no
trusted CA vouches for (here the test run's development CA, which the system store does
not hold) gets no request at all -- the hand-off is deferred before any HTTP is spoken,
so neither the message nor the signed request reaches an impostor."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest_twisted
from twisted.internet import reactor, task

from agentpost.outbound.ses import SESTransport
from agentpost.outbound.transports import DEFERRED, Envelope
from tests.aws import AWS_ACCESS_KEY_ID, AWS_REGION, AWS_SECRET_ACCESS_KEY
from tests.mailfactory import make_message


class Impostor:
    """A TLS server on loopback with a certificate for ``localhost`` from the dev CA. It
    records every byte of HTTP it reads (only a client that accepted the handshake can
    send any) and never answers."""

    def __init__(self, cert: str, key: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.received = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    tls = self.context.wrap_socket(conn, server_side=True)
                    self.handshakes += 1
                    self.received += tls.recv(65536)
                except (OSError, ssl.SSLError):
                    continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest_twisted.ensureDeferred
async def test_an_endpoint_with_an_untrusted_certificate_gets_nothing_and_mail_waits(dev_tls):
    impostor = Impostor(str(dev_tls.cert), str(dev_tls.key))
    transport = SESTransport(region=AWS_REGION, clock=task.Clock(), reactor=reactor,
                             endpoint_url=f"https://localhost:{impostor.port}",
                             access_key_id=AWS_ACCESS_KEY_ID,
                             secret_access_key=AWS_SECRET_ACCESS_KEY, max_send_rate=1000.0,
                             connect_timeout_s=2.0, read_timeout_s=0.5)
    transport.start()
    try:
        handoff = await transport.send(
            Envelope("obq_tls", "org_tls", "sender@agents.test", ["friend@example.org"],
                     "msg_tls"), make_message(to="friend@example.org"))
    finally:
        transport.stop()
        impostor.stop()
    [outcome] = handoff.outcomes
    assert outcome.status == DEFERRED and outcome.status_code.startswith("4."), outcome
    assert "certificate verify failed" in (outcome.diagnostic or ""), outcome
    assert (impostor.handshakes, impostor.received) == (0, b"")  # no HTTP reached it
