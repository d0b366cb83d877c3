"""IMAP end to end on the real store: imaplib over STARTTLS and 993, mail delivered over
SMTP appearing in IDLE, and two sessions (also in two server processes) seeing each other."""

import imaplib
import socket
import ssl
import time

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS, make_config, start_server
from tests.mailfactory import make_message
from tests.test_mx import _send


def _ctx():
    return ssl.create_default_context(cafile=_DEV_TLS["ca"])


async def _inbox(server, name):
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": name}, key=key)).json
    return inbox, key


def _starttls(port, user, key):
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    assert "LOGINDISABLED" in imap.capabilities
    imap.starttls(ssl_context=_ctx())
    imap.login(user, key)
    return imap


@pytest_twisted.ensureDeferred
async def test_imaplib_over_starttls_and_993_reads_smtp_mail_byte_exact(server):
    """SMTP in, IMAP out: BODY[] is the stored bytes; flags reach the API as read state."""
    inbox, key = await _inbox(server, "imap-e2e")
    raw = make_message(to=inbox["email"], subject="Über IMAP", msgid="<i1@x>",
                       extra_headers=[("X-Dup", "a"), ("X-Dup", "b")])
    assert (await deferToThread(_send, server.mx_port, "a@example.com", [inbox["email"]],
                                raw, starttls=False)) == ("ok", {})

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        typ, data = imap.select("INBOX")
        assert typ == "OK" and data == [b"1"]
        typ, data = imap.uid("FETCH", "1", "(BODY.PEEK[] RFC822.SIZE)")
        body = data[0][1]
        typ, header = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (X-DUP)])")
        imap.store("1", "+FLAGS", "(\\Seen urgent)")
        imap.logout()
        tls = imaplib.IMAP4_SSL("127.0.0.1", server.imaps_port, ssl_context=_ctx(), timeout=20)
        tls.login(inbox["email"], key)
        typ, data = tls.select("INBOX", readonly=True)
        typ, flags = tls.fetch("1", "(FLAGS)")
        tls.logout()
        return body, header[0][1], flags[0]

    body, header, flags = await deferToThread(session)
    assert body.endswith(raw) and body.startswith(b"Return-Path:")
    assert header == b"X-Dup: a\r\nX-Dup: b\r\n\r\n"
    assert b"\\Seen" in flags and b"urgent" in flags
    [msg] = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                  key=key)).json["data"]
    assert msg["read"] is True and msg["labels"] == ["urgent"]


def _idle_until(port, user, key, trigger):
    """Open an IDLE session, run ``trigger`` from it, return the untagged lines seen."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    f = raw.makefile("rb")
    f.readline()
    raw.sendall(b"a STARTTLS\r\n")
    f.readline()
    sock = _ctx().wrap_socket(raw, server_hostname="127.0.0.1")
    f = sock.makefile("rb")

    def cmd(line):
        sock.sendall(line)
        lines = []
        while True:
            reply = f.readline()
            lines.append(reply)
            if reply.startswith(line.split(b" ")[0] + b" "):
                return lines

    cmd(f'b LOGIN "{user}" "{key}"\r\n'.encode())
    cmd(b"c SELECT INBOX\r\n")
    sock.sendall(b"d IDLE\r\n")
    assert f.readline().startswith(b"+")
    start = time.monotonic()
    trigger()
    seen = []
    while time.monotonic() - start < 10:
        line = f.readline()
        seen.append(line)
        if b"EXISTS" in line:
            break
    sock.sendall(b"DONE\r\n")
    sock.close()
    return seen


@pytest_twisted.ensureDeferred
async def test_smtp_delivery_appears_in_idle_of_another_process(server, db_dsn,
                                                                openapi_checker):
    """A second server process on the same database: mail arriving over SMTP at one shows up
    as EXISTS in an IDLE session on the other (LISTEN/NOTIFY)."""
    other = await start_server(make_config(db_dsn), openapi_checker)
    try:
        inbox, key = await _inbox(server, "idler")
        raw = make_message(to=inbox["email"], subject="wake up")

        def trigger():
            assert _send(server.mx_port, "a@example.com", [inbox["email"]], raw,
                         starttls=False) == ("ok", {})

        seen = await deferToThread(_idle_until, other.imap_port, inbox["email"], key,
                                            trigger)
        assert any(line.startswith(b"* 1 EXISTS") for line in seen), seen
    finally:
        await other.service.stopService()


@pytest_twisted.ensureDeferred
async def test_cross_tenant_and_cross_environment_logins_are_refused(server):
    """Another organization's key, or a key restricted to another environment: NO."""
    inbox, key = await _inbox(server, "guarded-imap")
    _, foreign = await server.new_org("Other")
    env = (await server.api.post("/api/v1/environments", {"name": "Elsewhere"}, key=key)).json
    restricted = (await server.api.post("/api/v1/api-keys", {
        "scopes": ["messages:read"], "environment_ids": [env["id"]]}, key=key)).json["key"]

    def attempt(password):
        imap = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=20)
        imap.starttls(ssl_context=_ctx())
        try:
            imap.login(inbox["email"], password)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        finally:
            imap.shutdown()
        return "logged in"

    for password in (foreign, restricted):
        outcome = await deferToThread(attempt, password)
        assert "AUTHENTICATIONFAILED" in outcome, outcome


