"""The MX listener end to end: real smtplib over real sockets into the real store."""

import smtplib
import socket
import ssl
from email.message import EmailMessage

import psycopg2
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS, make_config, start_server
from tests.mailfactory import make_message


def _send(port, mail_from, rcpts, raw, *, starttls=True, options=()):
    """Send with smtplib (in a thread); return (code, message) of the final reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        assert "auth" not in smtp.esmtp_features  # never AUTH on the MX
        if starttls:
            context = ssl.create_default_context(cafile=_DEV_TLS["ca"])
            smtp.starttls(context=context)  # verifies the 127.0.0.1 SAN against the dev CA
            smtp.ehlo()
        try:
            refused = smtp.sendmail(mail_from, rcpts, raw, mail_options=list(options))
        except smtplib.SMTPRecipientsRefused as exc:
            return "refused", exc.recipients
        except smtplib.SMTPDataError as exc:
            return "data", (exc.smtp_code, exc.smtp_error)
        return "ok", refused


async def _inbox(server, key, name):
    resp = await server.api.post("/api/v1/inboxes", {"username": name}, key=key)
    assert resp.status == 201, resp
    return resp.json


@pytest_twisted.ensureDeferred
async def test_smtplib_over_starttls_then_api_shows_byte_exact_message(server):
    """Deliver over STARTTLS (certificate verified against the dev CA); read it back."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "mx-e2e")
    raw = make_message(to=inbox["email"], subject="Über TLS", msgid="<tls1@example.com>",
                       body="Grüße über STARTTLS.\n")
    outcome = await deferToThread(_send, server.mx_port, "alice@example.com",
                                  [inbox["email"]], raw)
    assert outcome == ("ok", {})
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    [summary] = listed.json["data"]
    assert summary["subject"] == "Über TLS"
    stored = (await server.api.get(f"/api/v1/messages/{summary['id']}/raw", key=key)).body
    assert stored.endswith(raw), "the message must be stored exactly as sent"
    trace = stored[: len(stored) - len(raw)]
    assert trace.startswith(b"Return-Path: <alice@example.com>\r\nReceived: from client.test")
    assert b"TLSv1.3" in trace or b"TLSv1.2" in trace


@pytest_twisted.ensureDeferred
async def test_unknown_recipient_and_relay_are_refused(server):
    """550 5.1.1 for an unknown local part, 550 5.7.1 for a domain we do not host."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "known")
    raw = make_message(to="nobody@agents.test")
    kind, refused = await deferToThread(_send, server.mx_port, "a@example.com",
                                        ["nobody@agents.test"], raw, starttls=False)
    assert kind == "refused"
    code, text = refused["nobody@agents.test"]
    assert code == 550 and text.startswith(b"5.1.1")
    kind, refused = await deferToThread(_send, server.mx_port, "a@example.com",
                                        ["victim@gmail.com"], raw, starttls=False)
    code, text = refused["victim@gmail.com"]
    assert code == 550 and text.startswith(b"5.7.1")
    kind, refused = await deferToThread(
        _send, server.mx_port, "a@example.com", [inbox["email"], "nobody@agents.test"], raw,
        starttls=False)
    assert kind == "ok" and list(refused) == ["nobody@agents.test"]


@pytest_twisted.ensureDeferred
async def test_blocked_sender_gets_550_at_rcpt(server):
    """A receive block rule refuses the sender at RCPT time with 550 5.7.1."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "ruled")
    await server.api.post("/api/v1/filter-rules", {
        "direction": "receive", "action": "block", "match_type": "subdomain_wildcard",
        "value": "*.spam.example"}, key=key)
    kind, refused = await deferToThread(_send, server.mx_port, "x@mail.spam.example",
                                        [inbox["email"]], make_message(), starttls=False)
    assert kind == "refused"
    code, text = refused[inbox["email"]]
    assert code == 550 and text.startswith(b"5.7.1")


def _raw_session(port, lines):
    """Speak SMTP by hand; return every reply line received."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        replies = [f.readline()]
        for line in lines:
            sock.sendall(line)
            while True:
                reply = f.readline()
                replies.append(reply)
                if reply[3:4] != b"-":
                    break
        return replies


@pytest_twisted.ensureDeferred
async def test_database_down_during_data_gives_451_then_accepts_after_recovery(server, pg):
    """PostgreSQL stops after RCPT: the end of DATA answers 451 4.3.0; a retry succeeds."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "outage")
    raw = make_message(to=inbox["email"], subject="survives outages")

    def session():
        with socket.create_connection(("127.0.0.1", server.mx_port), timeout=30) as sock:
            f = sock.makefile("rb")
            f.readline()

            def cmd(line):
                sock.sendall(line)
                while True:
                    reply = f.readline()
                    if reply[3:4] != b"-":
                        return reply

            cmd(b"EHLO client.test\r\n")
            cmd(b"MAIL FROM:<a@example.com>\r\n")
            assert cmd(f"RCPT TO:<{inbox['email']}>\r\n".encode()).startswith(b"250")
            assert cmd(b"DATA\r\n").startswith(b"354")
            pg.stop()
            try:
                return cmd(raw + b".\r\n")
            finally:
                pg.start()

    reply = await deferToThread(session)
    assert reply.startswith(b"451 4.3.0"), reply
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    assert listed.json["data"] == []
    outcome = await deferToThread(_send, server.mx_port, "a@example.com", [inbox["email"]],
                                  raw, starttls=False)
    assert outcome == ("ok", {})
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    assert [m["subject"] for m in listed.json["data"]] == ["survives outages"]


