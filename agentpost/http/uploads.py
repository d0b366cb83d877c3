"""Uploads: ``POST /attachments`` (a signed URL) and ``PUT /uploads/{key}`` (the bytes).

With the S3 store, ``POST /attachments`` answers a presigned S3 PUT URL instead (and
the headers it must carry): the bytes go straight to the bucket (core.uploads).

The PUT is not a RouteTable route: it carries no API key (the URL's signature is the
credential, so it can be handed to another program) and its body is the file, not
JSON, and may be larger than ``[http] max_body``. :func:`allow_upload_bodies` gives
the HTTP channel that larger limit for exactly these PUTs, still decided from
Content-Length before a byte is read. The same channel applies the per-route limit of
routes that declare one (``Route.max_body``: the send routes, whose JSON may carry
base64 attachments, up to ``[http] max_send_body``); every other request keeps
``[http] max_body``.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qs

from klein import Klein
from twisted.web.iweb import IRequest

from agentpost.auth.secrets import looks_like_api_key
from agentpost.core.context import RequestContext
from agentpost.core.uploads import Uploads
from agentpost.http import errors as http_errors
from agentpost.http import schemas as s
from agentpost.http.api import arg
from agentpost.http.framework import Body, Route, RouteTable, render
from agentpost.http.site import AgentPostChannel
from agentpost.http.views import ts
from agentpost.model import errors

log = logging.getLogger(__name__)

UPLOAD_PATH = "/api/v1/uploads/"

UPLOAD_CREATE = {
    "type": "object", "additionalProperties": False,
    "required": ["filename", "mime_type", "size"],
    "properties": {"filename": s.text(255, 1), "mime_type": s.text(255, 3),
                   "size": {"type": "integer", "minimum": 0}},
}
s.COMPONENTS["UploadTicket"] = {
    "type": "object", "additionalProperties": False,
    "required": ["key", "upload_url", "upload_headers", "expires_at", "max_size"],
    "properties": {
        "key": {"type": "string", "pattern": "^upl_"},
        "upload_url": {"type": "string", "description": "PUT the file's bytes here "
                       "(no Authorization header; the URL is signed). With the S3 store "
                       "it is a presigned S3 URL for exactly `size` bytes."},
        "upload_headers": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "Headers the PUT must carry (the S3 URL's "
                           "signature covers them); empty for our own URL."},
        "expires_at": {"type": "string", "format": "date-time",
                       "description": "The URL works until then."},
        "max_size": {"type": "integer"},
    },
}


def _base_url(request: IRequest, public_url: str) -> str:
    if public_url:
        return public_url.rstrip("/")
    host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
    return ("https://" if request.isSecure() else "http://") + host


def add_upload_routes(table: RouteTable, uploads: Uploads, public_url: str) -> None:
    """Register ``POST /attachments``."""

    async def create(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        v = body.value
        ticket = await uploads.create(ctx, v["filename"], v["mime_type"], v["size"])
        row = ticket.row
        url = ticket.presigned_url or (
            f"{_base_url(request, public_url)}{UPLOAD_PATH}{row['key']}?{ticket.own_query}")
        return 201, {"key": row["key"], "upload_url": url,
                     "upload_headers": ticket.headers or {},
                     "expires_at": ts(row["url_expires_at"]), "max_size": uploads.max_size_bytes}

    table.add(Route("POST", "/attachments", "attachments.upload", create,
                    "Get a signed URL to PUT an attachment to (use its key when sending)",
                    scope="messages:send", body=UPLOAD_CREATE,
                    response=s.ref("UploadTicket"), status=201, tag="Sending"))


def add_upload_endpoint(app: Klein, uploads: Uploads) -> None:
    """``PUT /api/v1/uploads/{key}?expires=..&signature=..``: store the body."""

    @app.route(UPLOAD_PATH + "<key>", methods=["PUT"])
    async def put_upload(request: IRequest, key: str) -> bytes:
        request_id = getattr(request, "request_id", "req_unknown")
        try:
            content = request.content
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
            row = await uploads.receive(key, arg(request, "expires"), arg(request, "signature"),
                                        content, length)
        except errors.AgentPostError as exc:
            status = http_errors.status_for(exc)
            if isinstance(exc, errors.TemporaryFailure):
                request.setHeader(b"retry-after", b"5")
            return render(request, status, http_errors.error_body(
                exc.type, exc.message if status != 500 else errors.AgentPostError.default_message,
                request_id))
        except Exception:
            log.exception("upload %s failed (request %s)", key[:40], request_id)
            return render(request, 500, http_errors.error_body(
                "internal_error", errors.AgentPostError.default_message, request_id))
        return render(request, 200, {"key": row["key"], "filename": row["filename"],
                                     "mime_type": row["mime_type"], "size": row["size"],
                                     "sha256": row["sha256"]})


class RouteBodyLimits:
    """The routes of a table that declare their own body limit, matched on the request
    line (method and path, before any body byte), as the channel needs them."""

    def __init__(self, table: RouteTable) -> None:
        self.rules: list[tuple[bytes, re.Pattern[bytes], int]] = []
        for route in table.routes:
            if route.max_body:
                parts = [("[^/]+" if part.startswith("{") else re.escape(part))
                         for part in re.split(r"(\{[^}]+\})", route.path) if part]
                pattern = re.escape(table.prefix) + "".join(parts) + "/?"
                self.rules.append((route.method.encode("ascii"),
                                   re.compile(pattern.encode("ascii")), route.max_body))
        #: Methods some rule is for: any other request line needs no look at its key.
        self.methods = frozenset(method for method, _, _ in self.rules)

    def limit_for(self, command: bytes, path: bytes) -> int | None:
        """The route's own limit for this request line, or None (the site's)."""
        route = path.partition(b"?")[0]
        for method, pattern, limit in self.rules:
            if command == method and pattern.fullmatch(route):
                return limit
        return None


class _UploadChannel(AgentPostChannel):
    """The site's channel, with larger body limits for upload PUTs and the routes that
    declare one (RouteBodyLimits)."""

    default_max: int | None = None
    upload_max: int = 0
    uploads: Uploads | None = None
    route_limits: RouteBodyLimits | None = None

    def allHeadersReceived(self) -> None:
        """Pick this request's limit from its method and path, then check as usual."""
        path = getattr(self, "_path", b"") or b""
        command = getattr(self, "_command", b"") or b""
        upload = (command == b"PUT" and path.startswith(UPLOAD_PATH.encode("ascii"))
                  and self.uploads is not None and _signed(self.uploads, path))
        limits = self.route_limits
        # A GET (most requests) is never one of the larger-body routes: no key to parse.
        own = (limits.limit_for(command, path)
               if limits is not None and command in limits.methods
               and self._names_an_api_key() else None)
        if upload:
            self.max_body_bytes = max(self.upload_max, self.default_max or 0)
        elif own is not None:
            self.max_body_bytes = max(own, self.default_max or 0)
        else:
            self.max_body_bytes = self.default_max
        super().allHeadersReceived()

    def _names_an_api_key(self) -> bool:
        """Whether the request carries something shaped like an API key: a request
        without one can only be refused (401), so it never gets the larger limit and a
        stranger cannot make us spool send-sized bodies for nothing. (A forged key can,
        once per failed-key allowance; the key is checked after the body is read.)"""
        requests = getattr(self, "requests", None)
        if not requests:
            return False
        raw = requests[-1].requestHeaders.getRawHeaders(b"authorization") or []
        if len(raw) != 1:
            return False
        scheme, _, token = raw[0].decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and looks_like_api_key(token.strip())


