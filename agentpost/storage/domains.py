"""Organizations' own domains: their DKIM material, DNS record status and the
verification schedule. Every query is scoped by organization (and the caller's
environments where a request names a domain); the verification timer's claim is the one
cross-tenant statement, and it only hands rows to the job that checks them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg2.errors
from psycopg2.extras import Json

from agentpost.model.errors import Conflict
from agentpost.storage.database import Txn

_COLS = ("org_id, id, environment_id, name, verified_at, created_at, mail_from_subdomain, "
         "dkim_mode, dkim_selector, dkim_algorithm, dkim_public_key, ses_dkim_tokens, "
         "record_status, check_count, last_checked_at, last_check_error, next_check_at")


def _arr(ids: frozenset[str] | None) -> list[str] | None:
    return None if ids is None else sorted(ids)


_RELEASABLE = ("d.verified_at IS NULL AND d.org_id <> %s AND d.created_at < %s "
               "AND NOT EXISTS (SELECT 1 FROM inboxes i WHERE i.org_id = d.org_id "
               "AND i.domain = d.name)")


async def name_taken(txn: Txn, name: str, org_id: str, stale_before: datetime | None) -> bool:
    """Whether ``name`` is the installation's (a shared domain, today's or an earlier
    one, or a name under one) or held by an organization -- unless it is another
    organization's registration that never verified, is older than ``stale_before``
    and has no inboxes (see :func:`release_stale`)."""
    return bool(await txn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM shared_domains WHERE name = %s "
        "               OR right(%s, length(name) + 1) = '.' || name) "
        "OR EXISTS (SELECT 1 FROM domains d WHERE d.name = %s "
        f"AND NOT (%s::timestamptz IS NOT NULL AND {_RELEASABLE}))",
        (name, name, name, stale_before, org_id, stale_before)))


async def bounce_name_taken(txn: Txn, name: str, org_id: str,
                            stale_before: datetime | None) -> bool:
    """Whether ``name`` is some domain's custom MAIL FROM name (``mail_from_subdomain``
    + ``.`` + its name), in any organization, ours included -- counted as
    :func:`name_taken` counts registrations (another organization's stale, never-verified
    one without inboxes does not block). A hosted domain of that name would win at the
    MX and take the other domain's bounces."""
    return bool(await txn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM domains d WHERE d.mail_from_subdomain IS NOT NULL "
        "AND d.mail_from_subdomain || '.' || d.name = %s "
        f"AND NOT (%s::timestamptz IS NOT NULL AND {_RELEASABLE}))",
        (name, stale_before, org_id, stale_before)))


async def verified_overlap(txn: Txn, org_id: str, domain_id: str) -> bool:
    """Whether a *verified* domain (of any organization) shares a name with this one:
    its hosted name is this one's custom MAIL FROM name, or the reverse. Checked again
    when a domain verifies, so registrations that raced (or a stale one that was let
    through) never both verify."""
    return bool(await txn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM domains me JOIN domains o "
        "  ON o.verified_at IS NOT NULL AND o.id <> me.id "
        "  AND (o.name = me.mail_from_subdomain || '.' || me.name "
        "       OR o.mail_from_subdomain || '.' || o.name = me.name) "
        "WHERE me.org_id = %s AND me.id = %s)",
        (org_id, domain_id)))


async def release_stale(txn: Txn, name: str, org_id: str,
                        stale_before: datetime) -> dict[str, Any] | None:
    """Delete another organization's stale, never-verified registration of ``name`` so
    that ``org_id`` may register it: a name cannot be squatted by registering it first
    (verification needs the DNS, which the squatter does not control).

    The candidate is locked first, in a statement of its own: an inbox being created on
    it holds a share lock (storage.inboxes.domain_usable) until it commits, and only a
    statement that starts after that sees the inbox. A single DELETE would wait for the
    lock but judge "no inboxes" by its earlier snapshot, and release a name its holder
    had just put an inbox on."""
    await txn.execute(
        "SELECT 1 FROM domains d WHERE d.name = %s AND d.verified_at IS NULL "
        "AND d.org_id <> %s FOR UPDATE", (name, org_id))
    return await txn.fetchone(
        f"DELETE FROM domains d WHERE d.name = %s AND {_RELEASABLE} "
        "RETURNING d.org_id, d.id, d.created_at", (name, org_id, stale_before))


async def insert_domain(txn: Txn, *, org_id: str, domain_id: str, environment_id: str,
                        name: str, mail_from_subdomain: str | None, dkim_mode: str,
                        dkim_selector: str | None = None, dkim_algorithm: str | None = None,
                        dkim_public_key: str | None = None,
                        dkim_private_sealed: bytes | None = None,
                        ses_dkim_tokens: list[str] | None = None) -> dict[str, Any]:
    """A new, unverified domain due for its first check now; a name any organization
    already has is a Conflict (the unique index decides a race)."""
    try:
        return await txn.fetchone_required(
            "INSERT INTO domains (org_id, id, environment_id, name, created_at, "
            "mail_from_subdomain, dkim_mode, dkim_selector, dkim_algorithm, dkim_public_key, "
            "dkim_private_sealed, ses_dkim_tokens, next_check_at) VALUES "
            f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLS}",
            (org_id, domain_id, environment_id, name, txn.now, mail_from_subdomain, dkim_mode,
             dkim_selector, dkim_algorithm, dkim_public_key,
             None if dkim_private_sealed is None else psycopg2.Binary(dkim_private_sealed),
             ses_dkim_tokens or [], txn.now))
    except psycopg2.errors.UniqueViolation:
        raise Conflict(f"The domain {name} is already registered.") from None


