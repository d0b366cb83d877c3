"""Where inbound mail goes: hosted-domain check, inbox lookup and receive filters.

This runs before any Principal exists (the MX is anonymous); the recipient address
names the tenant, and from then on every query is scoped to that organization.

Reserved local parts (:mod:`agentpost.core.reserved`) are the operator's:

- ``RCPT TO:<postmaster>`` (no domain, any case; RFC 5321 §4.5.1 says it must be
  accepted) goes to ``[mail] operator_inbox``;
- on a shared domain every reserved name (``postmaster@``, ``abuse@``, ``admin@``, ...)
  goes to the operator inbox, even if a tenant created such an inbox before names
  were reserved: that inbox keeps its stored mail but receives no more;
- on an organization's own verified domain the organization's inbox of that name gets
  the mail, and ``postmaster@`` falls back to the operator inbox when there is none.

Without an operator inbox those addresses are refused with ``550 5.1.1``, and the MX
logs a warning at start-up (RFC 5321 requires a working postmaster).

A verified domain's custom MAIL FROM (``bounce.example.com``, the envelope sender's
domain on every transport but ses: core.submission) is routed too, so bounces come
back: ``alice@bounce.example.com`` goes to the inbox ``alice@example.com`` of the
organization that holds ``example.com``; any other name under it is unknown (and
``postmaster@`` there is the operator's). Only a domain that is not hosted itself is
looked up so, in a second read: bounces and relay attempts, not the usual delivery.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet.interfaces import IReactorTime

from agentpost.core.ingest import Target
from agentpost.core.reserved import POSTMASTER, ReservedNames, is_postmaster
from agentpost.core.route_batch import RouteLookups
from agentpost.core.route_cache import RouteCache
from agentpost.mail import filters
from agentpost.model.errors import (
    MailboxFull,
    RelayDenied,
    SenderBlocked,
    TemporaryFailure,
    UnknownRecipient,
)
from agentpost.storage import inboxes as inbox_store
from agentpost.storage.database import Database

log = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, str]:
    """Local part and lowercased domain."""
    local, _, domain = address.rpartition("@")
    return local, domain.lower().rstrip(".")


class Router:
    """Resolves RCPT TO addresses to inbox targets.

    Arguments:
        inbox_quota: bytes per inbox; a full inbox is refused at RCPT (0: unlimited).
        reserved: the local parts reserved for the operator on shared domains.
        operator_inbox: address of the existing inbox that receives the operator's mail
            (postmaster, and every reserved name on a shared domain); "" for none.
        cache: routes to inboxes kept between changes (core.route_cache), or None.
    """

    def __init__(self, db: Database, clock: IReactorTime, inbox_quota: int = 0, *,
                 reserved: ReservedNames | None = None, operator_inbox: str = "",
                 cache: RouteCache | None = None) -> None:
        self._db = db
        self._quota = inbox_quota
        self._lookups = RouteLookups(db, clock, with_usage=bool(inbox_quota), cache=cache)
        self._reserved = reserved if reserved is not None else ReservedNames()
        self.operator_inbox = operator_inbox.strip()

    async def resolve(self, recipient: str, sender: str) -> Target:
        """An inbox target, or UnknownRecipient / RelayDenied / SenderBlocked /
        MailboxFull (the inbox has reached its quota: refused per recipient, at RCPT)."""
        if "@" not in recipient:
            if recipient.lower() == POSTMASTER:
                return await self._operator(sender)
            raise UnknownRecipient()
        local, domain = split_address(recipient)
        if not local or not domain:
            raise UnknownRecipient()
        if local in self._reserved or is_postmaster(local):
            return await self._resolve_reserved(local, domain, sender)
        return await self._route(f"{local}@{domain}", domain, sender)

    async def _resolve_reserved(self, local: str, domain: str, sender: str) -> Target:
        """A reserved name: the operator's on a shared domain; on an organization's own
        domain (or its custom MAIL FROM) its inbox, postmaster falling back to the
        operator."""
        kind = await self._db.run_read("routing.domain_kind", inbox_store.domain_kind,
                                       domain)
        if kind != "shared":
            try:
                if kind is None:  # RelayDenied unless a custom MAIL FROM
                    return await self._mail_from_route(local, domain, sender)
                return await self._route(f"{local}@{domain}", domain, sender)
            except UnknownRecipient:
                if not is_postmaster(local):
                    raise
        return await self._operator(sender)

    async def _operator(self, sender: str) -> Target:
        """The operator inbox; 550 5.1.1 when none is configured, 451 when it is
        configured but missing (a fixable mistake: senders retry meanwhile)."""
        if not self.operator_inbox:
            raise UnknownRecipient()
        local, domain = split_address(self.operator_inbox)
        try:
            return await self._route(f"{local}@{domain}", domain, sender)
        except (UnknownRecipient, RelayDenied):
            log.error("[mail] operator_inbox %s is not an inbox on a hosted domain; "
                      "mail for postmaster is deferred", self.operator_inbox)
            raise TemporaryFailure() from None

    async def _route(self, address: str, domain: str, sender: str) -> Target:
        """The inbox at ``address`` after its receive filters and quota."""
        row: Any = await self._lookups.route(address, domain)
        if not row["hosted"]:
            local = address.rpartition("@")[0]
            return await self._mail_from_route(local, domain, sender)
        return self._target(row, sender)

    async def _mail_from_route(self, local: str, domain: str, sender: str) -> Target:
        """``local@domain`` where ``domain`` is a verified domain's custom MAIL FROM: the
        inbox ``local@`` that domain (a bounce coming back); RelayDenied when ``domain``
        is no such name."""
        row = await self._db.run_read("routing.mail_from", inbox_store.mail_from_route,
                                      local, domain, with_usage=bool(self._quota))
        if row is None:
            raise RelayDenied()
        return self._target(row, sender)

    def _target(self, row: Any, sender: str) -> Target:
        """The routing row's inbox after its receive filters and quota."""
        if row["inbox_id"] is None:
            raise UnknownRecipient()
        if sender and row["rules"] and filters.decide(row["rules"], sender) == "block":
            raise SenderBlocked()
        if self._quota and row["used_bytes"] >= self._quota:
            raise MailboxFull()
        return Target(row["org_id"], row["environment_id"], row["inbox_id"], row["email"])
