"""Inboxes and the domains they may live on."""

from __future__ import annotations

from typing import Any

import psycopg2.errors

from agentpost.model.errors import Conflict
from agentpost.storage.database import Txn
from agentpost.storage.mail import rules_sql
from agentpost.storage.prepared import GENERIC_PLANS
from agentpost.storage.usage import used_sql

#: ``used_bytes`` is the exact use: the folded column plus pending deltas (storage.usage).
_COLS = ("id, org_id, environment_id, username, domain, email, display_name, client_id, "
         f"send_paused, {used_sql('inboxes')} AS used_bytes, created_at, updated_at")


async def insert_inbox(txn: Txn, *, org_id: str, inbox_id: str, environment_id: str,
                       username: str, domain: str, display_name: str,
                       client_id: str | None) -> dict[str, Any]:
    """Create an inbox; an address already taken anywhere is a Conflict."""
    try:
        return await txn.fetchone_required(
            "INSERT INTO inboxes (org_id, id, environment_id, username, domain, email, "
            "display_name, client_id, created_at, updated_at) "
            f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLS}",
            (org_id, inbox_id, environment_id, username, domain, f"{username}@{domain}",
             display_name, client_id, txn.now, txn.now),
        )
    except psycopg2.errors.UniqueViolation as exc:
        if "inboxes_client_id" in str(exc):
            raise Conflict("An inbox with that client_id was created concurrently.") from None
        raise Conflict(f"The address {username}@{domain} is already taken.") from None


async def get_inbox_by_client_id(txn: Txn, org_id: str, environment_id: str,
                                 client_id: str) -> dict[str, Any] | None:
    """The inbox a repeated create with the same client_id refers to."""
    return await txn.fetchone(
        f"SELECT {_COLS} FROM inboxes WHERE org_id = %s AND environment_id = %s "
        "AND client_id = %s",
        (org_id, environment_id, client_id),
    )


async def get_inbox(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                    inbox_id: str) -> dict[str, Any] | None:
    """One inbox, only if it is in the organization and an allowed environment."""
    return await txn.fetchone(
        f"SELECT {_COLS} FROM inboxes WHERE org_id = %s AND id = %s "
        "AND (%s::text[] IS NULL OR environment_id = ANY(%s))",
        (org_id, inbox_id, _arr(env_ids), _arr(env_ids)),
    )


async def get_inbox_by_address(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                               address: str) -> dict[str, Any] | None:
    """The inbox with this address, only if it is in the organization and an allowed
    environment (IMAP login: one statement, no transaction)."""
    return await txn.fetchone(
        f"SELECT {_COLS} FROM inboxes WHERE lower(email) = lower(%s) AND org_id = %s "
        "AND (%s::text[] IS NULL OR environment_id = ANY(%s))",
        (address, org_id, _arr(env_ids), _arr(env_ids)),
    )


def _list_where(org_id: str, env_ids: frozenset[str] | None,
                after_id: str | None) -> tuple[str, list[Any]]:
    """The WHERE of a list of inboxes newest first, and its parameters.

    Only the conditions that apply are written (one text per combination), never
    ``(%s IS NULL OR ...)``. With such branches, ``plan_cache_mode = auto`` either
    planned every GET afresh (3,000 inboxes) or kept a generic plan that rendered and
    sorted every inbox of the organization for a page of 20 (1,000 inboxes: 1.2 ms of
    PostgreSQL CPU per GET instead of 0.3, bench/api_bench.py --seed 1000), and no
    generic plan could start its scan at ``id < after``. Each text's generic plan is a
    backward scan of (org_id, id) -- or of (org_id, environment_id, id) for one
    environment -- that stops after the page (EXPLAIN on 1,000 inboxes without
    statistics, and on 63,000 over 40 organizations), so the callers that run alone
    ask for it (GENERIC_PLANS)."""
    sql = "WHERE org_id = %s"
    params: list[Any] = [org_id]
    if env_ids is not None and len(env_ids) == 1:
        sql += " AND environment_id = %s"
        params += list(env_ids)
    elif env_ids is not None:
        sql += " AND environment_id = ANY(%s::text[])"
        params.append(_arr(env_ids))
    if after_id is not None:
        sql += " AND id < %s"
        params.append(after_id)
    return sql, params