def _big_message(to: str, size: int) -> bytes:
    import base64 as b64
    blob = b64.encodebytes(bytes(range(256)) * (size // 256 + 1))[:size]
    blob = blob.replace(b"\n", b"\r\n")  # imaplib's APPEND sends CRLF line ends
    return (f"From: big@example.org\r\nTo: {to}\r\nSubject: large\r\n"
            "X-Dup: one\r\nX-Dup: two\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "Gr\u00fc\u00dfe\r\n".encode()
            + b"--b1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + blob + b"\r\n--b1--\r\n")


@pytest_twisted.ensureDeferred
async def test_large_message_sections_stream_byte_exact(server):
    """A 3 MB message (APPEND through ingest) is served from its section map: the
    whole body, partial ranges, parts and header fields equal slices of the original."""
    inbox, key = await _inbox(server, "imap-big")
    raw = _big_message(inbox["email"], 3_000_000)

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        typ, data = imap.append("INBOX", "(\\Flagged)", None, raw)
        assert typ == "OK", data
        imap.select("INBOX")
        out = {}
        for item in ("BODY.PEEK[]", "BODY.PEEK[]<1000000.70000>", "BODY.PEEK[2]",
                     "BODY.PEEK[1]", "BODY.PEEK[HEADER.FIELDS (X-DUP)]", "BODY.PEEK[TEXT]",
                     "BODY.PEEK[2.MIME]"):
            typ, data = imap.fetch("1", f"({item})")
            assert typ == "OK", data
            out[item] = data[0][1]
        imap.logout()
        return out

    out = await deferToThread(session)
    head_end = raw.index(b"\r\n\r\n") + 4
    assert out["BODY.PEEK[]"] == raw
    assert out["BODY.PEEK[]<1000000.70000>"] == raw[1000000:1070000]
    part2 = raw[raw.index(b"base64\r\n\r\n") + 10:raw.rindex(b"\r\n--b1--")]
    assert out["BODY.PEEK[2]"] == part2
    assert out["BODY.PEEK[1]"] == "Gr\u00fc\u00dfe".encode()
    assert out["BODY.PEEK[HEADER.FIELDS (X-DUP)]"] == b"X-Dup: one\r\nX-Dup: two\r\n\r\n"
    assert out["BODY.PEEK[TEXT]"] == raw[head_end:]
    assert out["BODY.PEEK[2.MIME]"].startswith(b"Content-Type: application/octet-stream")
    rows = await server.core.db.run_query(
        "t", "SELECT imap_sections FROM messages WHERE inbox_id = %s", (inbox["id"],))
    assert len(rows) == 1 and rows[0]["imap_sections"].startswith("[0,")


@pytest_twisted.ensureDeferred
async def test_qresync_esearch_and_list_status_on_the_real_store(server):
    """The extensions on PostgreSQL: a reconnecting client learns what vanished and
    what changed since its MODSEQ; ESEARCH counts; LIST returns STATUS."""
    inbox, key = await _inbox(server, "imap-ext")
    for n in range(4):
        raw = make_message(to=inbox["email"], subject=f"m{n}", msgid=f"<ext{n}@x>")
        await server.deliver(raw, [inbox["email"]])

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX")
        typ, data = imap.status("INBOX", "(HIGHESTMODSEQ UIDVALIDITY)")
        text = data[0].decode()
        modseq = int(text.split("HIGHESTMODSEQ ")[1].split()[0].rstrip(")"))
        uidvalidity = int(text.split("UIDVALIDITY ")[1].split()[0].rstrip(")"))
        imap.uid("STORE", "2", "+FLAGS", "(\\Deleted)")
        imap.expunge()
        imap.uid("STORE", "3", "+FLAGS", "(\\Flagged)")
        imap.uid("SEARCH", "RETURN", "(MIN MAX COUNT)", "ALL")
        esearch = imap.untagged_responses.pop("ESEARCH", [])
        imap._simple_command("LIST", '""', '"*"', "RETURN",
                                            "(STATUS (MESSAGES UNSEEN))")
        statuses = imap.untagged_responses.pop("STATUS", [])
        imap.logout()
        again = _starttls(server.imap_port, inbox["email"], key)
        again._simple_command("ENABLE", "QRESYNC")
        typ, _ = again._simple_command(
            "SELECT", "INBOX", f"(QRESYNC ({uidvalidity} {modseq} 1:4))")
        vanished = again.untagged_responses.pop("VANISHED", [])
        fetches = again.untagged_responses.pop("FETCH", [])
        again.logout()
        return esearch, statuses, typ, vanished, fetches

    esearch, statuses, typ, vanished, fetches = await deferToThread(session)
    assert esearch[0].endswith(b"UID MIN 1 MAX 4 COUNT 3")
    assert b'"INBOX" (MESSAGES 3 UNSEEN 3)' in statuses
    assert typ == "OK" and vanished == [b"(EARLIER) 2"]
    assert len(fetches) == 1 and b"UID 3 " in fetches[0] and b"\\Flagged" in fetches[0]


@pytest_twisted.ensureDeferred
async def test_logins_are_audited(server, db_dsn):
    """Each IMAP login and failure leaves an audit row (action imap.login)."""
    from tests.helpers import query
    inbox, key = await _inbox(server, "imap-audit")

    def logins():
        _starttls(server.imap_port, inbox["email"], key).logout()
        bad = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=20)
        bad.starttls(ssl_context=_ctx())
        try:
            bad.login(inbox["email"], "ap_sk_" + "q" * 43)
        except imaplib.IMAP4.error as exc:
            return str(exc)
        finally:
            bad.logout()

    refusal = await deferToThread(logins)
    assert "AUTHENTICATIONFAILED" in refusal
    await server.core.audit.flush()
    rows = query(db_dsn, "SELECT outcome, actor_type, target_id, remote_addr FROM audit_log "
                 "WHERE action = 'imap.login' ORDER BY id")
    assert ("allowed", "api_key", inbox["id"], "127.0.0.1") in rows
    # The failure is filed with the inbox (and its organization: test_login_guard.py).
    assert ("denied", "anonymous", inbox["id"], "127.0.0.1") in rows


@pytest_twisted.ensureDeferred
async def test_database_outage_is_no_unavailable_and_the_session_survives(server, pg):
    """With PostgreSQL down, commands answer NO [UNAVAILABLE] (a login too, never
    AUTHENTICATIONFAILED); the connection stays usable and works once it is back."""
    inbox, key = await _inbox(server, "imap-outage")
    await server.deliver(make_message(to=inbox["email"], subject="kept"), [inbox["email"]])
    imap = await deferToThread(_starttls, server.imap_port, inbox["email"], key)
    await deferToThread(imap.select, "INBOX")
    pg.stop()
    try:
        def during():
            typ, data = imap.uid("FETCH", "1", "(BODY.PEEK[])")
            fresh = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=20)
            fresh.starttls(ssl_context=_ctx())
            try:
                fresh.login(inbox["email"], key)
                login = "OK"
            except imaplib.IMAP4.error as exc:
                login = str(exc)
            fresh.logout()
            return typ, data, login

        typ, data, login = await deferToThread(during)
    finally:
        pg.start()
    assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE]")
    assert "[UNAVAILABLE]" in login and "AUTHENTICATIONFAILED" not in login

    def after():
        for _ in range(50):
            typ, data = imap.uid("FETCH", "1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            if typ == "OK":
                return data
            time.sleep(0.2)
        return data

    data = await deferToThread(after)
    assert data[0][1] == b"Subject: kept\r\n\r\n"
    await deferToThread(imap.logout)


@pytest_twisted.ensureDeferred
async def test_inbox_quota_over_smtp_imap_and_after_deletion(db_dsn, openapi_checker):
    """[mail] inbox_quota: the MX refuses a full inbox at RCPT (552 5.2.2) while other
    recipients still get the message; APPEND and COPY that would pass it are
    NO [OVERQUOTA]; GETQUOTAROOT reports the use; deleting frees the space."""
    from tests.conftest import start_server
    from tests.test_mx import _send

    running = await start_server(make_config(db_dsn, mail={"shared_domain": "agents.test",
                                                           "inbox_quota": "12KiB"}),
                                 openapi_checker)
    try:
        inbox, key = await _inbox(running, "quota")
        _, other_key = await running.new_org("Other")
        other = (await running.api.post("/api/v1/inboxes", {"username": "roomy"},
                                        key=other_key)).json
        big = make_message(to=inbox["email"], subject="big", body="x" * 9000 + "\n")
        assert (await deferToThread(_send, running.mx_port, "a@example.com",
                                    [inbox["email"]], big, starttls=False)) == ("ok", {})
        # Below the quota at RCPT: accepted, and the inbox may pass it by this message.
        assert (await deferToThread(_send, running.mx_port, "a@example.com",
                                    [inbox["email"]], big, starttls=False)) == ("ok", {})
        outcome = await deferToThread(_send, running.mx_port, "a@example.com",
                                      [inbox["email"], other["email"]], big, starttls=False)
        assert outcome[0] == "ok" and outcome[1][inbox["email"]][0] == 552
        assert b"5.2.2" in outcome[1][inbox["email"]][1]
        listed = (await running.api.get(f"/api/v1/inboxes/{other['id']}/messages",
                                        key=other_key)).json["data"]
        assert len(listed) == 1  # the other recipient still got it

        def imap_session():
            imap = _starttls(running.imap_port, inbox["email"], key)
            root = imap._simple_command("GETQUOTAROOT", "INBOX")
            quota = imap.untagged_responses.pop("QUOTA", [])
            appended = imap.append("INBOX", None, None, make_message(subject="more"))
            imap.select("INBOX")
            copied = imap.uid("COPY", "1", "Trash")
            imap.uid("STORE", "1:*", "+FLAGS", "(\\Deleted)")
            imap.expunge()
            after = imap._simple_command("GETQUOTA", '""')
            after_quota = imap.untagged_responses.pop("QUOTA", [])
            again = imap.append("INBOX", None, None, make_message(subject="fits now"))
            imap.logout()
            return root, quota, appended, copied, after, after_quota, again

        root, quota, appended, copied, after, after_quota, again = \
            await deferToThread(imap_session)
        assert root[0] == "OK" and quota and quota[0].endswith(b" 12)")
        used_kib = int(quota[0].split(b"STORAGE ")[1].split()[0])
        assert used_kib > 12  # two 9 KB messages: past the limit by the second one
        assert appended[0] == "NO" and b"OVERQUOTA" in appended[1][0]
        assert copied[0] == "NO" and b"OVERQUOTA" in copied[1][0]
        assert after[0] == "OK" and after_quota == [b'"" (STORAGE 0 12)']
        assert again[0] == "OK"
        shown = (await running.api.get(f"/api/v1/inboxes/{inbox['id']}", key=key)).json
        kept = (await running.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                      key=key)).json["data"]
        assert shown["used_bytes"] == sum(m["size"] for m in kept) > 0
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_compress_deflate_over_993_streams_a_large_body(server):
    """COMPRESS=DEFLATE on a real TLS socket: a 1 MB message (the streamed path) comes
    back byte-exact through the compressor."""
    import zlib

    inbox, key = await _inbox(server, "imap-zip")
    raw = _big_message(inbox["email"], 1_000_000)
    await server.deliver(raw, [inbox["email"]])

    def session():
        sock = _ctx().wrap_socket(socket.create_connection(("127.0.0.1", server.imaps_port),
                                                           timeout=20),
                                  server_hostname="127.0.0.1")
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b'a LOGIN "%s" "%s"\r\n' % (inbox["email"].encode(), key.encode()))
        while not f.readline().startswith(b"a "):
            pass
        sock.sendall(b"z COMPRESS DEFLATE\r\n")
        assert f.readline() == b"z OK DEFLATE active\r\n"
        out, inflate = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
        sock.sendall(out.compress(b"s SELECT INBOX\r\nf FETCH 1 BODY.PEEK[]\r\n")
                     + out.flush(zlib.Z_SYNC_FLUSH))
        received = b""
        while b"\r\nf OK" not in received and b"\r\nf NO" not in received:
            chunk = sock.recv(65536)
            assert chunk, "connection closed"
            received += inflate.decompress(chunk)
        sock.close()
        return received

    received = await deferToThread(session)
    assert b"s OK [READ-WRITE]" in received
    start = received.index(b"BODY[] {%d}\r\n" % len(raw))
    body = received[start + len(b"BODY[] {%d}\r\n" % len(raw)):][:len(raw)]
    assert body == raw


