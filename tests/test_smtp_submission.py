"""SMTP submission end to end: real sockets, real clients (smtplib, swaks, msmtp), the
real store, the real queue and the log transport's .eml files.

Codes: before TLS no AUTH in EHLO, ``530 5.7.0`` for MAIL, ``538 5.7.11`` for AUTH; a
refused key ``535 5.7.8``; MAIL FROM not the inbox ``553 5.7.1``; From: header not the
inbox ``550 5.7.1``; ``send_paused`` and send-filter blocks ``550 5.7.1`` at RCPT; a key
revoked mid-session ``421 4.7.0``; database trouble ``451 4.3.0``.
"""

from __future__ import annotations

import base64
import imaplib
import logging
import shutil
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS, make_config, start_server
from tests.helpers import query

SIMPLE = (b"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\n"
          b"Date: Sun, 29 Nov 2026 07:00:00 +0000\r\nMessage-ID: <{mid}@client.test>\r\n"
          b"\r\nHello from submission.\r\n")


def _msg(frm: str, to: str, subject: str = "Hi", mid: str = "m1") -> bytes:
    return (SIMPLE.replace(b"{frm}", frm.encode()).replace(b"{to}", to.encode())
            .replace(b"{subject}", subject.encode()).replace(b"{mid}", mid.encode()))


def _ctx() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=_DEV_TLS["ca"])


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbound"


@pytest_twisted.async_yield_fixture
async def sub(db_dsn, openapi_checker, outbox):
    """A server whose log transport writes .eml files, polling the queue often."""
    config = make_config(db_dsn, outbound={"log_dir": str(outbox), "poll_interval": "200ms"})
    running = await start_server(config, openapi_checker)
    yield running
    await running.service.stopService()


async def _setup(server, scopes=("messages:send", "messages:read")):
    """An org with a sending inbox, a second (local) inbox, and a key with ``scopes``."""
    _, owner = await server.new_org()
    sender = (await server.api.post("/api/v1/inboxes", {"username": "sender"},
                                    key=owner)).json
    other = (await server.api.post("/api/v1/inboxes", {"username": "other"},
                                   key=owner)).json
    made = await server.api.post("/api/v1/api-keys", {"name": "smtp", "scopes": list(scopes)},
                                 key=owner)
    assert made.status == 201, made
    return owner, sender, other, made.json["id"], made.json["key"]


def _login(port: int, user: str, key: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)
    smtp.ehlo()
    smtp.starttls(context=_ctx())
    smtp.ehlo()
    smtp.login(user, key)
    return smtp


async def _wait_for(predicate, timeout_s: float = 15.0):
    from twisted.internet import reactor

    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await task.deferLater(reactor, 0.1, lambda: None)


def _dsn(server) -> str:
    return server.service.config.database.url


# ---------------------------------------------------------------------------- TLS and AUTH


@pytest_twisted.ensureDeferred
async def test_before_tls_no_auth_is_offered_and_mail_and_auth_are_refused(sub):
    def session():
        with smtplib.SMTP("127.0.0.1", sub.submission_port, timeout=30) as smtp:
            smtp.ehlo()
            features = dict(smtp.esmtp_features)
            mail = smtp.docmd("MAIL", "FROM:<a@agents.test>")
            auth = smtp.docmd("AUTH", "PLAIN " + _b64("\0a@agents.test\0x"))
            smtp.starttls(context=_ctx())
            smtp.ehlo()
            after = dict(smtp.esmtp_features)
            unauthenticated = smtp.docmd("MAIL", "FROM:<a@agents.test>")
            return features, mail, auth, after, unauthenticated

    features, mail, auth, after, unauthenticated = await deferToThread(session)
    assert "auth" not in features and "starttls" in features
    assert mail == (530, b"5.7.0 Must issue a STARTTLS command first")
    assert auth[0] == 538 and auth[1].startswith(b"5.7.11")
    assert after["auth"].split() == ["PLAIN", "LOGIN"] and "starttls" not in after
    assert unauthenticated[0] == 530 and unauthenticated[1].startswith(b"5.7.0")


