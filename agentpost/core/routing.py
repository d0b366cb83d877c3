"""Where inbound mail goes: hosted-domain check, inbox lookup and receive filters.

This runs before any Principal exists (the MX is anonymous); the recipient address
names the tenant, and from then on every query is scoped to that organization.
"""

from __future__ import annotations

from agentpost.core.ingest import Target
from agentpost.mail import filters
from agentpost.model.errors import MailboxFull, RelayDenied, SenderBlocked, UnknownRecipient
from agentpost.storage import mail as mail_store
from agentpost.storage.database import Database


def split_address(address: str) -> tuple[str, str]:
    """Local part and lowercased domain."""
    local, _, domain = address.rpartition("@")
    return local, domain.lower().rstrip(".")


class Router:
    """Resolves RCPT TO addresses to inbox targets."""

    def __init__(self, db: Database, inbox_quota: int = 0) -> None:
        self._db = db
        self._quota = inbox_quota

    async def resolve(self, recipient: str, sender: str) -> Target:
        """An inbox target, or UnknownRecipient / RelayDenied / SenderBlocked /
        MailboxFull (the inbox has reached its quota: refused per recipient, at RCPT)."""
        local, domain = split_address(recipient)
        if not local or not domain:
            raise UnknownRecipient()

        row = await self._db.run_read("routing.resolve", mail_store.route,
                                      f"{local}@{domain}", domain)
        if not row["hosted"]:
            raise RelayDenied()
        if row["inbox_id"] is None:
            raise UnknownRecipient()
        if sender and row["rules"] and filters.decide(row["rules"], sender) == "block":
            raise SenderBlocked()
        if self._quota and row["used_bytes"] >= self._quota:
            raise MailboxFull()
        return Target(row["org_id"], row["environment_id"], row["inbox_id"], row["email"])
