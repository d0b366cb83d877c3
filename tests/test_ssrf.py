"""The webhook SSRF guard (issue 13): internal addresses are refused as literals and
behind DNS names, https is required in production, the allow-list opens chosen
networks, and the request goes to the address that was checked (no second look-up,
so no DNS rebinding)."""

from __future__ import annotations

import pytest
import pytest_twisted
from treq.client import HTTPClient

from agentpost.model.errors import WebhookURLNotAllowed
from agentpost.webhooks.ssrf import SSRFGuard, pinned_agent
from tests.webhook_receiver import Receiver

BLOCKED = ["127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "::ffff:127.0.0.1",
           "192.168.1.1", "172.16.0.1", "100.64.0.1", "fe80::1", "fd00::1",
           "0.0.0.0",  # noqa: S104 - an address to refuse, not one we bind
           "224.0.0.1", "::ffff:169.254.169.254", "fd00:ec2::254"]


def _stub(answers):
    calls = []

    async def resolve(host, port):
        calls.append(host)
        return answers[host]

    return resolve, calls


def _literal(ip):
    return f"https://[{ip}]/hook" if ":" in ip else f"https://{ip}/hook"


@pytest_twisted.ensureDeferred
async def test_internal_addresses_are_refused_as_literals_and_behind_names():
    resolve, _ = _stub({f"n{i}.example": [ip] for i, ip in enumerate(BLOCKED)}
                       | {"mixed.example": ["93.184.216.34", "10.0.0.1"]})
    guard = SSRFGuard(allow_http=False, resolver=resolve)
    for i, ip in enumerate(BLOCKED):
        with pytest.raises(WebhookURLNotAllowed):
            guard.check_syntax(_literal(ip))
        with pytest.raises(WebhookURLNotAllowed):
            await guard.target(_literal(ip))
        with pytest.raises(WebhookURLNotAllowed):
            await guard.target(f"https://n{i}.example/hook")
    # One internal address among public ones is enough to refuse.
    with pytest.raises(WebhookURLNotAllowed):
        await guard.target("https://mixed.example/hook")


@pytest_twisted.ensureDeferred
async def test_public_addresses_pass_and_https_is_required_in_production():
    resolve, _ = _stub({"hooks.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    guard = SSRFGuard(allow_http=False, resolver=resolve)
    target = await guard.target("https://hooks.example:8443/x")
    assert (target.host, target.port, target.address) == ("hooks.example", 8443,
                                                          "93.184.216.34")
    for bad in ("http://hooks.example/x", "ftp://hooks.example/x", "https:///x",
                "https://user:pw@hooks.example/x", "https://hooks.example/\r\nx"):
        with pytest.raises(WebhookURLNotAllowed):
            guard.check_syntax(bad)
    dev = SSRFGuard(allow_http=True, resolver=resolve)
    assert (await dev.target("http://hooks.example/x")).port == 80


@pytest_twisted.ensureDeferred
async def test_the_allow_list_opens_only_the_listed_networks():
    resolve, _ = _stub({"local.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"]})
    guard = SSRFGuard(allow_http=True, allow_networks=["127.0.0.0/8"], resolver=resolve)
    assert (await guard.target("http://local.test:9/x")).address == "127.0.0.1"
    assert (await guard.target("http://127.0.0.1:9/x")).address == "127.0.0.1"
    for refused in ("http://meta.test/x", "http://10.0.0.1/x", "http://[::1]/x"):
        with pytest.raises(WebhookURLNotAllowed):
            await guard.target(refused)


@pytest_twisted.ensureDeferred
async def test_the_request_goes_to_the_checked_address_with_the_names_host_header():
    """The name is looked up once, by the guard; the connection is made to that address.
    The name does not exist in real DNS, so reaching the receiver proves no second
    look-up happened (a rebinding answer would have nowhere to go)."""
    from twisted.internet import reactor

    receiver = Receiver()
    receiver.start()
    try:
        resolve, calls = _stub({"rebind.invalid": ["127.0.0.1"]})
        guard = SSRFGuard(allow_http=True, allow_networks=["127.0.0.0/8"], resolver=resolve)
        url = f"http://rebind.invalid:{receiver.port_number}/hook"
        target = await guard.target(url)
        client = HTTPClient(pinned_agent(reactor, target, 5.0))
        response = await client.request("POST", url, data=b"{}")
        await response.content()
        assert response.code == 200 and calls == ["rebind.invalid"]
        assert receiver.requests[0][0]["host"] == f"rebind.invalid:{receiver.port_number}"
    finally:
        await receiver.stop()
