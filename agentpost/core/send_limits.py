"""Send rate limits and daily quotas per organization and per inbox.

Why in PostgreSQL and not per process: several AgentPost processes (and nodes) share
one database, and a per-process bucket would multiply every limit by the number of
processes. Each scope (the organization, the sending inbox) has one row holding a
token bucket and the day's count (agentpost.storage.send_limits); a send is charged
by one statement per scope that refills by the elapsed time and takes the cost, or
refuses and changes nothing.

What counts: every envelope recipient is one message (as SES counts its quota, and
because the cost to the world -- and to a relay's reputation -- is per recipient).
Hosted recipients count too: the limit is on what an inbox sends, not on where it goes.

When: :meth:`SendLimits.charge` runs inside the transaction that stores the Sent copy
and queues it, as its last statement, so a refused send stores nothing and a send
that fails for any other reason consumes nothing (the charge rolls back with it).

The hot row: every send of an organization updates its one organization row and holds
that row's lock until COMMIT (one WAL flush). That is why the charge is the last
statement before COMMIT, why the inbox row is charged before the organization row
(one lock order everywhere, and the shared lock is taken last), and why a scope with
no limit configured is not charged at all (no row, no lock). bench/outbound_bench.py
measures the cost.

Refusals: :class:`SendRateLimited` (HTTP 429 ``rate_limited``, SMTP 451 4.7.0) with a
Retry-After of the time until the bucket holds the cost again;
:class:`DailyQuotaExceeded` (HTTP 429 ``daily_quota_exceeded``, SMTP 451 4.7.0) until
midnight UTC. Both are temporary: RFC 3463 4.x.x says "the message as sent is valid,
but ... some temporary event prevents successful sending", which is exactly a limit
that ends by itself; a 5xx would make a relaying client bounce mail that would have
gone out an hour later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.interfaces import IReactorTime

from agentpost.model.errors import DailyQuotaExceeded, SendRateLimited
from agentpost.storage import send_limits as store
from agentpost.storage.database import Database, Txn


@dataclass(frozen=True)
class Limit:
    """One scope's limits: tokens per second, bucket size, messages per UTC day.
    Zero is no limit."""

    rate: float = 0.0
    burst: int = 0
    daily: int = 0

    @property
    def active(self) -> bool:
        """Whether this scope is limited at all (an unlimited scope has no row)."""
        return self.rate > 0 or self.daily > 0


def _until_midnight(now: datetime) -> float:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - now).total_seconds()


class SendLimits:
    """The charge (inside a send's transaction) and the cheap look (at RCPT)."""

    def __init__(self, db: Database, clock: IReactorTime, *, org: Limit,
                 inbox: Limit) -> None:
        self._db = db
        self._clock = clock
        self._limits = {"inbox": inbox, "organization": org}

    @classmethod
    def from_config(cls, section: Any, db: Database, clock: IReactorTime) -> SendLimits:
        """From the ``[send_limits]`` section."""
        return cls(db, clock,
                   org=Limit(section.org_rate, section.org_burst, section.daily_quota),
                   inbox=Limit(section.inbox_rate, section.inbox_burst,
                               section.inbox_daily_quota))

    @property
    def active(self) -> bool:
        """Whether any limit is configured."""
        return any(limit.active for limit in self._limits.values())

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    @staticmethod
    def _key(scope: str, org_id: str, inbox_id: str) -> dict[str, str]:
        return {"org_id": org_id} if scope == "organization" else {
            "org_id": org_id, "inbox_id": inbox_id}

    async def charge(self, txn: Txn, org_id: str, inbox_id: str, recipients: int) -> None:
        """Spend ``recipients`` messages of the inbox's and the organization's
        allowances, or raise SendRateLimited / DailyQuotaExceeded (the caller's
        transaction then rolls back, so nothing is spent). Call it last before COMMIT."""
        if recipients <= 0:
            return
        now = self._now()
        for scope in ("inbox", "organization"):  # the shared row last
            limit = self._limits[scope]
            if not limit.active:
                continue
            if limit.daily and recipients > limit.daily:
                raise DailyQuotaExceeded(_until_midnight(now), scope=scope)
            cost = float(min(recipients, limit.burst)) if limit.rate else 0.0
            key = self._key(scope, org_id, inbox_id)
            if not await store.charge(txn, scope, key, cost=cost, n=recipients,
                                      rate=limit.rate, burst=float(limit.burst),
                                      quota=limit.daily, now=now, day=now.date()):
                row = await store.bucket(txn, scope, key)
                refusal = self._refusal(scope, limit, row, cost, recipients, now)
                # None: another process's clock is ahead of ours; a second is enough.
                raise refusal or SendRateLimited(1.0, scope=scope)

    async def check(self, org_id: str, inbox_id: str) -> None:
        """Refuse early (at RCPT) when a bucket is already empty or the day is used
        up; a read only -- the charge at commit is what counts."""
        if not self.active:
            return
        rows = await self._db.run_read("send_limits.check", store.buckets_of, org_id,
                                       inbox_id)
        now = self._now()
        for scope in ("inbox", "organization"):
            limit = self._limits[scope]
            if limit.active and scope in rows:
                refusal = self._refusal(scope, limit, rows[scope], min(1.0, limit.burst), 1,
                                        now)
                if refusal is not None:
                    raise refusal

    @staticmethod
    def _refusal(scope: str, limit: Limit, row: dict[str, Any] | None, cost: float,
                 n: int, now: datetime) -> SendRateLimited | None:
        """Why a charge of ``cost`` tokens / ``n`` messages does not fit ``row`` now,
        with the wait until it would; None if it fits."""
        if row is None:
            return None
        today = now.date()
        if limit.daily:
            used = row["day_count"] if row["day"] >= today else 0
            if used + n > limit.daily:
                return DailyQuotaExceeded(_until_midnight(now), scope=scope)
        if limit.rate:
            elapsed = max(0.0, (now - row["refilled_at"]).total_seconds())
            tokens = min(float(limit.burst), row["tokens"] + limit.rate * elapsed)
            if tokens < cost:
                return SendRateLimited((cost - tokens) / limit.rate, scope=scope)
        return None
