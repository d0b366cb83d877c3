"""The route tables' direct dispatch (agentpost.http.dispatch) agrees with werkzeug.

Over every route of the running server, with ids that collide with other routes'
static segments, non-ASCII ids, every method, trailing slashes, empty segments and an
encoded slash: whenever the segment tree answers, werkzeug (what Klein would have used)
picks the same rule with the same parameters; and the tree does answer every plain
request to a table route, so the fast path is the one in use.
"""

from __future__ import annotations

import itertools
from urllib.parse import quote, unquote_to_bytes

import pytest_twisted
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from tests.helpers import ApiClient

METHODS = ["GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"]


def _root(server):
    return server.service.ports["http"].factory.resource


def _werkzeug(url_map, method: str, path_info: str):
    adapter = url_map.bind("localhost", "", path_info=path_info, default_method=method)
    try:
        rule, values = adapter.match(return_rule=True)
    except (HTTPException, RequestRedirect):
        return None
    return rule.rule, values


def _segments(raw_path: str) -> list[bytes]:
    """What twisted.web's Request.process makes of a raw path (postpath)."""
    return [unquote_to_bytes(s) for s in raw_path.encode("utf-8")[1:].split(b"/")]


def _samples(rule: str, statics: list[str]) -> list[str]:
    parts = rule.strip("/").split("/")
    choices = [[p] if "<" not in p else ["x1", "inb_0a", "é", *statics[:6]] for p in parts]
    return ["/" + "/".join(combo) for combo in itertools.product(*choices)][:400]


@pytest_twisted.ensureDeferred
async def test_the_tree_agrees_with_werkzeug_on_every_route(server):
    root = _root(server)
    tree, url_map = root._tree, root._klein._app.url_map
    rules = [r.rule for r in url_map.iter_rules()]
    statics = sorted({p for r in rules for p in r.strip("/").split("/") if "<" not in p})
    table_rules = {rule for _, rule in _table_targets(tree)}
    assert len(table_rules) > 40  # every table's routes are in the tree
    checked = answered = 0
    for rule in rules:
        for path in _samples(rule, statics):
            variants = [path, path + "/", path.replace("/", "//", 1),
                        quote(path, safe="/"), path.replace("x1", "a%2Fb")]
            for raw, method in itertools.product(variants, METHODS):
                segments = _segments(raw)
                found = tree.match(method.encode(), segments)
                checked += 1
                if found is None:
                    continue
                answered += 1
                _, params, tree_rule = found
                path_info = "/" + b"/".join(segments).decode("utf-8")
                assert _werkzeug(url_map, method, path_info) == (tree_rule, params), (
                    method, raw)
    assert answered > len(table_rules)
    assert checked > answered


def _table_targets(tree):
    stack = [tree._root]
    while stack:
        node = stack.pop()
        stack.extend(node.static.values())
        stack.extend(child for _, child in node.params)
        for method, (_, rule) in node.methods.items():
            yield method, rule


@pytest_twisted.ensureDeferred
async def test_every_plain_table_request_takes_the_fast_path(server):
    tree = _root(server)._tree
    for method, rule in _table_targets(tree):
        path = "/" + "/".join("some_id" if "<" in p else p for p in rule.strip("/").split("/"))
        found = tree.match(method, _segments(path))
        assert found is not None and found[2] == rule, (method, rule)


@pytest_twisted.ensureDeferred
async def test_klein_still_answers_what_the_tree_leaves(server):
    """Unknown paths, wrong methods, HEAD and trailing slashes keep Klein's answers."""
    _, owner = await server.new_org()
    api: ApiClient = server.api
    assert (await api.get("/api/v1/inboxes", key=owner)).status == 200
    assert (await api.get("/api/v1/inboxes/", key=owner)).status == 200
    missing = await api.get("/api/v1/no-such-thing", key=owner)
    assert missing.status == 404 and missing.json["error"]["message"] == "No such endpoint."
    wrong = await api.request("PUT", "/api/v1/inboxes", key=owner)
    assert wrong.status == 405
    assert (await api.get("/api/v1/openapi.json")).status == 200
    assert (await api.get("/healthz")).status == 200


@pytest_twisted.ensureDeferred
async def test_doubled_slashes_are_a_json_404_not_a_redirect(server):
    """werkzeug merges "//" with a 308 whose Location comes from the Host header and
    whose body is HTML; the API answers its JSON 404 instead (fast path or not)."""
    _, owner = await server.new_org()
    for path in ("/api/v1//inboxes", "/api/v1/inboxes//x", "/api/v1//webhooks"):
        resp = await server.api.get(path, key=owner)
        assert resp.status == 404, (path, resp.status, resp.body[:80])
        assert resp.json["error"]["type"] == "not_found"
        assert "location" not in {k.lower() for k in resp.headers}
