"""The route wrapper every endpoint goes through.

In order: request id, authentication through the shared Portal, rate limit, body
checks (type, size, JSON, schema), the handler, JSON rendering, and the audit row.
Errors of every kind end here as one JSON shape; nothing else reaches the client.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from klein import Klein
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from agentpost.auth.cred import (
    AdminKeyCredentials,
    APIKeyChecker,
    APIKeyCredentials,
    IAdminKeyCredentials,
    IAdminPrincipal,
    IAPIKeyCredentials,
    IPrincipal,
    RefusedKey,
)
from agentpost.auth.ratelimit import TokenBuckets
from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.http import errors as http_errors
from agentpost.http.dispatch import FastKlein
from agentpost.http.key_failures import FailedKeyThrottle
from agentpost.http.site import canonical_headers
from agentpost.http.validation import parse_json_body, validate
from agentpost.model import errors
from agentpost.model.principal import AdminPrincipal, Principal

try:
    import ujson
except ImportError:  # pragma: no cover - a dependency of autobahn, so normally present
    ujson = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[tuple[int, Any]]]

#: The content type of every JSON answer.
JSON_CONTENT_TYPE = "application/json; charset=utf-8"

#: Routes whose change can alter what existing API keys may do: their holder's
#: organization or environment roles, the organization's owner seat, its tier, an
#: environment a key was confined to. This process forgets its cached keys as soon as
#: such a change committed; other processes learn it from the triggers' NOTIFY
#: (agentpost.auth.key_cache). Revocation waits for that notice (core.api_keys).
KEY_POWER_ACTIONS = frozenset({"members.create", "members.update", "members.delete",
                               "environments.delete", "admin.organizations.update"})


@dataclass
class Route:
    """One endpoint: everything the wrapper and the OpenAPI document need to know."""

    method: str
    path: str  # OpenAPI style: /inboxes/{inbox_id}
    action: str  # audit action, e.g. inboxes.create
    handler: Handler
    summary: str
    auth: str = "org"  # "org" | "admin" | "none"
    scope: str | None = None
    body: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    status: int = 200
    query: list[tuple[str, str]] = field(default_factory=list)
    tag: str = ""
    #: A larger body limit than the table's (send routes carrying inline attachments);
    #: the HTTP channel applies it from Content-Length too (http.uploads.RouteBodyLimits).
    max_body: int | None = None


@dataclass
class RawResponse:
    """A non-JSON answer (raw messages, attachment bytes, redirects to presigned URLs).

    With ``stream`` (an async chunk iterator with ``size``, such as a BlobStream) the
    body is written chunk by chunk with back-pressure instead of being held in memory.
    """

    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    stream: Any = None


@implementer(IPushProducer)
class _StreamProducer:
    """Pauses our chunk loop while the client is not reading."""

    def __init__(self) -> None:
        self.stopped = False
        self._paused = False
        self._waiter: defer.Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    async def wait(self) -> None:
        if self._paused and not self.stopped:
            self._waiter = defer.Deferred()
            await self._waiter


async def write_stream(request: IRequest, stream: Any) -> None:
    """Copy ``stream`` to the response, waiting whenever the transport pushes back."""
    producer = _StreamProducer()
    consumer = IConsumer(request)  # twisted.web's Request consumes its response body
    request.setHeader(b"content-length", str(stream.size).encode("ascii"))
    consumer.registerProducer(producer, True)
    try:
        async for chunk in stream:
            if producer.stopped:
                break
            request.write(chunk)
            await producer.wait()
    finally:
        await stream.aclose()
        # A client that hangs up once it has every byte leaves no channel behind.
        if getattr(request, "channel", None) is not None:
            consumer.unregisterProducer()


@dataclass
class Body:
    """The validated JSON body (or None)."""

    value: Any


class RouteTable:
    """Routes under one prefix, served by a Klein app and described in OpenAPI."""

    def __init__(self, prefix: str, portal: Portal, audit: AuditTrail,
                 buckets: TokenBuckets | None, max_body_bytes: int,
                 trusted_proxies: frozenset[str],
                 key_failures: FailedKeyThrottle | None = None) -> None:
        self.prefix = prefix
        self._key_failures = key_failures
        self.routes: list[Route] = []
        self._portal = portal
        self._audit = audit
        self._buckets = buckets
        self._max_body = max_body_bytes
        self._trusted = trusted_proxies

    def add(self, route: Route) -> None:
        """Register an endpoint."""
        self.routes.append(route)

    def mount(self, app: Klein) -> None:
        """Attach every route to ``app``, plus JSON answers for unknown paths and methods."""
        for route in self.routes:
            klein_path = self.prefix + route.path.replace("{", "<").replace("}", ">")
            endpoint = self._wrap(route)
            app.route(klein_path, methods=[route.method], endpoint=f"{route.method} {klein_path}",
                      strict_slashes=False)(endpoint)
            if isinstance(app, FastKlein):  # dispatched without werkzeug (http.dispatch)
                app.add_table_route(route.method, self.prefix + route.path, klein_path,
                                    endpoint)

    def _wrap(self, route: Route) -> Callable[..., defer.Deferred[bytes]]:
        def endpoint(request: IRequest, **params: str) -> defer.Deferred[bytes]:
            return defer.Deferred.fromCoroutine(self._serve(route, request, params))

        return endpoint

    def client_address(self, request: IRequest) -> str | None:
        """The peer, or the X-Forwarded-For hop a trusted proxy vouches for."""
        peer = getattr(request.getClientAddress(), "host", None)
        if peer in self._trusted:
            forwarded = request.getHeader(b"x-forwarded-for")
            hop = forwarded.decode("latin-1").split(",")[-1].strip()[:64] if forwarded else ""
            if hop:  # an empty last hop would leave the request with no source to throttle
                return hop
        return peer

    async def _serve(self, route: Route, request: IRequest, params: dict[str, str]) -> bytes:
        ctx = RequestContext(
            request_id=getattr(request, "request_id", "req_unknown"),
            remote_addr=self.client_address(request),
            action=route.action,
        )
        try:
            await self._authenticate(route, request, ctx)
            check_url_text(request, params)
            body = self._read_body(route, request)
            status, payload = await route.handler(ctx, request, body, **params)
        except errors.AgentPostError as exc:
            return self._error(request, ctx, exc)
        except Exception:
            log.exception("request %s failed", ctx.request_id)
            return self._error(request, ctx, errors.AgentPostError())
        if route.action in KEY_POWER_ACTIONS:
            self._forget_cached_keys()
        if not ctx.audited and route.auth != "none":
            self._audit.enqueue(ctx, "allowed", status)
        if isinstance(payload, RawResponse) and payload.stream is not None:
            render(request, status, payload)
            await write_stream(request, payload.stream)
            return b""
        return render(request, status, payload)

    def _forget_cached_keys(self) -> None:
        for checker in self._portal.checkers.values():
            if isinstance(checker, APIKeyChecker):
                checker.forget_cached()

    async def _authenticate(self, route: Route, request: IRequest, ctx: RequestContext) -> None:
        if route.auth == "none":
            return
        token = _bearer(request)
        if token is None:
            raise errors.Unauthenticated("Send an Authorization: Bearer header.")
        if route.auth == "admin":
            creds: Any = AdminKeyCredentials(token)
            interface: Any = IAdminPrincipal
        else:
            creds, interface = APIKeyCredentials(token), IPrincipal
        attempt = (await self._key_failures.admit(ctx.remote_addr, token)
                   if self._key_failures is not None else None)
        try:
            avatar = await self._login(creds, interface)
        except UnauthorizedLogin as exc:
            if isinstance(exc, RefusedKey) and exc.org_id:  # file it with the key's tenant
                ctx.details.update(org_id=exc.org_id, key_state=exc.state)
                ctx.target_id = exc.key_id
            elif self._key_failures is not None:  # a key nobody ever held: a guess
                await self._key_failures.unknown_key(attempt)
            raise errors.Unauthenticated("The key is unknown, revoked or expired.") from None
        if not isinstance(avatar, Principal | AdminPrincipal):  # AgentPostRealm's avatars
            raise TypeError(f"unexpected avatar {avatar!r}")
        ctx.principal = avatar
        if self._buckets is not None:
            self._buckets.take(avatar.credential_id if isinstance(avatar, Principal)
                               else avatar.admin_key_id)
        if route.scope is not None:
            ctx.org_principal.require(route.scope)  # scopes are for organization keys

    async def _login(self, creds: Any, interface: Any) -> Any:
        """``Portal.login`` without its Deferred plumbing: the same checker (the one
        registered for the credentials' interface) and the same realm, called directly.
        A key served by the key cache comes back already fired, and the maybeDeferred
        and callback chain around it were ~3% of a cached GET's CPU (issue 12)."""
        portal = self._portal
        wanted = IAPIKeyCredentials if interface is IPrincipal else IAdminKeyCredentials
        checker = portal.checkers.get(wanted)
        if checker is None or not wanted.providedBy(creds):  # not our usual setup
            _, avatar, _ = await portal.login(creds, None, interface)
            return avatar
        identity: Any = checker.requestAvatarId(creds)
        if isinstance(identity, defer.Deferred):
            identity = await identity
        answer: Any = portal.realm.requestAvatar(identity, None, interface)
        return answer[1]

    def _read_body(self, route: Route, request: IRequest) -> Body:
        limit = route.max_body or self._max_body
        raw = request.content.read(limit + 1) if request.content else b""
        if route.body is None:
            if raw.strip():
                raise errors.InvalidRequest("This endpoint takes no request body.")
            return Body(None)
        if len(raw) > limit:
            raise errors.PayloadTooLarge(f"The body exceeds {limit} bytes.")
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if not raw.strip():
            value: Any = {}
        else:
            if content_type != b"application/json":
                raise errors.UnsupportedMediaType()
            value = parse_json_body(raw)
        validate(route.body, value)
        return Body(value)

    def _error(self, request: IRequest, ctx: RequestContext, exc: errors.AgentPostError) -> bytes:
        status = http_errors.status_for(exc)
        if isinstance(exc, errors.Unauthenticated):
            request.setHeader(b"www-authenticate", b'Bearer realm="agentpost"')
        if isinstance(exc, errors.RateLimited):
            request.setHeader(b"retry-after", str(max(1, round(exc.retry_after_s + 0.5))).encode())
        if isinstance(exc, errors.TemporaryFailure):
            request.setHeader(b"retry-after", b"5")
        outcome = "denied" if status in (401, 403, 429) else "failed"
        self._audit.enqueue(ctx, outcome, status)
        details = {k: v for k, v in exc.details.items() if isinstance(v, str | int)}
        message = exc.message if status != 500 else errors.AgentPostError.default_message
        return render(request, status,
                      http_errors.error_body(exc.type, message, ctx.request_id, details))


_CONTROLS = re.compile("[\x00-\x1f\x7f]")


def check_url_text(request: IRequest, params: dict[str, str]) -> None:
    """Path ids and query parameters must be UTF-8 text without control characters.

    Checked once here, after authentication (so the refusal is audited under its key) and
    before any handler: a NUL in an id used to reach PostgreSQL, fail there with a 500,
    and then block the audit buffer holding the request's row.
    """
    for name, value in params.items():
        if _CONTROLS.search(value):
            raise errors.InvalidRequest(f"{name} must not contain control characters.",
                                        field=name)
    for raw_name, values in request.args.items():
        try:
            name = raw_name.decode("utf-8")
            texts = [name, *(v.decode("utf-8") for v in values)]
        except UnicodeDecodeError:
            raise errors.InvalidRequest("A query parameter is not valid UTF-8.") from None
        if any(_CONTROLS.search(t) for t in texts):
            field = {"field": name} if not _CONTROLS.search(name) else {}
            raise errors.InvalidRequest("Query parameters must not contain control "
                                        "characters.", **field)


def _bearer(request: IRequest) -> str | None:
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values:
        return None
    if len(values) > 1:
        # Not a list field (RFC 9110 section 11.6.2): with two, a proxy that checks the
        # first and this server (which read the last) would act on different keys.
        raise errors.Unauthenticated("Send exactly one Authorization header.")
    header = values[0]
    if not header:
        return None
    if header[:7] == b"Bearer ":  # the usual spelling: no split, no case folding
        value = header[7:].decode("latin-1").strip()
        return value or None
    scheme, _, value = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def render(request: IRequest, status: int, payload: Any) -> bytes:
    """Serialize a JSON response (204 has no body).

    A body held in memory is sent with its Content-Length rather than in chunks: less
    framing to write, and to parse for the client."""
    request.setResponseCode(status)
    if isinstance(payload, RawResponse):
        if (payload.content_type == JSON_CONTENT_TYPE and not payload.headers
                and payload.stream is None and status != 204):
            _json_framing(request, payload.body)  # a page joined by PostgreSQL
            return payload.body
        request.setHeader(b"content-type", payload.content_type.encode("ascii"))
        for name, value in payload.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("utf-8"))
        if payload.stream is None and status != 204:
            request.setHeader(b"content-length", b"%d" % len(payload.body))
        return payload.body
    if status == 204 or payload is None:
        return b""
    try:
        body = _encode(payload)
    except UnicodeEncodeError:  # a lone surrogate from somewhere: escape, never fail
        body = _encode_ascii(payload).encode("ascii")
    _json_framing(request, body)
    return body


