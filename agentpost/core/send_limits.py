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

When: :meth:`SendLimits.reserve` charges both scopes in ONE statement of its own
(committed without waiting for the WAL flush) just before the send's transaction
stores the Sent copy and queues it. A refused send stores nothing; a send that then
fails for any other reason gives the reservation back
(:meth:`Reservation.give_back`), so it consumes nothing -- except across a crash (or a
database lost) between the two, which leaves the allowance spent: the error is on the
side of sending less, never more. The reservation becomes durable with the message:
the send's COMMIT is flushed, and the WAL is flushed in order.

The hot row: every send of an organization updates its one organization row. In the
send's own transaction that row stayed locked from the charge to the COMMIT, one round
trip to a busy server process later, and an organization's sends queued behind it
(bench/outbound_bench.py measured up to 7 backends waiting on ``Lock:transactionid``).
The reservation holds it only while its statement runs. The inbox row is charged
before the organization row (one lock order everywhere, the shared lock last), and a
scope with no limit configured is not charged at all (no row, no lock).

At RCPT the buckets are read with the send's other checks
(storage.outbound.sending_checks) and :meth:`SendLimits.check_row` refuses early when
one is already empty.

Refusals: :class:`SendRateLimited` (HTTP 429 ``rate_limited``, SMTP 451 4.7.0) with a
Retry-After of the time until the bucket holds the cost again;
:class:`DailyQuotaExceeded` (HTTP 429 ``daily_quota_exceeded``, SMTP 451 4.7.0) until
midnight UTC. Both are temporary: RFC 3463 4.x.x says "the message as sent is valid,
but ... some temporary event prevents successful sending", which is exactly a limit
that ends by itself; a 5xx would make a relaying client bounce mail that would have
gone out an hour later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.interfaces import IReactorTime

from agentpost.model.errors import DailyQuotaExceeded, SendRateLimited
from agentpost.storage import send_limits as store
from agentpost.storage.database import Database

log = logging.getLogger(__name__)


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

    def _charges(self, recipients: int, now: datetime
                 ) -> dict[str, store.Charge | None]:
        """Each scope's charge for ``recipients`` messages (None: not limited); raises
        DailyQuotaExceeded for a message bigger than a whole day."""
        charges: dict[str, store.Charge | None] = {}
        for scope in ("inbox", "organization"):
            limit = self._limits[scope]
            if not limit.active:
                charges[scope] = None
                continue
            if limit.daily and recipients > limit.daily:
                raise DailyQuotaExceeded(_until_midnight(now), scope=scope)
            # The whole message, even past the bucket's size: it then needs a full
            # bucket and leaves it in debt (storage.send_limits), so many recipients
            # per message never multiply the sustained rate.
            cost = float(recipients) if limit.rate else 0.0
            charges[scope] = store.Charge(cost, recipients, limit.rate, float(limit.burst),
                                          limit.daily)
        return charges

    async def reserve(self, org_id: str, inbox_id: str, recipients: int) -> Reservation | None:
        """Spend ``recipients`` messages of the inbox's and the organization's
        allowances now, in one statement of its own, or raise SendRateLimited /
        DailyQuotaExceeded with nothing spent. The caller stores and queues the send
        next and gives the reservation back (:meth:`Reservation.give_back`) if that
        fails. None: nothing to charge."""
        if recipients <= 0 or not self.active:
            return None
        now = self._now()
        charges = self._charges(recipients, now)
        inbox, org = charges["inbox"], charges["organization"]
        took_inbox, took_org = await self._db.run_read(
            "send_limits.reserve", store.reserve, org_id, inbox_id, inbox, org,
            now=now, day=now.date())
        reservation = Reservation(self._db, org_id, inbox_id, inbox, org, now)
        if took_inbox and took_org:
            return reservation
        if took_inbox and inbox is not None:  # the organization said no: undo the inbox
            await Reservation(self._db, org_id, inbox_id, inbox, None, now).give_back()
        scope = "organization" if took_inbox else "inbox"
        charge = charges[scope]
        assert charge is not None
        row = (await self._db.run_read("send_limits.refused", store.buckets_of, org_id,
                                       inbox_id)).get(scope)
        refusal = self._refusal(scope, self._limits[scope], row,
                                min(charge.cost, charge.burst), recipients, now)
        # None: another process's clock is ahead of ours; a second is enough.
        raise refusal or SendRateLimited(1.0, scope=scope)

    async def check(self, org_id: str, inbox_id: str) -> None:
        """Refuse early (at RCPT) when a bucket is already empty or the day is used
        up; a read only -- the reservation at the end of the message is what counts."""
        if not self.active:
            return
        rows = await self._db.run_read("send_limits.check", store.buckets_of, org_id,
                                       inbox_id)
        self.check_rows(rows)

    def check_row(self, row: dict[str, Any]) -> None:
        """:meth:`check` on the buckets read with the send's other checks
        (storage.outbound.sending_checks with ``buckets``: ``<scope>_tokens``, ...)."""
        rows = {}
        for scope in ("inbox", "organization"):
            if row.get(f"{scope}_refilled_at") is not None:
                rows[scope] = {col: row[f"{scope}_{col}"]
                               for col in ("tokens", "refilled_at", "day", "day_count")}
        self.check_rows(rows)

    def check_rows(self, rows: dict[str, dict[str, Any]]) -> None:
        """The early refusal on the buckets as read (keyed by scope; missing: not sent
        yet)."""
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


class Reservation:
    """What :meth:`SendLimits.reserve` took, to give back when the send fails."""

    def __init__(self, db: Database, org_id: str, inbox_id: str,
                 inbox: store.Charge | None, org: store.Charge | None,
                 now: datetime) -> None:
        self._db = db
        self._args = (org_id, inbox_id, inbox, org)
        self._day = now.date()

    async def give_back(self) -> None:
        """Return the tokens and the day's count (best effort: when the database
        cannot be reached the allowance stays spent, which errs on the side of
        sending less)."""
        try:
            await self._db.run_read("send_limits.refund", store.refund, *self._args,
                                    day=self._day)
        except Exception:
            log.warning("send limits: could not give back a reservation", exc_info=True)
