"""Where inbound mail goes: hosted-domain check, inbox lookup and receive filters.

This runs before any Principal exists (the MX is anonymous); the recipient address
names the tenant, and from then on every query is scoped to that organization.
"""

from __future__ import annotations

from agentpost.core.ingest import Target
from agentpost.mail import filters
from agentpost.model.errors import RelayDenied, SenderBlocked, UnknownRecipient
from agentpost.storage import mail as mail_store
from agentpost.storage.database import Database, Txn


def split_address(address: str) -> tuple[str, str]:
    """Local part and lowercased domain."""
    local, _, domain = address.rpartition("@")
    return local, domain.lower().rstrip(".")


class Router:
    """Resolves RCPT TO addresses to inbox targets."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def resolve(self, recipient: str, sender: str) -> Target:
        """An inbox target, or UnknownRecipient / RelayDenied / SenderBlocked."""
        local, domain = split_address(recipient)
        if not local or not domain:
            raise UnknownRecipient()

        async def txn_fn(txn: Txn) -> Target:
            if not await mail_store.domain_is_hosted(txn, domain):
                raise RelayDenied()
            row = await mail_store.find_inbox_by_address(txn, f"{local}@{domain}")
            if row is None:
                raise UnknownRecipient()
            if sender:
                rules = await mail_store.matching_rules(
                    txn, row["org_id"], row["environment_id"], row["inbox_id"], "receive")
                if filters.decide(rules, sender) == "block":
                    raise SenderBlocked()
            return Target(row["org_id"], row["environment_id"], row["inbox_id"], row["email"])

        return await self._db.run_interaction("routing.resolve", txn_fn)
