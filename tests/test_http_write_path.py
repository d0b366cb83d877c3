"""The answer's write path and the channel's idle timer since the issue-12 tail work.

A JSON answer leaves as one piece (status line, headers, body) and, on a plain TCP
connection with nothing buffered, straight to the socket; anything unusual (HEAD,
HTTP/1.0, 204, no Content-Length) takes Twisted's own write. The idle timeout keeps one
timer per connection instead of cancelling and re-creating it around every request, so
these tests pin what it must still do: close an idle connection after ``timeOut``, never
while a request is being handled, start over on input and after each answer, and leave no
timer behind a closed connection.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest_twisted
from twisted.internet import address, task, threads
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import resource, server

from agentpost.http.framework import render
from agentpost.http.site import SECURITY_HEADERS, AgentPostChannel, make_site
from tests.helpers import SECURITY_HEADERS as CLIENT_SECURITY_HEADERS
from tests.helpers import http_answers

TIMEOUT_S = 30


class _Held(resource.Resource):
    """Answers ``/json`` with a JSON body, ``/empty`` with a 204, and ``/held`` only
    when the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        path = request.path
        if path == b"/held":
            self.held.append(request)
            return server.NOT_DONE_YET
        if path == b"/empty":
            return render(request, 204, None)
        body = render(request, 200, {"ok": True, "name": "Zoë"})
        if path == b"/nolength":
            request.responseHeaders.removeHeader(b"content-length")
        if path == b"/json" or path == b"/nolength":
            whole = request.write_whole(body)
            if not whole:
                request.write(body)
            request.finish()
            request.whole = whole  # for the test to see which path was taken
            return server.NOT_DONE_YET
        return body


def _channel(clock: task.Clock) -> tuple[AgentPostChannel, StringTransport, _Held]:
    root = _Held()
    site = make_site(root)
    channel = site.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 5000))
    assert isinstance(channel, AgentPostChannel)
    channel.callLater = clock.callLater  # type: ignore[method-assign,assignment]
    channel.timeOut = TIMEOUT_S
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, root


def test_an_idle_connection_is_closed_after_the_timeout():
    clock = task.Clock()
    _, transport, _ = _channel(clock)
    clock.advance(TIMEOUT_S - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_input_starts_the_idle_timeout_over():
    clock = task.Clock()
    channel, transport, _ = _channel(clock)
    clock.advance(TIMEOUT_S - 1)
    channel.dataReceived(b"GET /json HTTP/1.1\r\n")  # half a request
    clock.advance(TIMEOUT_S - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_no_timeout_while_a_request_is_handled_and_a_fresh_one_after_it():
    clock = task.Clock()
    channel, transport, root = _channel(clock)
    channel.dataReceived(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(root.held) == 1
    clock.advance(TIMEOUT_S * 3)  # the armed timer fires meanwhile and must do nothing
    assert not transport.disconnecting
    request = root.held.pop()
    request.write(b"done")
    request.finish()
    clock.advance(TIMEOUT_S - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_many_requests_keep_one_timer_and_a_closed_connection_none():
    clock = task.Clock()
    channel, transport, _ = _channel(clock)
    for _ in range(5):
        channel.dataReceived(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(1)
    assert len(http_answers(transport.value())) == 5
    assert len([c for c in clock.getDelayedCalls() if c.active()]) == 1
    channel.connectionLost(Failure(Exception("gone")))
    assert not [c for c in clock.getDelayedCalls() if c.active()]


def test_a_whole_answer_is_one_write_with_every_header_once():
    clock = task.Clock()
    channel, transport, _ = _channel(clock)
    writes: list[bytes] = []
    original = transport.write

    def write(data: bytes) -> None:
        writes.append(data)
        original(data)

    transport.write = write  # type: ignore[method-assign]
    channel.dataReceived(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(writes) == 1
    [(status, headers, body)] = http_answers(transport.value())
    assert status == b"HTTP/1.1 200 OK"
    assert json.loads(body) == {"ok": True, "name": "Zoë"}
    assert headers[b"content-length"] == [b"%d" % len(body)]
    assert headers[b"content-type"] == [b"application/json; charset=utf-8"]
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == [value]
    assert len(headers[b"x-request-id"]) == 1 and len(headers[b"date"]) == 1
    assert b"server" not in headers


def test_unusual_answers_take_twisteds_write():
    for line, path, expect_whole in (
        (b"GET /json HTTP/1.1", "json", True),
        (b"GET /json HTTP/1.0", "json", False),  # HTTP/1.0: Twisted decides framing
        (b"GET /nolength HTTP/1.1", "nolength", False),  # no Content-Length: chunked
    ):
        clock = task.Clock()
        channel, transport, _ = _channel(clock)
        seen: list[Any] = []
        channel.requestFactory = _recording(seen)
        channel.dataReceived(line + b"\r\nHost: x\r\n\r\n")
        assert seen[0].whole is expect_whole, path
        answer = transport.value()
        assert answer.startswith(line.split(b" ")[2] + b" 200 OK\r\n"), answer[:80]
        if path == "nolength":
            assert b"Transfer-Encoding: chunked" in answer
        else:
            assert answer.endswith('{"ok":true,"name":"Zoë"}'.encode())
    clock = task.Clock()
    channel, transport, _ = _channel(clock)
    channel.dataReceived(b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 204 No Content\r\n")


def _recording(seen: list[Any]) -> Any:
    from agentpost.http.site import AgentPostRequest

    def factory(*args: Any, **kwargs: Any) -> AgentPostRequest:
        request = AgentPostRequest(*args, **kwargs)
        seen.append(request)
        return request

    return factory


def _get_many(port: int, key: str, n: int) -> list[bytes]:
    """``n`` keep-alive GETs on one socket, each read to its last byte."""
    request = (b"GET /api/v1/inboxes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Authorization: Bearer " + key.encode() + b"\r\n\r\n")
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        buffered = b""
        for _ in range(n):
            sock.sendall(request)
            while b"\r\n\r\n" not in buffered:
                buffered += sock.recv(65536)
            head, _, rest = buffered.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(rest) < length:
                rest += sock.recv(65536)
            out.append(head + b"\r\n\r\n" + rest[:length])
            buffered = rest[length:]
    return out


@pytest_twisted.ensureDeferred
async def test_answers_sent_straight_to_the_socket_arrive_whole(server):
    _, key = await server.new_org()
    port = int(server.base_url.rsplit(":", 1)[1])
    answers = await threads.deferToThread(_get_many, port, key, 20)
    for answer in answers:
        [(status, headers, body)] = http_answers(answer)
        assert status == b"HTTP/1.1 200 OK"
        assert isinstance(json.loads(body)["data"], list)
        for name in CLIENT_SECURITY_HEADERS:
            assert len(headers[name.lower().encode()]) == 1, name