@pytest_twisted.ensureDeferred
async def test_idle_sees_flags_expunge_and_append_made_in_another_os_process(server,
                                                                            db_dsn,
                                                                            tmp_path):
    """A real second `agentpost serve` process on the same database and blob store:
    what an IMAP session there changes (STORE, EXPUNGE, APPEND) reaches an IDLE session
    here as FETCH, EXPUNGE and EXISTS, through PostgreSQL LISTEN/NOTIFY."""
    from tests.second_process import SecondProcess

    inbox, key = await _inbox(server, "two-procs")
    for n in range(2):
        await server.deliver(make_message(to=inbox["email"], subject=f"p{n}",
                                          msgid=f"<p{n}@x>"), [inbox["email"]])
    second = SecondProcess(tmp_path, db_dsn, server)

    def elsewhere():
        assert second.ready(), "second process did not start"
        other = imaplib.IMAP4("127.0.0.1", second.imap_port, timeout=20)
        other.login(inbox["email"], key)
        other.select("INBOX")
        other.uid("STORE", "1", "+FLAGS", "(\\Flagged)")
        other.uid("STORE", "2", "+FLAGS", "(\\Deleted)")
        other.expunge()
        other.append("INBOX", None, None, make_message(subject="from afar"))
        other.logout()

    def watcher():
        raw = socket.create_connection(("127.0.0.1", server.imap_port), timeout=20)
        f = raw.makefile("rb")
        f.readline()
        raw.sendall(b"a STARTTLS\r\n")
        f.readline()
        sock = _ctx().wrap_socket(raw, server_hostname="127.0.0.1")
        f = sock.makefile("rb")
        sock.sendall(b'b LOGIN "%s" "%s"\r\nc SELECT INBOX\r\nd IDLE\r\n'
                     % (inbox["email"].encode(), key.encode()))
        while not f.readline().startswith(b"+"):
            pass
        elsewhere()
        seen: list[bytes] = []
        start = time.monotonic()
        while time.monotonic() - start < 15 and not (
                any(b"EXISTS" in line for line in seen)
                and any(b"EXPUNGE" in line for line in seen)
                and any(b"\\Flagged" in line for line in seen)):
            seen.append(f.readline())
        sock.sendall(b"DONE\r\ne LOGOUT\r\n")
        sock.close()
        return seen

    try:
        seen = await deferToThread(watcher)
    finally:
        out = second.stop()
    assert any(line.startswith(b"* 1 FETCH") and b"\\Flagged" in line for line in seen), seen
    assert b"* 2 EXPUNGE\r\n" in seen, seen
    assert b"* 2 EXISTS\r\n" in seen, seen
    assert "Traceback" not in out


