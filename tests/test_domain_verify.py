"""Domain verification against a real DNS server: a ``twisted.names`` server on
127.0.0.1 serving a zone the test edits, the app's resolver pointed at it
([domains] dns_servers). The timer runs on ``task.Clock``; two job instances (two
database pools, as two processes would have) verify a domain and ``domain.verified``
is written exactly once. An inbox on an unverified domain cannot send over SMTP
submission (550 5.7.1); once the domain is verified it can."""

from __future__ import annotations

import smtplib
import time
from datetime import timedelta
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.names import common, dns, server
from twisted.names import error as dns_error

from agentpost.core.domains import next_check_delay
from agentpost.jobs.domain_verify import DomainVerifyJob, build_domains, parse_servers
from agentpost.storage.database import Database
from tests.conftest import make_config, start_server
from tests.helpers import execute as _execute
from tests.helpers import query
from tests.test_smtp_submission import _login, _msg


class Zone(common.ResolverBase):
    """An in-memory authority: {name: [(type, payload)]}; other names are NXDOMAIN."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[tuple[int, Any]]] = {}
        self.queries = 0

    def add_txt(self, name: str, text: str) -> None:
        raw = text.encode()
        chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)]  # RFC 1035 strings
        self.records.setdefault(name.lower(), []).append((dns.TXT, dns.Record_TXT(*chunks)))

    def add_mx(self, name: str, exchange: str, preference: int = 10) -> None:
        self.records.setdefault(name.lower(), []).append(
            (dns.MX, dns.Record_MX(preference, exchange.encode())))

    def _lookup(self, name: bytes, cls: int, type_: int, timeout: Any) -> defer.Deferred:
        self.queries += 1
        key = name.decode().lower().rstrip(".")
        if key not in self.records:
            return defer.fail(dns_error.DomainError(name))
        answers = [dns.RRHeader(name, t, dns.IN, 60, payload, auth=True)
                   for t, payload in self.records[key] if t == type_]
        return defer.succeed((answers, [], []))


@pytest.fixture
def zone():
    """The zone and a UDP DNS server for it on 127.0.0.1 (port 0)."""
    authority = Zone()
    factory = server.DNSServerFactory(authorities=[authority])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    authority.address = f"127.0.0.1:{port.getHost().port}"
    yield authority
    port.stopListening()


@pytest.fixture
def key_file(tmp_path):
    from agentpost.auth.sealing import generate_key_file

    path = tmp_path / "secrets.key"
    generate_key_file(path)
    return str(path)


def domain_config(db_dsn: str, zone: Zone, key_file: str, **extra: Any):
    return make_config(db_dsn, secrets={"key_file": key_file},
                       domains={"dns_servers": [zone.address], "dns_timeout": "2s"}, **extra)


@pytest_twisted.async_yield_fixture
async def dom_server(db_dsn, openapi_checker, zone, key_file, tmp_path):
    """A server (log transport) whose resolver asks the test zone; its own timer is
    stopped so the test's task.Clock jobs are the only ones checking."""
    config = domain_config(db_dsn, zone, key_file,
                           outbound={"log_dir": str(tmp_path / "out"),
                                     "poll_interval": "200ms"})
    running = await start_server(config, openapi_checker)
    await running.core.domain_verify.stop()
    yield running
    await running.service.stopService()


def _dsn(server) -> str:
    return server.service.config.database.url


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(time.time() + 1)
    return clock


def publish(zone: Zone, domain: dict) -> None:
    """Publish every record the API asked for."""
    for rec in domain["records"]:
        if rec["type"] == "MX":
            zone.add_mx(rec["name"], rec["value"], rec.get("priority", 10))
        else:
            zone.add_txt(rec["name"], rec["value"])


def _events(server, domain_id: str) -> list[tuple]:
    return query(_dsn(server), "SELECT org_id, environment_id, data FROM events "
                 "WHERE type = 'domain.verified' AND data->>'domain_id' = %s", (domain_id,))


async def _new_domain(server, name="example.com", **body):
    _, key = await server.new_org()
    made = await server.api.post("/api/v1/domains", {"name": name, **body}, key=key)
    assert made.status == 201, made
    return key, made.json


# ---------------------------------------------------------------------------- parsing