async def list_inboxes(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                       after_id: str | None, limit: int) -> list[dict[str, Any]]:
    """Inboxes newest first, within the allowed environments (sent alone: run_read)."""
    where, params = _list_where(org_id, env_ids, after_id)
    return await txn.fetchall(
        f"{GENERIC_PLANS}; SELECT {_COLS} FROM inboxes {where} ORDER BY id DESC LIMIT %s",
        [*params, limit],
    )


#: The inbox view (http.views.inbox) as PostgreSQL writes it: the list is the most
#: polled request, and rows -> dicts -> views -> JSON was a quarter of its CPU in the
#: server (issue 12). Same keys and values; tests compare it with views.inbox.
_JSON_TS = "'\"' || to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') || '\"'"
_JSON_FIELDS: tuple[tuple[str, str], ...] = (
    ("id", "to_json(id)::text"), ("email", "to_json(email)::text"),
    ("username", "to_json(username)::text"), ("domain", "to_json(domain)::text"),
    ("display_name", "to_json(display_name)::text"),
    ("environment_id", "to_json(environment_id)::text"),
    ("client_id", "to_json(client_id)::text"), ("send_paused", "send_paused::text"),
    ("used_bytes", f"{used_sql('inboxes')}::text"),
    ("created_at", _JSON_TS.format("created_at")),
    ("updated_at", _JSON_TS.format("updated_at")),
)
_JSON_ROW = "concat({})".format(", ".join(
    f"'{'{' if i == 0 else ','}\"{key}\":', COALESCE({expr}, 'null')"
    for i, (key, expr) in enumerate(_JSON_FIELDS)) + ", '}'")


async def list_inbox_json(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                          after_id: str | None, limit: int) -> list[dict[str, Any]]:
    """:func:`list_inboxes` with each inbox already rendered: rows of ``id`` and
    ``json`` (the client's view of the inbox as JSON text)."""
    where, params = _list_where(org_id, env_ids, after_id)
    return await txn.fetchall(
        f"SELECT id, {_JSON_ROW} AS json FROM inboxes {where} ORDER BY id DESC LIMIT %s",
        [*params, limit],
    )


async def list_inbox_page(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                          after_id: str | None, limit: int) -> tuple[str, str | None]:
    """One page of :func:`list_inbox_json`, joined by PostgreSQL: the page's inboxes as
    JSON text separated by commas, and the id of its last inbox when more follow (else
    None). One row of two values comes back instead of ``limit + 1`` rows of two: the
    driver builds no tuple, dict or string per inbox and Python joins nothing (issue 12:
    ~5% of a cached GET's CPU). Sent alone (run_read), with the generic plan (see
    :func:`_list_where`)."""
    where, params = _list_where(org_id, env_ids, after_id)
    row = await txn.fetchone(
        f"{GENERIC_PLANS}; "
        "SELECT COALESCE(string_agg(json, ',' ORDER BY id DESC) FILTER (WHERE n <= %s), '') "
        "AS page, CASE WHEN count(*) > %s THEN min(id) FILTER (WHERE n <= %s) END AS last "
        f"FROM (SELECT id, {_JSON_ROW} AS json, row_number() OVER (ORDER BY id DESC) AS n "
        f"FROM inboxes {where} ORDER BY id DESC LIMIT %s) AS p",
        [limit, limit, limit, *params, limit + 1],
    )
    if row is None:  # an aggregate without GROUP BY always yields its row
        return "", None
    return row["page"], row["last"]


async def update_inbox(txn: Txn, org_id: str, env_ids: frozenset[str] | None, inbox_id: str,
                       changes: dict[str, Any]) -> dict[str, Any] | None:
    """Change display_name or send_paused (columns come from core's allow-list)."""
    sets = ", ".join(f"{col} = %s" for col in changes)
    return await txn.fetchone(
        f"UPDATE inboxes SET {sets}, updated_at = %s WHERE org_id = %s AND id = %s "
        f"AND (%s::text[] IS NULL OR environment_id = ANY(%s)) RETURNING {_COLS}",
        (*changes.values(), txn.now, org_id, inbox_id, _arr(env_ids), _arr(env_ids)),
    )


