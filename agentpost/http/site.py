"""The twisted.web Site: security headers and a request id on every response.

Headers are set before any resource renders, so they are present on every answer —
2xx, 4xx, 5xx and Klein's own fallbacks — and Twisted's version banner is removed.
"""

from __future__ import annotations

from typing import Any

from twisted.web import server
from twisted.web.resource import IResource

from agentpost.model.ids import new_id

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


class AgentPostRequest(server.Request):
    """A request that carries its id and dresses its response before rendering."""

    def render(self, resrc: IResource) -> None:
        """Set headers every response must carry, then render as usual."""
        self.request_id = new_id("req")
        self.responseHeaders.removeHeader(b"server")
        for name, value in SECURITY_HEADERS.items():
            self.setHeader(name, value)
        self.setHeader(b"x-request-id", self.request_id.encode("ascii"))
        super().render(resrc)

    def processingFailed(self, reason: Any) -> None:
        """Never show a traceback: answer a generic JSON 500."""
        from twisted.logger import Logger

        Logger().failure("unhandled error in request", reason)
        body = (b'{"error":{"type":"internal_error","message":"An internal error occurred.",'
                b'"request_id":"' + getattr(self, "request_id", "").encode() + b'"}}')
        if not self.startedWriting:
            self.setResponseCode(500)
            self.setHeader(b"content-type", b"application/json; charset=utf-8")
            self.setHeader(b"content-length", str(len(body)).encode())
            self.write(body)
        self.finish()
        return reason


def make_site(resource: IResource, *, access_log: bool = False) -> server.Site:
    """A Site with our request class; the access log is off unless asked for, since
    every API request is already in the audit trail."""
    site = server.Site(resource)
    site.requestFactory = AgentPostRequest
    site.displayTracebacks = False
    if not access_log:
        site.log = lambda request: None  # type: ignore[method-assign]
    return site
