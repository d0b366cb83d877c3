"""Send rate buckets and daily counters (migration 0022), shared by every process.

One statement charges a bucket: it refills the tokens by the time elapsed since the
last charge, takes the message's cost and counts it for the day, but only if neither
would go past its limit; otherwise it changes nothing and returns no row. The refill
happens inside that UPDATE under the row's lock, so two processes charging at once
cannot both spend the same token (PostgreSQL re-evaluates the WHERE clause against
the row version it locked).

``now`` comes from the caller's injected clock. A process whose clock runs a little
behind another's neither gets tokens twice (``refilled_at`` never moves back) nor
resets another's day (``day`` never moves back).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from agentpost.storage.database import Txn

#: The two scopes: table and key columns (fixed strings, never input).
_TABLES = {
    "organization": ("send_limits_org", ("org_id",)),
    "inbox": ("send_limits_inbox", ("org_id", "inbox_id")),
}

_REFILLED = ("LEAST(%(burst)s::float8, b.tokens + %(rate)s::float8 * "
             "GREATEST(0, EXTRACT(EPOCH FROM (%(now)s::timestamptz - b.refilled_at))"
             "::float8))")
_TODAY_COUNT = "(CASE WHEN b.day >= %(day)s::date THEN b.day_count ELSE 0 END)"


def _charge_sql(scope: str) -> str:
    table, keys = _TABLES[scope]
    cols = ", ".join(keys)
    values = ", ".join(f"%({k})s" for k in keys)
    return (
        f"INSERT INTO {table} AS b ({cols}, tokens, refilled_at, day, day_count) "
        f"VALUES ({values}, %(fresh)s, %(now)s, %(day)s, %(n)s) "
        f"ON CONFLICT ({cols}) DO UPDATE SET "
        f"  tokens = CASE WHEN %(rate)s::float8 = 0 THEN 0 "
        f"                ELSE {_REFILLED} - %(cost)s END, "
        f"  refilled_at = GREATEST(b.refilled_at, %(now)s::timestamptz), "
        f"  day = GREATEST(b.day, %(day)s::date), "
        f"  day_count = {_TODAY_COUNT} + %(n)s "
        f"WHERE (%(rate)s::float8 = 0 OR {_REFILLED} >= %(cost)s) "
        f"  AND (%(quota)s = 0 OR {_TODAY_COUNT} + %(n)s <= %(quota)s) "
        f"RETURNING b.tokens")


_CHARGE = {scope: _charge_sql(scope) for scope in _TABLES}


async def charge(txn: Txn, scope: str, key: dict[str, str], *, cost: float, n: int,
                 rate: float, burst: float, quota: int, now: datetime,
                 day: date) -> bool:
    """Take ``cost`` tokens from the bucket of ``key`` (``org_id``, and ``inbox_id``
    for the inbox scope) and count ``n`` messages for ``day``. False, with nothing
    changed, when the bucket holds fewer than ``cost`` tokens or the day's count would
    pass ``quota``. ``rate`` 0 means no rate limit, ``quota`` 0 no daily limit; the
    caller makes sure a first charge fits (``cost <= burst``, ``n <= quota``)."""
    params: dict[str, Any] = {
        **key, "cost": cost, "n": n, "rate": rate, "burst": burst, "quota": quota,
        "now": now, "day": day, "fresh": burst - cost if rate else 0.0,
    }
    row = await txn.fetchone(_CHARGE[scope], params)
    return row is not None


async def bucket(txn: Txn, scope: str, key: dict[str, str]) -> dict[str, Any] | None:
    """The bucket row as last charged (tokens, refilled_at, day, day_count), or None
    when this organization or inbox has not sent yet."""
    table, keys = _TABLES[scope]
    where = " AND ".join(f"{k} = %({k})s" for k in keys)
    return await txn.fetchone(
        f"SELECT tokens, refilled_at, day, day_count FROM {table} WHERE {where}", key)


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
