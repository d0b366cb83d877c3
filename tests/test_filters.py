"""Receive-direction allow/block rules decide at RCPT time; the most specific rule wins."""

import pytest
import pytest_twisted

from agentpost.mail.filters import decide, normalize_value
from agentpost.model.errors import SenderBlocked


def _rule(match_type, value, action):
    return {"match_type": match_type, "value": value, "action": action}


def test_most_specific_rule_wins():
    """Address beats domain beats wildcard; a longer wildcard beats a shorter one."""
    rules = [_rule("subdomain_wildcard", "*.example.com", "block"),
             _rule("domain", "mail.example.com", "allow"),
             _rule("address", "spam@mail.example.com", "block"),
             _rule("subdomain_wildcard", "*.eu.example.com", "allow")]
    assert decide(rules, "ann@mail.example.com") == "allow"
    assert decide(rules, "SPAM@mail.example.com") == "block"
    assert decide(rules, "x@other.example.com") == "block"
    assert decide(rules, "x@paris.eu.example.com") == "allow"
    assert decide(rules, "x@example.com") is None  # the wildcard covers subdomains only
    assert decide([_rule("domain", "a.com", "allow"), _rule("domain", "a.com", "block")],
                  "x@a.com") == "block"
    with pytest.raises(ValueError):
        normalize_value("subdomain_wildcard", "example.com")
    assert normalize_value("address", " Bob@Example.COM ") == "bob@example.com"


@pytest_twisted.ensureDeferred
async def test_blocked_sender_is_refused_at_routing(server):
    """A block rule makes the MX router refuse the recipient; other senders still pass."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "guarded"}, key=key)).json
    rule = await server.api.post("/api/v1/filter-rules", {
        "direction": "receive", "action": "block", "match_type": "domain",
        "value": "Spam.Example", "inbox_id": inbox["id"]}, key=key)
    assert rule.status == 201 and rule.json["value"] == "spam.example"
    dup = await server.api.post("/api/v1/filter-rules", {
        "direction": "receive", "action": "block", "match_type": "domain",
        "value": "spam.example", "inbox_id": inbox["id"]}, key=key)
    assert dup.status == 409
    with pytest.raises(SenderBlocked):
        await server.core.router.resolve(inbox["email"], "x@spam.example")
    target = await server.core.router.resolve(inbox["email"], "friend@ok.example")
    assert target.inbox_id == inbox["id"]
    listed = await server.api.get("/api/v1/filter-rules", key=key)
    assert [r["id"] for r in listed.json["data"]] == [rule.json["id"]]
    assert (await server.api.delete(f"/api/v1/filter-rules/{rule.json['id']}",
                                    key=key)).status == 204
    assert (await server.core.router.resolve(inbox["email"], "x@spam.example")).inbox_id
