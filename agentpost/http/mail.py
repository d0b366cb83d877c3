"""The /api/v1 mail endpoints: messages, threads, attachments, labels and filter rules."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any
from urllib.parse import quote

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.filters import FilterRules
from agentpost.core.messages import Messages, check_labels
from agentpost.core.pages import decode_token, parse_limit
from agentpost.http import schemas as s
from agentpost.http import views
from agentpost.http.api import PAGING, arg, listing, time_arg
from agentpost.http.framework import Body, RawResponse, Route, RouteTable
from agentpost.http.validation import parse_timestamp
from agentpost.mail.sanitize import ascii_fallback, safe_filename
from agentpost.model.errors import InvalidRequest
from agentpost.model.ids import is_id


def _bool_arg(request: IRequest, name: str) -> bool | None:
    raw = arg(request, name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise InvalidRequest(f"{name} must be true or false.", field=name)


def _labels_arg(request: IRequest) -> list[str] | None:
    raw = arg(request, "labels")
    if not raw:
        return None
    return check_labels([x.strip() for x in raw.split(",") if x.strip()])


def _thread_token(row: dict[str, Any]) -> str:
    raw = f"t1:{row['last_message_at'].isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _thread_cursor(token: str | None) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        when, _, tid = raw[3:].partition("|")
        if raw.startswith("t1:") and is_id(tid, "thr"):
            # The time goes back to PostgreSQL: only one it can store, in UTC.
            return parse_timestamp(when, "page_token"), tid
    except (ValueError, InvalidRequest):
        pass
    raise InvalidRequest("page_token is not valid.", field="page_token")


def content_disposition(filename: str) -> str:
    """RFC 6266 ``attachment`` with an ASCII fallback and the UTF-8 name (RFC 8187).

    The name is reduced to a safe basename first (rows stored before ingest did that
    may still hold ``../`` or control characters): a browser or ``curl -J`` saving the
    file must not be steered into another directory, and no CR/LF can reach the header.
    """
    name = safe_filename(filename) or "attachment"
    return (f"attachment; filename=\"{ascii_fallback(name)}\"; "
            f"filename*=UTF-8''{quote(name, safe='')}")


def add_mail_routes(table: RouteTable, messages: Messages, filters: FilterRules) -> None:
    """Register the mail endpoints."""

    async def list_messages(ctx: RequestContext, request: IRequest, body: Body,
                            inbox_id: str) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await messages.list(
            ctx, inbox_id, thread_id=arg(request, "thread_id"), labels=_labels_arg(request),
            before=time_arg(request, "before"), after=time_arg(request, "after"),
            unread=_bool_arg(request, "unread"),
            after_id=decode_token(arg(request, "page_token")), limit=limit,
            folder=arg(request, "folder"), message_id=arg(request, "message_id"))
        return 200, listing(rows, limit, views.message_summary)

    async def get_message(ctx: RequestContext, request: IRequest, body: Body,
                          message_id: str) -> tuple[int, Any]:
        return 200, views.message(await messages.get(ctx, message_id))

    async def raw_message(ctx: RequestContext, request: IRequest, body: Body,
                          message_id: str) -> tuple[int, Any]:
        stream = await messages.raw(ctx, message_id)
        return 200, RawResponse(b"", "message/rfc822", {
            "content-disposition": content_disposition(f"{message_id}.eml")}, stream=stream)

    async def get_attachment(ctx: RequestContext, request: IRequest, body: Body,
                             message_id: str, attachment_id: str) -> tuple[int, Any]:
        att, stream, url = await messages.attachment(ctx, message_id, attachment_id)
        if url is not None:
            return 302, RawResponse(b"", "text/plain", {"location": url})
        return 200, RawResponse(b"", att["mime_type"], {
            "content-disposition": content_disposition(att["filename"] or "attachment")},
            stream=stream)

    async def update_message(ctx: RequestContext, request: IRequest, body: Body,
                             message_id: str) -> tuple[int, Any]:
        if "read" not in body.value:
            raise InvalidRequest("Nothing to change.")
        return 200, views.message(await messages.set_read(ctx, message_id, body.value["read"]))

    async def add_labels(ctx: RequestContext, request: IRequest, body: Body,
                         message_id: str) -> tuple[int, Any]:
        return 200, views.message(await messages.add_labels(ctx, message_id,
                                                            body.value["labels"]))

    async def remove_labels(ctx: RequestContext, request: IRequest, body: Body,
                            message_id: str) -> tuple[int, Any]:
        return 200, views.message(await messages.remove_labels(ctx, message_id,
                                                               body.value["labels"]))

    async def delete_message(ctx: RequestContext, request: IRequest, body: Body,
                             message_id: str) -> tuple[int, Any]:
        await messages.delete(ctx, message_id)
        return 204, None

    async def list_threads(ctx: RequestContext, request: IRequest, body: Body,
                           inbox_id: str) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await messages.list_threads(ctx, inbox_id, labels=_labels_arg(request),
                                           cursor=_thread_cursor(arg(request, "page_token")),
                                           limit=limit)
        token = _thread_token(rows[limit - 1]) if len(rows) > limit else None
        return 200, {"data": [views.thread(r) for r in rows[:limit]], "limit": limit,
                     "next_page_token": token}

    async def get_thread(ctx: RequestContext, request: IRequest, body: Body,
                         thread_id: str) -> tuple[int, Any]:
        return 200, views.thread(await messages.get_thread(ctx, thread_id))

    async def thread_add(ctx: RequestContext, request: IRequest, body: Body,
                         thread_id: str) -> tuple[int, Any]:
        return 200, views.thread(await messages.thread_labels(ctx, thread_id,
                                                              body.value["labels"], True))

    async def thread_remove(ctx: RequestContext, request: IRequest, body: Body,
                            thread_id: str) -> tuple[int, Any]:
        return 200, views.thread(await messages.thread_labels(ctx, thread_id,
                                                              body.value["labels"], False))

    async def create_rule(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        v = body.value
        rule = await filters.create(ctx, direction=v["direction"], action=v["action"],
                                    match_type=v["match_type"], value=v["value"],
                                    environment_id=v.get("environment_id"),
                                    inbox_id=v.get("inbox_id"))
        return 201, views.filter_rule(rule)

    async def list_rules(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await filters.list(ctx, decode_token(arg(request, "page_token")), limit)
        return 200, listing(rows, limit, views.filter_rule)

    async def get_rule(ctx: RequestContext, request: IRequest, body: Body,
                       rule_id: str) -> tuple[int, Any]:
        return 200, views.filter_rule(await filters.get(ctx, rule_id))

    async def delete_rule(ctx: RequestContext, request: IRequest, body: Body,
                          rule_id: str) -> tuple[int, Any]:
        await filters.delete(ctx, rule_id)
        return 204, None

    msg = "/messages/{message_id}"
    thr = "/threads/{thread_id}"
    for route in (
        Route("GET", "/inboxes/{inbox_id}/messages", "messages.list", list_messages,
              "Messages of an inbox, newest first", response=s.list_of("MessageSummary"),
              tag="Messages", query=[*PAGING, ("thread_id", "only this thread"),
                                     ("labels", "comma-separated; all must be present"),
                                     ("before", "received before (RFC 3339)"),
                                     ("after", "received after (RFC 3339)"),
                                     ("unread", "true or false"),
                                     ("folder", "only this IMAP folder (INBOX, Sent, Drafts, "
                                                "Trash, Junk, or one's own, e.g. Archive)"),
                                     ("message_id", "only copies of this RFC 5322 "
                                                    "Message-ID (with or without <>)")]),
        Route("GET", msg, "messages.get", get_message, "A message with bodies",
              response=s.ref("Message"), tag="Messages"),
        Route("GET", msg + "/raw", "messages.raw", raw_message,
              "The message exactly as received (message/rfc822)", tag="Messages"),
        Route("GET", msg + "/attachments/{attachment_id}", "messages.attachment",
              get_attachment, "Attachment content, or a redirect to a short-lived URL",
              tag="Messages"),
        Route("PATCH", msg, "messages.update", update_message, "Mark read or unread",
              body=s.MESSAGE_UPDATE, response=s.ref("Message"), tag="Messages"),
        Route("POST", msg + "/labels", "messages.labels.add", add_labels, "Add labels",
              body=s.LABELS_BODY, response=s.ref("Message"), tag="Messages"),
        Route("DELETE", msg + "/labels", "messages.labels.remove", remove_labels,
              "Remove labels", body=s.LABELS_BODY, response=s.ref("Message"), tag="Messages"),
        Route("DELETE", msg, "messages.delete", delete_message, "Delete a message",
              status=204, tag="Messages"),
        Route("GET", "/inboxes/{inbox_id}/threads", "threads.list", list_threads,
              "Threads of an inbox by latest activity", response=s.list_of("Thread"),
              tag="Threads", query=[*PAGING, ("labels", "comma-separated")]),
        Route("GET", thr, "threads.get", get_thread, "A thread with its messages",
              response=s.ref("Thread"), tag="Threads"),
        Route("POST", thr + "/labels", "threads.labels.add", thread_add,
              "Add labels to every message of a thread", body=s.LABELS_BODY,
              response=s.ref("Thread"), tag="Threads"),
        Route("DELETE", thr + "/labels", "threads.labels.remove", thread_remove,
              "Remove labels from every message of a thread", body=s.LABELS_BODY,
              response=s.ref("Thread"), tag="Threads"),
        Route("POST", "/filter-rules", "filters.create", create_rule,
              "Create an allow/block rule", body=s.FILTER_RULE_CREATE,
              response=s.ref("FilterRule"), status=201, tag="Filter rules"),
        Route("GET", "/filter-rules", "filters.list", list_rules, "List filter rules",
              response=s.list_of("FilterRule"), query=PAGING, tag="Filter rules"),
        Route("GET", "/filter-rules/{rule_id}", "filters.get", get_rule, "Get a filter rule",
              response=s.ref("FilterRule"), tag="Filter rules"),
        Route("DELETE", "/filter-rules/{rule_id}", "filters.delete", delete_rule,
              "Delete a filter rule", status=204, tag="Filter rules"),
    ):
        table.add(route)
