"""IMAP LOGIN/AUTHENTICATE: the shared portal, the shared login guard, the audit trail.

Kept apart from imap_accounts (the mailbox backend) because logging in is a security
boundary of its own; the check itself is core/mailbox_logins.py (SMTP submission AUTH
uses it too) and the failure allowances are core/login_guard.py.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.portal import Portal

from agentpost.core.audit import AuditTrail
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.imap_accounts import InboxAccount
from agentpost.core.ingest import Ingest
from agentpost.core.login_guard import LoginGuard, LoginLimits
from agentpost.core.mailbox_logins import MailboxLogins
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
        self._logins = MailboxLogins(portal, db, audit, self.guard)

    async def authenticate(self, username: str, password: str, peer: str) -> InboxAccount:
        """Username = inbox address, password = an API key of its organization."""
        principal, inbox = await self._logins.authenticate(
            username, password, peer, protocol="imap", scope="messages:read",
            action="imap.login")
        return InboxAccount(principal, inbox, self._db, self._blobs, self._ingest,
                            self._collector, self._notifier, self._ingest.inbox_quota,
                            remote_addr=peer)
