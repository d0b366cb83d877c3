"""The per-organization suppression list: the /suppressions API (scopes, tenancy,
pagination, address normalization), the core check every sending door calls, and the
queue's own permanent 5.1.x failures adding the address (migration 0020's trigger)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from agentpost.core.suppressions import check_not_suppressed, normalize_address
from agentpost.model.errors import SuppressedRecipient
from agentpost.outbound.transports import FAILED, SENT, Envelope, HandOff, Outcome
from tests.helpers import query
from tests.test_outbound_queue import Sink, _clock, _dsn, _enqueue, _sent_message, _worker


@pytest.fixture
def server(server):
    """The running service without its own queue worker (tests drive one)."""
    pytest_twisted.blockon(defer.ensureDeferred(server.core.outbound.stop()))
    return server


def test_addresses_are_compared_lowercased_with_the_domain_in_idna_form():
    assert normalize_address("  <Bob.Smith@Example.ORG> ") == "bob.smith@example.org"
    assert normalize_address("José@Bücher.example") == "josé@xn--bcher-kva.example"
    for bad in ("", "no-at-sign", "@example.org", "a@", "a b@example.org",
                "a@example.org\r\nBcc: x@y", "a,b@example.org", "x" * 250 + "@example.org"):
        with pytest.raises(ValueError):
            normalize_address(bad)


@pytest_twisted.ensureDeferred
async def test_manual_entries_are_listed_read_and_deleted_by_address(server):
    org, owner = await server.new_org()
    api = server.api
    made = await api.post("/api/v1/suppressions", {"email": "Spam.Trap@Example.org",
                                                   "diagnostic": "asked us to stop"},
                          key=owner)
    assert made.status == 201, made
    entry = made.json
    assert entry["email"] == "spam.trap@example.org" and entry["reason"] == "manual"
    assert entry["id"].startswith("sup_") and entry["environment_id"] is None
    again = await api.post("/api/v1/suppressions", {"email": "SPAM.TRAP@example.org"},
                           key=owner)
    assert again.status == 409
    for n in range(4):
        assert (await api.post("/api/v1/suppressions", {"email": f"r{n}@example.org"},
                               key=owner)).status == 201
    got = await api.get("/api/v1/suppressions/spam.trap@EXAMPLE.org", key=owner)
    assert got.status == 200 and got.json == entry
    # Pagination, newest first, and the email filter.
    first = await api.get("/api/v1/suppressions?limit=3", key=owner)
    assert [e["email"] for e in first.json["data"]] == [
        "r3@example.org", "r2@example.org", "r1@example.org"]
    rest = await api.get("/api/v1/suppressions?limit=3&page_token="
                         + first.json["next_page_token"], key=owner)
    assert [e["email"] for e in rest.json["data"]] == ["r0@example.org",
                                                       "spam.trap@example.org"]
    assert rest.json["next_page_token"] is None
    only = await api.get("/api/v1/suppressions?email=R2@example.org", key=owner)
    assert [e["email"] for e in only.json["data"]] == ["r2@example.org"]
    bad = await api.get("/api/v1/suppressions?email=not-an-address", key=owner)
    assert bad.status == 400
    # The core check every door calls.
    with pytest.raises(SuppressedRecipient):
        await check_not_suppressed(server.core.db, org["id"], "Spam.Trap@example.ORG")
    await check_not_suppressed(server.core.db, org["id"], "fine@example.org")
    # Delete, then it is gone (and deleting again is 404).
    assert (await api.delete("/api/v1/suppressions/Spam.Trap@example.org",
                             key=owner)).status == 204
    assert (await api.get("/api/v1/suppressions/spam.trap@example.org",
                          key=owner)).status == 404
    assert (await api.delete("/api/v1/suppressions/spam.trap@example.org",
                             key=owner)).status == 404
    await check_not_suppressed(server.core.db, org["id"], "spam.trap@example.org")
    audited = query(_dsn(server), "SELECT action FROM audit_log WHERE action LIKE "
                                  "'suppressions.%%' AND outcome = 'allowed' ORDER BY id")
    assert ("suppressions.create",) in audited and ("suppressions.delete",) in audited


@pytest_twisted.ensureDeferred
async def test_another_organizations_list_is_invisible(server):
    mine, owner = await server.new_org("Mine")
    _, stranger = await server.new_org("Stranger")
    assert (await server.api.post("/api/v1/suppressions", {"email": "x@example.org"},
                                  key=owner)).status == 201
    listed = await server.api.get("/api/v1/suppressions", key=stranger)
    assert listed.status == 200 and listed.json["data"] == []
    assert (await server.api.get("/api/v1/suppressions/x@example.org",
                                 key=stranger)).status == 404
    assert (await server.api.delete("/api/v1/suppressions/x@example.org",
                                    key=stranger)).status == 404
    # Still there for its owner, and it refuses only its own organization's sends.
    assert (await server.api.get("/api/v1/suppressions/x@example.org",
                                 key=owner)).status == 200
    other = await server.core.organizations.bootstrap("Third")
    await check_not_suppressed(server.core.db, other[0]["id"], "x@example.org")
    with pytest.raises(SuppressedRecipient):
        await check_not_suppressed(server.core.db, mine["id"], "x@example.org")


@pytest_twisted.ensureDeferred
async def test_members_read_the_list_and_only_admins_change_it(server):
    _, owner = await server.new_org()
    member = await server.api.post("/api/v1/api-keys", {
        "name": "member", "role": "member",
        "scopes": ["suppressions:read", "messages:read"]}, key=owner)
    assert member.status == 201, member
    too_much = await server.api.post("/api/v1/api-keys", {
        "name": "m2", "role": "member", "scopes": ["suppressions:write"]}, key=owner)
    assert too_much.status in (400, 403)
    reader = member.json["key"]
    assert (await server.api.get("/api/v1/suppressions", key=reader)).status == 200
    refused = await server.api.post("/api/v1/suppressions", {"email": "a@example.org"},
                                    key=reader)
    assert refused.status == 403
    assert refused.json["error"]["missing_scope"] == "suppressions:write"
    assert (await server.api.delete("/api/v1/suppressions/a@example.org",
                                    key=reader)).status == 403
    # A key without suppressions:read cannot list.
    narrow = await server.api.post("/api/v1/api-keys", {"name": "n", "scopes": [
        "messages:read"]}, key=owner)
    assert (await server.api.get("/api/v1/suppressions",
                                 key=narrow.json["key"])).status == 403
    # An environment-confined admin key reads but may not change the org-wide list.
    envs = await server.api.get("/api/v1/environments", key=owner)
    env_id = envs.json["data"][0]["id"]
    confined = await server.api.post("/api/v1/api-keys", {
        "name": "env", "role": "admin", "environment_ids": [env_id],
        "scopes": ["suppressions:read", "suppressions:write"]}, key=owner)
    assert confined.status == 201, confined
    assert (await server.api.post("/api/v1/suppressions", {"email": "b@example.org"},
                                  key=confined.json["key"])).status == 403


@pytest_twisted.ensureDeferred
async def test_the_queues_own_permanent_no_such_user_bounces_suppress_the_address(server):
    message, inbox, owner = await _sent_message(server, "sender")
    [queue_id] = await _enqueue(server, message, ["gone@example.org", "ok@example.org"])
    sink = Sink(lambda env: {r: FAILED if r.startswith("gone") else SENT
                             for r in env.recipients})
    await _worker(server, sink, _clock()).drain()
    rows = query(_dsn(server), "SELECT email, reason, environment_id, source_message_id, "
                               "id FROM suppressions")
    assert [r[:4] for r in rows] == [("gone@example.org", "queue_bounce",
                                      inbox["environment_id"], message.message_id)]
    assert rows[0][4].startswith("sup_") and len(rows[0][4]) == 30
    listed = await server.api.get("/api/v1/suppressions", key=owner)
    assert [e["reason"] for e in listed.json["data"]] == ["queue_bounce"]
    # A policy refusal (5.7.x) suppresses nothing.
    [second] = await _enqueue(server, message, ["policy@example.org"])
    assert second != queue_id
    await _worker(server, Refuses(), _clock()).drain()
    assert query(_dsn(server), "SELECT status, status_code FROM outbound_recipients "
                               "WHERE queue_id = %s", (second,)) == [("bounced", "5.7.1")]
    assert len(query(_dsn(server), "SELECT 1 FROM suppressions")) == 1


class Refuses:
    """A transport that refuses every recipient for policy reasons (5.7.1)."""

    name = "refuses"

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        return HandOff([Outcome(r, FAILED, 554, "5.7.1", "content rejected")
                        for r in envelope.recipients])
