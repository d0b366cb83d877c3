"""The domain verification timer, and the DNS/SES look-ups a check makes.

Every process runs the timer (on the injected clock, agentpost.jobs.periodic). A round
claims the unverified domains that are due with ``FOR UPDATE SKIP LOCKED`` and pushes
their next check past a lease, so two processes never check the same domain at once;
whichever check sees the domain verified first sets ``verified_at`` and writes the one
``domain.verified`` event (core.domains). Old unverified domains are checked ever less
often (core.domains.next_check_delay).

DNS goes through Twisted's own resolver (``twisted.names.client``), asking the servers
``[domains] dns_servers`` names (tests run a ``twisted.names`` server on 127.0.0.1) or
those of /etc/resolv.conf. An absent name or record is "pending"; a timeout or server
failure is recorded as the check's error and retried on the next round.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.names import client, dns
from twisted.names import error as dns_error

from agentpost.config import Config
from agentpost.core.domains import PENDING, VERIFIED, CheckResult, Domains
from agentpost.jobs.periodic import Periodic
from agentpost.outbound.ses_identity import SESIdentities

log = logging.getLogger(__name__)

#: Look-up answers that mean "not published (yet)", not "the check failed".
_ABSENT = (dns_error.DNSNameError, dns_error.DomainError)


def parse_servers(servers: list[str]) -> list[tuple[str, int]]:
    """``host`` or ``host:port`` (``[v6]:port`` for IPv6) to resolver addresses."""
    out = []
    for server in servers:
        host, port = server, 53
        if server.startswith("["):
            host, _, rest = server[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif server.count(":") == 1:
            host, _, text = server.partition(":")
            port = int(text)
        out.append((host, port))
    return out


class DnsLookups:
    """TXT and MX look-ups through ``twisted.names``."""

    def __init__(self, servers: list[str], timeout_s: float, reactor: Any) -> None:
        self._timeout = (timeout_s,)
        self._servers = parse_servers(servers)
        self._reactor = reactor
        self._resolver_obj: client.Resolver | None = None

    @property
    def _resolver(self) -> client.Resolver:
        # Made on first use: a resolv.conf resolver re-reads the file on a timer.
        if self._resolver_obj is None:
            if self._servers:
                self._resolver_obj = client.Resolver(servers=self._servers,
                                                     timeout=self._timeout,
                                                     reactor=self._reactor)
            else:
                self._resolver_obj = client.Resolver(resolv="/etc/resolv.conf",
                                                     timeout=self._timeout,
                                                     reactor=self._reactor)
        return self._resolver_obj

    async def txt(self, name: str) -> list[str]:
        """The TXT records of ``name`` (each record's strings joined), [] if none."""
        try:
            answers, _, _ = await self._resolver.lookupText(name, timeout=self._timeout)
        except _ABSENT:
            return []
        return [b"".join(a.payload.data).decode("utf-8", "replace") for a in answers
                if a.type == dns.TXT]

    async def mx(self, name: str) -> list[str]:
        """The exchanges of ``name``'s MX records (lowercase, no trailing dot)."""
        try:
            answers, _, _ = await self._resolver.lookupMailExchange(name,
                                                                    timeout=self._timeout)
        except _ABSENT:
            return []
        return [a.payload.name.name.decode().lower().rstrip(".") for a in answers
                if a.type == dns.MX]


def _tags(record: str) -> dict[str, str]:
    """A DKIM/DMARC tag list (``k=v; k=v``), whitespace inside values removed."""
    out = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            out[key.strip().lower()] = "".join(value.split())
    return out


def record_matches(rec: dict[str, Any], found: list[str]) -> bool:
    """Whether DNS holds what ``rec`` asks for (loosely where the owner may merge our
    mechanism into an SPF record of their own)."""
    key, want = rec["key"], rec["value"]
    if rec["type"] == "MX":
        return want.lower().rstrip(".") in found
    if key == "dkim":
        want_tags = _tags(want)
        return any(_tags(f).get("p") == want_tags["p"] and _tags(f).get("k", "rsa")
                   == want_tags["k"] for f in found)
    if key in ("spf", "mail_from_spf"):
        mechanism = want.split()[1].lower()
        return any(f.lower().startswith("v=spf1") and mechanism in f.lower().split()
                   for f in found)
    if key == "dmarc":
        return any(f.replace(" ", "").upper().startswith("V=DMARC1") for f in found)
    return want in found


class DomainDnsChecker:
    """One domain's check: DNS for the records, SES for SES-signed domains."""

    def __init__(self, dns_lookups: DnsLookups, ses: SESIdentities | None = None) -> None:
        self._dns = dns_lookups
        self._ses = ses

    async def _look(self, rec: dict[str, Any]) -> bool:
        found = await (self._dns.mx(rec["name"]) if rec["type"] == "MX"
                       else self._dns.txt(rec["name"]))
        return record_matches(rec, found)

    async def _look_safely(self, rec: dict[str, Any]) -> tuple[bool, str | None]:
        try:
            return await self._look(rec), None
        except Exception as exc:  # timeout, SERVFAIL, refused: this round's error
            return False, f"{rec['type']} {rec['name']}: {type(exc).__name__} {exc}"[:200]

    async def check(self, row: dict[str, Any], records: list[dict[str, Any]]) -> CheckResult:
        """Statuses of every record we can see in DNS; verified per the DKIM mode."""
        by_ses = row["dkim_mode"] == "ses"
        todo = [r for r in records if not (by_ses and r["key"].startswith("dkim"))]
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._look_safely(r)) for r in todo])
        statuses: dict[str, str] = {}
        errors: list[str] = []
        for rec, (found, problem) in zip(todo, results, strict=True):
            if problem is not None:
                errors.append(problem)
            statuses[rec["key"]] = VERIFIED if found else PENDING
        verified = statuses.get("dkim") == VERIFIED
        if by_ses:
            if self._ses is None:
                errors.append("SES is not the configured transport")
                verified = False
            else:
                state = await self._ses.state(row["name"])
                verified = state.verified
                statuses["dkim"] = VERIFIED if state.verified else PENDING
                if state.mail_from_status == "SUCCESS":
                    statuses.update(mail_from_mx=VERIFIED, mail_from_spf=VERIFIED)
        return CheckResult(statuses, verified, "; ".join(errors)[:500] or None)


