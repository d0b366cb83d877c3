"""The send API: POST /inboxes/{id}/messages, and reply, reply-all and forward.

Each answers ``201 Created`` with the Sent copy (the message JSON, direction
``outbound``, folder ``Sent``) plus ``queue_ids`` and ``send_status: "queued"``: the
message is stored and queued when the answer comes, delivery happens after it (watch
``message.sent`` / delivery events, or the queue). An ``Idempotency-Key`` header makes
a retry answer what the first request answered (core.idempotency).
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.idempotency import Idempotency, Recorder, check_key, fingerprint
from agentpost.core.sending import Sending
from agentpost.http import schemas as s
from agentpost.http.framework import Body, Route, RouteTable

_MAX_BODY_TEXT = 16 * 1024 * 1024  # bounded by [http] max_send_body anyway

_NAME = {"type": ["string", "null"], "maxLength": 998}
ADDRESS = {
    "type": ["string", "object"], "maxLength": 998,
    "description": "\"a@example.com\", \"Name <a@example.com>\", or {email, name}.",
    "additionalProperties": False, "required": ["email"],
    "properties": {"email": {"type": "string", "maxLength": 254}, "name": _NAME},
}
ADDRESSES = {"type": ["array", "string", "object"], "maxItems": 1000, "items": ADDRESS,
             "maxLength": 998, "additionalProperties": False,
             "properties": ADDRESS["properties"]}
ATTACHMENT_IN = {
    "type": "object", "additionalProperties": False,
    "description": "Either {key} of an upload (POST /attachments) or base64 content.",
    "properties": {
        "key": {"type": "string", "maxLength": 64},
        "content": {"type": "string", "maxLength": _MAX_BODY_TEXT},
        "filename": {"type": "string", "maxLength": 255},
        "mime_type": {"type": "string", "maxLength": 255},
        "content_id": {"type": "string", "maxLength": 250},
        "disposition": {"type": "string", "enum": ["attachment", "inline"]},
    },
}
_COMMON = {
    "cc": ADDRESSES, "bcc": ADDRESSES,
    "text_body": {"type": "string", "maxLength": _MAX_BODY_TEXT},
    "html_body": {"type": "string", "maxLength": _MAX_BODY_TEXT},
    "reply_to": ADDRESSES,
    "headers": {"type": "object", "description": "X-* and List-Unsubscribe(-Post), "
                "List-Id, Auto-Submitted, Precedence, Importance, Keywords, Comments.",
                "additionalProperties": {"type": "string", "maxLength": 998}},
    "labels": {"type": "array", "maxItems": 50, "items": s.text(64)},
    "attachments": {"type": "array", "maxItems": 100, "items": ATTACHMENT_IN},
}
SEND_BODY = {
    "type": "object", "additionalProperties": False,
    "properties": {"to": ADDRESSES, "subject": {"type": "string", "maxLength": 998},
                   **_COMMON},
}
REPLY_BODY = {
    "type": "object", "additionalProperties": False,
    "properties": {"to": ADDRESSES, "quote": {"type": "boolean"}, **_COMMON},
}
FORWARD_BODY = {
    "type": "object", "additionalProperties": False,
    "description": "to (or cc/bcc) is needed; checked after the message is found.",
    "properties": {"to": ADDRESSES, "include_attachments": {"type": "boolean"},
                   **_COMMON},
}
s.COMPONENTS["SentMessage"] = {
    "type": "object",
    "required": [*s.COMPONENTS["Message"]["required"], "queue_ids", "send_status"],
    "properties": {
        **s.COMPONENTS["Message"]["properties"],
        "queue_ids": {"type": "array", "items": {"type": "string", "pattern": "^obq_"},
                      "description": "Outbound queue rows (one per recipient domain)."},
        "send_status": {"type": "string", "enum": ["queued"]},
    },
}


async def idempotent(idempotency: Idempotency, ctx: RequestContext, request: IRequest,
                     body: Any, fn: Any) -> tuple[int, Any]:
    """Run ``fn(recorder)`` under the request's Idempotency-Key (if any); a replay gets
    the first answer and an ``Idempotent-Replayed: true`` header."""
    raw = request.getHeader(b"idempotency-key")
    key = check_key(raw.decode("latin-1") if raw is not None else None)
    fp = fingerprint(request.method.decode("ascii"), request.path.decode("latin-1"), body)
    status, payload = await idempotency.run(ctx, key, fp, fn)
    if ctx.details.get("idempotent_replay"):
        request.setHeader(b"idempotent-replayed", b"true")
    return status, payload


def add_send_routes(table: RouteTable, sending: Sending, idempotency: Idempotency, *,
                    max_body: int | None = None) -> None:
    """Register the send endpoints. Their bodies may be up to ``max_body`` (``[http]
    max_send_body``, sized for inline base64 attachments) rather than the table's
    ``[http] max_body``; the channel refuses more from Content-Length (http.uploads)."""

    async def send(ctx: RequestContext, request: IRequest, body: Body,
                   inbox_id: str) -> tuple[int, Any]:
        async def run(record: Recorder | None) -> tuple[int, Any]:
            return 201, await sending.send(ctx, inbox_id, body.value, record)

        return await idempotent(idempotency, ctx, request, body.value, run)

    def responder(mode: str) -> Any:
        async def respond(ctx: RequestContext, request: IRequest, body: Body,
                          message_id: str) -> tuple[int, Any]:
            async def run(record: Recorder | None) -> tuple[int, Any]:
                return 201, await sending.respond(ctx, message_id, body.value, mode, record)

            return await idempotent(idempotency, ctx, request, body.value, run)

        return respond

    sent = s.ref("SentMessage")
    msg = "/messages/{message_id}"
    for route in (
        Route("POST", "/inboxes/{inbox_id}/messages", "messages.send", send,
              "Send a message from this inbox (Idempotency-Key honoured)",
              scope="messages:send", body=SEND_BODY, response=sent, status=201,
              tag="Sending", max_body=max_body),
        Route("POST", msg + "/reply", "messages.reply", responder("reply"),
              "Reply to the sender (Re:, In-Reply-To, References; same thread; "
              "also needs messages:read)",
              scope="messages:send", body=REPLY_BODY, response=sent, status=201,
              tag="Sending", max_body=max_body),
        Route("POST", msg + "/reply-all", "messages.reply_all", responder("reply_all"),
              "Reply to the sender and every other recipient but this inbox (also "
              "needs messages:read)",
              scope="messages:send", body=REPLY_BODY, response=sent, status=201,
              tag="Sending", max_body=max_body),
        Route("POST", msg + "/forward", "messages.forward", responder("forward"),
              "Forward with the original quoted (and its attachments; also needs "
              "messages:read)",
              scope="messages:send", body=FORWARD_BODY, response=sent, status=201,
              tag="Sending", max_body=max_body),
    ):
        table.add(route)
