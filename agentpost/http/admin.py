"""The /admin/v1 endpoints, for operators holding admin keys only."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.organizations import Organizations
from agentpost.core.pages import decode_token, parse_limit
from agentpost.http import schemas as s
from agentpost.http import views
from agentpost.http.api import PAGING, arg, listing
from agentpost.http.framework import Body, Route, RouteTable


def add_admin_routes(table: RouteTable, organizations: Organizations) -> None:
    """Register every /admin/v1 endpoint."""

    async def create_org(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        v = body.value
        row = await organizations.create(ctx, v["name"], v.get("tier", "free"),
                                         v.get("owner_email"))
        return 201, views.organization(row)

    async def list_orgs(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        limit = parse_limit(arg(request, "limit"))
        rows = await organizations.list(decode_token(arg(request, "page_token")), limit)
        return 200, listing(rows, limit, views.organization)

    async def get_org(ctx: RequestContext, request: IRequest, body: Body,
                      org_id: str) -> tuple[int, Any]:
        ctx.target_id = org_id
        return 200, views.organization(await organizations.get(org_id))

    async def update_org(ctx: RequestContext, request: IRequest, body: Body,
                         org_id: str) -> tuple[int, Any]:
        return 200, views.organization(
            await organizations.set_tier(ctx, org_id, body.value["tier"]))

    async def mint_key(ctx: RequestContext, request: IRequest, body: Body,
                       org_id: str) -> tuple[int, Any]:
        minted = await organizations.mint_owner_key(ctx, org_id,
                                                    body.value.get("name", "owner key"))
        return 201, views.api_key(minted.row, minted.plaintext)

    org_path = "/organizations/{org_id}"
    for route in (
        Route("POST", "/organizations", "admin.organizations.create", create_org,
              "Create an organization with its default environment", auth="admin",
              body=s.ORG_CREATE, response=s.ref("Organization"), status=201, tag="Admin"),
        Route("GET", "/organizations", "admin.organizations.list", list_orgs,
              "List organizations", auth="admin", response=s.list_of("Organization"),
              query=PAGING, tag="Admin"),
        Route("GET", org_path, "admin.organizations.get", get_org, "Get an organization",
              auth="admin", response=s.ref("Organization"), tag="Admin"),
        Route("PATCH", org_path, "admin.organizations.update", update_org,
              "Set an organization's tier", auth="admin", body=s.ORG_UPDATE,
              response=s.ref("Organization"), tag="Admin"),
        Route("POST", org_path + "/api-keys", "admin.organizations.mint_key", mint_key,
              "Mint an owner-level API key for an organization", auth="admin",
              body=s.OWNER_KEY_CREATE, response=s.ref("ApiKey"), status=201, tag="Admin"),
    ):
        table.add(route)
