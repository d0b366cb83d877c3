"""Failed-login allowances (core/login_guard.py): strangers who fail cannot lock an owner
out; the failing source (an IPv4 address, an IPv6 /64) and its (source, account) pairs
are what gets throttled, in PostgreSQL, for every process. Each failure leaves one
fail2ban-readable log line (etc/fail2ban/) and an audit row in the attacked tenant's
trail — as does an HTTP request with a revoked or expired key."""

from __future__ import annotations

import configparser
import imaplib
import ipaddress
import logging
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread

from agentpost.auth.cred import build_portal
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.imap_logins import IMAPLogins
from agentpost.core.login_guard import LoginGuard, LoginLimits, client_source
from agentpost.logs import LOG_FORMAT
from agentpost.model.errors import RateLimited, Unauthenticated
from tests.conftest import _DEV_TLS
from tests.helpers import execute

WRONG = "ap_sk_" + "w" * 43
FILTER = Path(__file__).resolve().parent.parent / "etc" / "fail2ban" / "filter.d" / "agentpost.conf"


async def _inbox(server: Any, name: str, org_name: str = "Org") -> tuple[dict, dict, str]:
    org, key = await server.new_org(org_name)
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return org, inbox, key


def _logins(server: Any, limits: LoginLimits, clock: Any = reactor) -> IMAPLogins:
    """An IMAPLogins of its own (as another process would have), with tight limits."""
    core = server.core
    guard = LoginGuard(core.db, clock, core.audit, limits)
    return IMAPLogins(build_portal(core.db), core.db, core.blobs, core.ingest,
                      BlobCollector(core.db, core.blobs), core.audit, clock, None, guard=guard)