@pytest_twisted.ensureDeferred
async def test_auth_login_exchange_cancel_and_auth_twice(sub):
    _, sender, _, _, key = await _setup(sub)

    def session():
        with smtplib.SMTP("127.0.0.1", sub.submission_port, timeout=30) as smtp:
            smtp.ehlo()
            smtp.starttls(context=_ctx())
            smtp.ehlo()
            cancel = [smtp.docmd("AUTH", "PLAIN"), smtp.docmd("*")]
            bad = smtp.docmd("AUTH", "PLAIN not-base64!")
            steps = [smtp.docmd("AUTH", "LOGIN"), smtp.docmd(_b64(sender["email"])),
                     smtp.docmd(_b64(key))]
            twice = smtp.docmd("AUTH", "LOGIN")
            return cancel, bad, steps, twice

    cancel, bad, steps, twice = await deferToThread(session)
    assert cancel == [(334, b""), (501, b"5.7.0 Authentication cancelled")]
    assert bad[0] == 501
    assert steps[0] == (334, b"VXNlcm5hbWU6") and steps[1] == (334, b"UGFzc3dvcmQ6")
    assert steps[2][0] == 235 and steps[2][1].startswith(b"2.7.0")
    assert twice[0] == 503 and twice[1].startswith(b"5.5.1")


@pytest_twisted.ensureDeferred
async def test_refused_keys_get_535_a_fail2ban_line_and_an_audit_row(sub, caplog):
    caplog.set_level(logging.WARNING, logger="agentpost.auth")
    owner, sender, _, _, key = await _setup(sub)
    read_only = (await sub.api.post("/api/v1/api-keys", {
        "name": "reader", "scopes": ["messages:read"]}, key=owner)).json["key"]
    revoked = (await sub.api.post("/api/v1/api-keys", {
        "name": "old", "scopes": ["messages:send"]}, key=owner)).json
    assert (await sub.api.delete(f"/api/v1/api-keys/{revoked['id']}", key=owner)).status == 200

    def attempt(password):
        with smtplib.SMTP_SSL("127.0.0.1", sub.submissions_port, context=_ctx(),
                              timeout=30) as smtp:
            smtp.ehlo()
            return smtp.docmd("AUTH", "PLAIN " + _b64(f"\0{sender['email']}\0{password}"))

    for password in ("ap_sk_wrong", read_only, revoked["key"]):
        code, text = await deferToThread(attempt, password)
        assert (code, text[:5]) == (535, b"5.7.8"), (password, code, text)
    assert (await deferToThread(attempt, key))[0] == 235
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("agentpost auth failure: protocol=smtp")]
    assert len(lines) == 3 and all("rhost=127.0.0.1" in line for line in lines), lines

    async def audited():
        return query(_dsn(sub), "SELECT outcome FROM audit_log WHERE action = 'smtp.auth' "
                     "ORDER BY outcome")
    rows = await _wait_for(lambda: defer.succeed(len(query(
        _dsn(sub), "SELECT 1 FROM audit_log WHERE action = 'smtp.auth'")) >= 4))
    assert rows
    outcomes = [r[0] for r in await audited()]
    assert outcomes.count("allowed") == 1 and outcomes.count("denied") == 3


@pytest_twisted.ensureDeferred
async def test_a_key_revoked_while_connected_ends_the_session_with_421(sub):
    owner, sender, _, key_id, key = await _setup(sub)
    smtp = await deferToThread(_login, sub.submission_port, sender["email"], key)
    try:
        assert (await deferToThread(smtp.noop))[0] == 250
        revoked = await sub.api.delete(f"/api/v1/api-keys/{key_id}", key=owner)
        assert revoked.status == 200

        def wait_for_421():
            sock = smtp.sock
            sock.settimeout(20)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data

        line = await deferToThread(wait_for_421)
        assert line.startswith(b"421 4.7.0"), line
    finally:
        smtp.close()


# ---------------------------------------------------------------------------- sending


