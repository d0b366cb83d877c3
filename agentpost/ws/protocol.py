"""One WebSocket of the event stream: authentication, client frames, sending.

Why the checks sit where they do:

- The key is checked in the opening handshake (``onConnect``) through the same portal
  as the HTTP API, and the socket registers with ``LiveCredentials``: a revoked,
  expired or narrowed key ends the socket with close code 4001 as soon as the revoking
  transaction's NOTIFY arrives (and at the latest at the periodic re-read).
- Every frame is re-checked against the principal just before it is sent
  (organization, environment restriction, the subscription's filters), so a bug
  upstream in the hub can never leak another tenant's event.
- A client that reads slower than its events arrive is disconnected (4008) once the
  bytes waiting in the transport pass ``send_buffer_cap``: memory stays bounded.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from agentpost.auth.cred import APIKeyCredentials, IPrincipal, RefusedKey
from agentpost.core.events import EVENT_TYPES, envelope, visible_to
from agentpost.http.site import SECURITY_HEADERS, error_bytes
from agentpost.model.errors import AgentPostError
from agentpost.model.ids import _ALPHABET, is_id, new_id
from agentpost.model.principal import Principal
from agentpost.storage import events as event_store
from agentpost.storage.inboxes import get_inbox
from agentpost.storage.orgs import get_environment

log = logging.getLogger(__name__)

CLOSE_CREDENTIAL = 4001  # the key was revoked, expired or narrowed
CLOSE_SLOW = 4008  # the client did not read fast enough (send buffer cap)
CLOSE_PING = 4009  # no pong to the previous ping
MAX_CLIENT_FRAME = 8 * 1024  # bytes; larger client messages get an error frame
CATCH_UP_PAGE = 500
RECENT_IDS = 4096  # ids remembered per socket to drop duplicates (catch-up vs live)
START_MARGIN_MS = 2000  # a fresh socket's implicit cursor: its open time minus this


@dataclass(frozen=True)
class StreamSettings:
    """[websocket] as the sockets use it."""

    max_connections_per_key: int = 20
    send_buffer_cap: int = 1024 * 1024
    ping_interval: float = 30.0


def time_cursor(ms: int) -> str:
    """An event id sorting before every event created at ``ms`` or later: a cursor for
    "everything since then" (events_after falls back to id order for unknown ids)."""
    value, chars = ms << 80, []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "evt_" + "".join(reversed(chars))


def ulid_ms(event_id: str) -> int:
    """The millisecond timestamp in an ``evt_<ULID>`` id."""
    value = 0
    for char in event_id[4:14]:
        value = value * 32 + _ALPHABET.index(char)
    return value


def pending_bytes(transport: Any) -> int:
    """Bytes written but not yet on the wire, through TLS wrappers down to TCP."""
    total, seen = 0, 0
    while transport is not None and seen < 4:
        seen += 1
        data = getattr(transport, "dataBuffer", None)
        if isinstance(data, bytes | bytearray | memoryview):
            total += len(data) - int(getattr(transport, "offset", 0))
        total += int(getattr(transport, "_tempDataLen", 0) or 0)
        app = getattr(transport, "_appSendBuffer", None)
        if app:
            total += sum(len(b) for b in app)
        transport = getattr(transport, "transport", None)
    return total


#: The error ``type`` of a refused handshake, by status (the API's own names).
_REFUSAL_TYPES = {401: "unauthenticated", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 426: "upgrade_required", 429: "rate_limited"}
_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 426: "Upgrade Required", 429: "Too Many Requests"}


def handshake_refusal(code: int, message: str,
                      extra: list[tuple[str, str]] | None = None, *,
                      head_only: bool = False) -> bytes:
    """A refused opening handshake, answered like every other refusal of the listener.

    autobahn's own answer was a bare status line carrying the message as its reason
    phrase: no security headers, no length, no JSON body (the hostile review's "every
    answer" rule), and a 401 without ``WWW-Authenticate``. ``head_only``: the answer to
    a HEAD request, which has no body (RFC 9110 section 9.3.2)."""
    request_id = new_id("req")
    body = error_bytes(code, _REFUSAL_TYPES.get(code, "invalid_request"), message[:300],
                       request_id)
    head = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Bad Request')}".encode("ascii"),
            b"content-type: application/json; charset=utf-8",
            b"content-length: %d" % len(body), b"connection: close",
            b"x-request-id: " + request_id.encode("ascii")]
    head += [name + b": " + value for name, value in SECURITY_HEADERS.items()]
    if code == 401:
        head.append(b'www-authenticate: Bearer realm="agentpost"')
    if code == 426:  # RFC 9110 section 15.5.22: say what to upgrade to
        head.append(b"upgrade: websocket")
    if code == 405:  # RFC 9110 section 15.5.6
        head.append(b"allow: GET")
    for name, value in extra or ():  # autobahn's (Sec-WebSocket-Version on a bad version)
        line = f"{name}: {value}"
        if line.isascii() and line.isprintable():
            head.append(line.encode("ascii"))
    return b"\r\n".join(head) + b"\r\n\r\n" + (b"" if head_only else body)


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class EventStreamProtocol(WebSocketServerProtocol):
    """See the module docstring; the frames are documented in docs/websocket.md."""

    factory: EventStreamFactory
    principal: Principal
    org_id = ""
    key_id = ""

    def __init__(self) -> None:
        super().__init__()
        self._session: Any = None
        self._types: frozenset[str] | None = None
        self._inbox_id: str | None = None
        self._envs: frozenset[str] | None = None
        self.cursor: str | None = None
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._catching = False
        self._again = False
        self._held: list[dict[str, Any]] = []
        self._ping_call: Any = None
        self._awaiting_pong = False
        self._closing = False
        self._joined = False
        self._busy = False
        self._reserved = False

    # ------------------------------------------------------------------ opening

    def onConnect(self, request: Any) -> Any:  # a Deferred: autobahn awaits it
        return defer.ensureDeferred(self._authenticate(request))

    async def _authenticate(self, request: Any) -> None:
        f = self.factory
        token = (request.params.get("token") or [None])[0] or _bearer(request.headers)
        if not token:
            raise ConnectionDeny(401, "Send ?token= or an Authorization: Bearer header.")
        peer = f.client_address(self.transport, request.headers)
        try:  # unknown keys spend the same failed-login allowances as the HTTP API
            attempt = (await f.key_failures.admit(peer, token)
                       if f.key_failures is not None else None)
        except AgentPostError:
            raise ConnectionDeny(429, "Too many failed keys from this address.") from None
        try:
            _, avatar, _ = await f.portal.login(APIKeyCredentials(token), None, IPrincipal)
        except UnauthorizedLogin as exc:
            if not (isinstance(exc, RefusedKey) and exc.org_id) and f.key_failures is not None:
                await f.key_failures.unknown_key(attempt)
            raise ConnectionDeny(401, "The key is unknown, revoked or expired.") from None
        if not isinstance(avatar, Principal) or avatar.credential_type != "api_key":
            raise ConnectionDeny(401, "An organization API key is required.")
        if "events:read" not in avatar.scopes:
            raise ConnectionDeny(403, "This API key lacks the 'events:read' scope.")
        # Handshakes still opening count too: they join the hub only in onOpen, after
        # the awaits below, so a burst of simultaneous handshakes all passed a check of
        # open sockets alone, however many there were.
        key_id = avatar.credential_id
        if (f.hub.connections_of(key_id) + f.opening.get(key_id, 0)
                >= f.settings.max_connections_per_key):
            raise ConnectionDeny(429, "Too many open WebSockets for this API key.")
        self.principal, self.org_id, self.key_id = avatar, avatar.org_id, key_id
        self._reserve()
        try:
            self._session = await f.live_credentials.register(avatar, self._credential_ended)
        except AgentPostError:
            self._release()
            raise ConnectionDeny(401, "The key is unknown, revoked or expired.") from None
        self.cursor = time_cursor(int(f.clock.seconds() * 1000) - START_MARGIN_MS)

    def _reserve(self) -> None:
        opening = self.factory.opening
        opening[self.key_id] = opening.get(self.key_id, 0) + 1
        self._reserved = True

    def _release(self) -> None:
        """Give back the handshake's place (idempotent)."""
        if self._reserved:
            self._reserved = False
            opening = self.factory.opening
            left = opening.get(self.key_id, 0) - 1
            if left > 0:
                opening[self.key_id] = left
            else:
                opening.pop(self.key_id, None)

    def connectionLost(self, reason: Any = None) -> None:
        self._release()  # a handshake that never opened
        super().connectionLost(reason)

    def onOpen(self) -> None:
        self._release()
        self.factory.hub.add(self)
        self._joined = True
        self._arm_ping()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._closing = True
        self._release()
        if self._joined:
            self.factory.hub.remove(self)
            self._joined = False
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        self._held.clear()

    def _close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self.sendClose(code, reason[:120])

    def _credential_ended(self, reason: str) -> None:
        self._close(CLOSE_CREDENTIAL, reason)

    def sendHttpErrorResponse(self, code: int, reason: str,
                              responseHeaders: Any = None) -> None:
        """Every refused handshake (ours and autobahn's) as JSON with our headers."""
        status_line = str(getattr(self, "http_status_line", "") or "")
        head_only = status_line.split(" ", 1)[0] == "HEAD"
        self.sendData(handshake_refusal(int(code), str(reason),
                                        [tuple(h) for h in responseHeaders or ()],
                                        head_only=head_only))

    # ------------------------------------------------------------------ keep-alive

    def _arm_ping(self) -> None:
        interval = self.factory.settings.ping_interval
        if interval > 0 and not self._closing:
            self._ping_call = self.factory.clock.callLater(interval, self._ping)

    def _ping(self) -> None:
        """On the injected clock: drop a peer that did not answer the last ping, ping,
        and re-validate the key (in memory unless its last confirmation is stale)."""
        self._ping_call = None
        if self._closing:
            return
        if self._awaiting_pong:
            self._close(CLOSE_PING, "No pong to the previous ping.")
            return
        self._awaiting_pong = True
        self.sendPing()
        if self._session is not None:
            d = defer.ensureDeferred(self._session.check())
            d.addCallback(lambda why: self._credential_ended(why) if why else None)
            d.addErrback(lambda f: None)  # the database is away: the next tick retries
        self._arm_ping()

    def onPong(self, payload: bytes) -> None:
        self._awaiting_pong = False

    # ------------------------------------------------------------------ client frames

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return self._error("invalid_frame", "Frames are JSON text, not binary.")
        if len(payload) > MAX_CLIENT_FRAME:
            return self._error("invalid_frame", f"Frames are at most {MAX_CLIENT_FRAME} bytes.")
        if self._busy:
            return self._error("busy", "Wait for the answer to the previous frame.")
        try:
            frame = json.loads(payload)
        except (ValueError, RecursionError):
            return self._error("invalid_frame", "The frame is not JSON.")
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "subscribe":
            d = defer.ensureDeferred(self._subscribe(frame))
        elif kind == "resume":
            d = defer.ensureDeferred(self._resume(frame))
        else:
            return self._error("invalid_frame", "type must be \"subscribe\" or \"resume\".")
        self._busy = True  # one database-reading frame at a time per socket
        d.addErrback(self._failed)
        d.addBoth(self._not_busy)
        return None

    def _not_busy(self, _: Any) -> None:
        self._busy = False

    def _failed(self, failure: Any) -> None:
        if failure.check(AgentPostError):
            exc = failure.value
            self._error(exc.type, exc.message)
        else:
            log.error("WebSocket frame failed: %s", failure.getTraceback())
            self._error("internal_error", "The frame could not be handled.")

    def _error(self, type_: str, message: str) -> None:
        self._push({"type": "error", "error": {"type": type_, "message": message}})

    async def _subscribe(self, frame: dict[str, Any]) -> None:
        types, inbox_id, envs = (frame.get("event_types"), frame.get("inbox_id"),
                                 frame.get("environment_ids"))
        # Items are checked one by one: set() of a list holding a list or an object
        # raised TypeError, answered as an internal error.
        if types is not None and (not isinstance(types, list)
                                  or not all(isinstance(t, str) and t in EVENT_TYPES
                                             for t in types)):
            return self._error("invalid_request",
                               "event_types must be a list of: " + ", ".join(EVENT_TYPES))
        if inbox_id is not None and not (is_id(inbox_id, "inb") and
                                         await self._inbox_visible(inbox_id)):
            return self._error("not_found", "No such inbox.")
        if envs is not None:
            if not isinstance(envs, list) or not all(
                    [is_id(e, "env") and await self._env_visible(e) for e in envs]):
                return self._error("not_found", "No such environment.")
        self._types = frozenset(types) if types else None
        self._inbox_id = inbox_id
        self._envs = frozenset(envs) if envs else None
        self._push({"type": "subscribed", "event_types": sorted(self._types or ()),
                    "inbox_id": self._inbox_id, "environment_ids": sorted(self._envs or ())})
        return None

    async def _inbox_visible(self, inbox_id: str) -> bool:
        p = self.principal
        row = await self.factory.db.run_read("ws.inbox", get_inbox, p.org_id,
                                             p.environment_ids, inbox_id)
        return row is not None

    async def _env_visible(self, env_id: str) -> bool:
        p = self.principal
        if not p.may_use_environment(env_id):
            return False
        row = await self.factory.db.run_read("ws.environment", get_environment, p.org_id, env_id)
        return row is not None

    async def _resume(self, frame: dict[str, Any]) -> None:
        after = frame.get("after")
        if not is_id(after, "evt"):
            return self._error("invalid_request", "after must be an event id (evt_...).")
        self.cursor = after
        self.catch_up(rewind=False)
        return None

    # ------------------------------------------------------------------ events

    def _wanted(self, row: dict[str, Any]) -> bool:
        """The last word on every event frame: tenant, restriction, then filters."""
        p = self.principal
        if not visible_to(row, p.org_id, p.environment_ids):
            return False
        if self._envs is not None and row["environment_id"] not in self._envs:
            return False
        if self._types is not None and row["type"] not in self._types:
            return False
        return self._inbox_id is None or row["inbox_id"] == self._inbox_id

    def offer(self, row: dict[str, Any]) -> None:
        """A live event from the hub (held back while a catch-up is reading the log)."""
        if self._closing:
            return
        if self._catching:
            self._held.append(row)
        else:
            self._deliver(row)

    def _deliver(self, row: dict[str, Any]) -> None:
        if row["id"] in self._recent or not self._wanted(row):
            return
        self._recent[row["id"]] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        self.cursor = row["id"]
        self._push({"type": "event", "data": envelope(row)})

    def catch_up(self, rewind: bool = True) -> None:
        """Read the log after the cursor, then release the live events held meanwhile.

        ``rewind`` (the hub's catch-up after a lost LISTEN link): the cursor is a live
        event, and an event of an *older* transaction may have committed after it, with
        its notification lost; the log is paged by transaction, so such an event sorts
        before the cursor. Read from a little before the cursor's time instead; what
        was already sent is dropped by id."""
        if self._closing:
            return
        if rewind and self.cursor is not None:
            self.cursor = time_cursor(max(0, ulid_ms(self.cursor) - START_MARGIN_MS))
        if self._catching:
            self._again = True
            return
        self._catching = True
        d = defer.ensureDeferred(self._read_log())
        d.addErrback(self._failed)
        d.addBoth(self._caught_up)

    async def _read_log(self) -> None:
        p = self.principal
        envs = p.environment_ids
        if self._envs is not None:
            envs = self._envs if envs is None else envs & self._envs
        while not self._closing:
            self._again = False
            rows = await self.factory.db.run_read(
                "ws.catch_up", event_store.events_after, p.org_id, envs, after=self.cursor,
                types=sorted(self._types) if self._types else None,
                inbox_id=self._inbox_id, limit=CATCH_UP_PAGE)
            for row in rows:
                self._deliver(row)
            if len(rows) < CATCH_UP_PAGE and not self._again:
                return

    def _caught_up(self, _: Any) -> None:
        self._catching = False
        held, self._held = self._held, []
        for row in held:
            if self._closing:
                break
            self._deliver(row)

    def _push(self, frame: dict[str, Any]) -> None:
        if self._closing or self.transport is None:
            return
        data = json.dumps(frame, separators=(",", ":")).encode("utf-8")
        if pending_bytes(self.transport) + len(data) > self.factory.settings.send_buffer_cap:
            log.info("disconnecting a slow WebSocket of key %s", self.key_id)
            self._closing = True
            self.sendClose(CLOSE_SLOW, "The client is not reading fast enough.")
            self.factory.clock.callLater(1.0, self._drop)  # its close may never drain
            return
        self.sendMessage(data, isBinary=False)

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class EventStreamFactory(WebSocketServerFactory):
    """Holds what every socket needs: the portal, live credentials, hub, settings."""

    protocol = EventStreamProtocol  # type: ignore[assignment]

    def __init__(self, *, portal: Any, live_credentials: Any, hub: Any, db: Any, clock: Any,
                 settings: StreamSettings, key_failures: Any = None,
                 trusted_proxies: frozenset[str] = frozenset()) -> None:
        # server=None: no Server header on the upgrade answer (nor on a refused
        # handshake), like every other answer of our HTTP listener; autobahn's default
        # would announce "AutobahnPython/<version>".
        super().__init__(server=None)
        self.key_failures = key_failures
        self.trusted_proxies = trusted_proxies
        self.portal = portal
        self.live_credentials = live_credentials
        self.hub = hub
        self.db = db
        self.clock = clock
        self.settings = settings
        #: Handshakes past the per-key check that have not opened yet, by key id.
        self.opening: dict[str, int] = {}
        # webStatus=False: a GET without an Upgrade header is refused (426) rather than
        # answered with autobahn's HTML status page, which named its version and honoured
        # ?redirect= (an open redirect on our origin, and a 500 for a non-integer ?after=).
        self.setProtocolOptions(maxMessagePayloadSize=64 * 1024, maxFramePayloadSize=64 * 1024,
                                openHandshakeTimeout=10, closeHandshakeTimeout=2,
                                webStatus=False)

    def client_address(self, transport: Any, headers: dict[str, str]) -> str | None:
        """The peer, or the X-Forwarded-For hop a trusted proxy vouches for (as the HTTP
        API reads it): behind a proxy, every client's failed keys would otherwise be
        charged to the proxy's address, and one guesser would lock everyone out."""
        peer = getattr(transport.getPeer(), "host", None) if transport is not None else None
        if peer in self.trusted_proxies:
            hop = (headers.get("x-forwarded-for") or "").split(",")[-1].strip()[:64]
            if hop:
                return hop
        return peer