class DomainVerifyJob:
    """The timer: a round every ``interval_s`` checks every due domain."""

    def __init__(self, domains: Domains, clock: IReactorTime, interval_s: float, *,
                 batch: int = 20, ses: SESIdentities | None = None) -> None:
        self._domains = domains
        self._clock = clock
        self._batch = batch
        self._ses = ses
        self._periodic = Periodic("domain verification", clock, interval_s, self.round_once,
                                  self._report)

    async def round_once(self) -> int:
        """Check every due domain (in batches); returns how many were checked."""
        total = 0
        while True:
            now = datetime.fromtimestamp(self._clock.seconds(), UTC)
            claimed = await self._domains.check_due(now, limit=self._batch)
            total += claimed
            if claimed < self._batch:
                return total

    def _report(self, checked: int) -> None:
        if checked:
            log.info("domain verification: checked %d domain(s)", checked)

    @property
    def running(self) -> defer.Deferred[Any] | None:
        """The round in progress, if any (a test awaits it after advancing the clock)."""
        return self._periodic.running

    def wake(self) -> None:
        """Run a round now (or right after the one in progress)."""
        self._periodic.wake()

    def start(self, *, now: bool = True) -> None:
        """Check now and then every interval."""
        self._periodic.start(now=now)

    async def stop(self) -> None:
        """Stop the timer, wait for a round in progress, stop the SES thread pool."""
        await self._periodic.stop()
        if self._ses is not None:
            self._ses.stop()


def build_domains(config: Config, db: Any, audit: Any, reactor: Any,
                  clock: IReactorTime) -> tuple[Domains, DomainVerifyJob]:
    """The domain service and its timer from configuration (the composition root's
    helper). With SES, identity calls use a client built exactly as the ses transport
    builds its own (agentpost.outbound.ses: endpoint rules, credentials, timeouts)."""
    from agentpost.auth.sealing import load_sealer
    from agentpost.core.domains import RecordPolicy

    dom = config.domains
    ses = None
    if config.outbound.transport == "ses":
        from agentpost.outbound.ses import SESTransport

        ses = SESIdentities.for_transport(
            SESTransport.from_config(config.outbound, clock=clock, reactor=reactor), reactor)
    sealer = load_sealer(config.secrets.key_file) if config.secrets.key_file else None
    policy = RecordPolicy(hostname=config.server.hostname, transport=config.outbound.transport,
                          ses_region=config.outbound.ses_region, spf_include=dom.spf_include,
                          dmarc_rua=dom.dmarc_rua)
    checker = DomainDnsChecker(DnsLookups(dom.dns_servers, dom.dns_timeout, reactor), ses)
    domains = Domains(db, audit, shared_domain=config.mail.shared_domain, policy=policy,
                      reactor=reactor, dkim_algorithm=dom.dkim_algorithm, sealer=sealer,
                      ses=ses, checker=checker, claim_after_s=dom.claim_after)
    return domains, DomainVerifyJob(domains, clock, dom.verify_interval, ses=ses)
