"""Send rate limits and daily quotas: token buckets and day counters in PostgreSQL,
shared by every process, charged by one statement just before the transaction that
stores and queues a message (and given back if that fails).

Over SMTP submission (smtplib over STARTTLS, as tests/test_smtp_submission.py): the
first sends pass, a send the bucket cannot cover is refused ``451 4.7.0`` at the end
of DATA with nothing stored or queued, and once the bucket is empty RCPT is refused
too. The refill and the day's rollover run on a ``task.Clock``; two Submission cores
with their own database pools (two processes, as far as PostgreSQL can tell) share one
bucket and never overspend it.
"""

from __future__ import annotations

import io
import smtplib
import ssl
from datetime import UTC, datetime

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from agentpost.auth.cred import build_portal
from agentpost.config.loader import ConfigError
from agentpost.core.context import RequestContext
from agentpost.core.ingest import Ingest
from agentpost.core.mailbox_logins import MailboxLogins
from agentpost.core.send_limits import Limit, SendLimits
from agentpost.core.submission import Sender, Submission
from agentpost.http.errors import status_for
from agentpost.model.errors import DailyQuotaExceeded, SendRateLimited
from agentpost.outbound.queue import RetryPolicy
from agentpost.smtp.replies import reply_for_error
from agentpost.storage.database import Database
from tests.conftest import _DEV_TLS, make_config, start_server
from tests.helpers import query

MESSAGE = ("From: {frm}\r\nTo: someone@remote.example\r\nSubject: limits\r\n"
           "Date: Sun, 29 Nov 2026 07:00:00 +0000\r\n\r\nHello.\r\n")


def _dsn(server) -> str:
    return server.service.config.database.url


@pytest_twisted.async_yield_fixture
async def limited(db_dsn, openapi_checker, tmp_path):
    """A server whose organizations may send 3 messages at once, with a refill so slow
    (one token per 10 000 s) that no test sees it."""
    config = make_config(db_dsn, outbound={"log_dir": str(tmp_path / "out")},
                         send_limits={"org_rate": 0.0001, "org_burst": 3})
    running = await start_server(config, openapi_checker)
    yield running
    await running.service.stopService()


async def _inbox_and_key(server, username="sender", key=None):
    """An inbox and a messages:send key for it (a new organization unless ``key``)."""
    if key is None:
        _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": username},
                                   key=key)).json
    made = await server.api.post("/api/v1/api-keys",
                                 {"name": "smtp", "scopes": ["messages:send"]}, key=key)
    return inbox, made.json["key"], key


def _session(port: int, user: str, key: str, sends: list[list[str]]):
    """Send one message per entry of ``sends`` (its recipients) in one session; per
    message the RCPT replies and the DATA reply (None when no RCPT was accepted)."""
    ctx = ssl.create_default_context(cafile=_DEV_TLS["ca"])
    out = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.starttls(context=ctx)
        smtp.ehlo()
        smtp.login(user, key)
        for rcpts in sends:
            assert smtp.mail(user)[0] == 250
            replies = [smtp.rcpt(r) for r in rcpts]
            data = None
            if any(code == 250 for code, _ in replies):
                data = smtp.data(MESSAGE.format(frm=user).encode())
            else:
                smtp.rset()
            out.append((replies, data))
    return out


@pytest_twisted.ensureDeferred
async def test_submission_sends_pass_until_the_bucket_is_empty_then_451_4_7_0(limited):
    inbox, key, _ = await _inbox_and_key(limited)
    user = inbox["email"]
    one, two = ["a@remote.example"], ["b@remote.example", "c@remote.example"]
    results = await deferToThread(_session, limited.submission_port, user, key,
                                  [one, one, two, one, one])
    (_, d1), (_, d2), (r3, d3), (_, d4), (r5, d5) = results
    assert d1[0] == 250 and d2[0] == 250  # 2 of 3 tokens spent
    # One token left: RCPT sees a non-empty bucket, the charge at the end needs two.
    assert [code for code, _ in r3] == [250, 250]
    assert d3[0] == 451 and d3[1].startswith(b"4.7.0"), d3
    assert d4[0] == 250  # the refused message consumed nothing: the last token is here
    # Now the bucket is empty: refused early, at RCPT.
    assert r5[0][0] == 451 and r5[0][1].startswith(b"4.7.0") and d5 is None
    sent = query(_dsn(limited), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                 (inbox["id"],))
    queued = query(_dsn(limited), "SELECT count(*) FROM outbound_queue WHERE inbox_id = %s",
                   (inbox["id"],))
    assert sent == [(3,)] and queued == [(3,)]


