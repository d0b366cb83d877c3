"""Organizations' own domains: registration, the DNS records to publish, verification,
removal, and the DKIM key the smarthost signs with.

Why it is shaped this way:

* **One name, one organization.** A domain any organization (or the installation, as
  a shared domain or a subdomain of one) already has is a 409, whoever asks.
* **DKIM follows the transport.** With ``ses`` SES signs (Easy DKIM: three CNAMEs to
  tokens SES gives); otherwise we hold the key: RSA-2048 (or Ed25519) made here, its
  private half sealed with AES-256-GCM (:mod:`agentpost.auth.sealing`) under the org id
  and domain id, so a database copy alone cannot sign as the customer.
* **Verified means proven control**: SES says so, or our DKIM TXT record is published.
  The other records (MX, SPF, DMARC, MAIL FROM) are checked and reported, but a domain
  is usable for sending once DKIM is there. ``domain.verified`` is written in the
  transaction that sets ``verified_at``, and only by the update that set it (exactly
  once, whichever process or request got there first).
* **Inboxes on an unverified domain exist but do not send** (core.submission raises
  DomainNotVerified) nor receive (routing hosts verified domains only).
"""

from __future__ import annotations

import base64
import builtins
import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import idna
from twisted.internet import threads

from agentpost.auth.sealing import Sealer, context
from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.core.inboxes import resolve_environment
from agentpost.model.errors import Conflict, InvalidRequest, NotFound, TemporaryFailure
from agentpost.model.ids import new_id
from agentpost.storage import domains as store
from agentpost.storage import mail as mail_store
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
#: Special-use top-level names (RFC 6761, 6762, 7686) and the reverse-DNS tree: no
#: organization can prove it holds a name under them.
SPECIAL_USE_TLDS = frozenset({"localhost", "local", "invalid", "onion", "arpa",
                              "internal", "home", "lan", "corp", "localdomain"})
#: Common public suffixes with more than one label (a small built-in excerpt of the
#: Public Suffix List; single labels such as ``com`` are refused anyway). Registering one
#: would claim every address under it on the shared MX.
PUBLIC_SUFFIXES = frozenset({
    "co.uk", "org.uk", "me.uk", "ltd.uk", "plc.uk", "net.uk", "ac.uk", "gov.uk", "sch.uk",
    "com.au", "net.au", "org.au", "edu.au", "gov.au", "co.nz", "org.nz", "net.nz",
    "co.jp", "ne.jp", "or.jp", "ac.jp", "go.jp", "co.kr", "or.kr", "com.br", "net.br",
    "org.br", "com.cn", "net.cn", "org.cn", "gov.cn", "com.hk", "com.tw", "com.sg",
    "com.my", "co.in", "net.in", "org.in", "firm.in", "gen.in", "ind.in", "co.za",
    "org.za", "com.mx", "com.ar", "com.tr", "co.il", "org.il", "com.ua", "co.id",
    "or.id", "com.ph", "com.vn", "com.pk", "com.ng", "com.eg", "com.sa", "co.th",
    "in.th", "com.co", "com.pe", "com.ru", "co.at", "or.at", "com.pl", "co.it",
    "github.io", "gitlab.io", "herokuapp.com", "blogspot.com", "appspot.com",
    "azurewebsites.net", "cloudfront.net", "amazonaws.com", "netlify.app", "vercel.app",
    "pages.dev", "workers.dev", "web.app", "firebaseapp.com", "fly.dev",
})
SES_SPF = "include:amazonses.com"
PENDING, VERIFIED = "pending", "verified"


# ----------------------------------------------------------------------------- DKIM key