async def get_domain(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                     domain_id: str) -> dict[str, Any] | None:
    """One domain of the organization, only in an allowed environment."""
    return await txn.fetchone(
        f"SELECT {_COLS} FROM domains WHERE org_id = %s AND id = %s "
        "AND (%s::text[] IS NULL OR environment_id = ANY(%s))",
        (org_id, domain_id, _arr(env_ids), _arr(env_ids)))


async def list_domains(txn: Txn, org_id: str,
                       env_ids: frozenset[str] | None) -> list[dict[str, Any]]:
    """The organization's own domains in the allowed environments, by name."""
    return await txn.fetchall(
        f"SELECT {_COLS} FROM domains WHERE org_id = %s "
        "AND (%s::text[] IS NULL OR environment_id = ANY(%s)) ORDER BY name",
        (org_id, _arr(env_ids), _arr(env_ids)))


async def list_shared(txn: Txn) -> list[dict[str, Any]]:
    """The installation's shared domains."""
    return await txn.fetchall("SELECT name, created_at FROM shared_domains ORDER BY name")


async def inboxes_using(txn: Txn, org_id: str, name: str) -> int:
    """How many inboxes of the organization live on ``name``."""
    count: int = await txn.fetchval(
        "SELECT count(*) FROM inboxes WHERE org_id = %s AND domain = %s", (org_id, name))
    return count


async def delete_domain(txn: Txn, org_id: str, domain_id: str) -> bool:
    """Delete a domain (the caller checked it is unused, under the row lock)."""
    return bool(await txn.execute(
        "DELETE FROM domains WHERE org_id = %s AND id = %s", (org_id, domain_id)))


async def lock_domain(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                      domain_id: str) -> dict[str, Any] | None:
    """The domain, row-locked for a delete (two deletes, or a delete and a check, do not
    interleave)."""
    return await txn.fetchone(
        f"SELECT {_COLS} FROM domains WHERE org_id = %s AND id = %s "
        "AND (%s::text[] IS NULL OR environment_id = ANY(%s)) FOR UPDATE",
        (org_id, domain_id, _arr(env_ids), _arr(env_ids)))


async def claim_due(txn: Txn, now: datetime, lease_until: datetime,
                    limit: int) -> list[dict[str, Any]]:
    """Unverified domains due a check, across organizations: claimed by pushing
    ``next_check_at`` to ``lease_until`` (SKIP LOCKED: a concurrent round of another
    process takes other rows or none), so no two processes check one domain at once."""
    return await txn.fetchall(
        "UPDATE domains d SET next_check_at = %s FROM ("
        "  SELECT id FROM domains WHERE verified_at IS NULL AND next_check_at <= %s "
        "  ORDER BY next_check_at LIMIT %s FOR UPDATE SKIP LOCKED) due "
        f"WHERE d.id = due.id RETURNING {', '.join('d.' + c for c in _COLS.split(', '))}",
        (lease_until, now, limit))


async def record_check(txn: Txn, org_id: str, domain_id: str, *,
                       record_status: dict[str, str], error: str | None,
                       next_check_at: datetime | None) -> dict[str, Any] | None:
    """Store a check's outcome and when to look again."""
    return await txn.fetchone(
        "UPDATE domains SET record_status = record_status || %s, last_check_error = %s, "
        "last_checked_at = %s, check_count = check_count + 1, next_check_at = %s "
        f"WHERE org_id = %s AND id = %s RETURNING {_COLS}",
        (Json(record_status), error, txn.now, next_check_at, org_id, domain_id))


async def mark_verified(txn: Txn, org_id: str, domain_id: str) -> dict[str, Any] | None:
    """Set verified_at if it is not set yet: the row when this call verified it, None
    when it already was (so exactly one caller writes the ``domain.verified`` event)."""
    return await txn.fetchone(
        "UPDATE domains SET verified_at = %s, next_check_at = NULL "
        f"WHERE org_id = %s AND id = %s AND verified_at IS NULL RETURNING {_COLS}",
        (txn.now, org_id, domain_id))


async def dkim_key_for(txn: Txn, org_id: str, domain: str) -> dict[str, Any] | None:
    """The organization's own DKIM key row for ``domain`` (still sealed), or None when
    the domain is not the organization's or SES signs for it."""
    return await txn.fetchone(
        "SELECT id, name, dkim_selector, dkim_algorithm, dkim_private_sealed FROM domains "
        "WHERE org_id = %s AND name = lower(%s) AND dkim_mode = 'own'", (org_id, domain))
