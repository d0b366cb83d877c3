"""Shortcuts of the issue-12 tail work that must answer exactly as the long way did.

The segment tree remembers the answer for a path without parameters, and forgets it as
soon as a route or a Klein prefix is added (a prefix added later takes the path over);
the page token is URL-safe base64 of ``c1:<id>`` without padding, as base64 wrote it.
"""

from __future__ import annotations

import base64
from typing import Any

from agentpost.core.pages import decode_token, encode_token
from agentpost.http.dispatch import RouteTree


def _endpoint(name: str) -> Any:
    def endpoint(request: Any, **params: str) -> Any:
        return name

    return endpoint


def test_a_static_match_is_remembered_and_a_new_rule_or_prefix_forgets_it():
    tree = RouteTree()
    listing, one = _endpoint("list"), _endpoint("one")
    tree.add("GET", "/v1/inboxes", listing, "/v1/inboxes")
    tree.add("GET", "/v1/inboxes/{inbox_id}", one, "/v1/inboxes/<inbox_id>")
    for _ in range(3):
        found = tree.match(b"GET", [b"v1", b"inboxes"])
        assert found is not None
        endpoint, params, rule = found
        assert endpoint is listing and params == {} and rule == "/v1/inboxes"
        params["mutated"] = "x"  # the caller's own dict: the next answer is unaffected
    assert tree.match(b"POST", [b"v1", b"inboxes"]) is None  # a method nobody serves
    assert tree.match(b"GET", [b"v1", b"inboxes", b"inb_1"])[1:] == (
        {"inbox_id": "inb_1"}, "/v1/inboxes/<inbox_id>")
    assert tree.match(b"GET", [b"v1", b"inboxes", b"inb_2"])[1] == {"inbox_id": "inb_2"}
    posting = _endpoint("create")
    tree.add("POST", "/v1/inboxes", posting, "/v1/inboxes")
    assert tree.match(b"POST", [b"v1", b"inboxes"])[0] is posting
    tree.leave_to_klein("/v1/<path:rest>")  # from now on Klein's to route
    assert tree.match(b"GET", [b"v1", b"inboxes"]) is None
    assert tree.match(b"POST", [b"v1", b"inboxes"]) is None


def test_page_tokens_are_what_base64_wrote_and_decode_back():
    ids = ["inb_01JABCDEFGHJKMNPQRSTVWXYZ0", "a", "ab", "abc", "x" * 61, "id_with_under",
           "??", "~~~", ""]
    for last_id in ids:
        if not last_id.isascii():
            continue
        token = encode_token(last_id)
        assert token == base64.urlsafe_b64encode(
            f"c1:{last_id}".encode("ascii")).decode("ascii").rstrip("=")
        assert "=" not in token and "+" not in token and "/" not in token
        if last_id and last_id.replace("_", "").isalnum():
            assert decode_token(token) == last_id