@pytest_twisted.ensureDeferred
async def test_sort_on_the_real_store(server):
    """SORT (RFC 5256) and SORT=DISPLAY in SQL: base subjects, address mailboxes,
    REVERSE per key, sizes, with a search key and UID SORT."""
    inbox, key = await _inbox(server, "sorter")
    specs = [  # (from, subject, date, body)
        ("Zed <zed@x.org>", "Re: [list] banana", "Mon, 02 Mar 2026 10:00:00 +0000", "a"),
        ("amy@y.org", "apple", "Sun, 01 Mar 2026 10:00:00 +0000", "bb" * 500),
        ("Bob <bob@z.org>", "Fwd: cherry", "Tue, 03 Mar 2026 10:00:00 +0000", "ccc" * 50),
    ]
    for n, (frm, subject, date, body) in enumerate(specs):
        raw = make_message(to=inbox["email"], frm=frm, subject=subject, body=body + "\n",
                           msgid=f"<s{n}@x>").replace(
            b"Date: Sun, 29 Nov 2026 07:00:00 +0000", f"Date: {date}".encode())
        await server.deliver(raw, [inbox["email"]])

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX")
        out = {crit: imap.sort(crit, "UTF-8", "ALL")[1][0]
               for crit in ("(SUBJECT)", "(REVERSE DATE)", "(FROM)", "(SIZE)",
                            "(DISPLAYFROM)", "(REVERSE SIZE SUBJECT)")}
        out["uid"] = imap.uid("SORT", "(DATE)", "UTF-8", "NOT", "SUBJECT", "apple")[1][0]
        try:
            imap._simple_command("SORT", "(NOPE)", "UTF-8", "ALL")
            out["bad"] = "accepted"
        except imaplib.IMAP4.error as exc:
            out["bad"] = str(exc)
        imap.logout()
        return out

    out = await deferToThread(session)
    assert out["(SUBJECT)"] == b"2 1 3"  # apple, banana, cherry
    assert out["(REVERSE DATE)"] == b"3 1 2"
    assert out["(FROM)"] == b"2 3 1"  # amy, bob, zed
    assert out["(SIZE)"] == b"1 3 2"
    assert out["(DISPLAYFROM)"] == b"2 3 1"  # amy@y.org, Bob, Zed
    assert out["(REVERSE SIZE SUBJECT)"] == b"2 3 1"
    assert out["uid"] == b"1 3"
    assert "BAD" in out["bad"] and "Unknown sort key NOPE" in out["bad"]


