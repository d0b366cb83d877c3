"""Direct dispatch of the route tables' endpoints, in front of Klein.

Klein binds a werkzeug ``MapAdapter`` for every request, runs werkzeug's general
matcher (regular expressions per path segment, compiled on each call), and wraps the
endpoint in two ``maybeDeferred`` layers and an error-handler chain: about a tenth of
the CPU time of a cached ``GET /api/v1/inboxes`` (py-spy, issue 12). Every endpoint of
a :class:`~agentpost.http.framework.RouteTable` has only plain ``{name}`` path
parameters, so a segment tree finds it for a fraction of that cost.

The tree answers only what it is certain werkzeug would answer the same way (a test
compares the two over every route): a path whose segments all match a table route,
walked as werkzeug walks (static segments before parameters, backtracking), with a
method that route accepts. Everything else goes to the Klein resource unchanged:
unknown paths and methods (Klein's JSON 404/405), ``HEAD`` (which werkzeug adds to
``GET`` routes), empty segments and trailing slashes, an encoded ``/`` inside a
segment, and any path under the static prefix of a route that was added to the Klein
app directly (uploads, the SNS hook, the WebSocket, OpenAPI, health probes).

What happens to a matched request is what Klein does: the endpoint's Deferred is
cancelled if the client goes away, its bytes are written and the request finished
(unless it already was), and a failure goes to ``request.processingFailed``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from klein import Klein
from twisted.internet import defer, tcp
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from agentpost.http.errors import ROUTE_NOT_FOUND

log = logging.getLogger(__name__)

Endpoint = Callable[..., "defer.Deferred[bytes]"]


class _Node:
    """One path segment position: static children, parameter children, endpoints."""

    __slots__ = ("methods", "params", "static")

    def __init__(self) -> None:
        self.static: dict[bytes, _Node] = {}
        self.params: list[tuple[str, _Node]] = []  # (parameter name, child), in order
        self.methods: dict[bytes, tuple[Endpoint, str]] = {}  # and its Klein rule


class RouteTree:
    """``{name}``-style paths to endpoints, matched segment by segment."""

    def __init__(self) -> None:
        self._root = _Node()
        self._klein_prefixes: list[tuple[bytes, ...]] = []
        #: (method, *segments) -> (endpoint, rule) for paths that matched a route with no
        #: parameters: the same answer every time, so the walk is done once. Bounded by
        #: the routes (a miss or a parameter route is never stored).
        self._static: dict[tuple[bytes, ...], tuple[Endpoint, str]] = {}

    def add(self, method: str, path: str, endpoint: Endpoint, rule: str) -> None:
        """Register ``endpoint`` for ``method`` on ``path`` (``/a/{b}/c`` style), known to
        Klein as ``rule``."""
        node = self._root
        for part in path.strip("/").split("/"):
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1]
                for existing, child in node.params:
                    if existing == name:
                        node = child
                        break
                else:
                    child = _Node()
                    node.params.append((name, child))
                    node = child
            else:
                node = node.static.setdefault(part.encode("utf-8"), _Node())
        node.methods[method.encode("ascii")] = (endpoint, rule)
        self._static.clear()

    def leave_to_klein(self, rule: str) -> None:
        """Paths under this (werkzeug) rule's static prefix are Klein's to route."""
        prefix: list[bytes] = []
        for part in rule.strip("/").split("/"):
            if "<" in part:
                break
            prefix.append(part.encode("utf-8"))
        self._klein_prefixes.append(tuple(prefix))
        self._static.clear()

    def match(self, method: bytes,
              segments: list[bytes]) -> tuple[Endpoint, dict[str, str], str] | None:
        """The endpoint, its parameters and its Klein rule, or None (Klein decides)."""
        key = (method, *segments)
        static = self._static.get(key)
        if static is not None:
            return static[0], {}, static[1]
        for prefix in self._klein_prefixes:
            if tuple(segments[: len(prefix)]) == prefix:
                return None
        for segment in segments:
            if not segment or b"/" in segment:
                return None
        values: list[str] = []
        found = self._walk(self._root, segments, 0, method, values)
        if found is None:
            return None
        (endpoint, rule), names = found
        if not names:
            self._static[key] = (endpoint, rule)
        return endpoint, dict(zip(names, values, strict=True)), rule

    def _walk(self, node: _Node, segments: list[bytes], i: int, method: bytes,
              values: list[str]) -> tuple[tuple[Endpoint, str], list[str]] | None:
        if i == len(segments):
            target = node.methods.get(method)
            return None if target is None else (target, [])
        segment = segments[i]
        child = node.static.get(segment)
        if child is not None:
            found = self._walk(child, segments, i + 1, method, values)
            if found is not None:
                return found
        if node.params:
            try:
                text = segment.decode("utf-8")
            except UnicodeDecodeError:
                return None
            for name, child in node.params:
                values.append(text)
                found = self._walk(child, segments, i + 1, method, values)
                if found is not None:
                    found[1].insert(0, name)
                    return found
                values.pop()
        return None


class FastResource(Resource):
    """The site's root: table routes dispatched directly, everything else via Klein."""

    isLeaf = True

    def __init__(self, tree: RouteTree, klein_resource: IResource) -> None:
        super().__init__()
        self._tree = tree
        self._klein = klein_resource

    def render(self, request: IRequest) -> Any:
        """Run the matched endpoint the way KleinResource would, or hand over to it."""
        found = self._tree.match(request.method, request.postpath)
        if found is None:
            postpath = request.postpath
            if len(postpath) > 1 and postpath[0] == b"" and hasattr(request, "_answer"):
                # "//api/v1/..." : werkzeug strips leading slashes and would serve the
                # route, so a path a proxy judged as not ours (e.g. not under /admin/)
                # reached it anyway. An unknown path, like "/api/v1//inboxes".
                type_, status, message = ROUTE_NOT_FOUND
                request._answer(status, type_, message)
                return server.NOT_DONE_YET
            return self._klein.render(request)
        endpoint, params, _ = found
        request.prepath.extend(request.postpath)
        request.postpath = []
        finished = [False]
        transport = getattr(getattr(request, "channel", None), "transport", None)

        def gone(failure: Failure) -> None:
            finished[0] = True
            d.cancel()

        try:
            d = endpoint(request, **params)
        except Exception:
            d = defer.fail(Failure())
        request.notifyFinish().addCallbacks(  # type: ignore[attr-defined]
            lambda _: finished.__setitem__(0, True), gone)

        def write(body: Any) -> None:
            if isinstance(body, str):
                body = body.encode("utf-8")
            if isinstance(body, bytes):
                whole = getattr(request, "write_whole", None)  # head and body at once
                if not body or whole is None or not whole(body):
                    request.write(body)
            if not finished[0]:
                request.finish()
                send_now(transport)

        def failed(failure: Failure) -> None:
            if finished[0]:
                if not failure.check(defer.CancelledError):
                    log.error("unhandled error processing request: %s",
                              failure.getTraceback())
                return
            request.processingFailed(failure)  # type: ignore[attr-defined]

        d.addCallbacks(write, failed)
        d.addErrback(lambda f: log.error("unhandled error writing response: %s",
                                         f.getTraceback()))
        return server.NOT_DONE_YET


