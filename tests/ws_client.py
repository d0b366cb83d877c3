"""A real WebSocket client for the tests: autobahn's Twisted client on the test reactor.

Frames arrive in a DeferredQueue; the close code is kept. Timeouts are functional
bounds (a frame that never comes fails the test), not speed assertions.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor

BOUND_S = 20.0


class _Client(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.frames.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.code = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


class WS:
    """One connection; ``await WS.open(url, ...)``."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.proto: Any = None

    @classmethod
    async def open(cls, base_url: str, key: str | None = None, *, header: bool = False,
                   path: str = "/ws", ca: str | None = None) -> WS:
        url = base_url.replace("http", "ws", 1) + path
        headers = {}
        if key is not None and header:
            headers["Authorization"] = f"Bearer {key}"
        elif key is not None:
            url += f"?token={key}"
        factory = WebSocketClientFactory(url, headers=headers)
        factory.protocol = _Client
        factory.frames = defer.DeferredQueue()
        factory.opened = defer.Deferred()
        factory.closed = defer.Deferred()
        factory.code = None
        ws = cls(factory)
        tls = None
        if ca is not None:
            from twisted.internet import ssl

            with open(ca, "rb") as f:
                authority = ssl.Certificate.loadPEM(f.read())
            tls = ssl.optionsForClientTLS("localhost", trustRoot=authority)
        connectWS(factory, contextFactory=tls)
        ws.proto = await factory.opened.addTimeout(BOUND_S, reactor)
        return ws

    def send(self, frame: Any) -> None:
        data = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
        self.proto.sendMessage(data, isBinary=False)

    def send_binary(self, data: bytes) -> None:
        self.proto.sendMessage(data, isBinary=True)

    async def frame(self) -> dict[str, Any]:
        return await self.factory.frames.get().addTimeout(BOUND_S, reactor)

    async def events(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            frame = await self.frame()
            assert frame["type"] == "event", frame
            out.append(frame["data"])
        return out

    async def quiet(self, seconds: float = 0.5) -> list[dict[str, Any]]:
        """Frames that arrive within ``seconds`` (for "nothing else came")."""
        from twisted.internet.task import deferLater

        await deferLater(reactor, seconds, lambda: None)
        frames = []
        while self.factory.frames.pending:
            frames.append(await self.factory.frames.get())
        return frames

    async def closed(self) -> int:
        return await self.factory.closed.addTimeout(BOUND_S, reactor)

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.sendClose(1000)


async def refused(base_url: str, key: str | None, **kw: Any) -> str:
    """The refusal message of a handshake that must fail."""
    try:
        ws = await WS.open(base_url, key, **kw)
    except ConnectionError as exc:
        return str(exc)
    ws.close()
    raise AssertionError("the handshake succeeded")