@pytest_twisted.ensureDeferred
async def test_sort_by_rfc5256_base_subject_first_address_and_display(server):
    """SORT SUBJECT compares RFC 5256 base subjects (encoded words decoded, [fwd: ...]
    unwrapped, (fwd) trailers and blobs dropped) with i;ascii-casemap; FROM/CC the first
    address's mailbox, inside a group too, a missing field as ""; DISPLAYFROM the decoded
    display name, else the addr-spec. SEARCH over the same session: SENTON and FROM."""
    inbox, key = await _inbox(server, "sorter2")
    heads = [  # uid: (From, Cc, Subject, Date)
        ("Team: Yolanda <yolanda@x.org>, abe@x.org;", "zz@x.org",
         "=?utf-8?q?Re:_[list]_Delta?=", "Mon, 01 Jan 2024 23:30:00 -0500"),
        ("=?utf-8?q?=C3=81ngel?= <zack@x.org>", None,
         "[Fwd: Re: charlie (fwd)]", "Tue, 02 Jan 2024 00:30:00 +0200"),
        ("Xavier <bob@x.org>", "Team: Mel <mel@x.org>;", "Re: [fwd: bravo] (FWD)",
         "Wed, 03 Jan 2024 10:00:00 +0000"),
        ("carl@x.org", "amy@x.org", "[alpha]", "Thu, 04 Jan 2024 10:00:00 +0000"),
        (None, None, "_under", "Fri, 05 Jan 2024 10:00:00 +0000"),
    ]
    for n, (frm, cc, subject, date) in enumerate(heads):
        head = (f"From: {frm}\r\n" if frm else "") + (f"Cc: {cc}\r\n" if cc else "")
        raw = (f"{head}To: {inbox['email']}\r\nSubject: {subject}\r\nDate: {date}\r\n"
               f"Message-ID: <b{n}@x>\r\n\r\nbody\r\n").encode()
        await server.deliver(raw, [inbox["email"]])

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX")
        out = {crit: imap.sort(crit, "UTF-8", "ALL")[1][0]
               for crit in ("(SUBJECT)", "(REVERSE SUBJECT)", "(FROM)", "(CC)",
                            "(DISPLAYFROM)")}
        out["senton"] = imap.search(None, "SENTON", "1-Jan-2024")[1][0]
        out["from"] = imap.search(None, "FROM", "abe")[1][0]
        imap.logout()
        return out

    out = await deferToThread(session)
    # bravo, charlie, Delta, [alpha] (a lone blob is the base), _under: i;ascii-casemap
    # compares upper-cased octets, and "[" and "_" come after "Z"
    assert out["(SUBJECT)"] == b"3 2 1 4 5"
    assert out["(REVERSE SUBJECT)"] == b"5 4 1 2 3"
    # "", bob, carl, yolanda (first in the group; not abe), zack
    assert out["(FROM)"] == b"5 3 4 1 2"
    # "" (uid 2, 5 by UID), amy, mel (inside the group), zz
    assert out["(CC)"] == b"2 5 4 3 1"
    # "", carl@x.org, Xavier, Yolanda, Ángel (non-ASCII after ASCII)
    assert out["(DISPLAYFROM)"] == b"5 4 3 1 2"
    assert out["senton"] == b"1" and out["from"] == b"1"


