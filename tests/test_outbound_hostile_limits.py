"""Hostile review of the send limits (issue 11): a tenant must not get more than its
sustained rate by packing many recipients into each message, and the odd counts
(zero, more than a whole day) are clean refusals that spend nothing.

Through the Submission core with a ``task.Clock`` (as tests/test_send_limits.py).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import pytest_twisted

from agentpost.core.send_limits import Limit, SendLimits
from agentpost.model.errors import DailyQuotaExceeded, SendRateLimited
from agentpost.storage import send_limits as limit_store
from tests.test_send_limits import _clock_at, _sender, _submission, _submit


def _rcpts(n: int, tag: str) -> list[str]:
    return [f"{tag}{i}@remote.example" for i in range(n)]


@pytest_twisted.ensureDeferred
async def test_many_recipients_per_message_do_not_multiply_the_sustained_rate(server):
    """Burst 2 at 1 message/s: a 10-recipient message may start from a full bucket, but
    it is paid in full -- the bucket owes the other 8 tokens, so the next message waits
    for them instead of 10 recipients leaving every 2 seconds (5/s)."""
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(rate=1.0, burst=2), inbox=Limit())
    submission = _submission(server, limits)
    await _submit(submission, sender, _rcpts(10, "a"))
    clock.advance(2.0)
    with pytest.raises(SendRateLimited) as refused:
        await _submit(submission, sender, _rcpts(10, "b"))
    # 2 - 10 + 2 = -6 tokens: a full-bucket start (2 tokens) is 8 seconds away.
    assert refused.value.retry_after_s == pytest.approx(8.0)
    with pytest.raises(SendRateLimited) as early:  # the RCPT look agrees
        await submission.check_recipients(sender, ["c@remote.example"])
    assert early.value.retry_after_s == pytest.approx(7.0)
    clock.advance(7.0)
    await _submit(submission, sender, ["c@remote.example"])
    clock.advance(10.0)  # the bucket is full again (never above the burst)
    await _submit(submission, sender, _rcpts(10, "d"))
    rows = await server.core.db.run_read("t.buckets", limit_store.buckets_of,
                                         sender.org_id, sender.inbox_id)
    assert rows["organization"]["tokens"] == pytest.approx(-8.0)


@pytest_twisted.ensureDeferred
async def test_a_refused_big_message_spends_nothing_and_says_how_long(server):
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(rate=0.5, burst=4, daily=30),
                        inbox=Limit())
    submission = _submission(server, limits)
    await _submit(submission, sender, ["a@remote.example"])  # 3 tokens left
    with pytest.raises(SendRateLimited) as refused:
        await _submit(submission, sender, _rcpts(8, "b"))  # needs a full bucket (4)
    assert refused.value.retry_after_s == pytest.approx(2.0)
    with pytest.raises(DailyQuotaExceeded):  # more than a whole day: never
        await _submit(submission, sender, _rcpts(31, "c"))
    rows = await server.core.db.run_read("t.buckets", limit_store.buckets_of,
                                         sender.org_id, sender.inbox_id)
    assert rows["organization"]["tokens"] == pytest.approx(3.0)
    assert rows["organization"]["day_count"] == 1
    assert await limits.reserve(sender.org_id, sender.inbox_id, 0) is None
    assert await limits.reserve(sender.org_id, sender.inbox_id, -5) is None


@pytest_twisted.ensureDeferred
async def test_a_reservation_given_back_after_midnight_leaves_the_new_day_alone(server):
    """A send reserved at 23:59:59 UTC that fails after midnight gives back its tokens,
    but not to the new day's count (which never held it)."""
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 23, 59, 59, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(daily=5), inbox=Limit(daily=5))
    late = await limits.reserve(sender.org_id, sender.inbox_id, 3)
    assert late is not None
    clock.advance(2.0)  # 00:00:01, the next UTC day
    submission = _submission(server, limits)
    await _submit(submission, sender, ["a@remote.example"])
    await late.give_back()
    rows = await server.core.db.run_read("t.buckets", limit_store.buckets_of,
                                         sender.org_id, sender.inbox_id)
    for scope in ("organization", "inbox"):
        assert rows[scope]["day"].isoformat() == "2030-03-02"
        assert rows[scope]["day_count"] == 1, (scope, rows[scope])
    await _submit(submission, sender, _rcpts(4, "b"))  # the rest of the new day
    with pytest.raises(DailyQuotaExceeded):
        await _submit(submission, sender, ["c@remote.example"])
