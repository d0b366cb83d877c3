"""Logging in to one inbox with its address and an API key: the one check behind IMAP
LOGIN/AUTHENTICATE and SMTP submission AUTH.

The door names its protocol (for the fail2ban line and the audit action) and the scope
the key must hold (``messages:read`` for IMAP, ``messages:send`` for submission). Every
door goes through the same twisted.cred portal and the same LoginGuard allowances, so
an attacker who switches protocols keeps the allowance he has already spent.
"""

from __future__ import annotations

import re
from typing import Any, cast

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal

from agentpost.auth.cred import IPrincipal
from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.core.login_guard import LoginGuard
from agentpost.model.errors import Unauthenticated
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.storage import inboxes as inbox_store
from agentpost.storage.database import Database

#: No address or key holds these; a credential that does is refused (and charged).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


class MailboxLogins:
    """Inbox address + API key through the shared portal, throttled and audited."""

    def __init__(self, portal: Portal, db: Database, audit: AuditTrail,
                 guard: LoginGuard) -> None:
        self._portal = portal
        self._db = db
        self._audit = audit
        self.guard = guard

    async def authenticate(self, username: str, password: str, peer: str, *,
                           protocol: str, scope: str, action: str
                           ) -> tuple[Principal, dict[str, Any]]:
        """The key's principal and the inbox row, or Unauthenticated (a refused
        credential, whatever the reason) / RateLimited (the source is throttled).

        ``action`` names the audit row (``imap.login``, ``smtp.auth``); every outcome
        is audited: a success here, a failure by the guard (in the attacked tenant)."""
        ctx = RequestContext(new_id("req"), peer, action, target_id=username[:320])
        attempt = await self.guard.admit(protocol, peer, username)
        account_key = attempt.account
        try:
            if _CONTROLS.search(username) or _CONTROLS.search(password):
                raise UnauthorizedLogin("control characters in the credentials")
            # The key is checked before the inbox is looked up, so a missing inbox and a
            # wrong key take the same path and the same time.
            _, avatar, _ = await self._portal.login(
                UsernamePassword(username.encode("utf-8"), password.encode("utf-8")), None,
                IPrincipal)
            principal = cast(Principal, avatar)  # what the realm yields for IPrincipal
            ctx.principal = principal
            if scope not in principal.scopes:
                raise UnauthorizedLogin(f"missing {scope}")
            inbox = await self._db.run_read(f"{protocol}.login.inbox",
                                            inbox_store.get_inbox_by_address,
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
        return principal, inbox
