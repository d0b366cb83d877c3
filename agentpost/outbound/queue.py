"""Putting a message on the outbound queue, and the retry policy every worker follows.

Enqueueing happens inside the transaction that stores the Sent copy (and writes the
``message.sent`` event), so a message is either stored, queued and announced, or none
of these: the door answers 250 / 2xx only after that one COMMIT.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agentpost.model.ids import new_id
from agentpost.storage import outbound as store
from agentpost.storage.database import Txn

#: Waits between attempts (seconds): 1 m, 5 m, 30 m, 2 h, then every 4 h until the
#: message's lifetime is over.
DEFAULT_SCHEDULE = (60.0, 300.0, 1800.0, 7200.0, 14400.0)
DEFAULT_LIFETIME_S = 4 * 24 * 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again, and when to give up and bounce; and the envelope sender the
    rows get (the doors that queue read this policy: core.submission)."""

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    lifetime_s: float = DEFAULT_LIFETIME_S
    #: The envelope sender is ``local@`` the sending domain's custom MAIL FROM when it
    #: has one (``alice@bounce.example.com``, so SPF aligns there and bounces come back
    #: to our MX). Every transport but ses: SES rewrites the inbox address itself
    #: (PutEmailIdentityMailFromAttributes), so there it stays the inbox's.
    custom_mail_from: bool = False

    def delay(self, attempts: int, retry_after_s: float | None = None) -> float:
        """The wait after the ``attempts``-th attempt failed for now (1-based); a
        transport's own Retry-After is honoured when it asks for longer."""
        step = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
        return max(step, retry_after_s or 0.0)


def domain_of(address: str) -> str:
    """The recipient's domain, lowercased (the queue's batching key)."""
    return address.rpartition("@")[2].lower()


def normal_recipient(address: str) -> str:
    """``address`` with its domain lowercased and its local part as given: RFC 5321
    §2.4 makes domains case-insensitive but lets the receiving host decide about local
    parts, so ``Bob@Example.COM`` and ``bob@example.com`` may be two mailboxes and are
    both sent to, while ``bob@Example.com`` and ``bob@example.com`` are one."""
    local, at, domain = address.rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address


def unique_recipients(recipients: list[str]) -> list[str]:
    """The recipients once each (see :func:`normal_recipient`), in their first order."""
    return list(dict.fromkeys(normal_recipient(r) for r in recipients))


@dataclass(frozen=True)
class QueuedMessage:
    """What the queue needs of a stored outbound message."""

    org_id: str
    environment_id: str
    inbox_id: str
    message_id: str
    raw_blob_key: str
    size: int
    mail_from: str


async def enqueue(txn: Txn, message: QueuedMessage, recipients: list[str], *,
                  policy: RetryPolicy, not_before: datetime | None = None) -> list[str]:
    """Queue ``message`` for ``recipients`` (already validated; duplicates are dropped
    here, see :func:`unique_recipients`): one row per recipient domain, all written in
    one round trip. Returns the queue row ids."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for rcpt in unique_recipients(recipients):
        by_domain[domain_of(rcpt)].append(rcpt)
    start = not_before or txn.now
    domains = sorted(by_domain)
    rows: list[dict[str, Any]] = [{
        "org_id": message.org_id, "id": new_id("obq"),
        "environment_id": message.environment_id, "inbox_id": message.inbox_id,
        "message_id": message.message_id, "raw_blob_key": message.raw_blob_key,
        "size": message.size, "mail_from": message.mail_from, "domain": domain,
        "status": "queued", "next_attempt_at": start,
        "expires_at": start + timedelta(seconds=policy.lifetime_s),
        "created_at": txn.now, "updated_at": txn.now,
    } for domain in domains]
    await store.insert_batch(txn, rows, [by_domain[domain] for domain in domains])
    return [row["id"] for row in rows]
