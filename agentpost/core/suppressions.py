"""The per-organization suppression list, and the deliveries report of a sent message.

Why a suppression list: mail to an address that hard-bounced or complained hurts the
sender reputation of the whole installation (SES pauses accounts whose bounce or
complaint rate climbs), so such addresses are refused at the door, before anything is
queued: ``SuppressedRecipient`` (HTTP 422 ``suppressed_recipient``, SMTP 550 5.7.1).

Entries come from SES feedback (permanent bounces, complaints:
agentpost.outbound.feedback), from our own queue's permanent 5.1.x answers (a trigger
of migration 0020) and from people (``POST /suppressions``).

Addresses are compared after :func:`normalize_address`: trimmed, the domain in IDNA
form, and the whole address lowercased -- the local part too. RFC 5321 lets a local
part be case-sensitive, but no mailbox provider in practice treats ``Bob@`` and
``bob@`` as two people, and a suppression that a change of case could dodge would
protect nothing. A trailing dot on the domain (the DNS root) is dropped for the same
reason. Plus-addresses (``bob+x@``) are NOT folded into ``bob@``: whether a provider
delivers them to one mailbox is its own business, and folding would let one bounce
suppress addresses that never bounced.

Scopes: ``suppressions:read`` (members and up) and ``suppressions:write`` (admins and
owners). The list is the organization's: changing it needs an organization-wide
credential, and an environment-confined reader sees the entries its own environments
caused plus the manual ones.
"""

from __future__ import annotations

from typing import Any

import idna

from agentpost.core.audit import AuditTrail
from agentpost.core.context import RequestContext
from agentpost.model.errors import Conflict, InvalidRequest, NotFound, SuppressedRecipient
from agentpost.model.ids import new_id
from agentpost.storage import delivery_events as delivery_store
from agentpost.storage import mail as mail_store
from agentpost.storage import suppressions as store
from agentpost.storage.database import Database, Txn

MAX_ADDRESS_LENGTH = 254


def normalize_address(value: str) -> str:
    """The comparison form of an address (see the module doc); ValueError when it is
    not ``local@domain``."""
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    domain = domain[:-1] if domain.endswith(".") else domain  # the root: same mailbox
    if (not at or not local or not domain or len(text) > MAX_ADDRESS_LENGTH
            or any(c.isspace() or ord(c) < 32 or c in "<>,;\x7f" for c in text)):
        raise ValueError("not an address")
    if not domain.isascii():
        try:  # IDNA 2008 / UTS #46, as the send API writes it (mail.compose)
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise ValueError("not an address") from None
    return f"{local}@{domain}".lower()


def checked_address(value: str, field: str = "email") -> str:
    """normalize_address, as a client error."""
    try:
        return normalize_address(value)
    except ValueError:
        raise InvalidRequest(f"{field} must be an address such as someone@example.com.",
                             field=field) from None


async def check_not_suppressed(db: Database, org_id: str, recipient: str) -> None:
    """SuppressedRecipient when ``recipient`` is on the organization's list (what every
    sending door calls per recipient)."""
    try:
        email = normalize_address(recipient)
    except ValueError:
        return  # not comparable: the door's own address checks refuse it
    if await db.run_read("suppressions.check", store.is_suppressed, org_id, email):
        raise SuppressedRecipient()


async def suppress_in(txn: Txn, *, org_id: str, email: str, reason: str,
                      environment_id: str | None, source_message_id: str | None,
                      diagnostic: str | None) -> bool:
    """Add an entry inside a caller's transaction (feedback processing); False when the
    address was already suppressed."""
    row = await store.add(txn, {
        "org_id": org_id, "id": new_id("sup"), "email": normalize_address(email),
        "reason": reason, "environment_id": environment_id,
        "source_message_id": source_message_id,
        "diagnostic": (diagnostic or None) and diagnostic[:1000], "created_at": txn.now})
    return row is not None


class Suppressions:
    """List, read, add and remove suppression entries (the /suppressions API)."""

    def __init__(self, db: Database, audit: AuditTrail) -> None:
        self._db = db
        self._audit = audit

    async def list(self, ctx: RequestContext, *, email: str | None, after_id: str | None,
                   limit: int) -> list[dict[str, Any]]:
        """Entries newest first (limit + 1 rows), optionally only one address."""
        p = ctx.org_principal
        p.require("suppressions:read")
        wanted = checked_address(email) if email is not None else None
        return await self._db.run_read("suppressions.list", store.list_entries, p.org_id,
                                       p.environment_ids, email=wanted, after_id=after_id,
                                       limit=limit + 1)

    async def get(self, ctx: RequestContext, email: str) -> dict[str, Any]:
        """One entry (NotFound when the address is not suppressed, or not visible)."""
        p = ctx.org_principal
        p.require("suppressions:read")
        row = await self._db.run_read("suppressions.get", store.get, p.org_id,
                                      p.environment_ids, checked_address(email))
        if row is None:
            raise NotFound("This address is not suppressed.")
        ctx.target_id = row["id"]
        return row

    async def add(self, ctx: RequestContext, email: str,
                  diagnostic: str | None = None) -> dict[str, Any]:
        """A manual entry; Conflict when the address is already suppressed."""
        p = ctx.org_principal
        p.require("suppressions:write")
        p.require_organization_wide("change the suppression list")
        address = checked_address(email)

        async def txn_fn(txn: Txn) -> dict[str, Any]:
            row = await store.add(txn, {
                "org_id": p.org_id, "id": new_id("sup"), "email": address,
                "reason": "manual", "environment_id": None, "source_message_id": None,
                "diagnostic": diagnostic, "created_at": txn.now})
            if row is None:
                raise Conflict("This address is already suppressed.")
            ctx.target_id = row["id"]
            await self._audit.write_in(txn, ctx, 201)
            return row

        return await self._db.run_interaction("suppressions.add", txn_fn)

    async def remove(self, ctx: RequestContext, email: str) -> None:
        """Take an address off the list (mail to it may be sent again)."""
        p = ctx.org_principal
        p.require("suppressions:write")
        p.require_organization_wide("change the suppression list")
        address = checked_address(email)

        async def txn_fn(txn: Txn) -> None:
            row = await store.get(txn, p.org_id, None, address)
            if row is None:
                raise NotFound("This address is not suppressed.")
            ctx.target_id = row["id"]
            await store.remove(txn, p.org_id, address)
            await self._audit.write_in(txn, ctx, 204)

        await self._db.run_interaction("suppressions.remove", txn_fn)


class Deliveries:
    """What became of a sent message at each recipient: the queue's hand-off state,
    the feedback state (delivered, bounced, complained ...) and the feedback events."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def of_message(self, ctx: RequestContext, message_id: str) -> list[dict[str, Any]]:
        """Per-recipient rows; NotFound when the message is neither visible nor queued."""
        p = ctx.org_principal
        p.require("messages:read")
        ctx.target_id = message_id

        async def read(txn: Txn) -> list[dict[str, Any]] | None:
            rows = await delivery_store.deliveries_of_message(txn, p.org_id,
                                                              p.environment_ids, message_id)
            if rows:
                return rows
            # No queue rows: an inbound message, or one whose Sent copy is all there is.
            if await mail_store.get_message(txn, p.org_id, p.environment_ids,
                                            message_id) is None:
                return None
            return []

        rows = await self._db.run_read("messages.deliveries", read)
        if rows is None:
            raise NotFound()
        return rows
