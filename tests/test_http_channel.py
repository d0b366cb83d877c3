"""Requests Twisted's HTTP parser refuses still get our JSON error and security headers.

Raw sockets, because an HTTP client library would not send these requests: a URL or a
header line over 16 KiB, too many headers, a negative or doubled length, a body over the
limit. Each answer must be the project's JSON error with the security headers, and then
the connection must be closed.
"""

from __future__ import annotations

import json
import socket

import pytest_twisted
from twisted.internet import threads

from tests.helpers import SECURITY_HEADERS

HOST = b"Host: 127.0.0.1\r\n"


def _exchange(port: int, payload: bytes, timeout_s: float = 10.0) -> tuple[bytes, bool]:
    """Send ``payload``, read until the server closes; (everything read, closed?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return b"".join(chunks), False
            if not data:
                return b"".join(chunks), True
            chunks.append(data)


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def _refused(server, payload: bytes, status: int, type_: str) -> dict[str, str]:
    port = int(server.base_url.rsplit(":", 1)[1])
    answer, closed = await threads.deferToThread(_exchange, port, payload)
    assert answer, f"no answer for {payload[:60]!r}"
    got, headers, body = _parse(answer)
    assert got == status, (payload[:60], answer[:300])
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == type_ and error["message"]
    assert error["request_id"] == headers["x-request-id"] and error["request_id"].startswith(
        "req_")
    for name in SECURITY_HEADERS:
        assert name in headers, (name, answer[:300])
    assert headers["x-frame-options"] == "DENY" and "server" not in headers
    assert closed, f"connection left open after {status}"
    return headers


@pytest_twisted.ensureDeferred
async def test_oversized_and_malformed_requests_get_json_errors_then_close(server):
    """414, 431, 400 and 413 from the channel: JSON, security headers, closed."""
    get = b"GET /api/v1/inboxes HTTP/1.1\r\n" + HOST
    cases = [
        (b"GET /api/v1/inboxes?q=" + b"a" * 17_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
         414, "uri_too_long"),
        (get + b"X-Big: " + b"a" * 17_000 + b"\r\n\r\n", 431, "header_fields_too_large"),
        (get + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n", 431,
         "header_fields_too_large"),
        (get + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 9000) for i in range(5)) + b"\r\n",
         431, "header_fields_too_large"),
        (b"POST /api/v1/inboxes HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n", 400,
         "invalid_request"),
        (b"POST /api/v1/inboxes HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "invalid_request"),
        (b"POST /api/v1/inboxes HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
         b"Content-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, "invalid_request"),
        (get + b"X-Nul: a\x00b\r\n\r\n", 400, "invalid_request"),
        # Not the channel's refusal but Klein's (in text/plain until now): an ordinary
        # answer, so the client asks for the close.
        (b"GET /api/v1/inboxes/inb_%FF HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n",
         400, "invalid_request"),
    ]
    for payload, status, type_ in cases:
        await _refused(server, payload, status, type_)


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    """A declared length over [http] max_body is 413 at once; a chunked body as soon as
    it passes the limit; either way the client can read the answer while still sending."""
    limit = server.service.config.http.max_body
    declared = (b"POST /api/v1/inboxes HTTP/1.1\r\n" + HOST +
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (10**12)
                + b"x" * 100_000)
    headers = await _refused(server, declared, 413, "payload_too_large")
    assert headers["connection"] == "close"
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    chunked = (b"POST /api/v1/inboxes HTTP/1.1\r\n" + HOST +
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunk * (limit // (64 * 1024) + 2))
    await _refused(server, chunked, 413, "payload_too_large")
    # Exactly at the limit is still the route's business (a 4xx about the JSON, not 413).
    port = int(server.base_url.rsplit(":", 1)[1])
    _, owner = await server.new_org()
    body = b'{"display_name": "' + b"x" * (limit - 20) + b'"}'
    body += b" " * (limit - len(body))
    answer, _ = await threads.deferToThread(_exchange, port, (
        b"POST /api/v1/inboxes HTTP/1.1\r\n" + HOST + b"Connection: close\r\n"
        b"Authorization: Bearer " + owner.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body))
    status, _, reply = _parse(answer)
    assert status == 400 and b'"field":"display_name"' in reply, answer[:300]  # chunked


@pytest_twisted.ensureDeferred
async def test_good_requests_on_one_connection_still_work(server):
    """Keep-alive and pipelining are untouched by the channel's limits."""
    _, owner = await server.new_org()
    port = int(server.base_url.rsplit(":", 1)[1])
    one = (b"GET /api/v1/inboxes HTTP/1.1\r\n" + HOST + b"Authorization: Bearer "
           + owner.encode() + b"\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(50))
           + b"\r\n")
    last = one.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answer, closed = await threads.deferToThread(_exchange, port, one + one + last)
    assert closed and answer.count(b"HTTP/1.1 200 OK") == 3, answer[:500]