@pytest_twisted.ensureDeferred
async def test_the_organization_bucket_is_shared_by_its_inboxes_not_by_others(limited):
    first, key1, owner = await _inbox_and_key(limited, "first")
    second, key2, _ = await _inbox_and_key(limited, "second", key=owner)
    stranger, key3, _ = await _inbox_and_key(limited, "stranger")
    three = [["x@remote.example"]] * 3
    assert all(d[0] == 250 for _, d in await deferToThread(
        _session, limited.submission_port, first["email"], key1, three))
    [(rcpt, data)] = await deferToThread(_session, limited.submission_port,
                                         second["email"], key2, [["y@remote.example"]])
    assert rcpt[0][0] == 451 and data is None
    assert all(d[0] == 250 for _, d in await deferToThread(
        _session, limited.submission_port, stranger["email"], key3, three))


@pytest_twisted.ensureDeferred
async def test_the_send_api_answers_429_with_retry_after_and_stores_nothing(limited):
    inbox, _, owner = await _inbox_and_key(limited)
    path = f"/api/v1/inboxes/{inbox['id']}/messages"
    body = {"to": ["a@remote.example", "b@remote.example", "c@remote.example"],
            "subject": "three", "text_body": "Hello."}
    assert (await limited.api.post(path, body, key=owner)).status == 201
    refused = await limited.api.post(path, {**body, "to": ["d@remote.example"]}, key=owner)
    assert refused.status == 429, refused
    error = refused.json["error"]
    assert error["type"] == "rate_limited" and error["scope"] == "organization"
    assert int(refused.headers["retry-after"]) >= 9000  # one token per 10 000 s
    stored = query(_dsn(limited), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                   (inbox["id"],))
    assert stored == [(1,)]


# ----------------------------------------------------------------------------- core level


async def _sender(server, username="sender", key=None) -> tuple[Sender, str]:
    inbox, send_key, owner = await _inbox_and_key(server, username, key)
    core = server.core
    logins = MailboxLogins(build_portal(core.db), core.db, core.audit, core.login_guard)
    principal, row = await logins.authenticate(
        inbox["email"], send_key, "127.0.0.1", protocol="smtp", scope="messages:send",
        action="smtp.auth")
    return Sender.of(principal, row), owner


def _submission(server, limits: SendLimits, db: Database | None = None) -> Submission:
    core = server.core
    ingest = core.ingest if db is None else Ingest(db, core.blobs, reactor)
    return Submission(db or core.db, ingest, reactor, RetryPolicy(), "mx.test",
                      limits=limits)


async def _submit(submission: Submission, sender: Sender, recipients: list[str]):
    return await submission.submit(
        sender, sender.address, recipients,
        io.BytesIO(MESSAGE.format(frm=sender.address).encode()),
        RequestContext("req_test", "127.0.0.1", "test.send"))


def _clock_at(when: datetime) -> task.Clock:
    clock = task.Clock()
    clock.advance(when.timestamp())
    return clock


@pytest_twisted.ensureDeferred
async def test_the_bucket_refills_with_the_clock_and_says_how_long_to_wait(server):
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(rate=0.5, burst=2), inbox=Limit())
    submission = _submission(server, limits)
    await _submit(submission, sender, ["a@remote.example", "b@remote.example"])
    with pytest.raises(SendRateLimited) as refused:
        await _submit(submission, sender, ["c@remote.example"])
    assert refused.value.retry_after_s == pytest.approx(2.0)  # one token at 0.5/s
    assert refused.value.details == {"scope": "organization"}
    with pytest.raises(SendRateLimited):
        await submission.check_recipients(sender, ["c@remote.example"])  # RCPT look
    clock.advance(1.0)
    with pytest.raises(SendRateLimited) as again:
        await _submit(submission, sender, ["c@remote.example"])
    assert again.value.retry_after_s == pytest.approx(1.0)
    clock.advance(1.0)
    await _submit(submission, sender, ["c@remote.example"])
    clock.advance(3600.0)  # a long pause refills to the burst, not beyond
    await _submit(submission, sender, ["d@remote.example", "e@remote.example"])
    with pytest.raises(SendRateLimited):
        await _submit(submission, sender, ["f@remote.example"])