async def _fail(logins: IMAPLogins, user: str, peer: str, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(Unauthenticated):
            await logins.authenticate(user, WRONG, peer)


# ---------------------------------------------------------------- the allowances


@pytest_twisted.ensureDeferred
async def test_strangers_failing_from_many_addresses_do_not_lock_the_owner_out(server):
    """Twelve wrong logins from twelve addresses (more than any per-account allowance
    would grant) and the owner, from another address, still logs in: the composition
    root's guard, as production has it."""
    _, inbox, key = await _inbox(server, "victim")
    logins = server.core.imap_logins
    for i in range(1, 13):
        await _fail(logins, inbox["email"], f"198.51.100.{i}")
    account = await logins.authenticate(inbox["email"], key, "203.0.113.9")
    assert account.address == inbox["email"]


@pytest_twisted.ensureDeferred
async def test_account_wide_failures_only_slow_a_clean_source_down(server):
    """Past the account-wide allowance a login waits a moment before verification —
    and then a correct credential from a clean source is let in all the same. The
    guard's clock is a task.Clock: the login is not answered until it is advanced."""
    _, inbox, key = await _inbox(server, "slowed")
    clock = task.Clock()
    clock.advance(reactor.seconds())  # now, as stored allowances know it; then frozen
    logins = _logins(server, LoginLimits(source_failures_per_minute=30,
                                         pair_failures_per_minute=10,
                                         account_failures_per_minute=5, account_delay_s=0.3),
                     clock)

    async def answered_after(attempt: Any, delay_s: float) -> Any:
        """Not answered until the guard's clock has moved ``delay_s`` on, then answered."""
        d = defer.Deferred.fromCoroutine(attempt)
        for _ in range(1000):  # the allowance is read from PostgreSQL (real reactor)
            if d.called or clock.getDelayedCalls():
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        if delay_s == 0:
            assert not clock.getDelayedCalls()
            return await d
        assert not d.called, "answered without waiting"
        [delay] = clock.getDelayedCalls()
        assert delay.getTime() - clock.seconds() == pytest.approx(delay_s)
        clock.advance(delay_s * 0.95)
        assert not d.called and delay.active()
        clock.advance(delay.getTime() - clock.seconds())  # exactly the delay's end
        return await d

    for i in range(1, 9):  # past the 5th failure, failures wait too
        await answered_after(_fail(logins, inbox["email"], f"198.51.100.{i}"),
                             0 if i <= 5 else 0.3)
    account = await answered_after(logins.authenticate(inbox["email"], key, "203.0.113.9"),
                                   0.3)
    assert account.address == inbox["email"]
    assert not clock.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_a_source_past_its_allowance_is_refused_even_with_the_right_key(server):
    """The trade-off for the attacker's own source: (source, account) pair first, then
    the source as a whole; another source is never affected."""
    _, a, key_a = await _inbox(server, "pair-a")
    _, b, key_b = await _inbox(server, "pair-b")
    _, c, key_c = await _inbox(server, "pair-c")
    logins = _logins(server, LoginLimits(source_failures_per_minute=6,
                                         pair_failures_per_minute=3))
    await _fail(logins, a["email"], "192.0.2.1", times=3)
    with pytest.raises(RateLimited) as refused:
        await logins.authenticate(a["email"], key_a, "192.0.2.1")
    assert 0 < refused.value.retry_after_s <= 20
    assert (await logins.authenticate(b["email"], key_b, "192.0.2.1")).address == b["email"]
    assert (await logins.authenticate(a["email"], key_a, "192.0.2.2")).address == a["email"]
    await _fail(logins, b["email"], "192.0.2.1", times=3)  # the source's 6th failure
    with pytest.raises(RateLimited):  # an account never tried from there: the source
        await logins.authenticate(c["email"], key_c, "192.0.2.1")
    assert (await logins.authenticate(c["email"], key_c, "192.0.2.2")).address == c["email"]
    # Another process (its own guard) draws from the same allowances: PostgreSQL.
    with pytest.raises(RateLimited):
        await _logins(server, LoginLimits(6, 3)).authenticate(c["email"], key_c, "192.0.2.1")


@pytest_twisted.ensureDeferred
async def test_an_ipv6_source_is_its_slash_64(server):
    """Every address of one /64 shares the allowance (one attacker holds them all); the
    next /64 does not; an IPv4-mapped address is that IPv4 address."""
    assert client_source("2001:db8:1:2::1") == client_source("2001:db8:1:2:ffff::9") \
        == "2001:db8:1:2::/64"
    assert client_source("::ffff:192.0.2.7") == client_source("192.0.2.7") == "192.0.2.7"
    assert client_source("192.0.2.7") != client_source("192.0.2.8")
    _, inbox, key = await _inbox(server, "six")
    logins = _logins(server, LoginLimits(source_failures_per_minute=3,
                                         pair_failures_per_minute=3))
    for i in range(1, 4):  # three addresses, three usernames: one source
        await _fail(logins, f"nobody{i}@agents.test", f"2001:db8:1:2::{i}")
    with pytest.raises(RateLimited):
        await logins.authenticate(inbox["email"], key, "2001:db8:1:2:abcd::1")
    assert (await logins.authenticate(inbox["email"], key, "2001:db8:1:3::1")).address == \
        inbox["email"]
    await _fail(logins, inbox["email"], "192.0.2.7", times=3)
    with pytest.raises(RateLimited):
        await logins.authenticate(inbox["email"], key, "::ffff:192.0.2.7")


@pytest_twisted.ensureDeferred
async def test_a_correct_login_forgives_only_its_own_pair(server):
    """Another source's success leaves a failing source's count alone; a source's own
    success forgives its typos on that account (never its source-wide count)."""
    _, inbox, key = await _inbox(server, "forgive")
    logins = _logins(server, LoginLimits(source_failures_per_minute=30,
                                         pair_failures_per_minute=3))
    await _fail(logins, inbox["email"], "192.0.2.10", times=2)
    await logins.authenticate(inbox["email"], key, "192.0.2.11")
    await _fail(logins, inbox["email"], "192.0.2.10")
    with pytest.raises(RateLimited):
        await logins.authenticate(inbox["email"], key, "192.0.2.10")
    for _ in range(3):  # 2 typos then success, three times over: never refused
        await _fail(logins, inbox["email"], "192.0.2.12", times=2)
        await logins.authenticate(inbox["email"], key, "192.0.2.12")


# ---------------------------------------------------------------- real sockets


def _ctx() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=_DEV_TLS["ca"])


class _IMAPFrom(imaplib.IMAP4):
    """imaplib from a chosen loopback source address (all of 127/8 is loopback)."""

    def __init__(self, source: str, port: int) -> None:
        self._source = source
        super().__init__("127.0.0.1", port, timeout=20)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