def test_dns_server_addresses_and_backoff():
    assert parse_servers(["127.0.0.1:5353", "10.0.0.1", "[::1]:53", "[::1]"]) == [
        ("127.0.0.1", 5353), ("10.0.0.1", 53), ("::1", 53), ("::1", 53)]
    delays = [next_check_delay(age) for age in (0, 3599, 3600, 86400, 7 * 86400, 1e9)]
    assert delays == [60, 60, 600, 3600, 6 * 3600, 6 * 3600]


# ---------------------------------------------------------------------------- the timer


@pytest_twisted.ensureDeferred
async def test_timer_verifies_on_clock_advance_once_with_two_jobs(dom_server, zone):
    key, domain = await _new_domain(dom_server, mail_from_subdomain="bounce")
    config = dom_server.service.config
    db2 = Database(config.database.url, clock=reactor, reactor=reactor, pool_size=2)
    domains2, _ = build_domains(config, db2, dom_server.core.audit, reactor, reactor)
    clock1, clock2 = _clock(), _clock()
    job1 = DomainVerifyJob(dom_server.core.domains, clock1, 60.0)
    job2 = DomainVerifyJob(domains2, clock2, 60.0)
    job1.start(now=False)
    job2.start(now=False)
    try:
        # First round: nothing published yet, so the domain stays pending.
        clock1.advance(60)
        clock2.advance(60)
        await defer.gatherResults([d for d in (job1.running, job2.running) if d])
        got = (await dom_server.api.get(f"/api/v1/domains/{domain['id']}", key=key)).json
        assert got["status"] == "pending" and got["verified_at"] is None
        assert got["last_checked_at"] is not None and got["next_check_at"] is not None
        assert {r["key"]: r["status"] for r in got["records"]}["dkim"] == "pending"
        assert _events(dom_server, domain["id"]) == []

        publish(zone, domain)
        # Both jobs' clocks pass the next check; both run a round at the same time.
        clock1.advance(180)
        clock2.advance(180)
        await defer.gatherResults([d for d in (job1.running, job2.running) if d])
        got = (await dom_server.api.get(f"/api/v1/domains/{domain['id']}", key=key)).json
        assert got["status"] == "verified" and got["verified"] is True
        assert got["next_check_at"] is None and got["last_check_error"] is None
        assert {r["key"]: r["status"] for r in got["records"]} == {
            "mx": "verified", "spf": "verified", "dkim": "verified", "dmarc": "verified",
            "mail_from_mx": "verified", "mail_from_spf": "verified"}
        [(_, env_id, data)] = _events(dom_server, domain["id"])
        assert env_id == domain["environment_id"] and data["name"] == "example.com"

        # Later rounds leave a verified domain alone: still exactly one event.
        queries = zone.queries
        clock1.advance(3600)
        clock2.advance(3600)
        await defer.gatherResults([d for d in (job1.running, job2.running) if d])
        assert zone.queries == queries
        assert len(_events(dom_server, domain["id"])) == 1
    finally:
        await job1.stop()
        await job2.stop()
        await db2.close()


@pytest_twisted.ensureDeferred
async def test_concurrent_checks_of_one_domain_write_one_event(dom_server, zone):
    """Two processes checking the same row at once (a manual verify racing the timer):
    only the update that sets verified_at writes the event."""
    _, domain = await _new_domain(dom_server)
    publish(zone, domain)
    config = dom_server.service.config
    db2 = Database(config.database.url, clock=reactor, reactor=reactor, pool_size=2)
    domains2, _ = build_domains(config, db2, dom_server.core.audit, reactor, reactor)
    try:
        [row] = await dom_server.core.db.run_query(
            "t", "SELECT * FROM domains WHERE id = %s", (domain["id"],))
        results = await defer.gatherResults([
            defer.Deferred.fromCoroutine(dom_server.core.domains.run_check(row)),
            defer.Deferred.fromCoroutine(domains2.run_check(row)),
            defer.Deferred.fromCoroutine(domains2.run_check(row))])
        assert all(r["verified_at"] is not None for r in results)
        assert len(_events(dom_server, domain["id"])) == 1
    finally:
        await db2.close()


@pytest_twisted.ensureDeferred
async def test_old_unverified_domains_are_polled_less_often(dom_server, zone):
    _, domain = await _new_domain(dom_server)
    _execute(_dsn(dom_server), "UPDATE domains SET created_at = created_at - interval "
             "'30 days' WHERE id = %s", (domain["id"],))
    clock = _clock()
    job = DomainVerifyJob(dom_server.core.domains, clock, 60.0)
    assert await job.round_once() == 1
    [(checked, due, count)] = query(
        _dsn(dom_server), "SELECT last_checked_at, next_check_at, check_count FROM domains "
        "WHERE id = %s", (domain["id"],))
    assert count == 1 and due - checked == timedelta(hours=6)
    assert await job.round_once() == 0  # not due again for six hours