@pytest_twisted.ensureDeferred
async def test_uidvalidity_never_repeats_for_a_folder_name(server, db_dsn):
    """DELETE and CREATE of one name within a second gave the new folder the old
    UIDVALIDITY (the clock) with UIDs restarting at 1. Values now come from a sequence:
    every folder row gets its own, above the old clock-based ones."""
    from tests.helpers import query
    inbox, key = await _inbox(server, "revalid")
    other, _ = await _inbox(server, "revalid2")

    def uidvalidity(imap, name):
        typ, data = imap.status(name, "(UIDVALIDITY UIDNEXT)")
        assert typ == "OK", data
        text = data[0].decode()
        return (int(text.split("UIDVALIDITY ")[1].split()[0].rstrip(")")),
                int(text.split("UIDNEXT ")[1].split()[0].rstrip(")")))

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        assert imap.create("foo")[0] == "OK"
        imap.append("foo", None, None, b"Subject: one\r\n\r\nbody\r\n")
        first = uidvalidity(imap, "foo")
        assert imap.delete("foo")[0] == "OK"
        assert imap.create("foo")[0] == "OK"
        second = uidvalidity(imap, "foo")
        imap.select("foo")
        selected = int(imap.untagged_responses["UIDVALIDITY"][-1])
        imap.logout()
        return first, second, selected

    first, second, selected = await deferToThread(session)
    assert first[1] == 2 and second[1] == 1
    assert second[0] != first[0] and selected == second[0]
    rows = query(db_dsn, "SELECT uidvalidity FROM folders WHERE inbox_id IN (%s, %s)",
                 (inbox["id"], other["id"]))
    values = [v for (v,) in rows]
    assert len(values) == 11 and len(set(values)) == 11  # 2 x 5 system folders + foo
    [(migrated,)] = query(db_dsn, "SELECT extract(epoch FROM applied_at)::bigint "
                                  "FROM schema_migrations WHERE version = 11")
    assert all(migrated < v < 2**32 for v in values)  # above the clock-based ones