_CONTENT_TYPE, _CONTENT_LENGTH = (name for name, _ in canonical_headers({
    b"content-type": b"", b"content-length": b""}))
_JSON_CONTENT_TYPE_RAW = JSON_CONTENT_TYPE.encode("ascii")


def _json_framing(request: IRequest, body: bytes) -> None:
    """Content-Type (JSON) and Content-Length, straight into twisted.web's header store
    as ``setHeader`` would leave them (canonical names; constant or digit values need
    no sanitising): two ``setHeader`` calls were ~2% of a GET's CPU (issue 12)."""
    headers = getattr(request, "responseHeaders", None)
    if not isinstance(headers, Headers):
        request.setHeader(b"content-type", _JSON_CONTENT_TYPE_RAW)
        request.setHeader(b"content-length", b"%d" % len(body))
        return
    raw = headers._rawHeaders
    raw[_CONTENT_TYPE] = [_JSON_CONTENT_TYPE_RAW]
    raw[_CONTENT_LENGTH] = [b"%d" % len(body)]


def _encode(payload: Any) -> bytes:
    return _encode_text(payload).encode("utf-8")


def _ujson_text(payload: Any) -> str:
    return ujson.dumps(payload, ensure_ascii=False, escape_forward_slashes=False)


# ujson (already installed with autobahn) writes a page of inboxes in a third of the
# stdlib encoder's time, ~40 us of a GET's ~600 us (py-spy, issue 12). Same JSON: both
# refuse what is not JSON (TypeError), both keep lone surrogates for the ASCII fallback.
_encode_text = (_ujson_text if ujson is not None
                else json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode)
_encode_ascii = json.JSONEncoder(separators=(",", ":")).encode


def install_fallbacks(app: Klein) -> None:
    """JSON for unknown paths and wrong methods, instead of Klein's HTML."""

    @app.handle_errors(NotFound)
    def not_found(request: IRequest, failure: Any) -> bytes:
        type_, status, message = http_errors.ROUTE_NOT_FOUND
        return render(request, status, http_errors.error_body(
            type_, message, getattr(request, "request_id", "")))

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(request: IRequest, failure: Any) -> bytes:
        type_, status, message = http_errors.METHOD_NOT_ALLOWED
        allowed = getattr(failure.value, "valid_methods", None) or []
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return render(request, status, http_errors.error_body(
            type_, message, getattr(request, "request_id", "")))