@pytest_twisted.ensureDeferred
async def test_sent_copy_queue_row_eml_without_bcc_and_message_sent_event(sub, outbox):
    """smtplib STARTTLS + login: the Sent copy (API and IMAP) keeps Bcc and gains
    Message-ID/Date; what leaves through the log transport has no Bcc."""
    _, sender, _, _, key = await _setup(sub)
    raw = (f"From: Sender <{sender['email']}>\r\nTo: bob@remote.example\r\n"
           "Bcc: carol@remote.example\r\nX-SES-CONFIGURATION-SET: no-feedback\r\n"
           "x-ses-source-arn: arn:aws:ses:us-east-1:999:identity/other.example\r\n"
           "Subject: Submitted\r\n\r\nBody line.\r\n").encode()

    def send():
        with _login(sub.submission_port, sender["email"], key) as smtp:
            smtp.sendmail(sender["email"], ["bob@remote.example", "carol@remote.example"], raw)
            # sendmail does not return the final reply text; send a second one by hand
            smtp.mail(sender["email"])
            smtp.rcpt("bob@remote.example")
            return smtp.data(raw)

    code, text = await deferToThread(send)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as msg_"), text
    listed = (await sub.api.get(f"/api/v1/inboxes/{sender['id']}/messages", key=key)).json
    assert len(listed["data"]) == 2
    first = listed["data"][-1]
    detail = (await sub.api.get(f"/api/v1/messages/{first['id']}", key=key)).json
    assert detail["direction"] == "outbound" and detail["folder"] == "Sent"
    stored = (await sub.api.get(f"/api/v1/messages/{first['id']}/raw", key=key)).body
    assert b"\r\nBcc: carol@remote.example\r\n" in stored
    assert b"\r\nMessage-ID: <" in stored and b"\r\nDate: " in stored
    assert b"Return-Path:" not in stored and b"with ESMTPSA" in stored
    events = query(_dsn(sub), "SELECT type FROM events WHERE inbox_id = %s", (sender["id"],))
    assert [e[0] for e in events] == ["message.sent", "message.sent"]
    queued = query(_dsn(sub), "SELECT q.domain, array_agg(r.address ORDER BY r.address) "
                   "FROM outbound_queue q JOIN outbound_recipients r ON r.queue_id = q.id "
                   "WHERE q.message_id = %s GROUP BY q.domain", (first["id"],))
    assert queued == [("remote.example", ["bob@remote.example", "carol@remote.example"])]

    async def emls():
        return sorted(outbox.glob("*.eml")) if outbox.exists() else []
    files = await _wait_for(lambda: defer.ensureDeferred(_count(emls, 2)))
    assert files, "the log transport never wrote the messages"
    for path in await emls():
        data = path.read_bytes()
        assert b"Bcc:" not in data and b"\r\nMessage-ID: <" in data
        assert b"x-ses-" not in data.lower()  # SES control headers never leave
        assert b"X-AgentPost-Envelope-To: <bob@remote.example>" in data

    def imap_sent():
        imap = imaplib.IMAP4_SSL("127.0.0.1", sub.imaps_port, ssl_context=_ctx(), timeout=20)
        imap.login(sender["email"], key)
        status, data = imap.select("Sent", readonly=True)
        imap.logout()
        return status, data

    status, data = await deferToThread(imap_sent)
    assert status == "OK" and data == [b"2"]


async def _count(get, n):
    return len(await get()) >= n


@pytest_twisted.ensureDeferred
async def test_implicit_tls_auth_plain_initial_response_delivers_to_a_local_inbox(sub):
    _, sender, other, _, key = await _setup(sub)

    def send():
        with smtplib.SMTP_SSL("127.0.0.1", sub.submissions_port, context=_ctx(),
                              timeout=30) as smtp:
            smtp.ehlo()
            assert smtp.docmd("AUTH", "PLAIN " + _b64(f"\0{sender['email']}\0{key}"))[0] == 235
            return smtp.sendmail(sender["email"], [other["email"]],
                                 _msg(sender["email"], other["email"], "Local hop"))

    assert await deferToThread(send) == {}

    async def arrived():
        got = (await sub.api.get(f"/api/v1/inboxes/{other['id']}/messages", key=key)).json
        return got["data"]
    [msg] = await _wait_for(arrived)
    assert msg["subject"] == "Local hop" and msg["direction"] == "inbound"
    events = query(_dsn(sub), "SELECT type FROM events WHERE inbox_id = %s", (other["id"],))
    assert [e[0] for e in events] == ["message.received"]

    async def recorded():
        # the hand-off's outcome is recorded in its own transaction, after the local
        # delivery committed: the message can be listed a moment before it says "sent"
        rows = query(_dsn(sub), "SELECT status FROM outbound_recipients WHERE address = %s",
                     (other["email"],))
        return rows if rows != [("queued",)] and rows != [("sending",)] else None
    assert await _wait_for(recorded) == [("sent",)]


