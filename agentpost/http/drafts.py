"""The /api/v1 draft endpoints: CRUD, send (now or at ``send_at``) and cancel.

Drafts are the inbox's IMAP Drafts folder seen structurally (agentpost.core.drafts);
sending goes through the one send core (agentpost.core.draft_sending)."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.drafts import AnswerHook, Drafts
from agentpost.core.idempotency import Idempotency, Recorder
from agentpost.core.pages import decode_token, parse_limit
from agentpost.http import schemas as s
from agentpost.http.api import PAGING, arg, listing
from agentpost.http.framework import Body, Route, RouteTable
from agentpost.http.send import idempotent
from agentpost.http.validation import parse_timestamp
from agentpost.http.views import ts
from agentpost.mail import keywords
from agentpost.model.errors import InvalidRequest

_TS_NULL = {"type": ["string", "null"], "format": "date-time"}
_STR_NULL = {"type": ["string", "null"]}
_ADDR_OUT = {"type": "object", "required": ["email", "name"],
             "properties": {"email": {"type": "string"}, "name": _STR_NULL}}
_ADDRS_OUT = {"type": "array", "items": _ADDR_OUT}
#: Bodies are bounded by [http] max_send_body; the schema's own default (10,000) is not theirs.
_BODY_TEXT = {"type": ["string", "null"], "maxLength": 64 * 1024 * 1024}
#: Addresses: "a@b", "Name <a@b>", {email, name}, or a list of those (checked by the core,
#: which refuses CR/LF/NUL and invalid addresses with the field's name).
_ADDR_IN = {"type": ["string", "object", "array", "null"], "maxItems": 100,
            "description": "\"a@b\", \"Name <a@b>\", {email, name}, or a list of those."}
_ATTACHMENT_IN = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "key": s.text(100, 1),
        "content": {"type": "string", "maxLength": 64 * 1024 * 1024,
                    "description": "base64 (instead of an upload key)"},
        "filename": s.text(255, 1),
        "mime_type": s.text(255, 3),
        "content_id": s.text(200, 1),
        "inline": {"type": "boolean"},
    },
}
_FIELDS_IN = {
    "to": _ADDR_IN, "cc": _ADDR_IN, "bcc": _ADDR_IN, "reply_to": _ADDR_IN,
    "subject": {**s.text(998), "type": ["string", "null"]},
    "text_body": _BODY_TEXT, "html_body": _BODY_TEXT,
    "headers": {"type": ["object", "null"],
                "description": "X-* and a few list headers (List-Unsubscribe...)."},
    "in_reply_to": {**s.text(40), "type": ["string", "null"],
                    "description": "msg_ id of the inbox's message this draft answers"},
    "attachments": {"type": ["array", "null"], "maxItems": 50, "items": _ATTACHMENT_IN},
    "labels": {"type": "array", "maxItems": 50, "items": s.text(64)},
    "send_at": {**_TS_NULL, "description": "schedule the send (messages:send); null "
                                           "cancels a scheduled one"},
}
DRAFT_CREATE = {"type": "object", "additionalProperties": False, "properties": _FIELDS_IN}
DRAFT_UPDATE = DRAFT_CREATE
_EMPTY = {"type": "object", "additionalProperties": False, "properties": {}}
DRAFT_SEND = {"type": "object", "additionalProperties": False,
              "properties": {"send_at": {**_TS_NULL, "description": "omit or null: now"}}}

s.COMPONENTS["Draft"] = {
    "type": "object",
    "required": ["id", "inbox_id", "environment_id", "thread_id", "message_id", "in_reply_to",
                 "subject", "to", "cc", "bcc", "reply_to", "text_body", "html_body",
                 "headers", "attachments", "labels", "send_at", "status", "last_error",
                 "created_at", "updated_at"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": "^drf_"},
        "inbox_id": {"type": "string"}, "environment_id": {"type": "string"},
        "thread_id": {"type": "string"},
        "message_id": {"type": "string", "pattern": "^msg_",
                       "description": "the draft's current copy in the Drafts folder"},
        "in_reply_to": _STR_NULL, "subject": {"type": "string"},
        "to": _ADDRS_OUT, "cc": _ADDRS_OUT, "bcc": _ADDRS_OUT, "reply_to": _ADDRS_OUT,
        "text_body": _STR_NULL, "html_body": _STR_NULL,
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "attachments": {"type": "array", "items": {
            "type": "object", "required": ["id", "filename", "mime_type", "size"],
            "properties": {"id": {"type": "string", "pattern": "^att_"},
                           "filename": {"type": "string"}, "mime_type": {"type": "string"},
                           "size": {"type": "integer"}, "content_id": _STR_NULL,
                           "disposition": _STR_NULL}}},
        "labels": {"type": "array", "items": {"type": "string"}},
        "send_at": _TS_NULL,
        "status": {"type": "string", "enum": ["draft", "scheduled", "sending", "failed"]},
        "last_error": _STR_NULL,
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}
s.COMPONENTS["DraftSummary"] = {
    "type": "object",
    "required": [*(k for k in s.COMPONENTS["Draft"]["required"]
                   if k not in ("text_body", "html_body")), "preview"],
    "additionalProperties": False,
    "properties": {**{k: v for k, v in s.COMPONENTS["Draft"]["properties"].items()
                      if k not in ("text_body", "html_body")},
                   "preview": {"type": "string"}},
}
s.COMPONENTS["DraftSendResult"] = {
    "type": "object", "required": ["status", "draft", "message"],
    "properties": {
        "status": {"type": "string", "enum": ["sent", "scheduled"]},
        "draft": {"oneOf": [s.ref("Draft"), {"type": "null"}],
                  "description": "the scheduled draft (status scheduled)"},
        "message": {"type": ["object", "null"],
                    "description": "the sent message, as the send API answers it"},
    },
}


def draft_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A draft in a list: everything but the bodies, and the copy's preview."""
    body = draft_view(row)
    del body["text_body"], body["html_body"]
    body["preview"] = row["preview"]
    return body


