"""Failed-login token buckets in PostgreSQL (see migration 0008), and the lookups that
attribute a failed login to the organization it was aimed at.

Token buckets: ``burst`` tokens, ``rate`` tokens per second back, a failure spends one
(down to ``-burst`` of debt), and a login is refused while a bucket that guards it
holds less than one token. Each bucket carries its own rate and burst (a client
address gets a larger allowance than one (address, account) pair), so they travel as
parallel arrays. ``now`` comes from the caller's injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agentpost.storage.database import Txn


@dataclass(frozen=True)
class Allowance:
    """One bucket: its key (a digest, never an address in clear) and its shape."""

    key: str
    rate_per_s: float
    burst: float


def _arrays(allowances: list[Allowance], now: datetime) -> dict[str, Any]:
    ordered = sorted({a.key: a for a in allowances}.values(), key=lambda a: a.key)
    return {"keys": [a.key for a in ordered], "rates": [a.rate_per_s for a in ordered],
            "bursts": [a.burst for a in ordered], "now": now}


_BUCKETS = ("unnest(%(keys)s::text[], %(rates)s::float8[], %(bursts)s::float8[]) "
            "AS b(key, rate, burst)")


async def tokens_left(txn: Txn, allowances: list[Allowance],
                      now: datetime) -> dict[str, float]:
    """Tokens each bucket holds now; a bucket that never failed lately is absent (full)."""
    rows = await txn.fetchall(
        "SELECT b.key, LEAST(b.burst, f.tokens + b.rate * "
        "GREATEST(0, EXTRACT(EPOCH FROM (%(now)s - f.updated_at)))) AS tokens "
        f"FROM {_BUCKETS} JOIN login_failures f ON f.key = b.key",
        _arrays(allowances, now))
    return {row["key"]: float(row["tokens"]) for row in rows}


async def spend(txn: Txn, allowances: list[Allowance], now: datetime) -> None:
    """Spend one token from each bucket (rows are locked in key order: no deadlocks)."""
    await txn.execute(
        "INSERT INTO login_failures AS f (key, tokens, updated_at) "
        f"SELECT b.key, b.burst - 1, %(now)s FROM {_BUCKETS} ORDER BY b.key "
        "ON CONFLICT (key) DO UPDATE SET "
        "tokens = (SELECT GREATEST(LEAST(b.burst, f.tokens + b.rate * GREATEST(0, "
        "EXTRACT(EPOCH FROM (EXCLUDED.updated_at - f.updated_at)))) - 1, -b.burst) "
        f"FROM {_BUCKETS} WHERE b.key = EXCLUDED.key), "
        "updated_at = GREATEST(f.updated_at, EXCLUDED.updated_at)",
        _arrays(allowances, now))


async def forgive(txn: Txn, keys: list[str]) -> None:
    """Refill buckets completely (a correct login forgives its own pair's typos)."""
    await txn.execute("DELETE FROM login_failures WHERE key = ANY(%s)", (sorted(set(keys)),))


async def purge_idle(txn: Txn, before: datetime) -> int:
    """Forget buckets untouched since ``before`` (long full again)."""
    return await txn.execute("DELETE FROM login_failures WHERE updated_at < %s", (before,))


async def owner_of_address(txn: Txn, address: str) -> dict[str, Any] | None:
    """The organization, environment and id of the inbox with this address, across all
    tenants: only to file a failed login in the attacked tenant's audit trail, never
    to answer the client."""
    return await txn.fetchone(
        "SELECT org_id, environment_id, id FROM inboxes WHERE lower(email) = lower(%s)",
        (address,))


async def spend_and_find_owner(txn: Txn, allowances: list[Allowance], now: datetime,
                               address: str) -> dict[str, Any] | None:
    """A failed login in one round of the transaction wrapper: the same statements run
    whether the address exists or not, so the answer's timing tells nothing."""
    await spend(txn, allowances, now)
    return await owner_of_address(txn, address)