def send_now(transport: Any) -> None:
    """Hand a finished response to the kernel now rather than on the reactor's next pass.

    Twisted's ``transport.write`` only buffers: the bytes leave in ``doWrite`` once the
    next epoll reports the socket writable, after every other event of that pass. Under
    load a pass is 4-13 ms of other requests' work, so each answer waited about one
    pass after it was ready, and the longest passes made the latency tail (issue 12).
    This is the reactor's own ``doWrite``, called early, only on a plain TCP connection
    that is not closing: whatever it cannot send stays buffered and the reactor writes
    it as before; a failed write leaves the socket registered, so the reactor meets the
    same error and handles it as it always does."""
    if (transport is None or not getattr(transport, "connected", False)
            or transport.disconnecting or getattr(transport, "_writeDisconnecting", True)
            or not isinstance(transport, tcp.Connection)):
        return
    # Private attributes of twisted.internet.abstract.FileDescriptor: a Twisted that
    # renamed them simply gets the reactor's write, as before.
    pending = getattr(transport, "_tempDataLen", 0)
    buffered = getattr(transport, "dataBuffer", b"")
    if pending or len(buffered) > getattr(transport, "offset", len(buffered)):
        transport.doWrite()


class FastKlein(Klein):
    """A Klein app whose resource dispatches the route tables' endpoints directly."""

    def __init__(self) -> None:
        super().__init__()
        self._tree = RouteTree()
        self._table_rules: set[str] = set()
        # werkzeug would answer "/api/v1//inboxes" with a 308 to the merged path, an
        # HTML body and a Location built from the client's Host header; an API answers
        # an unknown path with its JSON 404 instead. Set before any rule is added:
        # rules take the map's setting when they are bound.
        self.url_map.merge_slashes = False

    def add_table_route(self, method: str, path: str, klein_path: str,
                        endpoint: Endpoint) -> None:
        """Known to both: the tree (fast path) and Klein (everything it does not take)."""
        self._tree.add(method, path, endpoint, klein_path)
        self._table_rules.add(klein_path)

    def resource(self) -> FastResource:  # type: ignore[override]
        """Called once every route is in (Server.http_resource)."""
        for rule in _rules(self):
            if rule not in self._table_rules:
                self._tree.leave_to_klein(rule)
        return FastResource(self._tree, super().resource())


def _rules(app: Klein) -> Iterable[str]:
    return [rule.rule for rule in app.url_map.iter_rules()]
