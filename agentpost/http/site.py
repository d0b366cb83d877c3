"""The twisted.web Site: security headers and a request id on every response.

Headers are set before any resource renders, so they are present on every answer —
2xx, 4xx, 5xx and Klein's own fallbacks — and Twisted's version banner is removed.

Twisted's HTTP parser refuses some requests before any resource exists (a URL or header
line over 16 KiB, too many headers, a negative or doubled length) with a bare
``400 Bad Request`` or a silently closed connection. Our channel answers those with the
same JSON error and headers as everything else (414, 431, 400, and 413 for a body over
the limit, which is refused before it is read), then closes: it stops writing, drops
what the client still sends for a moment, and closes once the client has read the
answer — closing at once would reset the connection and lose the answer in transit.
Such requests never reach a route, so they have no credential and no audit row.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import abstract
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource

from agentpost.http import errors as http_errors
from agentpost.http.access_log import redacting_log_formatter
from agentpost.listening import ConnectionCaps, cap_key, send_direct
from agentpost.model.ids import new_id

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"strict-transport-security": b"max-age=31536000; includeSubDomains",
    b"content-security-policy": (
        b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
    b"cross-origin-resource-policy": b"same-origin",
}


def canonical_headers(headers: dict[bytes, bytes]) -> tuple[tuple[bytes, bytes], ...]:
    """The headers as twisted.web's Headers stores them (canonical names, sanitised
    values), computed once so a request can take them without the per-call checks."""
    probe = Headers()
    for name, value in headers.items():
        probe.setRawHeaders(name, [value])
    return tuple((name, values[0]) for name, values in probe.getAllRawHeaders())


_SECURITY_RAW = canonical_headers(SECURITY_HEADERS)
_SERVER, _REQUEST_ID, _DATE, _CONTENT_LENGTH, _CONTENT_TYPE = (
    name for name, _ in canonical_headers({
        b"server": b"", b"x-request-id": b"", b"date": b"", b"content-length": b"",
        b"content-type": b""}))

#: The Date header of the current second (Twisted formats it afresh for every request).
_date_cache: list[Any] = [-1, b""]


def _http_date() -> bytes:
    now = int(time.time())  # the wall clock, as Twisted's own Date header reads it
    if _date_cache[0] != now:
        _date_cache[:] = [now, http.datetimeToString(now)]
    value: bytes = _date_cache[1]
    return value


LINE_MAX_BYTES = 16 * 1024  # the request line, and each header line
HEADERS_MAX_BYTES = 32 * 1024  # request line and all header lines together
HEADERS_MAX_COUNT = 100
LINGER_S = 5.0  # how long a refused client may take to read the answer
LINGER_MAX_BYTES = 16 * 1024 * 1024  # what we drop meanwhile before closing regardless


_REASONS = {431: b"Request Header Fields Too Large", 413: b"Content Too Large",
            414: b"URI Too Long", 408: b"Request Timeout"}  # RFC 9110 / 6585 wording
HEADER_TIMEOUT_S = 30.0  # [http] header_timeout
BODY_MIN_RATE = 500  # [http] body_min_rate, bytes per second over each header_timeout
MAX_CONNECTIONS_PER_IP = 256  # [http] max_connections_per_ip
MAX_CONNECTIONS = 10_000  # [http] max_connections


def error_bytes(status: int, type_: str, message: str, request_id: str) -> bytes:
    """The JSON error body every refusal carries."""
    body = http_errors.error_body(type_, message, request_id)
    return json.dumps(body, separators=(",", ":")).encode("ascii")


class AgentPostRequest(server.Request):
    """A request that carries its id and dresses its response before rendering."""

    _body_bytes = 0

    def process(self) -> None:
        """``server.Request.process`` without its per-request extras (issue 12): the
        Date header comes from a once-a-second cache, no Server header is set only to
        be removed in :meth:`render`, and a path without ``%`` is split without
        percent-decoding each segment. Anything unusual goes to Twisted's own."""
        path = self.path
        if b"%" in path or path == b"*":
            super().process()
            return
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.responseHeaders._rawHeaders[_DATE] = [_http_date()]
        self.prepath = []
        self.postpath = path[1:].split(b"/")
        try:
            resrc = self.site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(resrc):
                encoder = resrc.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resrc)
        except BaseException:
            self.processingFailed(Failure())

    def render(self, resrc: IResource) -> None:
        """Set headers every response must carry, then render as usual."""
        self.request_id = new_id("req")
        # Straight into the header store, as setHeader would leave them (names
        # canonical, values checked once at import): nine setHeader calls were ~3% of
        # a GET's CPU (issue 12). Each value gets its own list, as setRawHeaders does.
        raw: dict[bytes, list[bytes]] = self.responseHeaders._rawHeaders
        raw.pop(_SERVER, None)
        for name, value in _SECURITY_RAW:
            raw[name] = [value]
        raw[_REQUEST_ID] = [self.request_id.encode("ascii")]
        if not _utf8_path(self.path):
            # Klein would answer this in text/plain; everything we say is JSON.
            self._answer(400, "invalid_request", "The URL path is not valid UTF-8.")
            return
        super().render(resrc)

    def write_whole(self, body: bytes) -> bool:
        """Send the status line, the headers and ``body`` in one transport write, when
        ``body`` is the whole response and ``Request.write`` would do nothing more than
        that; False (nothing written) otherwise, and the caller writes as usual.

        ``Request.write`` looks up Content-Length, Content-Type, Last-Modified and friends
        through the header store and hands the transport the head and the body apart:
        about 3% of a GET's CPU (issue 12). Here the answer must already carry the
        Content-Length of ``body`` and a Content-Type (``framework.render`` sets both);
        HEAD, 204/304, HTTP/1.0, an encoder, cookies, ETag or Last-Modified take
        Twisted's path."""
        if (self.startedWriting or self.finished or self._disconnected
                or self._encoder is not None or self._inFakeHead or self.method == b"HEAD"
                or self.code in http.NO_BODY_CODES or self.clientproto != b"HTTP/1.1"
                or self.lastModified is not None or self.etag is not None or self.cookies):
            return False
        raw: dict[bytes, list[bytes]] = self.responseHeaders._rawHeaders
        channel = self.channel
        if (raw.get(_CONTENT_LENGTH) != [b"%d" % len(body)] or _CONTENT_TYPE not in raw
                or not isinstance(channel, AgentPostChannel) or channel.transport is None):
            return False
        self.startedWriting = 1
        self.sentLength = len(body)
        send_direct(channel.transport, channel.head_bytes(
            self.clientproto, b"%d" % self.code, self.code_message, raw) + body)
        return True

    def handleContentChunk(self, data: bytes) -> None:
        """Count the body as it arrives: a chunked one has no length to check upfront."""
        self._body_bytes += len(data)
        channel = self.channel
        if (isinstance(channel, AgentPostChannel) and channel.max_body_bytes is not None
                and self._body_bytes > channel.max_body_bytes):
            channel.refuse_payload_too_large()
            return
        super().handleContentChunk(data)

    def _answer(self, status: int, type_: str, message: str) -> None:
        request_id = getattr(self, "request_id", None) or new_id("req")
        body = error_bytes(status, type_, message, request_id)
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json; charset=utf-8")
        self.setHeader(b"content-length", str(len(body)).encode())
        self.write(body)
        self.finish()

    def processingFailed(self, reason: Any) -> None:
        """Never show a traceback: answer a generic JSON 500."""
        from twisted.logger import Logger

        Logger().failure("unhandled error in request", reason)
        if not self.startedWriting:
            self._answer(500, "internal_error", "An internal error occurred.")
        else:
            self.finish()
        return reason


