"""Failed-login allowances for every door that takes a password (IMAP LOGIN and
AUTHENTICATE now, SMTP AUTH on submission next).

The allowances throttle whoever fails, never the account they aim at: a stranger
who fails twelve times from twelve addresses must not lock the owner out. So a login
is refused before its credential is checked only when its *source* (an IPv4 address,
an IPv6 /64 — one attacker holds a whole /64) or its *(source, account) pair* has
used up its failures. Failures against one account from everywhere only earn a
small delay before verification, never a refusal.

The buckets live in PostgreSQL (storage/logins.py) so every process and node draws
from the same ones, and they are keyed by protocol-agnostic digests: an attacker who
switches from IMAP to SMTP AUTH keeps the allowance he has already spent.

Each failure also leaves one log line in a stable format for fail2ban (see
etc/fail2ban/ and docs/operations.md) and an audit row filed in the organization
that owns the attacked inbox, so a tenant sees attacks on its own inboxes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.logs import AUTH_LOGGER
from agentpost.model.errors import RateLimited
from agentpost.model.principal import Principal
from agentpost.storage import logins as login_store
from agentpost.storage.database import Database
from agentpost.storage.logins import Allowance

#: The logger of the fail2ban line; its name is part of the documented format.
failure_log = logging.getLogger(AUTH_LOGGER)

#: The one failure line, parsed by etc/fail2ban/filter.d/agentpost.conf. Changing it
#: breaks installed filters: keep it stable.
FAILURE_FORMAT = "agentpost auth failure: protocol=%s rhost=%s user=%s reason=%s"

_UNSAFE = re.compile(r"[^A-Za-z0-9._%+@-]")
_MAX_LOGGED_USER = 128


@dataclass(frozen=True)
class LoginLimits:
    """How many failures each kind of bucket allows (per minute, and as a burst)."""

    source_failures_per_minute: int = 30
    pair_failures_per_minute: int = 10
    account_failures_per_minute: int = 60
    account_delay_s: float = 1.0  # before verifying, once the account's own bucket is empty


@dataclass
class LoginAttempt:
    """One attempt between ``admit`` and ``failed``/``succeeded``."""

    protocol: str
    peer: str
    username: str
    account: str
    source: Allowance
    pair: Allowance
    account_wide: Allowance
    pair_failed_before: bool = False

    @property
    def refusing(self) -> list[Allowance]:
        """The buckets whose emptiness refuses a login before verification."""
        return [self.source, self.pair]


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def client_source(peer: str) -> str:
    """What one client controls: an IPv4 address, or the /64 around an IPv6 address
    (IPv4-mapped IPv6 counts as the IPv4 address). Anything else is taken as is."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer.strip().lower()[:128]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def log_host(peer: str) -> str:
    """The client address as fail2ban should ban it: an IP literal, else ``unknown``
    (which the shipped filter does not match, so no DNS lookup is ever attempted)."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def log_user(username: str) -> str:
    """The username as logged: no spaces, ``=`` or control characters, so a crafted
    name cannot smuggle a second ``rhost=`` into the line fail2ban reads."""
    cleaned = _UNSAFE.sub("?", username[:_MAX_LOGGED_USER])
    return cleaned or "-"


def _key(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()


class LoginGuard:
    """Admits, and records the outcome of, password logins for any protocol."""

    def __init__(self, db: Database, clock: IReactorTime, audit: AuditTrail,
                 limits: LoginLimits | None = None) -> None:
        self._db = db
        self._clock = clock
        self._audit = audit
        self.limits = limits or LoginLimits()

    def _allowance(self, kind: str, value: str, per_minute: int) -> Allowance:
        return Allowance(_key(kind, value), per_minute / 60.0, float(per_minute))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def attempt(self, protocol: str, peer: str, username: str) -> LoginAttempt:
        """The buckets one attempt draws on, without reading them: for doors that only
        consult the allowances of sources that failed before (HTTP, see ``admit``)."""
        limits = self.limits
        source = client_source(peer)
        # Control characters (a NUL in an AUTH LOGIN name) could not reach PostgreSQL:
        # the failure must still be charged, so they never become part of a key.
        account = _CONTROLS.sub("", username).strip().lower()[:320]
        return LoginAttempt(
            protocol, peer, username, account,
            source=self._allowance("login-source", source, limits.source_failures_per_minute),
            pair=self._allowance("login-pair", f"{source}|{account}",
                                 limits.pair_failures_per_minute),
            account_wide=self._allowance("login-account", account,
                                         limits.account_failures_per_minute))

    async def admit(self, protocol: str, peer: str, username: str) -> LoginAttempt:
        """Refuse (RateLimited) when this source or this (source, account) pair has
        used up its failures — before the credential is checked, so that a throttled
        attacker learns nothing more. An account that many sources fail against is
        only slowed down: a correct credential from a clean source still logs in."""
        limits = self.limits
        attempt = self.attempt(protocol, peer, username)
        buckets = [attempt.source, attempt.pair, attempt.account_wide]
        tokens = await self._db.run_read("login.allowance", login_store.tokens_left, buckets,
                                         self._now())
        attempt.pair_failed_before = attempt.pair.key in tokens
        for bucket in attempt.refusing:
            left = tokens.get(bucket.key, bucket.burst)
            if left < 1.0:
                failure_log.warning(FAILURE_FORMAT, protocol, log_host(peer), log_user(username),
                                    "throttled")
                raise RateLimited(retry_after_s=(1.0 - left) / bucket.rate_per_s)
        if tokens.get(attempt.account_wide.key, 1.0) < 1.0 and limits.account_delay_s > 0:
            await task.deferLater(self._clock, limits.account_delay_s, lambda: None)
        return attempt

    async def failed(self, attempt: LoginAttempt, ctx: RequestContext | None,
                     reason: str = "bad-credentials") -> None:
        """Spend from the source, pair and account buckets, log the fail2ban line and
        file the audit row with the organization whose inbox was aimed at (``ctx``
        None: the caller's own audit row already tells the story, as HTTP's does)."""
        # Logged first: fail2ban still sees the failure if the database is down.
        failure_log.warning(FAILURE_FORMAT, attempt.protocol, log_host(attempt.peer),
                            log_user(attempt.username), reason)
        owner = await self._db.run_interaction(
            "login.failed", login_store.spend_and_find_owner,
            [attempt.source, attempt.pair, attempt.account_wide], self._now(), attempt.account)
        if ctx is not None:
            self._audit_failure(ctx, owner)

    def _audit_failure(self, ctx: RequestContext, owner: dict[str, Any] | None) -> None:
        """One row for the inbox's organization (anonymous: it must not learn which
        foreign key was tried), and the usual row for the presented key's own
        organization when the key was valid but not for this inbox."""
        principal = ctx.principal if isinstance(ctx.principal, Principal) else None
        if owner is not None and principal is not None and principal.org_id == owner["org_id"]:
            ctx.target_id, ctx.environment_id = owner["id"], owner["environment_id"]
            self._audit.enqueue(ctx, "denied", None)
            return
        if owner is not None:
            attacked = RequestContext(ctx.request_id, ctx.remote_addr, ctx.action,
                                      environment_id=owner["environment_id"],
                                      target_id=owner["id"], details={"org_id": owner["org_id"]})
            self._audit.enqueue(attacked, "denied", None)
            if principal is None:
                return
        self._audit.enqueue(ctx, "denied", None)

    async def succeeded(self, attempt: LoginAttempt) -> None:
        """A correct login forgives its own (source, account) pair's typos — never the
        source's or the account's buckets, which others' failures filled."""
        if attempt.pair_failed_before:
            await self._db.run_interaction("login.forgive", login_store.forgive,
                                           [attempt.pair.key])