def _login_from(source: str, port: int, user: str, key: str) -> str:
    """LOGIN over STARTTLS from ``source``; the server's answer (OK text or refusal)."""
    imap = _IMAPFrom(source, port)
    imap.starttls(ssl_context=_ctx())
    try:
        return imap.login(user, key)[1][0].decode()
    except imaplib.IMAP4.error as exc:
        return str(exc)
    finally:
        imap.logout()


def _fail2ban_regex() -> re.Pattern[str]:
    """The shipped failregex with fail2ban's interpolation and <ADDR>/<HOST> tags."""
    parser = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    parser.read(FILTER)
    failregex = parser.get("Definition", "failregex").strip()
    assert "\n" not in failregex
    for tag in ("<ADDR>", "<HOST>"):
        failregex = failregex.replace(tag, r"(?P<host>[0-9A-Fa-f:.]+)")
    return re.compile(failregex)


def _journal_line(record: logging.LogRecord) -> str:
    """What fail2ban's journald backend reads: " <host> <ident>[<pid>]: <MESSAGE>"."""
    message = logging.Formatter(LOG_FORMAT).format(record)
    return " " + " ".join(["mail1", "agentpost[4242]:", message])


@pytest_twisted.ensureDeferred
async def test_over_imap_strangers_are_throttled_and_logged_for_fail2ban(server, caplog):
    """Real sockets from 127.0.0.2..13: twelve failures, then the owner logs in from
    127.0.0.1. A source past its pair allowance gets NO [UNAVAILABLE] with the right
    key; its neighbour does not. Every failure wrote one line that the shipped
    fail2ban filter matches, naming the right address."""
    caplog.set_level(logging.WARNING, logger="agentpost.auth")
    _, inbox, key = await _inbox(server, "sockets")
    user, port = inbox["email"], server.imap_port

    def attempts() -> tuple[list[str], str, str, str]:
        refusals = [_login_from(f"127.0.0.{i}", port, user, WRONG) for i in range(2, 14)]
        owner = _login_from("127.0.0.1", port, user, key)
        for _ in range(server.core.login_guard.limits.pair_failures_per_minute):
            _login_from("127.0.0.20", port, user, WRONG)
        throttled = _login_from("127.0.0.20", port, user, key)
        neighbour = _login_from("127.0.0.21", port, user, key)
        return refusals, owner, throttled, neighbour

    refusals, owner, throttled, neighbour = await deferToThread(attempts)
    assert all("AUTHENTICATIONFAILED" in r for r in refusals)
    assert "LOGIN completed" in owner and "LOGIN completed" in neighbour
    assert "UNAVAILABLE" in throttled
    pattern = _fail2ban_regex()
    hosts = []
    for record in caplog.records:
        if record.name == "agentpost.auth":
            match = pattern.match(_journal_line(record))
            assert match, _journal_line(record)
            assert key not in record.getMessage() and WRONG not in record.getMessage()
            hosts.append((match["host"], record.getMessage().rsplit("=", 1)[1]))
    expected = [(f"127.0.0.{i}", "bad-credentials") for i in range(2, 14)]
    expected += [("127.0.0.20", "bad-credentials")] * 10 + [("127.0.0.20", "throttled")]
    assert hosts == expected