def draft_view(row: dict[str, Any]) -> dict[str, Any]:
    """A draft: the fields as given (or read back from an IMAP client's message), the
    copy's thread, labels and attachments, and the send plan."""
    f = row["fields"]

    def addrs(name: str) -> list[dict[str, Any]]:
        return [{"email": a["email"], "name": a.get("name") or None} for a in f.get(name) or []]

    return {
        "id": row["id"], "inbox_id": row["inbox_id"], "environment_id": row["environment_id"],
        "thread_id": row["thread_id"], "message_id": row["message_id"],
        "in_reply_to": f.get("in_reply_to"), "subject": f.get("subject") or "",
        "to": addrs("to"), "cc": addrs("cc"), "bcc": addrs("bcc"),
        "reply_to": addrs("reply_to"), "text_body": f.get("text_body"),
        "html_body": f.get("html_body"), "headers": dict(f.get("headers") or {}),
        "attachments": [{"id": a["id"], "filename": a["filename"],
                         "mime_type": a["mime_type"], "size": a["size"],
                         "content_id": a["content_id"], "disposition": a["disposition"]}
                        for a in row.get("attachments", [])],
        "labels": keywords.split(row["labels"])[0], "send_at": ts(row["send_at"]),
        "status": row["status"], "last_error": row["last_error"],
        "created_at": ts(row["created_at"]), "updated_at": ts(row["updated_at"]),
    }


def _for(ctx: RequestContext, row: dict[str, Any]) -> dict[str, Any]:
    """The draft as ``ctx``'s principal may see it: a key without messages:read (one
    that may only send, or only write) learns the draft's id, thread and plan from an
    answer, never its content -- otherwise scheduling, cancelling or touching a draft
    would read it."""
    body = draft_view(row)
    if "messages:read" in ctx.org_principal.scopes:
        return body
    return {**body, "subject": "", "to": [], "cc": [], "bcc": [], "reply_to": [],
            "text_body": None, "html_body": None, "headers": {}, "attachments": [],
            "in_reply_to": None}


def _parsed(value: dict[str, Any]) -> dict[str, Any]:
    """The body with ``send_at`` as a datetime (the schema has checked its syntax)."""
    if value.get("send_at") is not None:
        return {**value, "send_at": parse_timestamp(value["send_at"], "send_at")}
    return value


