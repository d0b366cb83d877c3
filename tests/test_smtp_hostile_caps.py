"""Connection caps against one IPv6 client (smtphostile).

The per-address cap counted exact addresses, but an IPv6 client holds a whole /64 (the
login throttle already counts it so): from one /64 a single host could open sessions
from as many addresses as it liked, up to the total cap, and so shut every other
sender out of the MX.  The cap now counts the /64 (and IPv4-mapped IPv6 as its IPv4
address), as the login throttle does.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from agentpost.listening import cap_key
from agentpost.smtp.listener import SMTPFactory


class _Agent:
    """A delivery agent never asked anything here (only greetings are exchanged)."""

    async def check_sender(self, session: Any, mail_from: str) -> None:
        raise AssertionError("not reached")


def _connect(factory: SMTPFactory, host: str) -> StringTransport:
    address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 40000)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    transport.protocol = protocol
    return transport


def test_one_ipv6_slash_64_is_one_client_for_the_per_address_cap():
    factory = SMTPFactory(_Agent(), hostname="mx.test", clock=Clock(),
                          max_connections_per_ip=2, max_connections=100)
    first, second, third = (_connect(factory, f"2001:db8:1:2::{n:x}") for n in (1, 0xbeef, 7))
    assert first.value().startswith(b"220 ") and second.value().startswith(b"220 ")
    assert third.value().startswith(b"421 4.7.0 mx.test Too many connections from your address")
    # Another /64 is another client; closing a session frees its /64's slot.
    assert _connect(factory, "2001:db8:1:3::1").value().startswith(b"220 ")
    first.protocol.connectionLost(None)
    assert factory.connections_by_ip == {"2001:db8:1:2::/64": 1, "2001:db8:1:3::/64": 1}
    assert _connect(factory, "2001:db8:1:2:ffff::9").value().startswith(b"220 ")


@pytest.mark.parametrize(("host", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:DB8::1", "2001:db8::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("", ""),
    ("unix-socket", "unix-socket"),
])
def test_the_cap_key(host, key):
    assert cap_key(host) == key