@pytest_twisted.ensureDeferred
async def test_envelope_routes_and_bodystructure_parameters_as_in_the_header(server):
    """Over imaplib: a source route is the adl of its address, and an RFC 2231 filename
    and an RFC 2047 name stay encoded in BODYSTRUCTURE (7-bit, no literal)."""
    inbox, key = await _inbox(server, "params")
    raw = (f"From: Routed <@relay.example,@hop.example:alice@example.com>\r\n"
           f"To: {inbox['email']}\r\n"
           "Subject: report\r\n"
           "Message-ID: <params1@x>\r\n"
           "MIME-Version: 1.0\r\n"
           "Content-Type: multipart/mixed; boundary=b\r\n"
           "\r\n"
           "--b\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n"
           "\r\n"
           "see attached\r\n"
           "--b\r\n"
           "Content-Type: application/pdf; name=\"=?utf-8?B?0J7RgtGH0ZHRgi5wZGY=?=\"\r\n"
           "Content-Disposition: attachment;\r\n"
           " filename*=utf-8''%D0%9E%D1%82%D1%87%D1%91%D1%82.pdf\r\n"
           "Content-Transfer-Encoding: base64\r\n"
           "\r\n"
           "JVBERi0=\r\n"
           "--b--\r\n").encode()
    await server.deliver(raw, [inbox["email"]])

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX", readonly=True)
        typ, data = imap.fetch("1", "(ENVELOPE BODYSTRUCTURE)")
        imap.logout()
        return typ, data

    typ, data = await deferToThread(session)
    assert typ == "OK" and len(data) == 1 and isinstance(data[0], bytes)  # no literal
    line = data[0]
    assert line.isascii()
    assert b'(("Routed" "@relay.example,@hop.example" "alice" "example.com"))' in line
    assert b'("name" "=?utf-8?B?0J7RgtGH0ZHRgi5wZGY=?=")' in line
    assert (b'("attachment" ("filename*" "utf-8\'\'%D0%9E%D1%82%D1%87%D1%91%D1%82.pdf"))'
            in line)