@dataclass(frozen=True)
class DkimKey:
    """An organization's own DKIM signing key for one domain (decrypted: keep it in
    memory only as long as signing needs it)."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    private_key_pem: bytes  # PKCS#8 PEM

    @property
    def dkimpy_signature_algorithm(self) -> bytes:
        """``signature_algorithm`` for ``dkim.sign``."""
        return b"ed25519-sha256" if self.algorithm == "ed25519" else b"rsa-sha256"

    @property
    def dkimpy_private_key(self) -> bytes:
        """``privkey`` for ``dkim.sign``: the PEM for RSA; for Ed25519 dkimpy wants the
        base64 of the raw 32-byte private key (RFC 8463)."""
        if self.algorithm != "ed25519":
            return self.private_key_pem
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return base64.b64encode(raw)


def key_context(org_id: str, domain_id: str) -> bytes:
    """Associated data of a sealed DKIM key: where it belongs."""
    return context("dkim", org_id, domain_id)


async def dkim_key_for(db: Database, org_id: str, domain: str, *,
                       sealer: Sealer) -> DkimKey | None:
    """The DKIM key to sign mail from ``domain`` sent by organization ``org_id``, or None
    when the domain is not that organization's or is not signed by us (SES signs, or a
    shared domain). Raises SealingError if the key cannot be opened (wrong master key,
    or a row moved between tenants). For the smarthost transport (dkimpy)::

        key = await dkim_key_for(db, org_id, "example.com", sealer=sealer)
        if key: dkim.sign(raw, key.selector.encode(), key.domain.encode(),
                          key.dkimpy_private_key,
                          signature_algorithm=key.dkimpy_signature_algorithm)
    """
    row = await db.run_read("domains.dkim_key", store.dkim_key_for, org_id, domain)
    if row is None:
        return None
    pem = sealer.open(bytes(row["dkim_private_sealed"]), key_context(org_id, row["id"]))
    return DkimKey(row["name"], row["dkim_selector"], row["dkim_algorithm"], pem)


def generate_key(algorithm: str) -> tuple[bytes, str]:
    """A new key pair: (private PKCS#8 PEM, the TXT record's ``p=`` value). CPU-heavy for
    RSA: call it in a thread."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key: Any
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, base64.b64encode(public).decode("ascii")


# ----------------------------------------------------------------------------- names


def normalize_name(raw: Any, field_name: str = "name") -> str:
    """A domain name as stored: IDNA (UTS #46) A-labels, lowercase, no trailing dot, at
    least two labels, not an IP address."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidRequest(f"{field_name} must be a domain name.", field=field_name)
    text = raw.strip()
    text = text[:-1] if text.endswith(".") else text
    try:
        name = idna.encode(text, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        raise InvalidRequest(f"{field_name} is not a valid domain name.",
                             field=field_name) from None
    labels = name.split(".")
    if (len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels)
            or labels[-1].isdigit()):
        raise InvalidRequest(f"{field_name} is not a valid domain name.", field=field_name)
    if labels[-1] in SPECIAL_USE_TLDS or name in PUBLIC_SUFFIXES:
        raise InvalidRequest(f"{field_name} is a public suffix or a special-use name, not "
                             "a domain an organization can hold.", field=field_name)
    return name


def normalize_subdomain(raw: Any) -> str | None:
    """The custom MAIL FROM's left-hand label(s), e.g. ``bounce``; None for none."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidRequest("mail_from_subdomain must be a string.",
                             field="mail_from_subdomain")
    sub = raw.strip().lower().rstrip(".")
    if not sub or len(sub) > 63 or not all(_LABEL.match(x) for x in sub.split(".")):
        raise InvalidRequest("mail_from_subdomain must be one or more DNS labels such as "
                             "'bounce'.", field="mail_from_subdomain")
    return sub


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordPolicy:
    """What this installation asks domains to publish."""

    hostname: str  # our MX
    transport: str  # "ses", "log", "smtp", ...
    ses_region: str = "us-east-1"
    spf_include: str = ""  # smarthost's SPF mechanism; "" = a:<hostname>
    dmarc_rua: str = ""

    @property
    def spf_mechanism(self) -> str:
        """The SPF mechanism covering where our mail leaves from."""
        if self.transport == "ses":
            return SES_SPF
        return self.spf_include or f"a:{self.hostname}"


def _rec(key: str, type_: str, name: str, value: str, purpose: str, status: dict[str, str],
         *, required: bool = True, priority: int | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"key": key, "type": type_, "name": name, "value": value,
                           "purpose": purpose, "required": required,
                           "status": status.get(key, PENDING)}
    if priority is not None:
        rec["priority"] = priority
    return rec


