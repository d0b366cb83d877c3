"""The access log's line format: Twisted's combined log line, without secrets.

Browsers hand the event stream its API key in the query string (``GET /ws?token=…``),
and clients put keys where they should not; with ``[http] access_log`` on, every such
key used to be written to the service log, where anyone reading logs could use it.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.web import http

#: What must never reach the access log: key-shaped text anywhere in a logged value,
#: and the value of any ``token``-like query parameter (``GET /ws?token=…``).
_SECRETS_IN_URI = re.compile(
    rb"ap_(?:sk|admin)_[A-Za-z0-9_%-]+|(?<=token=)[^&#\s]+", re.IGNORECASE)


class _Redacted:
    """A request as the access log formatter sees it: its URI and Referer without
    secrets, everything else the request's own."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = _SECRETS_IN_URI.sub(b"REDACTED", request.uri)

    def getHeader(self, name: bytes) -> Any:
        value = self._request.getHeader(name)
        return _SECRETS_IN_URI.sub(b"REDACTED", value) if isinstance(value, bytes) else value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redacting_log_formatter(timestamp: str, request: Any) -> str:
    """Twisted's combined log line, minus API keys: browsers hand the event stream its
    key in the query string, and a key in a log file is a key anyone reading logs holds."""
    return http.combinedLogFormatter(timestamp, _Redacted(request))
