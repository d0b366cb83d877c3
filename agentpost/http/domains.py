"""The /api/v1 domain endpoints: register, list, read, verify now, delete.

``GET /domains`` lists the installation's shared domains (always verified, no records)
followed by the organization's own, each with the DNS records to publish and their
last checked status (agentpost.core.domains)."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from agentpost.core.context import RequestContext
from agentpost.core.domains import Domains
from agentpost.http import schemas as s
from agentpost.http.framework import Body, Route, RouteTable
from agentpost.http.views import ts

_TS_NULL = {"type": ["string", "null"], "format": "date-time"}
_STR_NULL = {"type": ["string", "null"]}

s.COMPONENTS["DnsRecord"] = {
    "type": "object",
    "required": ["type", "name", "value", "purpose", "status", "required"],
    "properties": {
        "key": {"type": "string",
                "description": "mx, spf, dkim (dkim1..3 with SES), dmarc, mail_from_mx, "
                               "mail_from_spf"},
        "type": {"type": "string", "enum": ["MX", "TXT", "CNAME"]},
        "name": {"type": "string"},
        "value": {"type": "string"},
        "priority": {"type": "integer"},
        "purpose": {"type": "string"},
        "required": {"type": "boolean",
                     "description": "false for suggestions (DMARC)"},
        "status": {"type": "string", "enum": ["pending", "verified"]},
    },
}
s.COMPONENTS["Domain"] = {
    "type": "object",
    "required": ["id", "name", "shared", "verified", "environment_id", "status", "records"],
    "properties": {
        "id": _STR_NULL,
        "name": {"type": "string"},
        "shared": {"type": "boolean"},
        "verified": {"type": "boolean"},
        "status": {"type": "string", "enum": ["pending", "verified"]},
        "environment_id": _STR_NULL,
        "dkim": {"type": "string", "enum": ["ses", "own", "none"],
                 "description": "who signs: SES Easy DKIM, our own key, or nobody"},
        "dkim_selector": _STR_NULL,
        "mail_from_domain": _STR_NULL,
        "records": {"type": "array", "items": s.ref("DnsRecord")},
        "verified_at": _TS_NULL,
        "created_at": _TS_NULL,
        "last_checked_at": _TS_NULL,
        "next_check_at": _TS_NULL,
        "last_check_error": _STR_NULL,
    },
}
DOMAIN_CREATE = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {
        "name": s.text(253, 1),
        "environment_id": s.text(40),
        "mail_from_subdomain": {**s.text(63), "type": ["string", "null"],
                                "description": "e.g. 'bounce' for bounce.<name> as the "
                                               "envelope sender's domain"},
    },
}

#: ``POST /domains/{id}/verify`` takes nothing; an empty body or ``{}`` are both fine.
VERIFY_BODY = {"type": "object", "additionalProperties": False, "properties": {}}


def domain_view(row: dict[str, Any]) -> dict[str, Any]:
    """A shared domain or one of the organization's, as the API shows it."""
    if row.get("shared"):
        return {"id": None, "name": row["name"], "shared": True, "verified": True,
                "status": "verified", "environment_id": None, "dkim": "none",
                "dkim_selector": None, "mail_from_domain": None, "records": [],
                "verified_at": None, "created_at": ts(row.get("created_at")),
                "last_checked_at": None, "next_check_at": None, "last_check_error": None}
    verified = row["verified_at"] is not None
    sub = row.get("mail_from_subdomain")
    return {
        "id": row["id"], "name": row["name"], "shared": False, "verified": verified,
        "status": "verified" if verified else "pending",
        "environment_id": row["environment_id"], "dkim": row["dkim_mode"],
        "dkim_selector": row.get("dkim_selector"),
        "mail_from_domain": f"{sub}.{row['name']}" if sub else None,
        "records": row["records"], "verified_at": ts(row["verified_at"]),
        "created_at": ts(row["created_at"]), "last_checked_at": ts(row["last_checked_at"]),
        "next_check_at": ts(row["next_check_at"]),
        "last_check_error": row["last_check_error"],
    }


def add_domain_routes(table: RouteTable, domains: Domains) -> None:
    """Register the /domains endpoints."""

    async def list_domains(ctx: RequestContext, request: IRequest,
                           body: Body) -> tuple[int, Any]:
        rows = await domains.list(ctx)
        return 200, {"data": [domain_view(r) for r in rows], "limit": len(rows),
                     "next_page_token": None}

    async def create(ctx: RequestContext, request: IRequest, body: Body) -> tuple[int, Any]:
        v = body.value
        row = await domains.create(ctx, name=v["name"], environment_id=v.get("environment_id"),
                                   mail_from_subdomain=v.get("mail_from_subdomain"))
        return 201, domain_view(row)

    async def get(ctx: RequestContext, request: IRequest, body: Body,
                  domain_id: str) -> tuple[int, Any]:
        return 200, domain_view(await domains.get(ctx, domain_id))

    async def verify(ctx: RequestContext, request: IRequest, body: Body,
                     domain_id: str) -> tuple[int, Any]:
        return 200, domain_view(await domains.verify(ctx, domain_id))

    async def delete(ctx: RequestContext, request: IRequest, body: Body,
                     domain_id: str) -> tuple[int, Any]:
        await domains.delete(ctx, domain_id)
        return 204, None

    path = "/domains/{domain_id}"
    for route in (
        Route("GET", "/domains", "domains.list", list_domains,
              "Shared domains and the organization's own, with the DNS records to publish",
              scope="domains:read", response=s.list_of("Domain"), tag="Domains"),
        Route("POST", "/domains", "domains.create", create,
              "Register a domain; the answer lists the DNS records to publish",
              scope="domains:write", body=DOMAIN_CREATE, response=s.ref("Domain"),
              status=201, tag="Domains"),
        Route("GET", path, "domains.get", get, "Get a domain and its records' status",
              scope="domains:read", response=s.ref("Domain"), tag="Domains"),
        Route("POST", f"{path}/verify", "domains.verify", verify,
              "Check the domain's DNS records (and SES) now", scope="domains:write",
              body=VERIFY_BODY, response=s.ref("Domain"), tag="Domains"),
        Route("DELETE", path, "domains.delete", delete,
              "Remove a domain (409 while inboxes use it)", scope="domains:write",
              status=204, tag="Domains"),
    ):
        table.add(route)
