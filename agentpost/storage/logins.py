"""Failed-login token buckets in PostgreSQL (see migration 0008).

Token buckets: ``burst`` tokens, ``rate`` tokens per second back, a failure spends one
(down to ``-burst`` of debt), and a login is refused while any of its buckets holds
less than one token. ``now`` comes from the caller's injected clock.
"""

from __future__ import annotations

from datetime import datetime

from agentpost.storage.database import Txn

_REFILLED = ("LEAST(%(burst)s, tokens + %(rate)s * "
             "GREATEST(0, EXTRACT(EPOCH FROM (%(now)s - updated_at))))")


async def emptiest(txn: Txn, keys: list[str], now: datetime, rate: float,
                   burst: float) -> float | None:
    """The fewest tokens any of ``keys`` holds now (None: none has failed lately)."""
    return await txn.fetchval(
        f"SELECT min({_REFILLED}) FROM login_failures WHERE key = ANY(%(keys)s)",
        {"keys": keys, "now": now, "rate": rate, "burst": burst})


async def record_failure(txn: Txn, keys: list[str], now: datetime, rate: float,
                         burst: float) -> None:
    """Spend one token from each of ``keys``."""
    await txn.execute(
        "INSERT INTO login_failures AS f (key, tokens, updated_at) "
        "SELECT k, %(burst)s - 1, %(now)s FROM unnest(%(keys)s::text[]) AS k "
        "ON CONFLICT (key) DO UPDATE SET "
        "tokens = GREATEST(LEAST(%(burst)s, f.tokens + %(rate)s * GREATEST(0, EXTRACT(EPOCH "
        "FROM (EXCLUDED.updated_at - f.updated_at)))) - 1, -%(burst)s), "
        "updated_at = GREATEST(f.updated_at, EXCLUDED.updated_at)",
        {"keys": sorted(set(keys)), "now": now, "rate": rate, "burst": burst})


async def purge_idle(txn: Txn, before: datetime) -> int:
    """Forget buckets untouched since ``before`` (long full again)."""
    return await txn.execute("DELETE FROM login_failures WHERE updated_at < %s", (before,))