@pytest_twisted.ensureDeferred
async def test_sender_mismatches_are_refused_and_nothing_is_stored(sub):
    _, sender, _, _, key = await _setup(sub)

    def session():
        with _login(sub.submission_port, sender["email"], key) as smtp:
            envelope = smtp.docmd("MAIL", "FROM:<someone@agents.test>")
            smtp.rset()
            smtp.mail(sender["email"])
            smtp.rcpt("bob@remote.example")
            header = smtp.data(_msg("Boss <boss@agents.test>", "bob@remote.example"))
            return envelope, header

    envelope, header = await deferToThread(session)
    assert envelope[0] == 553 and envelope[1].startswith(b"5.7.1")
    assert header[0] == 550 and header[1].startswith(b"5.7.1")
    assert query(_dsn(sub), "SELECT count(*) FROM messages") == [(0,)]
    assert query(_dsn(sub), "SELECT count(*) FROM outbound_queue") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_send_paused_and_send_filter_rules_refuse_at_rcpt(sub):
    owner, sender, _, _, key = await _setup(sub)
    for rule in ({"match_type": "domain", "value": "blocked.example", "action": "block"},
                 {"match_type": "address", "value": "vip@blocked.example", "action": "allow"}):
        made = await sub.api.post("/api/v1/filter-rules", {
            "direction": "send", "inbox_id": sender["id"], **rule}, key=owner)
        assert made.status == 201, made

    def rcpts(addresses):
        with _login(sub.submission_port, sender["email"], key) as smtp:
            smtp.mail(sender["email"])
            return [smtp.rcpt(a) for a in addresses]

    blocked, vip, fine = await deferToThread(
        rcpts, ["x@blocked.example", "vip@blocked.example", "x@fine.example"])
    assert blocked[0] == 550 and blocked[1].startswith(b"5.7.1")
    assert vip[0] == 250 and fine[0] == 250  # the most specific rule wins
    patched = await sub.api.patch(f"/api/v1/inboxes/{sender['id']}", {"send_paused": True},
                                  key=owner)
    assert patched.status == 200, patched
    [paused] = await deferToThread(rcpts, ["x@fine.example"])
    assert paused == (550, b"5.7.1 Sending is paused for this inbox.")


# ---------------------------------------------------------------------------- real clients


@pytest_twisted.ensureDeferred
async def test_swaks_starttls_auth_plain(sub, outbox):
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    _, sender, _, _, key = await _setup(sub)
    result = await deferToThread(subprocess.run, [
        "swaks", "--server", f"127.0.0.1:{sub.submission_port}", "--tls",
        "--tls-verify", "--tls-ca-path", _DEV_TLS["ca"], "--ehlo", "client.test",
        "--auth", "PLAIN", "--auth-user", sender["email"], "--auth-password", key,
        "--from", sender["email"], "--to", "dave@remote.example",
        "--header", "Subject: via swaks"], capture_output=True, timeout=60)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert "235 2.7.0" in out and "250 2.0.0 Ok: queued as msg_" in out
    [sent] = (await sub.api.get(f"/api/v1/inboxes/{sender['id']}/messages", key=key)).json[
        "data"]
    assert sent["subject"] == "via swaks"


