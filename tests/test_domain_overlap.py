"""A hosted domain never shares its name with another domain's custom MAIL FROM.

The MX routes a hosted domain before any custom MAIL FROM: an organization hosting
``bounce.overlap.example`` would receive the bounces of the ``overlap.example`` that uses
``bounce`` -- another organization's. Both orders are refused at registration (409
``conflict``), within one organization too; and verification checks again, for
registrations that got past that (a stale, never-verified one the name was released
from). Real HTTP, real PostgreSQL, a real DNS server for verification.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted

from tests import test_domain_verify as verify_tests
from tests.test_domain_verify import _execute, publish

zone = verify_tests.zone
key_file = verify_tests.key_file
dom_server = verify_tests.dom_server


def _dsn(server: Any) -> str:
    return server.service.config.database.url


async def _add(server: Any, key: str, name: str, sub: str | None = None) -> Any:
    body: dict[str, Any] = {"name": name}
    if sub is not None:
        body["mail_from_subdomain"] = sub
    return await server.api.post("/api/v1/domains", body, key=key)


async def _verify(server: Any, zone: Any, key: str, made: dict[str, Any]) -> dict[str, Any]:
    publish(zone, made)
    done = await server.api.post(f"/api/v1/domains/{made['id']}/verify", key=key)
    assert done.status == 200, done
    return dict(done.json)


def _conflict(resp: Any, field: str, *words: str) -> None:
    assert resp.status == 409, resp
    error = resp.json["error"]
    assert error["type"] == "conflict" and error.get("field") == field, resp
    assert all(w in error["message"] for w in words), error["message"]


@pytest_twisted.ensureDeferred
async def test_a_hosted_name_that_is_anothers_bounce_name_is_refused(dom_server, zone):
    """Org B's verified overlap.example uses bounce: org A may not host its bounce name."""
    _, a = await dom_server.new_org("A")
    _, b = await dom_server.new_org("B")
    made = await _add(dom_server, b, "overlap.example", "bounce")
    assert made.status == 201, made
    assert (await _verify(dom_server, zone, b, made.json))["verified"] is True
    for who in (a, b):  # the same organization is refused too
        _conflict(await _add(dom_server, who, "Bounce.Overlap.Example."), "name",
                  "bounce.overlap.example", "custom MAIL FROM", "bounces")
    # Names next to it are fine.
    for name in ("mail.overlap.example", "x.bounce.overlap.example", "bounce.other.example"):
        assert (await _add(dom_server, a, name)).status == 201, name


@pytest_twisted.ensureDeferred
async def test_a_bounce_name_that_is_someones_hosted_domain_is_refused(dom_server, zone):
    """Org A hosts bounce.reverse.example: org B may not make it reverse.example's MAIL FROM."""
    _, a = await dom_server.new_org("A")
    _, b = await dom_server.new_org("B")
    hosted = await _add(dom_server, a, "bounce.reverse.example")
    assert hosted.status == 201, hosted
    for who in (b, a):  # still pending: a registration holds the name all the same
        _conflict(await _add(dom_server, who, "reverse.example", "BOUNCE"),
                  "mail_from_subdomain", "bounce.reverse.example", "hosted domain")
    await _verify(dom_server, zone, a, hosted.json)
    _conflict(await _add(dom_server, b, "reverse.example", "bounce"), "mail_from_subdomain",
              "bounce.reverse.example")
    # Another subdomain, or none, is fine; so is a MAIL FROM name nobody hosts.
    ok = await _add(dom_server, b, "reverse.example", "returns")
    assert ok.status == 201 and ok.json["mail_from_domain"] == "returns.reverse.example", ok
    assert (await _add(dom_server, b, "plain.example")).status == 201
    assert (await _add(dom_server, a, "fresh.example", "bounce")).status == 201


@pytest_twisted.ensureDeferred
async def test_an_overlap_let_through_never_verifies_both(dom_server, zone):
    """A stale registration does not block (as for names), so the overlap is checked
    again at verification: the second of the two never verifies."""
    _, a = await dom_server.new_org("A")
    _, b = await dom_server.new_org("B")
    stale = await _add(dom_server, b, "late.example", "bounce")
    assert stale.status == 201, stale
    _execute(_dsn(dom_server), "UPDATE domains SET created_at = created_at - interval "
             "'8 days' WHERE id = %s", (stale.json["id"],))
    hosted = await _add(dom_server, a, "bounce.late.example")
    assert hosted.status == 201, hosted
    assert (await _verify(dom_server, zone, a, hosted.json))["verified"] is True
    late = await _verify(dom_server, zone, b, stale.json)
    assert late["verified"] is False, late
    assert "custom MAIL FROM" in late["last_check_error"], late
    # Once the hosted name is gone, the domain verifies.
    assert (await dom_server.api.delete(f"/api/v1/domains/{hosted.json['id']}",
                                        key=a)).status == 204
    assert (await _verify(dom_server, zone, b, stale.json))["verified"] is True