def _idempotency_key(request: IRequest) -> str | None:
    raw = request.getHeader(b"idempotency-key")
    if raw is None:
        return None
    try:
        return str(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise InvalidRequest("Idempotency-Key must be printable ASCII.",
                             field="Idempotency-Key") from None


def _recording(ctx: RequestContext, record: Recorder) -> AnswerHook:
    """The create hook that records the answer (as ``ctx`` may see the draft) in the
    draft's own transaction."""
    async def answer(txn: Any, row: dict[str, Any]) -> None:
        await record(txn, 201, _for(ctx, row))

    return answer


def add_drafts_routes(table: RouteTable, drafts: Drafts, sending: Any, *,
                      max_body: int | None = None,
                      idempotency: Idempotency | None = None) -> None:
    """Register the draft endpoints (``sending``: core.draft_sending.DraftSending).
    Create and update take bodies up to ``max_body`` (``[http] max_send_body``: inline
    base64 attachments) instead of the table's limit. ``idempotency`` serves the
    Idempotency-Key of create: with a ``send_at`` it is a POST that sends, and a client
    retrying one whose answer it lost must not schedule the mail twice."""

    async def create(ctx: RequestContext, request: IRequest, body: Body,
                     inbox_id: str) -> tuple[int, Any]:
        value = _parsed(body.value)

        async def run(record: Recorder | None) -> tuple[int, Any]:
            answer = _recording(ctx, record) if record is not None else None
            return 201, _for(ctx, await drafts.create(ctx, inbox_id, value, answer=answer))

        if idempotency is None:
            return await run(None)
        return await idempotent(idempotency, ctx, request, body.value, run)

    async def list_drafts(ctx: RequestContext, request: IRequest, body: Body,
                          inbox_id: str) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await drafts.list_drafts(ctx, inbox_id, limit=limit,
                                        after_id=decode_token(arg(request, "page_token")))
        return 200, listing(rows, limit, draft_summary)

    async def get(ctx: RequestContext, request: IRequest, body: Body,
                  draft_id: str) -> tuple[int, Any]:
        return 200, draft_view(await drafts.get(ctx, draft_id))

    async def update(ctx: RequestContext, request: IRequest, body: Body,
                     draft_id: str) -> tuple[int, Any]:
        return 200, _for(ctx, await drafts.update(ctx, draft_id, _parsed(body.value)))

    async def delete(ctx: RequestContext, request: IRequest, body: Body,
                     draft_id: str) -> tuple[int, Any]:
        await drafts.delete(ctx, draft_id)
        return 204, None

    async def send(ctx: RequestContext, request: IRequest, body: Body,
                   draft_id: str) -> tuple[int, Any]:
        value = _parsed(body.value)
        status, result = await sending.send(
            ctx, draft_id, value.get("send_at"), idempotency_key=_idempotency_key(request),
            request_body=body.value, path=request.path.decode("utf-8", "replace"),
            render=lambda row: _for(ctx, row))
        if ctx.details.get("idempotent_replay"):  # as the send API says it
            request.setHeader(b"idempotent-replayed", b"true")
        # A scheduled answer's draft is rendered already (``render``, also when replayed).
        if (isinstance(result, dict) and result.get("status") != "scheduled"
                and "messages:read" not in ctx.org_principal.scopes):
            # The Sent copy is the draft's content (also in a replayed answer).
            result = {**result, "message": None}
        return status, result

    async def cancel(ctx: RequestContext, request: IRequest, body: Body,
                     draft_id: str) -> tuple[int, Any]:
        return 200, _for(ctx, await drafts.cancel(ctx, draft_id))

    base, one = "/inboxes/{inbox_id}/drafts", "/drafts/{draft_id}"
    for route in (
        Route("POST", base, "drafts.create", create,
              "Create a draft (also a message in the inbox's IMAP Drafts folder; "
              "Idempotency-Key honoured)",
              scope="messages:write", body=DRAFT_CREATE, response=s.ref("Draft"), status=201,
              tag="Drafts", max_body=max_body),
        Route("GET", base, "drafts.list", list_drafts,
              "Drafts of an inbox, newest first (IMAP clients' drafts included)",
              scope="messages:read", response=s.list_of("DraftSummary"), query=PAGING,
              tag="Drafts"),
        Route("GET", one, "drafts.get", get, "A draft", scope="messages:read",
              response=s.ref("Draft"), tag="Drafts"),
        Route("PATCH", one, "drafts.update", update,
              "Change a draft (its Drafts-folder copy is replaced; the id stays) or its "
              "send_at (null cancels a scheduled send)", scope="messages:write",
              body=DRAFT_UPDATE, response=s.ref("Draft"), tag="Drafts", max_body=max_body),
        Route("DELETE", one, "drafts.delete", delete,
              "Delete a draft (cancels a scheduled send)", scope="messages:write",
              status=204, tag="Drafts"),
        Route("POST", one + "/send", "drafts.send", send,
              "Send a draft now, or schedule it with send_at (Idempotency-Key honoured)",
              scope="messages:send", body=DRAFT_SEND, response=s.ref("DraftSendResult"),
              tag="Drafts"),
        Route("POST", one + "/cancel", "drafts.cancel", cancel,
              "Cancel a scheduled send (the draft stays, status draft); messages:send "
              "or messages:write", body=_EMPTY, response=s.ref("Draft"), tag="Drafts"),
    ):
        table.add(route)
