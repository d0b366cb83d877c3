"""Send rate buckets and daily counters (migration 0022), shared by every process.

One statement charges both buckets of a send (:func:`reserve`, before the send's own
transaction): per bucket it refills the tokens by the time elapsed since the last
charge, takes the message's cost and counts it for the day, but only if neither would
go past its limit; otherwise it changes nothing. :func:`refund` gives a charge back
when the send then fails. The refill happens inside the upsert under the row's lock,
so two processes charging at once cannot both spend the same token (PostgreSQL
re-evaluates the WHERE clause against the row version it locked).

``now`` comes from the caller's injected clock. A process whose clock runs a little
behind another's neither gets tokens twice (``refilled_at`` never moves back) nor
resets another's day (``day`` never moves back).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from agentpost.storage.database import Txn

#: The two scopes: table and key columns (fixed strings, never input).
_TABLES = {
    "organization": ("send_limits_org", ("org_id",)),
    "inbox": ("send_limits_inbox", ("org_id", "inbox_id")),
}


async def buckets_of(txn: Txn, org_id: str, inbox_id: str) -> dict[str, dict[str, Any]]:
    """Both buckets a send from ``inbox_id`` is charged to, in one statement (the
    cheap look at RCPT time), keyed by scope; a scope that has not sent is missing."""
    rows = await txn.fetchall(
        "SELECT 'organization' AS scope, tokens, refilled_at, day, day_count "
        "  FROM send_limits_org WHERE org_id = %(org_id)s "
        "UNION ALL "
        "SELECT 'inbox', tokens, refilled_at, day, day_count FROM send_limits_inbox "
        " WHERE org_id = %(org_id)s AND inbox_id = %(inbox_id)s",
        {"org_id": org_id, "inbox_id": inbox_id})
    return {row["scope"]: row for row in rows}


# ------------------------------------------------------------------ the reservation

@dataclass(frozen=True)
class Charge:
    """What one scope's bucket is charged: ``cost`` tokens and ``n`` messages against
    ``rate``/``burst`` (``rate`` 0: no rate limit) and ``quota`` (0: no daily limit). A
    cost above ``burst`` needs a full bucket and leaves it in debt."""

    cost: float
    n: int
    rate: float
    burst: float
    quota: int


#: The reservation's values, each sent once (the statement names them many times).
_PARAMS = ("org_id", "inbox_id", "now", "day", "i_on", "i_cost", "i_n", "i_rate", "i_burst",
           "i_quota", "o_on", "o_cost", "o_n", "o_rate", "o_burst", "o_quota")
_TYPES = {"org_id": "text", "inbox_id": "text", "now": "timestamptz", "day": "date",
          "on": "boolean", "cost": "float8", "n": "bigint", "rate": "float8",
          "burst": "float8", "quota": "bigint"}


def _scope_upsert(scope: str, alias: str, condition: str) -> str:
    """The charge of one scope, its values read from the CTE ``p`` (columns prefixed
    ``alias_``): an ``INSERT ... SELECT ... WHERE condition ON CONFLICT DO UPDATE ...
    WHERE fits``: the tokens refilled by the time elapsed (never above the burst) must
    cover the cost, or be a full bucket for a cost bigger than the burst, and the day's
    count (reset by a new day) must stay within the quota; otherwise the row is left as
    it was (locked, not updated) and no row returns. The whole cost is taken, so a
    message bigger than the bucket leaves it in debt (negative tokens) and the next
    send waits until that is paid: packing recipients into messages does not raise the
    sustained rate."""
    table, keys = _TABLES[scope]
    cols = ", ".join(keys)

    def v(name: str) -> str:  # a value of p, also where only the row's columns are in scope
        return f"(SELECT {alias}_{name} FROM p)"

    refilled = (f"LEAST({v('burst')}, b.tokens + {v('rate')} * GREATEST(0, EXTRACT(EPOCH "
                f"FROM (EXCLUDED.refilled_at - b.refilled_at))::float8))")
    today = "(CASE WHEN b.day >= EXCLUDED.day THEN b.day_count ELSE 0 END)"
    return (
        f"INSERT INTO {table} AS b ({cols}, tokens, refilled_at, day, day_count) "
        f"SELECT {', '.join(f'p.{k}' for k in keys)}, "
        f"CASE WHEN p.{alias}_rate = 0 THEN 0 ELSE p.{alias}_burst - p.{alias}_cost END, "
        f"p.now, p.day, p.{alias}_n FROM p WHERE {condition} "
        f"ON CONFLICT ({cols}) DO UPDATE SET "
        f"  tokens = CASE WHEN {v('rate')} = 0 THEN 0 ELSE {refilled} - {v('cost')} END, "
        f"  refilled_at = GREATEST(b.refilled_at, EXCLUDED.refilled_at), "
        f"  day = GREATEST(b.day, EXCLUDED.day), "
        f"  day_count = {today} + EXCLUDED.day_count "
        f"WHERE ({v('rate')} = 0 OR {refilled} >= LEAST({v('cost')}, {v('burst')})) "
        f"  AND ({v('quota')} = 0 OR {today} + EXCLUDED.day_count <= {v('quota')}) "
        f"RETURNING 1")


#: Both scopes in one statement, the inbox first (the shared row last): the
#: organization is charged only when the inbox was (or has no limit). The statement is
#: committed on its own, without waiting for the WAL flush: the send's own COMMIT,
#: which comes after it and is flushed, makes it durable with the message; a crash
#: before that loses both the reservation and the unacknowledged message.
_RESERVE = (
    "SET LOCAL synchronous_commit TO OFF; "
    "WITH p AS (SELECT "
    + ", ".join(f"%s::{_TYPES.get(name) or _TYPES[name[2:]]} AS {name}"
                for name in _PARAMS) + "), "
    "i AS (" + _scope_upsert("inbox", "i", "p.i_on") + "), "
    "o AS (" + _scope_upsert("organization", "o",
                             "p.o_on AND (NOT p.i_on OR EXISTS (SELECT 1 FROM i))") + ") "
    "SELECT EXISTS (SELECT 1 FROM i) AS inbox, EXISTS (SELECT 1 FROM o) AS organization")


async def reserve(txn: Txn, org_id: str, inbox_id: str, inbox: Charge | None,
                  org: Charge | None, *, now: datetime, day: date) -> tuple[bool, bool]:
    """Charge the inbox's and then the organization's bucket in ONE statement outside
    the send's transaction (so the organization's row is locked only while the
    statement runs, not until the send commits). ``None``: that scope has no limit.
    Returns (inbox charged, organization charged); a refused inbox leaves the
    organization untouched, a refused organization leaves the inbox charged (the
    caller gives it back with :func:`refund`). Run it as a read (no BEGIN): the two
    statements of the message are one implicit transaction."""
    params: dict[str, Any] = {"org_id": org_id, "inbox_id": inbox_id, "now": now,
                              "day": day}
    for alias, charge in (("i", inbox), ("o", org)):
        c = charge or Charge(0.0, 0, 0.0, 0.0, 0)
        params.update({f"{alias}_on": charge is not None, f"{alias}_cost": c.cost,
                       f"{alias}_n": c.n, f"{alias}_rate": c.rate,
                       f"{alias}_burst": c.burst, f"{alias}_quota": c.quota})
    row = await txn.fetchone(_RESERVE, [params[name] for name in _PARAMS])
    assert row is not None  # a SELECT without FROM always yields its row
    return (inbox is None or bool(row["inbox"]), org is None or bool(row["organization"]))


#: A reservation given back: the tokens (never above the bucket) and the day's count
#: (only while it is still that day). Exact: the charge refilled the bucket up to its
#: own ``now``, so adding the cost back is the bucket as if it had not been charged.
_REFUND = (
    "SET LOCAL synchronous_commit TO OFF; "
    "UPDATE send_limits_inbox AS b SET "
    "  tokens = CASE WHEN %s::float8 = 0 THEN b.tokens "
    "                ELSE LEAST(%s::float8, b.tokens + %s::float8) END, "
    "  day_count = CASE WHEN b.day = %s::date THEN GREATEST(0, b.day_count - %s::bigint) "
    "                   ELSE b.day_count END "
    " WHERE %s AND b.org_id = %s AND b.inbox_id = %s; "
    "UPDATE send_limits_org AS b SET "
    "  tokens = CASE WHEN %s::float8 = 0 THEN b.tokens "
    "                ELSE LEAST(%s::float8, b.tokens + %s::float8) END, "
    "  day_count = CASE WHEN b.day = %s::date THEN GREATEST(0, b.day_count - %s::bigint) "
    "                   ELSE b.day_count END "
    " WHERE %s AND b.org_id = %s")


async def refund(txn: Txn, org_id: str, inbox_id: str, inbox: Charge | None,
                 org: Charge | None, *, day: date) -> None:
    """Give back what :func:`reserve` took from the scopes given (a send that failed
    after its reservation, or an inbox charged for a send its organization refused).
    One message, run as a read (no BEGIN)."""
    i = inbox or Charge(0.0, 0, 0.0, 0.0, 0)
    o = org or Charge(0.0, 0, 0.0, 0.0, 0)
    await txn.execute(_REFUND, [
        i.rate, i.burst, i.cost, day, i.n, inbox is not None, org_id, inbox_id,
        o.rate, o.burst, o.cost, day, o.n, org is not None, org_id])
