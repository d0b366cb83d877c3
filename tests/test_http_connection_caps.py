"""The HTTP listener caps connections per client address and in all, as SMTP and IMAP
do: a connection over a cap gets one JSON 503 (security headers included) and is
closed; a closed connection gives its place back; a trusted proxy, which carries
everyone's requests, is held only to the total."""

from __future__ import annotations

import json
import socket

import pytest_twisted
from twisted.internet import threads

from tests.conftest import make_config, start_server
from tests.helpers import http_answers, read_until_closed

_GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _scenario(port: int, held: int) -> tuple[list[bytes], bytes]:
    """Hold ``held`` idle connections, then try one more; close one, try again."""
    idle = [_connect(port) for _ in range(held)]
    try:
        over = _connect(port)
        over.sendall(_GET)
        refused = read_until_closed(over)
        over.close()
        idle.pop().close()
        answers = []
        for _ in range(20):  # the close reaches the server a moment later
            again = _connect(port)
            again.sendall(_GET)
            answers.append(read_until_closed(again))
            again.close()
            if answers[-1].startswith(b"HTTP/1.1 200"):
                break
        return answers, refused
    finally:
        for sock in idle:
            sock.close()


async def _server(db_dsn, checker, **http):
    return await start_server(make_config(db_dsn, http=http), checker)


@pytest_twisted.ensureDeferred
async def test_a_connection_over_the_per_address_cap_gets_a_json_503(db_dsn, openapi_checker):
    server = await _server(db_dsn, openapi_checker, max_connections_per_ip=3)
    try:
        port = int(server.base_url.rsplit(":", 1)[1])
        answers, refused = await threads.deferToThread(_scenario, port, 3)
    finally:
        await server.service.stopService()
    [(status, fields, body)] = http_answers(refused)
    assert status == b"HTTP/1.1 503 Service Unavailable", refused
    assert json.loads(body)["error"]["type"] == "temporarily_unavailable"
    assert fields[b"x-content-type-options"] == [b"nosniff"], fields
    assert b"retry-after" in fields
    assert answers[-1].startswith(b"HTTP/1.1 200"), answers  # the place came back


@pytest_twisted.ensureDeferred
async def test_a_trusted_proxy_is_held_to_the_total_only(db_dsn, openapi_checker):
    server = await _server(db_dsn, openapi_checker, max_connections_per_ip=1,
                           max_connections=3, trusted_proxies=["127.0.0.1"])
    try:
        port = int(server.base_url.rsplit(":", 1)[1])
        answers, refused = await threads.deferToThread(_scenario, port, 3)
    finally:
        await server.service.stopService()
    # three connections from the proxy's one address were let in (the per-address cap
    # is 1); the fourth met the total
    assert refused.startswith(b"HTTP/1.1 503"), refused
    assert answers[-1].startswith(b"HTTP/1.1 200"), answers


def test_an_ipv6_trusted_proxy_is_recognised_under_its_64():
    """The caps count an IPv6 client as its /64; a trusted IPv6 proxy must be found
    under that same key, or it would be held to the per-address cap."""
    from twisted.web.resource import Resource

    from agentpost.http.site import AgentPostSite

    site = AgentPostSite(Resource(), max_body_bytes=None, max_connections_per_ip=1,
                         max_connections=3, trusted_proxies=frozenset({"2001:db8::7"}))
    key = "2001:db8::/64"
    assert [site.admit(key) for _ in range(3)] == [None, None, None]
    assert site.admit(key) is not None  # the total still applies
    other = "2001:db9::/64"
    assert site.admit(other) is not None  # (the total is reached)