def dns_records(row: dict[str, Any], policy: RecordPolicy) -> list[dict[str, Any]]:
    """The DNS records ``row``'s owner publishes, each with its last checked status."""
    name, status = row["name"], dict(row.get("record_status") or {})
    if row.get("verified_at") is not None:
        status.setdefault("dkim", VERIFIED)
    spf = f"v=spf1 {policy.spf_mechanism} ~all"
    out = [
        _rec("mx", "MX", name, policy.hostname, "Inbound mail for the domain comes here.",
             status, priority=10),
        _rec("spf", "TXT", name, spf, "SPF: receivers accept mail from the hosts that "
             "send for this domain.", status),
    ]
    if row["dkim_mode"] == "ses":
        for i, token in enumerate(row.get("ses_dkim_tokens") or [], 1):
            dkim_status = {f"dkim{i}": status.get("dkim", PENDING)}
            out.append(_rec(f"dkim{i}", "CNAME", f"{token}._domainkey.{name}",
                            f"{token}.dkim.amazonses.com",
                            "DKIM (SES Easy DKIM): SES signs mail from the domain.",
                            dkim_status))
    elif row["dkim_mode"] == "own":
        k = "ed25519" if row["dkim_algorithm"] == "ed25519" else "rsa"
        out.append(_rec("dkim", "TXT", f"{row['dkim_selector']}._domainkey.{name}",
                        f"v=DKIM1; k={k}; p={row['dkim_public_key']}",
                        "DKIM: the public key receivers check our signatures with.", status))
    rua = policy.dmarc_rua or f"mailto:postmaster@{name}"
    out.append(_rec("dmarc", "TXT", f"_dmarc.{name}", f"v=DMARC1; p=none; rua={rua}",
                    "DMARC (a suggestion): start with p=none, read the reports, then "
                    "tighten.", status, required=False))
    sub = row.get("mail_from_subdomain")
    if sub:
        mf = f"{sub}.{name}"
        mx = (f"feedback-smtp.{policy.ses_region}.amazonses.com"
              if row["dkim_mode"] == "ses" else policy.hostname)
        out.append(_rec("mail_from_mx", "MX", mf, mx, "Custom MAIL FROM: bounces to the "
                        "envelope sender's domain come back here.", status, priority=10))
        out.append(_rec("mail_from_spf", "TXT", mf, spf, "Custom MAIL FROM: SPF for the "
                        "envelope sender's domain (aligns SPF for DMARC).", status))
    return out


# ----------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class CheckResult:
    """One verification check: per-record status, whether the domain is now verified,
    and what went wrong (a DNS or SES failure; the next round tries again)."""

    statuses: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    error: str | None = None


class DomainChecker(Protocol):
    """Looks at DNS (and SES) for one domain (agentpost.jobs.domain_verify)."""

    def check(self, row: dict[str, Any],
              records: list[dict[str, Any]]) -> Awaitable[CheckResult]: ...


def next_check_delay(age_s: float) -> float:
    """How long an unverified domain of this age waits for its next check: every minute
    in its first hour (the owner is publishing records now), then ever less often."""
    if age_s < 3600:
        return 60.0
    if age_s < 86400:
        return 600.0
    if age_s < 7 * 86400:
        return 3600.0
    return 6 * 3600.0


class SESIdentityCalls(Protocol):
    """The parts of agentpost.outbound.ses_identity.SESIdentities the core uses."""

    async def create(self, domain: str) -> Any: ...

    async def set_mail_from(self, domain: str, mail_from_domain: str) -> None: ...

    async def delete(self, domain: str) -> None: ...


# ----------------------------------------------------------------------------- service