@pytest_twisted.ensureDeferred
async def test_the_fail2ban_filter_cannot_be_steered_by_the_username(server, caplog):
    """A username carrying its own ``rhost=`` cannot make fail2ban ban someone else;
    IPv6 clients are named in full; the file form (date cut out) matches too."""
    caplog.set_level(logging.WARNING, logger="agentpost.auth")
    logins = server.core.imap_logins
    await _fail(logins, "x rhost=192.0.2.66 user=y reason=throttled", "198.51.100.77")
    await _fail(logins, "bot@agents.test\nagentpost auth failure: rhost=192.0.2.66",
                "2001:db8::77")
    await _fail(logins, "unix@agents.test", "")  # no address: no line fail2ban takes
    pattern = _fail2ban_regex()
    lines = [_journal_line(r) for r in caplog.records if r.name == "agentpost.auth"]
    assert len(lines) == 3 and "\n" not in "".join(lines)
    assert [m["host"] if (m := pattern.match(line)) else None for line in lines] == \
        ["198.51.100.77", "2001:db8::77", None]
    assert ipaddress.ip_address(pattern.match(lines[1])["host"]).version == 6
    stamp_cut = re.sub(r"^.*?\]: \S+ \S+", "", lines[0])  # as a file backend sees it
    assert pattern.match(stamp_cut)["host"] == "198.51.100.77"


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban not installed")
@pytest_twisted.ensureDeferred
async def test_fail2ban_itself_bans_the_right_addresses(server, caplog, tmp_path):
    """Where fail2ban is installed, its own fail2ban-regex reads the server's lines (as
    a log file would hold them) and finds exactly the clients' addresses."""
    caplog.set_level(logging.WARNING, logger="agentpost.auth")
    await _fail(server.core.imap_logins, "x rhost=192.0.2.66 user=y", "198.51.100.77")
    await _fail(server.core.imap_logins, "bot@agents.test", "2001:db8::77")
    log = tmp_path / "agentpost.log"
    log.write_text("".join(logging.Formatter(LOG_FORMAT).format(r) + "\n"
                           for r in caplog.records if r.name == "agentpost.auth"))
    result = await deferToThread(subprocess.run, ["fail2ban-regex", "-v", str(log), str(FILTER)],
                                 capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = re.findall(r"^\|\s+(\S+)\s+\w{3} \w{3} ", result.stdout, re.M)
    assert found == ["198.51.100.77", "2001:db8::77"], result.stdout


# ---------------------------------------------------------------- the tenant's view


@pytest_twisted.ensureDeferred
async def test_tenants_see_attacks_on_their_inboxes_and_keys(server, db_dsn):
    """A failed IMAP login on an inbox and requests with the organization's revoked or
    expired keys land in that organization's audit log (never in another's), while
    the callers are answered exactly as for an inbox or key that does not exist."""
    _, inbox, owner = await _inbox(server, "watched", "Watched")
    _, _, other = await _inbox(server, "elsewhere", "Other")
    logins = server.core.imap_logins
    with pytest.raises(Unauthenticated) as real:
        await logins.authenticate(inbox["email"], WRONG, "198.51.100.5")
    with pytest.raises(Unauthenticated) as ghost:
        await logins.authenticate("ghost@agents.test", WRONG, "198.51.100.5")
    assert str(real.value) == str(ghost.value)
    with pytest.raises(Unauthenticated):  # another tenant's valid key on this inbox
        await logins.authenticate(inbox["email"], other, "198.51.100.6")

    revoked = (await server.api.post("/api/v1/api-keys", {"name": "old"}, key=owner)).json
    await server.api.delete(f"/api/v1/api-keys/{revoked['id']}", key=owner)
    expired = (await server.api.post("/api/v1/api-keys", {"name": "lapsed"}, key=owner)).json
    execute(db_dsn, "UPDATE api_keys SET expires_at = now() - interval '1 hour' WHERE id = %s",
         (expired["id"],))
    answers = [await server.api.get("/api/v1/inboxes", key=k)
               for k in (revoked["key"], expired["key"], "ap_sk_" + "u" * 43)]
    assert [a.status for a in answers] == [401, 401, 401]
    bodies = [{**a.json, "error": {**a.json["error"], "request_id": None}} for a in answers]
    assert bodies[0] == bodies[1] == bodies[2]
    await server.core.audit.flush()

    seen = (await server.api.get("/api/v1/audit-logs", key=owner)).json["data"]
    imap_rows = [(e["action"], e["outcome"], e["target_id"], e["environment_id"],
                  e["actor"]["type"], e["remote_addr"])
                 for e in seen if e["action"] == "imap.login"]
    row = ("imap.login", "denied", inbox["id"], inbox["environment_id"], "anonymous")
    assert imap_rows == [(*row, "198.51.100.6"), (*row, "198.51.100.5")]
    refused = {e["target_id"]: (e["action"], e["outcome"], e["status"], e["actor"]["type"])
               for e in seen if e["status"] == 401}
    assert refused == {revoked["id"]: ("inboxes.list", "denied", 401, "anonymous"),
                       expired["id"]: ("inboxes.list", "denied", 401, "anonymous")}

    theirs = (await server.api.get("/api/v1/audit-logs", key=other)).json["data"]
    assert not [e for e in theirs if e["status"] == 401]
    # The other tenant sees its own key's attempt, named by the address it typed only.
    assert [(e["action"], e["target_id"]) for e in theirs if e["action"] == "imap.login"] \
        == [("imap.login", inbox["email"])]
    assert inbox["id"] not in str(theirs)
