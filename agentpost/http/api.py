"""The /api/v1 endpoints: thin calls into the core, nothing else."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.api_keys import APIKeys
from agentpost.core.audit_log import AuditLog
from agentpost.core.context import RequestContext
from agentpost.core.environments import Environments
from agentpost.core.inboxes import Inboxes
from agentpost.core.members import Members
from agentpost.core.pages import decode_token, encode_token, page, parse_limit
from agentpost.http import schemas as s
from agentpost.http import views
from agentpost.http.framework import JSON_CONTENT_TYPE, Body, RawResponse, Route, RouteTable
from agentpost.http.validation import parse_timestamp
from agentpost.model.errors import InvalidRequest


def arg(request: IRequest, name: str) -> str | None:
    """One query parameter as text (last one wins)."""
    values = request.args.get(name.encode())
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} is not valid UTF-8.", field=name) from None


def time_arg(request: IRequest, name: str) -> datetime | None:
    """An RFC 3339 query parameter PostgreSQL can store, in UTC."""
    raw = arg(request, name)
    return None if raw is None else parse_timestamp(raw, name)


def listing(rows: list[dict[str, Any]], limit: int, view: Any, key: str = "id") -> dict[str, Any]:
    """The list envelope with its cursor."""
    rows, token = page(rows, limit, key)
    return {"data": [view(r) for r in rows], "limit": limit, "next_page_token": token}


def joined_listing(page_json: str, last_id: str | None, limit: int) -> RawResponse:
    """:func:`listing` for a page PostgreSQL rendered and joined already (``page_json``:
    the items' JSON separated by commas; ``last_id``: the last item's id when more
    follow): the envelope is written around the text, nothing is parsed or encoded."""
    body = b"".join((b'{"data":[', page_json.encode("utf-8"),
                     b'],"limit":%d,"next_page_token":' % limit,
                     b"null" if last_id is None
                     else b'"%s"' % encode_token(last_id).encode("ascii"), b"}"))
    return RawResponse(body, JSON_CONTENT_TYPE)


PAGING = [("limit", "1-100, default 20"), ("page_token", "next_page_token of the previous page")]


def add_api_routes(table: RouteTable, *, environments: Environments, inboxes: Inboxes,
                   api_keys: APIKeys, members: Members, audit_log: AuditLog) -> None:
    """Register every /api/v1 endpoint."""

    # Environments -----------------------------------------------------------------
    async def list_envs(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        rows = await environments.list(ctx)
        return 200, {"data": [views.environment(r) for r in rows], "limit": len(rows),
                     "next_page_token": None}

    async def create_env(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        row = await environments.create(ctx, body.value["name"], body.value.get("slug"))
        return 201, views.environment(row)

    async def get_env(ctx: RequestContext, request: IRequest, body: Body,
                      environment_id: str) -> tuple[int, Any]:
        return 200, views.environment(await environments.get(ctx, environment_id))

    async def update_env(ctx: RequestContext, request: IRequest, body: Body,
                         environment_id: str) -> tuple[int, Any]:
        if not body.value:
            raise InvalidRequest("Nothing to change.")
        return 200, views.environment(await environments.update(ctx, environment_id, body.value))

    async def delete_env(ctx: RequestContext, request: IRequest, body: Body,
                         environment_id: str) -> tuple[int, Any]:
        await environments.delete(ctx, environment_id)
        return 204, None

    env_path = "/environments/{environment_id}"
    for route in (
        Route("GET", "/environments", "environments.list", list_envs, "List environments",
              response=s.list_of("Environment"), tag="Environments"),
        Route("POST", "/environments", "environments.create", create_env, "Create an environment",
              body=s.ENVIRONMENT_CREATE, response=s.ref("Environment"), status=201,
              tag="Environments"),
        Route("GET", env_path, "environments.get", get_env, "Get an environment",
              response=s.ref("Environment"), tag="Environments"),
        Route("PATCH", env_path, "environments.update", update_env, "Rename an environment",
              body=s.ENVIRONMENT_UPDATE, response=s.ref("Environment"), tag="Environments"),
        Route("DELETE", env_path, "environments.delete", delete_env,
              "Delete an empty, non-default environment", status=204, tag="Environments"),
    ):
        table.add(route)

    # Inboxes ----------------------------------------------------------------------
    async def create_inbox(ctx: RequestContext, request: IRequest,
                           body: Body) -> tuple[int, Any]:
        v = body.value
        row, created = await inboxes.create(
            ctx, username=v.get("username"), domain=v.get("domain"),
            display_name=v.get("display_name"), environment_id=v.get("environment_id"),
            client_id=v.get("client_id"))
        return (201 if created else 200), views.inbox(row)

    async def list_inboxes(ctx: RequestContext, request: IRequest,
                           body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        page_json, last_id = await inboxes.list_page(
            ctx, environment_id=arg(request, "environment_id"),
            after_id=decode_token(arg(request, "page_token")), limit=limit)
        return 200, joined_listing(page_json, last_id, limit)

    async def get_inbox(ctx: RequestContext, request: IRequest, body: Body,
                        inbox_id: str) -> tuple[int, Any]:
        return 200, views.inbox(await inboxes.get(ctx, inbox_id))

    async def update_inbox(ctx: RequestContext, request: IRequest, body: Body,
                           inbox_id: str) -> tuple[int, Any]:
        if not body.value:
            raise InvalidRequest("Nothing to change.")
        return 200, views.inbox(await inboxes.update(ctx, inbox_id, body.value))

    async def delete_inbox(ctx: RequestContext, request: IRequest, body: Body,
                           inbox_id: str) -> tuple[int, Any]:
        await inboxes.delete(ctx, inbox_id)
        return 204, None

    inbox_path = "/inboxes/{inbox_id}"
    for route in (
        Route("POST", "/inboxes", "inboxes.create", create_inbox,
              "Create an inbox (a repeated client_id returns the existing one with 200)",
              body=s.INBOX_CREATE, response=s.ref("Inbox"), status=201, tag="Inboxes"),
        Route("GET", "/inboxes", "inboxes.list", list_inboxes, "List inboxes, newest first",
              response=s.list_of("Inbox"), tag="Inboxes",
              query=[*PAGING, ("environment_id", "only this environment")]),
        Route("GET", inbox_path, "inboxes.get", get_inbox, "Get an inbox",
              response=s.ref("Inbox"), tag="Inboxes"),
        Route("PATCH", inbox_path, "inboxes.update", update_inbox,
              "Change display_name or send_paused", body=s.INBOX_UPDATE,
              response=s.ref("Inbox"), tag="Inboxes"),
        Route("DELETE", inbox_path, "inboxes.delete", delete_inbox, "Delete an inbox",
              status=204, tag="Inboxes"),
    ):
        table.add(route)

    # API keys ---------------------------------------------------------------------
    async def create_key(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        v = body.value
        expires = v.get("expires_at")
        minted = await api_keys.create(
            ctx, name=v.get("name", ""), scopes=v.get("scopes"),
            environment_ids=v.get("environment_ids"),
            expires_at=parse_timestamp(expires, "expires_at") if expires else None,
            role=v.get("role"))
        return 201, views.api_key(minted.row, minted.plaintext)

    async def list_keys(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await api_keys.list(ctx, decode_token(arg(request, "page_token")), limit)
        return 200, listing(rows, limit, views.api_key)

    async def get_key(ctx: RequestContext, request: IRequest, body: Body,
                      api_key_id: str) -> tuple[int, Any]:
        return 200, views.api_key(await api_keys.get(ctx, api_key_id))

    async def revoke_key(ctx: RequestContext, request: IRequest, body: Body,
                         api_key_id: str) -> tuple[int, Any]:
        return 200, views.api_key(await api_keys.revoke(ctx, api_key_id))

    key_path = "/api-keys/{api_key_id}"
    for route in (
        Route("POST", "/api-keys", "api_keys.create", create_key,
              "Create an API key; the secret is in this response only",
              body=s.API_KEY_CREATE, response=s.ref("ApiKey"), status=201, tag="API keys"),
        Route("GET", "/api-keys", "api_keys.list", list_keys, "List API keys",
              response=s.list_of("ApiKey"), query=PAGING, tag="API keys"),
        Route("GET", key_path, "api_keys.get", get_key, "Get an API key's metadata",
              response=s.ref("ApiKey"), tag="API keys"),
        Route("DELETE", key_path, "api_keys.revoke", revoke_key,
              "Revoke an API key (effective on the next request)", response=s.ref("ApiKey"),
              tag="API keys"),
    ):
        table.add(route)

    # Members ----------------------------------------------------------------------
    async def list_members(ctx: RequestContext, request: IRequest,
                           body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await members.list(ctx, decode_token(arg(request, "page_token")), limit)
        return 200, listing(rows, limit, views.member, key="user_id")

    async def add_member(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        v = body.value
        row = await members.add(ctx, v["email"], v.get("role", "member"),
                                v.get("display_name", ""))
        return 201, views.member(row)

    async def get_member(ctx: RequestContext, request: IRequest, body: Body,
                         user_id: str) -> tuple[int, Any]:
        return 200, views.member(await members.get(ctx, user_id))

    async def update_member(ctx: RequestContext, request: IRequest, body: Body,
                            user_id: str) -> tuple[int, Any]:
        v = body.value
        if not v:
            raise InvalidRequest("Nothing to change.")
        row = await members.update(ctx, user_id, v.get("role"), v.get("environments"))
        return 200, views.member(row)

    async def remove_member(ctx: RequestContext, request: IRequest, body: Body,
                            user_id: str) -> tuple[int, Any]:
        await members.remove(ctx, user_id)
        return 204, None

    member_path = "/members/{user_id}"
    for route in (
        Route("GET", "/members", "members.list", list_members, "List members",
              response=s.list_of("Member"), query=PAGING, tag="Members"),
        Route("POST", "/members", "members.create", add_member,
              "Add a person to the organization", body=s.MEMBER_CREATE,
              response=s.ref("Member"), status=201, tag="Members"),
        Route("GET", member_path, "members.get", get_member, "Get a member",
              response=s.ref("Member"), tag="Members"),
        Route("PATCH", member_path, "members.update", update_member,
              "Change a member's organization or environment roles", body=s.MEMBER_UPDATE,
              response=s.ref("Member"), tag="Members"),
        Route("DELETE", member_path, "members.delete", remove_member, "Remove a member",
              status=204, tag="Members"),
    ):
        table.add(route)

    # Audit log --------------------------------------------------------------------
    async def list_audit(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await audit_log.list(
            ctx, actor_id=arg(request, "actor_id"), action=arg(request, "action"),
            since=time_arg(request, "since"), until=time_arg(request, "until"),
            after_id=decode_token(arg(request, "page_token")), limit=limit)
        return 200, listing(rows, limit, views.audit_entry)

    table.add(Route(
        "GET", "/audit-logs", "audit.list", list_audit,
        "The organization's audit trail, newest first", response=s.list_of("AuditEntry"),
        tag="Audit", query=[*PAGING, ("actor_id", "a key or user id"),
                            ("action", "exact, or a prefix ending in *"),
                            ("since", "RFC 3339, inclusive"), ("until", "RFC 3339, exclusive")]))
