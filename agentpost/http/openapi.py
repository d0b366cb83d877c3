"""The OpenAPI 3.1 document, generated from the route tables so it cannot drift."""

from __future__ import annotations

import re
from typing import Any

from agentpost import __version__
from agentpost.http import schemas as s
from agentpost.http.framework import RouteTable

_ERRORS = {
    "400": "invalid_request", "401": "unauthenticated", "403": "forbidden",
    "404": "not_found", "409": "conflict", "413": "payload_too_large",
    "414": "uri_too_long", "415": "unsupported_media_type", "429": "rate_limited",
    "431": "header_fields_too_large", "503": "temporarily_unavailable",
}


def build_document(tables: list[RouteTable], server_url: str = "/") -> dict[str, Any]:
    """Describe every route of every table."""
    paths: dict[str, dict[str, Any]] = {}
    for table in tables:
        for route in table.routes:
            full = table.prefix + route.path
            op: dict[str, Any] = {
                "operationId": route.action.replace(".", "_"),
                "summary": route.summary,
                "tags": [route.tag] if route.tag else [],
                "responses": {},
            }
            if route.auth == "org":
                op["security"] = [{"apiKey": []}]
            elif route.auth == "admin":
                op["security"] = [{"adminKey": []}]
            else:
                op["security"] = []
            params = [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in re.findall(r"{(\w+)}", route.path)
            ]
            params += [
                {"name": name, "in": "query", "required": False, "description": desc,
                 "schema": {"type": "string"}}
                for name, desc in route.query
            ]
            if params:
                op["parameters"] = params
            if route.body is not None:
                op["requestBody"] = {
                    "required": False,
                    "content": {"application/json": {"schema": route.body}},
                }
            ok: dict[str, Any] = {"description": "Success"}
            if route.response is not None:
                ok["content"] = {"application/json": {"schema": route.response}}
            op["responses"][str(route.status)] = ok
            if route.status == 201 and route.action == "inboxes.create":
                op["responses"]["200"] = {
                    "description": "An inbox with this client_id already existed",
                    "content": {"application/json": {"schema": route.response}},
                }
            for code, type_ in _ERRORS.items():
                op["responses"][code] = {
                    "description": type_,
                    "content": {"application/json": {"schema": s.ref("Error")}},
                }
            paths.setdefault(full, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "AgentPost API",
            "version": __version__,
            "description": "Mailboxes for AI agents. Organization keys (ap_sk_…) on /api/v1; "
                           "installation admin keys (ap_admin_…) on /admin/v1.",
        },
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "schemas": s.COMPONENTS,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "bearerFormat": "ap_sk_…"},
                "adminKey": {"type": "http", "scheme": "bearer", "bearerFormat": "ap_admin_…"},
            },
        },
    }
