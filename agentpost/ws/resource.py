"""Wiring: the ``/ws`` route on the Klein app, served by autobahn's WebSocketResource.

The route hands the request's transport to autobahn, on the same listener as the API
(so WSS whenever ``[http] tls`` is on). The HTTP channel's idle timeout is switched
off first: the connection now belongs to the WebSocket, whose own keep-alive decides.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from klein import Klein
from twisted.web.iweb import IRequest

from agentpost.ws.hub import EventHub
from agentpost.ws.protocol import EventStreamFactory, StreamSettings


def build_ws_resource(*, portal: Any, live_credentials: Any, hub: EventHub, db: Any,
                      clock: Any, settings: StreamSettings,
                      key_failures: Any = None,
                      trusted_proxies: frozenset[str] = frozenset()) -> WebSocketResource:
    """The resource every ``GET /ws`` upgrade is handed to (``key_failures``: the HTTP
    door's FailedKeyThrottle, so guessing keys here is throttled the same way)."""
    factory = EventStreamFactory(portal=portal, live_credentials=live_credentials, hub=hub,
                                 db=db, clock=clock, settings=settings,
                                 key_failures=key_failures, trusted_proxies=trusted_proxies)
    return WebSocketResource(factory)


def mount_websocket(app: Klein, resource: WebSocketResource, path: str = "/ws") -> None:
    """Serve the event stream at ``path``."""

    @app.route(path, methods=["GET"], branch=False, endpoint="websocket")
    def websocket(request: IRequest) -> Any:
        channel = getattr(request, "channel", None)
        if channel is not None and hasattr(channel, "setTimeout"):
            channel.setTimeout(None)
        return resource