def _signed(uploads: Uploads, path: bytes) -> bool:
    """Whether ``path`` (with its query) is an upload URL we signed and is still valid."""
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        return False
    route, _, query = text.partition("?")
    args = parse_qs(query)
    key = route[len(UPLOAD_PATH):]
    expires, signature = args.get("expires"), args.get("signature")
    return uploads.url_is_signed(key, expires[-1] if expires else None,
                                 signature[-1] if signature else None)


def allow_upload_bodies(site: Any, upload_max_bytes: int, uploads: Uploads,
                        routes: RouteTable | None = None) -> None:
    """Let ``site`` (http.site.make_site) take upload PUTs of ``upload_max_bytes`` when
    their URL's signature checks out, and the bodies of ``routes`` that declare their
    own limit up to it (both decided from the headers, before the body)."""
    default = site.max_body_bytes
    limits = RouteBodyLimits(routes) if routes is not None else None

    def protocol() -> _UploadChannel:
        channel = _UploadChannel()
        channel.default_max = channel.max_body_bytes = default
        channel.upload_max = upload_max_bytes
        channel.uploads = uploads
        channel.route_limits = limits
        channel.header_timeout_s = getattr(site, "header_timeout_s", channel.header_timeout_s)
        channel.body_min_rate = getattr(site, "body_min_rate", channel.body_min_rate)
        return channel

    site.protocol = protocol
