"""Where the MX's recipients go: the hosted-domain check, the inbox and what RCPT
decides with (its receive filters, its use), for one address or for many at once.

Routing runs per recipient, so it is one statement per lookup; under load the MX
asks for several at once (core.route_batch), and they share one statement: one
execution, one backend wake-up and one result for the lot, instead of each its own.
Both shapes answer from the same per-address query (:func:`_route_select`), so a
batch answers each address exactly as a lookup of its own would.
"""

from __future__ import annotations

from typing import Any

from agentpost.storage import usage
from agentpost.storage.database import Txn, text_array
from agentpost.storage.mail import rules_sql
from agentpost.storage.prepared import GENERIC_PLANS

#: NOTIFYed by every change to what routing reads (migration 0041): core.route_cache.
ROUTE_CHANNEL = "agentpost_route_changed"


def _route_select(address: str, domain: str, with_usage: bool) -> str:
    """One address's routing row, with ``address`` and ``domain`` the SQL expressions
    that give them. The inbox is only this address's if its own organization holds the
    name (or it is a shared domain): never another tenant's inbox left on a name that
    an organization verified later."""
    return (
        f"SELECT (EXISTS (SELECT 1 FROM shared_domains WHERE name = lower({domain})) OR "
        f"        EXISTS (SELECT 1 FROM domains WHERE name = lower({domain}) "
        "                AND verified_at IS NOT NULL)) AS hosted, "
        "       i.org_id, i.environment_id, i.id AS inbox_id, i.email, "
        f"      {usage.used_sql('i') if with_usage else 'NULL::bigint'} AS used_bytes, "
        f"      {rules_sql('receive')} AS rules "
        f"FROM (SELECT 1) AS one LEFT JOIN inboxes i ON lower(i.email) = lower({address}) "
        f"  AND (EXISTS (SELECT 1 FROM shared_domains s WHERE s.name = lower({domain})) OR "
        "       EXISTS (SELECT 1 FROM domains d WHERE d.org_id = i.org_id "
        f"               AND d.name = lower({domain}) AND d.verified_at IS NOT NULL))")


async def route(txn: Txn, address: str, domain: str, *,
                with_usage: bool = True) -> dict[str, Any]:
    """Everything the MX needs at RCPT, in ONE statement: ``hosted`` (the domain is
    ours), the inbox (``org_id``... None when unknown, or when its organization does not
    hold the verified name), its receive filter ``rules`` (a list of {match_type, value,
    action}) and, ``with_usage``, its ``used_bytes`` (else None).

    Without a quota nothing reads the use, and reading it costs: it sums the inbox's
    deltas not yet folded (storage.usage), up to a fold interval's worth of deliveries
    for an inbox that receives a burst -- the most expensive part of this statement.

    Sent alone (run_read), with the generic plan: every part is an index lookup by an
    equality, so it is the custom plan without planning, and a plan of this statement
    costs about four times its execution (pg_stat_statements, bench/smtp_bench.py
    --pg-stats); under ``auto`` each connection planned it afresh after each of its
    re-preparations (storage.prepared)."""
    return await txn.fetchone(  # type: ignore[return-value]
        f"{GENERIC_PLANS}; {_route_select('%s', '%s', with_usage)}",
        (domain, domain, address, domain, domain))


async def route_many(txn: Txn, lookups: list[tuple[str, str]], *,
                     with_usage: bool = True) -> list[dict[str, Any]]:
    """:func:`route` of each (address, domain) of ``lookups``, in ONE statement; the
    rows in ``lookups``' order (one per lookup, repeats included)."""
    rows = await txn.fetchall(
        f"{GENERIC_PLANS}; "
        "SELECT x.n, r.* FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS "
        "x(address, domain, n) CROSS JOIN LATERAL "
        f"({_route_select('x.address', 'x.domain', with_usage)} LIMIT 1) AS r ORDER BY x.n",
        (text_array(a for a, _ in lookups), text_array(d for _, d in lookups)))
    return [{k: v for k, v in row.items() if k != "n"} for row in rows]
