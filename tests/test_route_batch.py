"""RCPT lookups that arrive together share one statement (core.route_batch): each gets
exactly the row a lookup of its own gets -- tenancy included -- and one odd address
never fails its batch-mates."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, task

from agentpost.core.route_batch import RouteLookups
from agentpost.model.errors import InvalidRequest
from agentpost.storage import mx_routes
from tests.test_mx_routing_ownership import squatted_name


async def _addresses(server) -> list[tuple[str, str]]:
    """Owner and squatter inboxes on one verified name, a shared-domain inbox, unknown
    and unhosted addresses, and case variants."""
    _, _, other_key = await squatted_name(server, "batch.example")
    plain = (await server.api.post("/api/v1/inboxes", {"username": "plain"},
                                   key=other_key)).json
    shared = plain["email"].rpartition("@")[2]
    return [("boss@batch.example", "batch.example"), ("CEO@batch.example", "batch.example"),
            (plain["email"].upper(), shared.upper()), ("nobody@batch.example", "batch.example"),
            ("x@elsewhere.example", "elsewhere.example"), ("boss@batch.example", "batch.example"),
            (plain["email"], shared)]


async def _alone(server, address: str, domain: str, with_usage: bool):
    return await server.core.db.run_read("t", mx_routes.route, address, domain,
                                         with_usage=with_usage)


@pytest.mark.parametrize("with_usage", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_batch_answers_each_address_as_a_lookup_of_its_own(server, with_usage):
    lookups = await _addresses(server)
    clock = task.Clock()  # they wait for company on it: one batch, whatever the timing
    batcher = RouteLookups(server.core.db, clock, with_usage=with_usage, parallel=1,
                           delay_s=1.0)
    pending = [batcher.route(a, d) for a, d in lookups]
    clock.advance(1.0)
    rows = await defer.gatherResults(pending)
    assert batcher.statements == 1  # all of them in one statement
    expected = [await _alone(server, a, d, with_usage) for a, d in lookups]
    assert rows == expected
    owner, squatter, shared, unknown, unhosted = rows[:5]
    assert owner["hosted"] and owner["inbox_id"] is not None
    assert squatter["hosted"] and squatter["inbox_id"] is None  # never another tenant's
    assert shared["inbox_id"] is not None and shared["inbox_id"] == rows[6]["inbox_id"]
    assert unknown["hosted"] and unknown["inbox_id"] is None
    assert not unhosted["hosted"] and unhosted["inbox_id"] is None
    assert (owner["used_bytes"] is not None) is with_usage


@pytest_twisted.ensureDeferred
async def test_an_address_the_batch_cannot_carry_fails_alone(server):
    lookups = await _addresses(server)
    clock = task.Clock()  # the odd one and the others wait for company: one batch
    batcher = RouteLookups(server.core.db, clock, with_usage=False, parallel=1,
                           delay_s=1.0)
    first = batcher.route(*lookups[0])
    odd = batcher.route("nul\x00@batch.example", "batch.example")
    others = [batcher.route(a, d) for a, d in lookups[1:]]
    clock.advance(1.0)
    assert (await first)["inbox_id"] is not None
    with pytest.raises(InvalidRequest):  # what it gets alone too (Txn._send)
        await odd
    rows = await defer.gatherResults(others)
    assert rows == [await _alone(server, a, d, False) for a, d in lookups[1:]]
    assert batcher.statements == 1  # the batch was tried, then each looked up alone