@pytest_twisted.ensureDeferred
async def test_msmtp_as_a_real_mua(sub, tmp_path):
    if shutil.which("msmtp") is None:
        pytest.skip("msmtp is not installed (apt-get install msmtp)")
    _, sender, other, _, key = await _setup(sub)
    conf = tmp_path / "msmtprc"
    conf.write_text(
        "account agentpost\n"
        "host 127.0.0.1\n"
        f"port {sub.submission_port}\n"
        "tls on\ntls_starttls on\n"
        f"tls_trust_file {_DEV_TLS['ca']}\n"
        "auth login\n"
        f"user {sender['email']}\n"
        f"password {key}\n"
        f"from {sender['email']}\n"
        "account default : agentpost\n")
    conf.chmod(0o600)
    message = _msg(sender["email"], other["email"], "via msmtp", "msmtp1")
    result = await deferToThread(subprocess.run, [
        "msmtp", "-C", str(conf), "--domain=client.test", other["email"]],
        input=message, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")

    async def arrived():
        got = (await sub.api.get(f"/api/v1/inboxes/{other['id']}/messages", key=key)).json
        return got["data"]
    [msg] = await _wait_for(arrived)
    assert msg["subject"] == "via msmtp"


def test_submission_ports_default_to_587_and_465_and_minus_one_turns_one_off(db_dsn):
    """Production defaults, the tests' ephemeral ports, and -1 for "not served"."""
    from agentpost.config.loader import parse_config

    defaults = parse_config({"database": {"url": db_dsn}}, "<test>", environ={})
    assert (defaults.smtp.submission_port, defaults.smtp.submissions_port) == (587, 465)
    config = make_config(db_dsn, smtp={"submissions_port": -1})
    assert config.smtp.submission_port == 0 and config.smtp.submissions_port == -1


@pytest_twisted.ensureDeferred
async def test_a_throttled_source_gets_454(db_dsn, openapi_checker):
    """Failed AUTHs draw on the shared LoginGuard allowances; once the (source, account)
    allowance is spent the next AUTH is 454 4.7.0 before the key is even checked."""
    config = make_config(db_dsn, login={"pair_failures_per_minute": 1,
                                        "source_failures_per_minute": 100})
    server = await start_server(config, openapi_checker)
    try:
        _, sender, _, _, key = await _setup(server)

        def attempts():
            with smtplib.SMTP_SSL("127.0.0.1", server.submissions_port, context=_ctx(),
                                  timeout=30) as smtp:
                smtp.ehlo()
                plain = "PLAIN " + _b64(f"\0{sender['email']}\0ap_sk_wrong")
                return [smtp.docmd("AUTH", plain), smtp.docmd("AUTH", plain),
                        smtp.docmd("AUTH", "PLAIN " + _b64(f"\0{sender['email']}\0{key}"))]

        first, second, right_key = await deferToThread(attempts)
        assert first[0] == 535
        assert second[0] == 454 and second[1].startswith(b"4.7.0"), second
        assert right_key[0] == 454  # the pair stays throttled for this source
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_minus_one_leaves_that_listener_unserved(db_dsn, openapi_checker):
    config = make_config(db_dsn, smtp={"submission_port": -1})
    server = await start_server(config, openapi_checker)
    try:
        assert server.submission_port is None and server.submissions_port
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_second_originator_a_lenient_reader_would_see_is_refused(sub):
    """Obsolete ``From :`` spellings, a non-field line hiding a later From:, a Sender:
    naming someone else, bare LF: each refused with nothing stored or queued."""
    _, sender, _, _, key = await _setup(sub)
    me = sender["email"]
    heads = [f"From: {me}\r\nFrom : boss@agents.test\r\n",
             f"From: {me}\r\nFrom\t: boss@agents.test\r\n",
             f"From: {me}\r\nX-Junk\r\nFrom: boss@agents.test\r\n",
             f"From: {me}\r\nSender: boss@agents.test\r\n",
             f"From: {me}\nFrom: boss@agents.test\r\n"]

    def session():
        replies = []
        with _login(sub.submission_port, me, key) as smtp:
            for head in heads:
                smtp.mail(me)
                smtp.rcpt("bob@remote.example")
                body = (head + "To: bob@remote.example\r\nSubject: x\r\n\r\nhi\r\n").encode()
                replies.append(smtp.data(body))
        return replies

    replies = await deferToThread(session)
    assert [r[0] // 100 for r in replies] == [5] * len(heads), replies
    assert query(_dsn(sub), "SELECT count(*) FROM messages") == [(0,)]
    assert query(_dsn(sub), "SELECT count(*) FROM outbound_queue") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_nul_in_an_auth_login_name_is_a_charged_failure(sub, caplog):
    """The NUL cannot reach PostgreSQL, and the failure still spends the allowance and
    leaves the fail2ban line (it used to roll the charge back and answer 501)."""
    caplog.set_level(logging.WARNING, logger="agentpost.auth")
    _, sender, _, _, key = await _setup(sub)

    def session():
        smtp = smtplib.SMTP("127.0.0.1", sub.submission_port, timeout=30)
        smtp.ehlo()
        smtp.starttls(context=_ctx())
        smtp.ehlo()
        first = smtp.docmd("AUTH", "LOGIN " + _b64(sender["email"] + "\x00"))
        second = smtp.docmd(_b64(key))
        smtp.close()
        return first, second

    first, second = await deferToThread(session)
    assert first[0] == 334
    assert second[0] == 535 and second[1].startswith(b"5.7.8"), second
    lines = [r.getMessage() for r in caplog.records if r.name == "agentpost.auth"]
    assert any("protocol=smtp" in line and "reason=bad-credentials" in line
               for line in lines), lines
    [(spent,)] = query(_dsn(sub), "SELECT count(*) FROM login_failures")
    assert spent >= 1
