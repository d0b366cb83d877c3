"""IMAP LOGIN/AUTHENTICATE: the shared portal, the shared login guard, the audit trail.

Kept apart from imap_accounts (the mailbox backend) because logging in is a security
boundary of its own; the failure allowances themselves are protocol-agnostic and live
in core/login_guard.py, where SMTP AUTH finds them too.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal

from agentpost.auth.cred import IPrincipal
from agentpost.core.audit import AuditTrail
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.context import RequestContext
from agentpost.core.imap_accounts import InboxAccount
from agentpost.core.ingest import Ingest
from agentpost.core.login_guard import LoginGuard, LoginLimits
from agentpost.model.errors import Unauthenticated
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.storage import inboxes as inbox_store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database
from agentpost.storage.notify import Notifier


class IMAPLogins:
    """IMAP LOGIN/AUTHENTICATE through the shared portal, throttled and audited."""

    def __init__(self, portal: Portal, db: Database, blobs: BlobStore, ingest: Ingest,
                 collector: BlobCollector, audit: AuditTrail, clock: Any,
                 notifier: Notifier | None, failures_per_minute: int = 10,
                 guard: LoginGuard | None = None) -> None:
        """``guard`` is the installation's shared LoginGuard; without one (tests), a
        guard whose (source, account) allowance is ``failures_per_minute`` and whose
        source allowance is three times that."""
        self._portal = portal
        self._db = db
        self._blobs = blobs
        self._ingest = ingest
        self._collector = collector
        self._audit = audit
        self._notifier = notifier
        self.guard = guard or LoginGuard(db, clock, audit, LoginLimits(
            source_failures_per_minute=3 * failures_per_minute,
            pair_failures_per_minute=failures_per_minute))

    async def authenticate(self, username: str, password: str, peer: str) -> InboxAccount:
        """Username = inbox address, password = an API key of its organization."""
        ctx = RequestContext(new_id("req"), peer, "imap.login", target_id=username[:320])
        attempt = await self.guard.admit("imap", peer, username)
        account_key = attempt.account
        try:
            # The key is checked before the inbox is looked up, so a missing inbox and a
            # wrong key take the same path and the same time.
            _, avatar, _ = await self._portal.login(
                UsernamePassword(username.encode("utf-8"), password.encode("utf-8")), None,
                IPrincipal)
            principal = cast(Principal, avatar)  # what the realm yields for IPrincipal
            ctx.principal = principal
            if "messages:read" not in principal.scopes:
                raise UnauthorizedLogin("missing messages:read")
            inbox = await self._db.run_read("imap.login.inbox", inbox_store.get_inbox_by_address,
                                            principal.org_id, principal.environment_ids,
                                            account_key)
            if inbox is None:
                raise UnauthorizedLogin("no such inbox for this key")
        except UnauthorizedLogin:
            await self.guard.failed(attempt, ctx)
            raise Unauthenticated("Authentication failed.") from None
        await self.guard.succeeded(attempt)
        ctx.target_id = inbox["id"]
        ctx.environment_id = inbox["environment_id"]
        self._audit.enqueue(ctx, "allowed", None)
        return InboxAccount(principal, inbox, self._db, self._blobs, self._ingest,
                            self._collector, self._notifier, self._ingest.inbox_quota,
                            remote_addr=peer)