def _utf8_path(path: bytes) -> bool:
    if path.isascii() and b"%" not in path:
        return True  # nothing to decode (the usual API path)
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class AgentPostChannel(http.HTTPChannel):
    """HTTP/1.1 with our limits, whose every refusal is a JSON answer with our headers.

    Overrides the points where Twisted would write a bare ``400`` (or drop the line):
    the line length limit (414 for the request line, 431 for a header), the header size
    and count limits (431), the body size (413, decided from Content-Length before the
    body is read, or as chunks arrive) and every other framing error (400).
    """

    MAX_LENGTH = LINE_MAX_BYTES
    totalHeadersSize = HEADERS_MAX_BYTES
    maxHeaders = HEADERS_MAX_COUNT
    max_body_bytes: int | None = None
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_min_rate: int = BODY_MIN_RATE
    _slow_call: Any = None  # the running head deadline or body rate window
    _window_bytes = 0

    _refused = False
    _awaiting_request_line = True
    _idle_call: Any = None
    _host: Any = None
    _peer: Any = None
    _linger_call: Any = None
    #: Gives the connection's place under AgentPostSite's caps back (set by the site).
    on_close: Callable[[], None] | None = None
    _dropped_bytes = 0

    def getHost(self) -> Any:
        """The local address, asked of the socket once per connection rather than once
        per request (``Request.__init__`` asks; a ``getsockname`` call each time)."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        """The peer's address, built once per connection (see :meth:`getHost`)."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def setTimeout(self, period: Any) -> Any:
        """``TimeoutMixin.setTimeout`` without a reactor call per request.

        Twisted suspends the idle timeout while a request is handled by cancelling its
        timer, and starts a new one when the answer is out: a cancel and a ``callLater``
        (a heap push) per request, and cancelled timers left in the reactor's heap
        (issue 12). Here the timer stays armed while suspended; if it fires then, it
        does nothing and the next ``setTimeout(period)`` arms a new one. Resuming moves
        the armed timer (``DelayedCall.reset``) as ``resetTimeout`` always did."""
        previous = self.timeOut
        self.timeOut = period
        if period is None:
            return previous
        call = self._idle_call
        if call is not None and call.active():
            call.reset(period)
        else:
            self._idle_call = self.callLater(period, self._idle_expired)
        return previous

    def resetTimeout(self) -> None:
        """Input arrived: the idle timeout starts over (unless suspended)."""
        call = self._idle_call
        if call is not None and self.timeOut is not None and call.active():
            call.reset(self.timeOut)

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self.timeOut is not None and self.transport is not None:
            self.timeoutConnection()

    def dataReceived(self, data: bytes) -> None:
        """Parse as usual, or drop everything once the request was refused."""
        if self._refused:
            self._drop(data)
            return
        self._window_bytes += len(data)
        if self._awaiting_request_line and self._slow_call is None:
            self._arm_slow(self._head_too_slow)  # a request begins: its head's deadline
        super().dataReceived(data)

    # The idle timer restarts with every byte, so on its own it let a client that sends
    # one byte a minute keep a connection (and a request) open for weeks, and many such
    # connections exhaust the descriptors of every tenant's API (slowloris). A request's
    # head must arrive within header_timeout, and its body at body_min_rate or more,
    # counted over each header_timeout window; otherwise 408 and the connection closes.

    def _arm_slow(self, check: Any) -> None:
        self._cancel_slow()
        self._window_bytes = 0
        if self.header_timeout_s > 0:
            self._slow_call = self.callLater(self.header_timeout_s, check)

    def _cancel_slow(self) -> None:
        if self._slow_call is not None and self._slow_call.active():
            self._slow_call.cancel()
        self._slow_call = None

    def _head_too_slow(self) -> None:
        self._slow_call = None
        if self._handlingRequest:  # pipelined behind a request still being answered
            self._arm_slow(self._head_too_slow)
        elif self.transport is not None:
            self.refuse(*http_errors.REQUEST_TIMEOUT)

    def _body_window(self) -> None:
        self._slow_call = None
        if self._window_bytes < self.body_min_rate * self.header_timeout_s:
            if self.transport is not None:
                self.refuse(*http_errors.REQUEST_TIMEOUT)
            return
        self._arm_slow(self._body_window)

    def rawDataReceived(self, data: bytes) -> None:
        """Body bytes; none are kept once the request was refused."""
        if self._refused:
            self._drop(data)
            return
        super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> bool | None:
        """Enforce the header size limit with a 431 (or 414 on the request line)."""
        if self._refused:
            return True
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_oversized()
            return True
        if line:
            self._awaiting_request_line = False
        result = super().lineReceived(line)
        return True if self._refused else result

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes,
                     headers: Any) -> None:
        """The status line and headers as one bytes write.

        Twisted's version hands the transport a list of four items per header, each
        checked to be bytes, on every response (issue 12). The values are the same:
        they went through Headers, which sanitised them when they were set."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        if self.transport is not None:
            self.transport.write(self.head_bytes(version, code, reason,
                                                 headers._rawHeaders))

    @staticmethod
    def head_bytes(version: bytes, code: bytes, reason: bytes,
                   raw: dict[bytes, list[bytes]]) -> bytes:
        """The status line and the headers of a ``Headers`` store (canonical names,
        values sanitised when they were set), with the blank line that ends them."""
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in raw.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over MAX_LENGTH: the URL (414) or a header field (431)."""
        self._refuse_oversized()

    def headerReceived(self, line: bytes) -> bool:
        """Enforce the header count limit with a 431."""
        if self._refused:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(*http_errors.HEADERS_TOO_LARGE)
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        """Refuse a declared body over the limit before reading (or 100-continuing) it."""
        if self._refused:
            return
        self._arm_slow(self._body_window)  # cancelled again when the body is complete
        if self.max_body_bytes is not None and (self.length or 0) > self.max_body_bytes:
            self.refuse_payload_too_large()
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        """Hand the request to the site, unless it was refused meanwhile."""
        if self._refused:
            return
        self._cancel_slow()
        self._awaiting_request_line = True
        super().allContentReceived()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Every other framing error Twisted detects (bad length, bad header, ...)."""
        self.refuse(*http_errors.BAD_FRAMING)

    def _refuse_oversized(self) -> None:
        if self._awaiting_request_line:
            self.refuse(*http_errors.URI_TOO_LONG)
        else:
            self.refuse(*http_errors.HEADERS_TOO_LARGE)

    def refuse_payload_too_large(self) -> None:
        """413, with the limit in the message."""
        type_, status, _ = http_errors.PAYLOAD_TOO_LARGE
        self.refuse(type_, status, f"The body exceeds {self.max_body_bytes} bytes.")

    def refuse(self, type_: str, status: int, message: str) -> None:
        """Answer with our JSON error and headers, then close (see the module doc)."""
        if self._refused or self.transport is None:
            return
        self._refused = True
        self._cancel_slow()
        self.clearLineBuffer()
        self.setTimeout(None)
        request_id = new_id("req")
        body = error_bytes(status, type_, message, request_id)
        reason = _REASONS.get(status) or http.RESPONSES.get(status, b"Error")
        head = [b"HTTP/1.1 %d %s" % (status, reason),
                b"content-type: application/json; charset=utf-8",
                b"content-length: %d" % len(body), b"connection: close",
                b"x-request-id: " + request_id.encode("ascii")]
        head += [name + b": " + value for name, value in SECURITY_HEADERS.items()]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        log.info("refused an HTTP request (%d %s) from %s", status, type_,
                 getattr(self.transport.getPeer(), "host", "?"))
        if isinstance(self.transport, abstract.FileDescriptor):
            self.transport.loseWriteConnection()  # FIN after the answer; keep reading
        self._linger_call = self.callLater(LINGER_S, self._close)

    def _drop(self, data: bytes) -> None:
        self._dropped_bytes += len(data)
        if self._dropped_bytes > LINGER_MAX_BYTES:
            self._close()

    def _close(self) -> None:
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The client has gone (normally after reading a refusal): stop lingering, and
        give its place under the connection caps back (once)."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        if self._linger_call is not None and self._linger_call.active():
            self._linger_call.cancel()
        self._cancel_slow()
        super().connectionLost(reason)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None


class _Refusal(Protocol):
    """A connection over a cap: one JSON 503 (with the security headers), then FIN."""

    def __init__(self, text: str) -> None:
        self.text = text

    def connectionMade(self) -> None:
        request_id = new_id("req")
        body = error_bytes(503, "temporarily_unavailable", self.text, request_id)
        head = [b"HTTP/1.1 503 Service Unavailable",
                b"content-type: application/json; charset=utf-8",
                b"content-length: %d" % len(body), b"connection: close", b"retry-after: 5",
                b"x-request-id: " + request_id.encode("ascii")]
        head += [name + b": " + value for name, value in SECURITY_HEADERS.items()]
        assert self.transport is not None
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.loseConnection()


class AgentPostSite(ConnectionCaps, server.Site):
    """A Site speaking HTTP/1.1 through :class:`AgentPostChannel`.

    The channel is built directly rather than through Twisted's ALPN switch, so no
    request can reach the application over HTTP/2 around these limits. Connections
    are capped per client address and in all, as SMTP's and IMAP's are: the header
    and body deadlines bound how long each lives, but without a cap one address could
    hold every file descriptor of the process. A trusted proxy (``[http]
    trusted_proxies``) carries everyone's requests, so only the total applies to it.
    """

    def __init__(self, resource: IResource, *, max_body_bytes: int | None,
                 header_timeout_s: float = HEADER_TIMEOUT_S,
                 body_min_rate: int = BODY_MIN_RATE,
                 max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
                 max_connections: int = MAX_CONNECTIONS,
                 trusted_proxies: frozenset[str] = frozenset()) -> None:
        super().__init__(resource)
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s
        self.body_min_rate = body_min_rate
        # compared with what the caps count (cap_key: an IPv6 proxy counts as its /64)
        self.trusted_proxies = frozenset(cap_key(p) for p in trusted_proxies)
        self.init_caps(max_connections_per_ip, max_connections)

    def buildProtocol(self, addr: Any) -> Any:
        """A channel, or a 503 when a connection cap is reached."""

        def session(on_close: Callable[[], None]) -> Protocol:
            channel = server.Site.buildProtocol(self, addr)
            assert isinstance(channel, AgentPostChannel)
            channel.on_close = on_close
            return channel

        return self.admitted(addr, session)

    def admit(self, host: str) -> str | None:
        if host in self.trusted_proxies:
            if self.connections >= self.max_connections:
                return "Too many connections; try again later"
            self.connections += 1
            self.connections_by_ip[host] += 1
            return None
        return super().admit(host)

    def refusal(self, text: str) -> Protocol:
        return _Refusal(text)

    def protocol(self) -> AgentPostChannel:  # type: ignore[override]
        """One channel per connection (HTTPFactory.buildProtocol calls this)."""
        channel = AgentPostChannel()
        channel.max_body_bytes = self.max_body_bytes
        channel.header_timeout_s = self.header_timeout_s
        channel.body_min_rate = self.body_min_rate
        return channel


def make_site(resource: IResource, *, access_log: bool = False,
              max_body_bytes: int | None = None, header_timeout_s: float = HEADER_TIMEOUT_S,
              body_min_rate: int = BODY_MIN_RATE,
              max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP,
              max_connections: int = MAX_CONNECTIONS,
              trusted_proxies: frozenset[str] = frozenset()) -> server.Site:
    """A Site with our channel and request class; the access log is off unless asked for,
    since every API request is already in the audit trail."""
    site = AgentPostSite(resource, max_body_bytes=max_body_bytes,
                         header_timeout_s=header_timeout_s, body_min_rate=body_min_rate,
                         max_connections_per_ip=max_connections_per_ip,
                         max_connections=max_connections, trusted_proxies=trusted_proxies)
    site.requestFactory = AgentPostRequest
    site.displayTracebacks = False
    site._logFormatter = redacting_log_formatter
    if not access_log:
        site.log = lambda request: None  # type: ignore[method-assign]
    return site