class Domains:
    """Register, list, verify and remove an organization's own domains."""

    def __init__(self, db: Database, audit: AuditTrail, *, shared_domain: str,
                 policy: RecordPolicy, reactor: Any, dkim_algorithm: str = "rsa",
                 sealer: Sealer | None = None, ses: SESIdentityCalls | None = None,
                 checker: DomainChecker | None = None, claim_after_s: float = 0.0) -> None:
        self._claim_after_s = claim_after_s
        self._db = db
        self._audit = audit
        self._shared = shared_domain.lower().rstrip(".")
        self.policy = policy
        self._reactor = reactor
        self._algorithm = dkim_algorithm
        self.sealer = sealer
        self._ses = ses if policy.transport == "ses" else None
        self.checker = checker

    # -- reading

    def view(self, row: dict[str, Any]) -> dict[str, Any]:
        """A domain row with its DNS records (what the API shows)."""
        return {**row, "records": dns_records(row, self.policy)}

    async def list(self, ctx: RequestContext) -> builtins.list[dict[str, Any]]:
        """Shared domains first, then the organization's own (visible environments)."""
        p = ctx.org_principal
        p.require("domains:read")

        async def read(txn: Txn) -> builtins.list[dict[str, Any]]:
            shared = await store.list_shared(txn)
            own = await store.list_domains(txn, p.org_id, p.environment_ids)
            return [{"shared": True, **r} for r in shared] + [self.view(r) for r in own]

        return await self._db.run_read("domains.list", read)

    async def get(self, ctx: RequestContext, domain_id: str) -> dict[str, Any]:
        """One of the organization's domains."""
        return self.view(await self._own_domain(ctx, domain_id, "domains:read"))

    async def _own_domain(self, ctx: RequestContext, domain_id: str,
                          scope: str) -> dict[str, Any]:
        """The caller's domain (in an environment it sees) or 404, with the audit row's
        target and environment set: the one way every single-domain read starts."""
        p = ctx.org_principal
        p.require(scope)
        ctx.target_id = domain_id
        row = await self._db.run_read("domains.get", store.get_domain, p.org_id,
                                      p.environment_ids, domain_id)
        if row is None:
            raise NotFound()
        ctx.environment_id = row["environment_id"]
        return row

    async def dkim_key_for(self, org_id: str, domain: str) -> DkimKey | None:
        """See the module function :func:`dkim_key_for` (this one uses our sealer)."""
        if self.sealer is None:
            return None
        return await dkim_key_for(self._db, org_id, domain, sealer=self.sealer)

    # -- creating

    def _refuse_reserved_name(self, name: str) -> None:
        ours = {self._shared, self.policy.hostname.lower()}
        if name in ours or any(name.endswith("." + d) for d in ours if d):
            raise Conflict(f"The domain {name} belongs to this installation.")

    async def create(self, ctx: RequestContext, *, name: Any, environment_id: str | None,
                     mail_from_subdomain: Any = None) -> dict[str, Any]:
        """Register a domain; the answer lists the DNS records to publish."""
        p = ctx.org_principal
        p.require("domains:write")
        domain = normalize_name(name)
        sub = normalize_subdomain(mail_from_subdomain)
        self._refuse_reserved_name(domain)
        env_id = await self._db.run_read("domains.environment", resolve_environment, p,
                                         environment_id)
        stale_before = (None if not self._claim_after_s else self._db.now()
                        - timedelta(seconds=self._claim_after_s))
        if await self._db.run_read("domains.taken", store.name_taken, domain, p.org_id,
                                   stale_before):
            raise Conflict(f"The domain {domain} is already registered.")
        await self._refuse_overlap(p.org_id, domain, sub, stale_before)
        domain_id = new_id("dom")
        fields = await self._dkim_fields(p.org_id, domain_id, domain, sub)

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            if stale_before is not None:
                released = await store.release_stale(txn, domain, p.org_id, stale_before)
                if released is not None:
                    log.info("domain %s: %s's unverified registration %s released to %s",
                             domain, released["org_id"], released["id"], p.org_id)
            row = await store.insert_domain(
                txn, org_id=p.org_id, domain_id=domain_id, environment_id=env_id,
                name=domain, mail_from_subdomain=sub, **fields)
            ctx.target_id, ctx.environment_id = domain_id, env_id
            await self._audit.write_in(txn, ctx, 201)
            return row

        return self.view(await self._db.run_interaction("domains.create", txn_fn))

    async def _refuse_overlap(self, org_id: str, domain: str, sub: str | None,
                              stale_before: datetime | None) -> None:
        """Refuse a hosted name that is a custom MAIL FROM name, and the reverse.

        The MX routes a hosted domain before any custom MAIL FROM, so a hosted
        ``bounce.example.com`` would take the bounces of the ``example.com`` that uses
        ``bounce``: another organization's, or muddled routing within one (refused
        too, for simplicity). Either order answers 409 ``conflict``; verification
        checks again (see :meth:`_record`) for registrations that raced.
        """
        if await self._db.run_read("domains.bounce_name_taken", store.bounce_name_taken,
                                   domain, org_id, stale_before):
            raise Conflict(f"{domain} is the custom MAIL FROM name of a registered domain; "
                           "as a hosted domain it would take that domain's bounces.",
                           field="name")
        if sub is None:
            return
        bounce_name = f"{sub}.{domain}"
        self._refuse_reserved_name(bounce_name)
        if await self._db.run_read("domains.taken", store.name_taken, bounce_name, org_id,
                                   stale_before):
            raise Conflict(f"{bounce_name} is already registered as a hosted domain, which "
                           "would take this domain's bounces; choose another "
                           "mail_from_subdomain.", field="mail_from_subdomain")

    async def _dkim_fields(self, org_id: str, domain_id: str, domain: str,
                           sub: str | None) -> dict[str, Any]:
        """SES identity (Easy DKIM tokens) or our own sealed key pair."""
        if self._ses is not None:
            state = await self._ses.create(domain)
            if sub:
                await self._ses.set_mail_from(domain, f"{sub}.{domain}")
            return {"dkim_mode": "ses", "ses_dkim_tokens": list(state.tokens)}
        if self.sealer is None:
            # The operator's configuration, not the client's request: 503 until fixed.
            raise TemporaryFailure("This installation cannot hold DKIM keys: its operator "
                                   "has not configured [secrets] key_file.")
        algorithm = self._algorithm
        pem, public = await threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), generate_key, algorithm)
        now = datetime.fromtimestamp(self._reactor.seconds(), UTC)
        return {"dkim_mode": "own", "dkim_selector": f"ap{now:%Y%m}",
                "dkim_algorithm": algorithm, "dkim_public_key": public,
                "dkim_private_sealed": self.sealer.seal(pem, key_context(org_id, domain_id))}

    # -- removing

    async def delete(self, ctx: RequestContext, domain_id: str) -> None:
        """Remove a domain no inbox uses (409 otherwise); with SES, its identity too."""
        p = ctx.org_principal
        p.require("domains:write")
        ctx.target_id = domain_id

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            row = await store.lock_domain(txn, p.org_id, p.environment_ids, domain_id)
            if row is None:
                raise NotFound()
            ctx.environment_id = row["environment_id"]
            used = await store.inboxes_using(txn, p.org_id, row["name"])
            if used:
                raise Conflict(f"{used} inbox(es) use {row['name']}; delete them first.",
                               inboxes=used)
            await store.delete_domain(txn, p.org_id, domain_id)
            await self._audit.write_in(txn, ctx, 204)
            return row

        row = await self._db.run_interaction("domains.delete", txn_fn)
        if self._ses is not None and row["dkim_mode"] == "ses":
            await self._ses.delete(row["name"])

    # -- verifying

    async def verify(self, ctx: RequestContext, domain_id: str) -> dict[str, Any]:
        """Check the domain's DNS (and SES) now; the updated domain."""
        row = await self._own_domain(ctx, domain_id, "domains:write")
        return self.view(await self.run_check(row))

    async def run_check(self, row: dict[str, Any]) -> dict[str, Any]:
        """Check one domain and record the outcome; on success set verified_at and write
        ``domain.verified`` in the same transaction (only if this call set it)."""
        if self.checker is None:
            result = CheckResult(error="no checker configured")
        else:
            try:
                result = await self.checker.check(row, dns_records(row, self.policy))
            except Exception as exc:  # a DNS/SES failure: recorded, tried again later
                result = CheckResult(error=f"{type(exc).__name__}: {exc}"[:500])
        return await self._db.run_interaction("domains.record_check", self._record, row,
                                              result)

    async def _record(self, txn: Txn, row: dict[str, Any], result: CheckResult
                      ) -> dict[str, Any]:
        org_id, domain_id = row["org_id"], row["id"]
        if (result.verified and row["verified_at"] is None
                and await store.verified_overlap(txn, org_id, domain_id)):
            result = CheckResult(statuses=result.statuses, error=(
                "A verified domain's hosted name is this domain's custom MAIL FROM name, "
                "or the reverse; the MX cannot route both."))
        verified = result.verified or row["verified_at"] is not None
        age = (txn.now - row["created_at"]).total_seconds()
        next_at = None if verified else txn.now + timedelta(seconds=next_check_delay(age))
        updated = await store.record_check(txn, org_id, domain_id,
                                           record_status=result.statuses,
                                           error=result.error, next_check_at=next_at)
        if updated is None:  # deleted meanwhile
            raise NotFound()
        if result.verified and row["verified_at"] is None:
            marked = await store.mark_verified(txn, org_id, domain_id)
            if marked is not None:
                await mail_store.insert_event(
                    txn, org_id=org_id, event_id=new_id("evt"),
                    environment_id=marked["environment_id"], inbox_id=None,
                    type_="domain.verified",
                    data={"domain_id": domain_id, "name": marked["name"],
                          "environment_id": marked["environment_id"],
                          "verified_at": marked["verified_at"].isoformat()})
                return marked
            return await store.get_domain(txn, org_id, None, domain_id) or updated
        return updated

    async def check_due(self, now: datetime, *, lease_s: float = 300.0,
                        limit: int = 20) -> int:
        """One verification round: claim due domains (SKIP LOCKED, so concurrent rounds
        in other processes take other rows) and check each; returns how many."""
        rows = await self._db.run_interaction(
            "domains.claim_due", store.claim_due, now, now + timedelta(seconds=lease_s), limit)
        for row in rows:
            try:
                await self.run_check(row)
            except NotFound:
                continue
        return len(rows)

