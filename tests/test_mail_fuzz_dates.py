"""Date fields PostgreSQL cannot store or psycopg2 cannot read back, found by fuzzing
the ingest analysis (tests/mail_fuzz.py).

Why: ``Date: ... +2359`` is a valid RFC 5322 offset that PostgreSQL refuses ("time zone
displacement out of range", the whole delivery failed), and ``31 Dec 9999 23:59 -0100``
is year 10000 in UTC, which PostgreSQL stores but no read of the mailbox could load.
Real server, real PostgreSQL, real HTTP API.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import pytest_twisted

from agentpost.core.ingest import _analyse_indexed


@pytest.mark.parametrize(("date", "instant"), [
    ("Wed, 1 Jan 2020 00:00:00 +2359", datetime(2019, 12, 31, 0, 1, tzinfo=UTC)),
    ("Wed, 1 Jan 2020 00:00:00 -1600", datetime(2020, 1, 1, 16, 0, tzinfo=UTC)),
    ("Fri, 31 Dec 9999 23:59:59 -0100", None),
    ("Wed, 1 Jan 2020 00:00:00 +1559", datetime(2019, 12, 31, 8, 1, tzinfo=UTC)),
])
def test_sent_at_is_storable(date: str, instant: datetime | None) -> None:
    parsed, _, index = _analyse_indexed(f"Date: {date}\r\nSubject: d\r\n\r\nx".encode())
    assert parsed.sent_at == instant  # the same instant (or none when out of range)
    if parsed.sent_at is not None:
        offset = parsed.sent_at.utcoffset()
        assert offset is not None and abs(offset.total_seconds()) < 16 * 3600
        assert index["sent_date"] == parsed.sent_at.date()


@pytest_twisted.ensureDeferred
async def test_out_of_range_dates_are_delivered_and_listed(server):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "dates"}, key=key)).json
    ids = []
    for date in ("Wed, 1 Jan 2020 00:00:00 +2359", "Fri, 31 Dec 9999 23:59:59 -0100"):
        raw = (f"From: a@example.com\r\nTo: {inbox['email']}\r\nDate: {date}\r\n"
               f"Subject: {date}\r\n\r\nbody\r\n").encode()
        [stored] = await server.deliver(raw, [inbox["email"]])
        got = await server.api.get(f"/api/v1/messages/{stored.message_id}", key=key)
        assert got.status == 200
        ids.append(stored.message_id)
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    assert listed.status == 200
    assert {m["id"] for m in listed.json["data"]} >= set(ids)
