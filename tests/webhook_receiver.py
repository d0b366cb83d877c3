"""A local webhook receiver for the webhook tests: a real HTTP server on loopback that
records every request and answers with a configurable status."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor, task
from twisted.web import resource, server


class Receiver(resource.Resource):
    """Records (headers, body) of each POST; answers ``status`` (or pops ``script``)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        self.script: list[int] = []
        self.port: Any = None
        self.port_number = 0

    def render_POST(self, request: Any) -> bytes:
        headers = {k.decode().lower(): v[-1].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((headers, request.content.read()))
        request.setResponseCode(self.script.pop(0) if self.script else self.status)
        return b"ok"

    def start(self, port: int = 0) -> None:
        self.port = reactor.listenTCP(port, server.Site(self), interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    async def stop(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
            self.port = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port_number}/hook"

    def ids(self) -> list[str]:
        return [h["webhook-id"] for h, _ in self.requests]


async def wait_for(predicate: Any, tries: int = 400) -> None:
    """Let the real reactor run until ``predicate()`` holds (bounded; no timing asserted)."""
    for _ in range(tries):
        if predicate():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError("condition not reached")


@pytest_twisted.async_yield_fixture
async def receiver() -> Any:
    """A started Receiver on loopback, stopped after the test (a plugin of
    tests/conftest.py, so every webhook test module shares this one fixture)."""
    r = Receiver()
    r.start()
    yield r
    await r.stop()
