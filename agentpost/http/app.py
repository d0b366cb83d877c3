"""Assemble the Klein application from the route tables."""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from agentpost.http.dispatch import FastKlein
from agentpost.http.framework import RouteTable, install_fallbacks, render
from agentpost.http.openapi import build_document


def build_app(api: RouteTable, admin: RouteTable, ready_check: Any) -> Klein:
    """One Klein app: /api/v1, /admin/v1, the OpenAPI document and health probes.

    Its ``resource()`` dispatches the tables' routes itself and leaves the rest to Klein
    (agentpost.http.dispatch)."""
    app = FastKlein()
    api.mount(app)
    admin.mount(app)
    document = json.dumps(build_document([api, admin])).encode("utf-8")

    @app.route("/api/v1/openapi.json", methods=["GET"])
    def openapi(request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return document

    @app.route("/healthz", methods=["GET"])
    def healthz(request: IRequest) -> bytes:
        """Liveness: the reactor answers."""
        return render(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET"])
    async def readyz(request: IRequest) -> bytes:
        """Readiness: the database answers."""
        ok = await ready_check()
        return render(request, 200 if ok else 503, {"status": "ok" if ok else "unavailable"})

    install_fallbacks(app)
    return app