@pytest_twisted.ensureDeferred
async def test_the_inbox_limit_holds_one_inbox_back_and_not_its_neighbour(server):
    sender, owner = await _sender(server, "busy")
    neighbour, _ = await _sender(server, "quiet", key=owner)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(rate=100.0, burst=100),
                        inbox=Limit(rate=1.0, burst=1))
    submission = _submission(server, limits)
    await _submit(submission, sender, ["a@remote.example"])
    with pytest.raises(SendRateLimited) as refused:
        await _submit(submission, sender, ["b@remote.example"])
    assert refused.value.details == {"scope": "inbox"}
    await _submit(submission, neighbour, ["b@remote.example"])


@pytest_twisted.ensureDeferred
async def test_the_daily_quota_counts_recipients_and_resets_at_midnight_utc(server):
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 23, 0, tzinfo=UTC))
    limits = SendLimits(server.core.db, clock, org=Limit(daily=5), inbox=Limit())
    submission = _submission(server, limits)
    await _submit(submission, sender, ["a@remote.example", "b@remote.example",
                                       "c@remote.example"])
    await _submit(submission, sender, ["d@remote.example", "e@remote.example"])
    with pytest.raises(DailyQuotaExceeded) as refused:
        await _submit(submission, sender, ["f@remote.example"])
    assert refused.value.type == "daily_quota_exceeded"
    assert refused.value.retry_after_s == pytest.approx(3600.0)
    with pytest.raises(DailyQuotaExceeded):  # a message bigger than a whole day
        await _submit(submission, sender, [f"r{i}@remote.example" for i in range(6)])
    clock.advance(3600.0)
    await _submit(submission, sender, ["f@remote.example"])
    stored = query(_dsn(server), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                   (sender.inbox_id,))
    assert stored == [(3,)]


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_bucket_and_never_overspend_it(server):
    """Two Submission cores with their own database pools (what two AgentPost processes
    are to PostgreSQL) send 16 messages at once against a bucket of 10."""
    sender, _ = await _sender(server)
    clock = _clock_at(datetime(2030, 3, 1, 12, 0, tzinfo=UTC))
    url = _dsn(server)
    dbs = [Database(url, clock=reactor, reactor=reactor, pool_size=4) for _ in range(2)]
    try:
        cores = [_submission(server, SendLimits(db, clock, org=Limit(rate=0.001, burst=10),
                                                inbox=Limit(daily=12)), db)
                 for db in dbs]
        attempts = [defer.ensureDeferred(_submit(cores[i % 2], sender,
                                                 [f"r{i}@remote.example"]))
                    for i in range(16)]
        results = await defer.DeferredList(attempts, consumeErrors=True)
    finally:
        for db in dbs:
            await db.close()
    passed = [r for ok, r in results if ok]
    refused = [r.value for ok, r in results if not ok]
    assert len(passed) == 10 and len(refused) == 6
    assert all(isinstance(e, SendRateLimited) for e in refused), refused
    stored = query(url, "SELECT count(*) FROM outbound_queue WHERE inbox_id = %s",
                   (sender.inbox_id,))
    assert stored == [(10,)]
    counted = query(url, "SELECT day_count FROM send_limits_inbox WHERE inbox_id = %s",
                    (sender.inbox_id,))
    assert counted == [(10,)]


# ----------------------------------------------------------------------------- mappings


def test_refusals_map_to_429_and_451_4_7_0_with_their_types():
    rate, day = SendRateLimited(2.5, scope="inbox"), DailyQuotaExceeded(60.0)
    assert status_for(rate) == 429 and status_for(day) == 429
    assert (rate.type, day.type) == ("rate_limited", "daily_quota_exceeded")
    for exc in (rate, day):
        reply = reply_for_error(exc)
        assert (reply.code, reply.enhanced) == (451, "4.7.0")


@pytest.mark.parametrize("values", [{"org_rate": 1.0}, {"inbox_rate": 2.0, "inbox_burst": 0},
                                    {"daily_quota": -1}, {"org_burst": -5}])
def test_configuration_refuses_impossible_limits(db_dsn, values):
    with pytest.raises(ConfigError):
        make_config(db_dsn, send_limits=values)