async def delete_inbox(txn: Txn, org_id: str, env_ids: frozenset[str] | None,
                       inbox_id: str) -> dict[str, Any] | None:
    """Delete an inbox; returns what was deleted."""
    return await txn.fetchone(
        f"DELETE FROM inboxes WHERE org_id = %s AND id = %s "
        f"AND (%s::text[] IS NULL OR environment_id = ANY(%s)) RETURNING {_COLS}",
        (org_id, inbox_id, _arr(env_ids), _arr(env_ids)),
    )


async def ensure_shared_domain(txn: Txn, name: str) -> None:
    """Record the configured shared domain (idempotent)."""
    await txn.execute(
        "INSERT INTO shared_domains (name, created_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (name.lower(), txn.now),
    )


async def domain_kind(txn: Txn, name: str) -> str | None:
    """``"shared"`` for a shared domain, ``"own"`` for an organization's verified domain,
    None for a domain not hosted here (routing of reserved local parts)."""
    kind: str | None = await txn.fetchval(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM shared_domains WHERE name = lower(%s)) "
        "THEN 'shared' WHEN EXISTS (SELECT 1 FROM domains WHERE name = lower(%s) "
        "AND verified_at IS NOT NULL) THEN 'own' END",
        (name, name),
    )
    return kind


async def mail_from_route(txn: Txn, local: str, domain: str, *,
                          with_usage: bool = True) -> dict[str, Any] | None:
    """The MX's routing for ``local@domain`` when ``domain`` is not hosted itself but
    may be a verified domain's custom MAIL FROM (``bounce.example.com``): bounces to the
    envelope sender ``alice@bounce.example.com`` go to the inbox ``alice@example.com``.

    None: no verified domain has ``domain`` as its custom MAIL FROM (relay denied). Else
    the row of storage.mail.route (``inbox_id`` None: no such inbox). The inbox must be
    of the organization that holds the verified domain -- the rule of the MX's own
    routing: never another tenant's inbox left on a name verified later."""
    labels = domain.lower().split(".")
    parents = [".".join(labels[n:]) for n in range(1, len(labels))]
    if not parents:
        return None
    return await txn.fetchone(
        "SELECT i.org_id, i.environment_id, i.id AS inbox_id, i.email, "
        f"      {used_sql('i') if with_usage else 'NULL::bigint'} AS used_bytes, "
        f"      {rules_sql('receive')} AS rules "
        "FROM domains d LEFT JOIN inboxes i ON i.org_id = d.org_id "
        "  AND lower(i.email) = lower(%s) || '@' || d.name "
        "WHERE d.name = ANY(%s::text[]) AND d.verified_at IS NOT NULL "
        "  AND d.mail_from_subdomain || '.' || d.name = lower(%s)",
        (local, parents, domain))


async def domain_usable(txn: Txn, org_id: str, environment_id: str, name: str) -> bool:
    """Whether inboxes of this org and environment may use ``name``: a shared domain or
    the organization's own, verified or not (an inbox on an unverified domain exists but
    neither sends -- core.submission -- nor receives until the domain is verified).

    The organization's domain row is share-locked until the caller commits: deleting a
    domain locks it for update and then counts its inboxes (core.domains), so an inbox
    being created on it either commits first (and is counted: 409) or finds the domain
    gone; otherwise both committed and left an inbox on a domain nobody holds."""
    return bool(await txn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM shared_domains WHERE name = %s) OR EXISTS ("
        "SELECT 1 FROM domains WHERE org_id = %s AND environment_id = %s AND name = %s "
        "FOR KEY SHARE)",
        (name, org_id, environment_id, name),
    ))


def _arr(ids: frozenset[str] | None) -> list[str] | None:
    return None if ids is None else sorted(ids)