@pytest_twisted.ensureDeferred
async def test_blob_store_failure_gives_451(db_dsn, tmp_path, openapi_checker):
    """A blob store that cannot write makes the end of DATA answer 451, and stores
    nothing, for every message that needs it: one with an attachment, one over
    storage.inline_message_max. A small plain message is kept in PostgreSQL alone, so
    it is accepted all the same."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    running = await start_server(
        make_config(db_dsn, storage={"backend": "local", "path": str(blocker / "blobs"),
                                     "inline_message_max": "8KiB"}),
        openapi_checker)
    try:
        _, key = await running.new_org()
        inbox = await _inbox(running, key, "nostore")
        attached = EmailMessage()
        attached["From"], attached["To"], attached["Subject"] = "a@example.com", \
            inbox["email"], "with a file"
        attached.set_content("see the file")
        attached.add_attachment(b"%PDF-1.4 not really", maintype="application",
                                subtype="pdf", filename="x.pdf")
        for raw in (attached.as_bytes(), make_message(body="x" * 9000)):
            kind, (code, text) = await deferToThread(_send, running.mx_port, "a@example.com",
                                                     [inbox["email"]], raw, starttls=False)
            assert kind == "data" and code == 451 and text.startswith(b"4.3.0")
        conn = psycopg2.connect(db_dsn)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM messages")
            assert cur.fetchone()[0] == 0
        conn.close()
        outcome = await deferToThread(_send, running.mx_port, "a@example.com",
                                      [inbox["email"]], make_message(), starttls=False)
        assert outcome == ("ok", {})
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_utf8_addresses_with_smtputf8(server):
    """An internationalized recipient with SMTPUTF8 reaches its inbox."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, "plain")
    raw = ("From: Jörg <jörg@exämple.de>\r\nTo: " + inbox["email"] +
           "\r\nSubject: Ünïcode\r\n\r\nHallo.\r\n").encode("utf-8")
    outcome = await deferToThread(_send, server.mx_port, "jörg@exämple.de", [inbox["email"]],
                                  raw, starttls=False, options=("SMTPUTF8",))
    assert outcome == ("ok", {})
    [msg] = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                  key=key)).json["data"]
    assert msg["subject"] == "Ünïcode"
    assert msg["from_address"]["email"] == "jörg@exämple.de"


@pytest_twisted.ensureDeferred
async def test_s3_backend_end_to_end_with_presigned_attachment(db_dsn, s3_bucket,
                                                               openapi_checker):
    """With the S3 store: mail over SMTP lands in S3 encrypted; attachments are served by a
    short-lived presigned URL that a plain HTTP client can fetch."""
    import urllib.request

    running = await start_server(make_config(db_dsn, storage={
        "backend": "s3", "bucket": s3_bucket.name, "endpoint_url": s3_bucket.endpoint_url,
        "region": s3_bucket.region, "access_key_id": s3_bucket.access_key,
        "secret_access_key": s3_bucket.secret_key, "presign_ttl": "2m"}), openapi_checker)
    try:
        _, key = await running.new_org()
        inbox = await _inbox(running, key, "s3")
        blob = b"%PDF-1.7\r\n" + bytes(range(256)) * 10
        raw = make_message(to=inbox["email"], attachments=[("scan.pdf", "application/pdf",
                                                            blob)])
        assert (await deferToThread(_send, running.mx_port, "a@example.com", [inbox["email"]],
                                    raw, starttls=False)) == ("ok", {})
        [summary] = (await running.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                           key=key)).json["data"]
        msg = (await running.api.get(f"/api/v1/messages/{summary['id']}", key=key)).json
        [att] = msg["attachments"]
        redirect = await running.api.get(
            f"/api/v1/messages/{msg['id']}/attachments/{att['id']}", key=key)
        assert redirect.status == 302
        url = redirect.headers["location"]
        assert "X-Amz-Expires=120" in url

        def fetch():
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.read(), resp.headers["Content-Disposition"]

        body, disposition = await deferToThread(fetch)
        assert body == blob and "scan.pdf" in disposition

        def encryption():
            objects = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]
            return [s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=o["Key"]).get(
                "ServerSideEncryption") for o in objects]

        # The attachment; the message itself is small, so its bytes are in PostgreSQL.
        assert await deferToThread(encryption) == ["AES256"]
        raw_back = await running.api.get(f"/api/v1/messages/{msg['id']}/raw", key=key)
        assert raw_back.body.endswith(raw)
        # A message over storage.inline_message_max goes to S3, encrypted too.
        big = make_message(to=inbox["email"], body="long line of text\n" * 16000)
        assert (await deferToThread(_send, running.mx_port, "a@example.com", [inbox["email"]],
                                    big, starttls=False)) == ("ok", {})
        assert await deferToThread(encryption) == ["AES256", "AES256"]
        listed = (await running.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                        key=key)).json["data"]
        newest = max(listed, key=lambda m: m["size"])
        raw_big = await running.api.get(f"/api/v1/messages/{newest['id']}/raw", key=key)
        assert raw_big.body.endswith(big) and newest["size"] > 256 * 1024
    finally:
        await running.service.stopService()
