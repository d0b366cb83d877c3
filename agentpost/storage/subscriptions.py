"""IMAP mailbox subscriptions (migration 0023): names per inbox, independent of folders.

Why a table of names and not a flag on the folder row: RFC 3501 §6.3.6 lets a client
subscribe to a name that does not exist, and §6.3.9 forbids dropping a subscription
because its mailbox was deleted; LIST (SUBSCRIBED) then answers ``\\NonExistent``
(RFC 5258). Every change wakes the inbox's folder-list watchers (IMAP NOTIFY
SubscriptionChange), like folder changes do.
"""

from __future__ import annotations

from agentpost.storage.database import Txn
from agentpost.storage.mail import notify_folder_list

#: Subscribed names an inbox may hold (folders or not).
MAX_SUBSCRIPTIONS_PER_INBOX = 5000


def canonical(name: str) -> str:
    """The stored spelling: INBOX is case-insensitive (RFC 3501 §5.1), nothing else."""
    return "INBOX" if name.upper() == "INBOX" else name


async def list_names(txn: Txn, org_id: str, inbox_id: str) -> list[str]:
    """Every subscribed name of an inbox, sorted."""
    rows = await txn.fetchall(
        "SELECT name FROM mailbox_subscriptions WHERE org_id = %s AND inbox_id = %s "
        "ORDER BY name", (org_id, inbox_id))
    return [r["name"] for r in rows]


async def subscribe(txn: Txn, org_id: str, inbox_id: str, name: str) -> bool:
    """Add a subscription (again: nothing changes). False when the inbox already holds
    :data:`MAX_SUBSCRIPTIONS_PER_INBOX` other names: names need no folder, so without
    a cap one session could grow the table without end."""
    name = canonical(name)
    done = await txn.fetchval(
        "WITH ins AS (INSERT INTO mailbox_subscriptions (org_id, inbox_id, name, created_at) "
        "             SELECT %s, %s, %s, %s WHERE (SELECT count(*) FROM "
        "             mailbox_subscriptions WHERE org_id = %s AND inbox_id = %s) < %s "
        "             ON CONFLICT DO NOTHING RETURNING 1) "
        "SELECT EXISTS (SELECT 1 FROM ins) OR EXISTS (SELECT 1 FROM mailbox_subscriptions "
        "WHERE org_id = %s AND inbox_id = %s AND name = %s)",
        (org_id, inbox_id, name, txn.now, org_id, inbox_id, MAX_SUBSCRIPTIONS_PER_INBOX,
         org_id, inbox_id, name))
    if done:
        await notify_folder_list(txn, inbox_id)
    return bool(done)


async def unsubscribe(txn: Txn, org_id: str, inbox_id: str, name: str) -> bool:
    """Remove a subscription; whether there was one."""
    removed = await txn.fetchval(
        "WITH d AS (DELETE FROM mailbox_subscriptions WHERE org_id = %s AND inbox_id = %s "
        "           AND name = %s RETURNING 1) SELECT count(*) FROM d",
        (org_id, inbox_id, canonical(name)))
    if removed:
        await notify_folder_list(txn, inbox_id)
    return bool(removed)


async def rename(txn: Txn, org_id: str, inbox_id: str, old: str, new: str) -> None:
    """RENAME: the subscriptions of ``old`` and of every name below it move to the new
    name (a subscription the new name already had is kept, once)."""
    moved = await txn.fetchall(
        "DELETE FROM mailbox_subscriptions WHERE org_id = %s AND inbox_id = %s "
        "AND (name = %s OR starts_with(name, %s || '/')) RETURNING name, created_at",
        (org_id, inbox_id, old, old))
    if moved:
        await txn.execute(
            "INSERT INTO mailbox_subscriptions (org_id, inbox_id, name, created_at) "
            "SELECT %s, %s, n, c FROM unnest(%s::text[], %s::timestamptz[]) AS u(n, c) "
            "ON CONFLICT DO NOTHING",
            (org_id, inbox_id, [canonical(new + r["name"][len(old):]) for r in moved],
             [r["created_at"] for r in moved]))
        await notify_folder_list(txn, inbox_id)
