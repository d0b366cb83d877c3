"""The HTTP adapter's one translation table from domain errors to responses."""

from __future__ import annotations

from typing import Any

from agentpost.model import errors

STATUS: dict[type[errors.AgentPostError], int] = {
    errors.InvalidRequest: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.Unprocessable: 422,
    errors.RateLimited: 429,
    errors.MailboxFull: 507,
    errors.TemporaryFailure: 503,
}

# Extra error types that only HTTP has (no domain meaning).
METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "This method is not allowed on this resource.")
ROUTE_NOT_FOUND = ("not_found", 404, "No such endpoint.")
# Refusals of the HTTP channel itself, before any route (http.site).
BAD_FRAMING = ("invalid_request", 400, "The request is not valid HTTP/1.1 (its framing, a "
               "header or its length).")
URI_TOO_LONG = ("uri_too_long", 414, "The request line is too long.")
HEADERS_TOO_LARGE = ("header_fields_too_large", 431,
                     "The request's header fields are too large or too many.")
PAYLOAD_TOO_LARGE = ("payload_too_large", 413, "The request body is too large.")
REQUEST_TIMEOUT = ("request_timeout", 408, "The request arrived too slowly; send it again "
                   "without pausing.")


def status_for(exc: errors.AgentPostError) -> int:
    """HTTP status for a domain error (500 for anything unmapped)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(type_: str, message: str, request_id: str,
               details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The one JSON error shape: {"error": {type, message, request_id, ...details}}."""
    body: dict[str, Any] = {"type": type_, "message": message, "request_id": request_id}
    for key, value in (details or {}).items():
        body[key] = value
    return {"error": body}