@pytest_twisted.ensureDeferred
async def test_a_wrong_dkim_record_stays_pending_and_dns_failures_are_recorded(
        dom_server, zone, db_dsn, openapi_checker, key_file):
    key, domain = await _new_domain(dom_server)
    dkim = next(r for r in domain["records"] if r["key"] == "dkim")
    zone.add_txt(dkim["name"], "v=DKIM1; k=rsa; p=" + "A" * 40)
    got = (await dom_server.api.post(f"/api/v1/domains/{domain['id']}/verify", None,
                                     key=key)).json
    assert got["status"] == "pending" and got["last_check_error"] is None
    assert _events(dom_server, domain["id"]) == []
    # A DNS server that does not answer: the check records an error, nothing changes.
    dom_server.core.domains.checker._dns = type(dom_server.core.domains.checker._dns)(
        ["127.0.0.1:9"], 0.2, reactor)
    got = (await dom_server.api.post(f"/api/v1/domains/{domain['id']}/verify", None,
                                     key=key)).json
    assert got["status"] == "pending" and got["last_check_error"]


# ---------------------------------------------------------------------------- sending


@pytest_twisted.ensureDeferred
async def test_an_inbox_on_an_unverified_domain_cannot_send_until_verified(dom_server, zone):
    key, domain = await _new_domain(dom_server)
    inbox = await dom_server.api.post("/api/v1/inboxes",
                                      {"username": "agent", "domain": "example.com"}, key=key)
    assert inbox.status == 201, inbox
    address = inbox.json["email"]
    made = await dom_server.api.post("/api/v1/api-keys", {"name": "smtp",
                                                          "scopes": ["messages:send"]}, key=key)
    smtp_key = made.json["key"]

    def send(mid: str) -> Any:
        smtp = _login(dom_server.submission_port, address, smtp_key)
        try:
            assert smtp.docmd("MAIL", f"FROM:<{address}>")[0] == 250
            rcpt = smtp.docmd("RCPT", "TO:<someone@example.org>")
            if rcpt[0] != 250:
                return rcpt
            return smtp.data(_msg(address, "someone@example.org", mid=mid))
        finally:
            smtp.quit()

    refused = await deferToThread(send, "m1")
    assert refused[0] == 550 and refused[1].startswith(b"5.7.1"), refused
    assert b"not verified" in refused[1]
    # The send API goes through the same check.
    api = await dom_server.api.post(f"/api/v1/inboxes/{inbox.json['id']}/messages",
                                    {"to": ["someone@example.org"], "subject": "hi",
                                     "text_body": "hello"}, key=key)
    assert api.status == 403 and api.json["error"]["type"] == "domain_not_verified", api
    assert query(_dsn(dom_server), "SELECT count(*) FROM outbound_queue")[0][0] == 0

    publish(zone, domain)
    verified = await dom_server.api.post(f"/api/v1/domains/{domain['id']}/verify", None,
                                         key=key)
    assert verified.json["status"] == "verified", verified
    accepted = await deferToThread(send, "m2")
    assert accepted[0] == 250, accepted
    assert query(_dsn(dom_server), "SELECT count(*) FROM outbound_queue")[0][0] == 1


@pytest_twisted.ensureDeferred
async def test_the_shared_domain_counts_as_verified(dom_server):
    _, key = await dom_server.new_org()
    inbox = (await dom_server.api.post("/api/v1/inboxes", {"username": "s"}, key=key)).json
    made = (await dom_server.api.post("/api/v1/api-keys", {"scopes": ["messages:send"]},
                                      key=key)).json

    def send() -> Any:
        smtp = _login(dom_server.submission_port, inbox["email"], made["key"])
        try:
            smtp.sendmail(inbox["email"], ["x@example.org"],
                          _msg(inbox["email"], "x@example.org"))
        except smtplib.SMTPException as exc:
            return exc
        finally:
            smtp.quit()
        return None

    assert await deferToThread(send) is None


def test_twisted_names_zone_helper_splits_long_txt():
    z = Zone()
    z.add_txt("a.test", "x" * 600)
    [(t, payload)] = z.records["a.test"]
    assert t == dns.TXT and [len(c) for c in payload.data] == [255, 255, 90]
