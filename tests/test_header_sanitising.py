"""Decoded header values are safe to index and to serve; the raw message stays exact.

An RFC 2047 subject that decodes to CR LF, a display name with a NUL, attachment names
with ``../`` and control characters: sent over real SMTP, read back over the JSON API,
the attachment download's Content-Disposition, ``/raw`` and IMAP ``BODY[]``.
"""

from __future__ import annotations

import base64
import imaplib
import re
import ssl
from pathlib import Path

import psycopg2
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.http.mail import content_disposition
from agentpost.mail.parse import parse_message
from agentpost.mail.sanitize import header_text, safe_filename, safe_mime_type
from tests.conftest import _DEV_TLS
from tests.helpers import query
from tests.test_mx import _send


def _word(text: str) -> str:
    return "=?UTF-8?B?" + base64.b64encode(text.encode()).decode() + "?="


def _hostile_message(to: str) -> bytes:
    lines = [
        f"From: {_word('Eve' + chr(0) + chr(13) + chr(10) + 'Bcc: x@example.com')} "
        "<eve@example.com>",
        f"To: {to}",
        f"Subject: {_word('Hello' + chr(13) + chr(10) + 'Bcc: victim@example.com')}",
        "Message-ID: <sanitise@example.com>",
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="b"',
        "",
        "--b",
        "Content-Type: text/plain",
        "",
        "body",
        "--b",
        'Content-Type: text/plain; name="../../../../tmp/pwned.txt"',
        'Content-Disposition: attachment; filename="../../../../tmp/pwned.txt"',
        "",
        "pwned",
        "--b",
        "Content-Type: application/octet-stream\r\n\tX-Evil: 1",
        "Content-Disposition: attachment;",
        " filename*=UTF-8''..%2F.evil%00%0D%0AX-Injected%3A%201%22%C3%A9.txt",
        "",
        "data",
        "--b--",
        "",
    ]
    return "\r\n".join(lines).encode("ascii")


def _imap_body(port: int, user: str, key: str) -> bytes:
    ctx = ssl.create_default_context(cafile=_DEV_TLS["ca"])
    imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=ctx, timeout=20)
    try:
        imap.login(user, key)
        imap.select("INBOX", readonly=True)
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        return data[0][1]
    finally:
        imap.logout()


@pytest_twisted.ensureDeferred
async def test_hostile_headers_over_smtp_are_safe_in_json_and_downloads(server):
    """CR/LF/NUL never reach JSON or a header; filenames are basenames; bytes stay exact."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "hostile"}, key=key)).json
    raw = _hostile_message(inbox["email"])
    assert await deferToThread(_send, server.mx_port, "eve@example.com", [inbox["email"]],
                               raw, starttls=False) == ("ok", {})

    [summary] = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                      key=key)).json["data"]
    assert summary["subject"] == "Hello Bcc: victim@example.com"
    sender = summary["from_address"]
    assert sender["email"] == "eve@example.com"
    # The stdlib leaves a display name it cannot represent encoded; either way, one line.
    assert not re.search("[\x00-\x1f]", sender["name"]) and "Bcc" not in sender["email"]
    thread = (await server.api.get(f"/api/v1/threads/{summary['thread_id']}", key=key)).json
    assert thread["subject"] == "Hello Bcc: victim@example.com"
    msg = (await server.api.get(f"/api/v1/messages/{summary['id']}", key=key)).json
    names = [a["filename"] for a in msg["attachments"]]
    assert names == ["pwned.txt", 'evil X-Injected: 1"é.txt']
    assert msg["attachments"][1]["mime_type"] == "application/octet-stream"

    expected = [
        "attachment; filename=\"pwned.txt\"; filename*=UTF-8''pwned.txt",
        "attachment; filename=\"evil X-Injected: 1__.txt\"; "
        "filename*=UTF-8''evil%20X-Injected%3A%201%22%C3%A9.txt",
    ]
    for att, header in zip(msg["attachments"], expected, strict=True):
        resp = await server.api.get(f"/api/v1/messages/{msg['id']}/attachments/{att['id']}",
                                    key=key)
        assert resp.status == 200
        assert resp.headers["content-disposition"] == header
        assert "x-injected" not in resp.headers

    stored = (await server.api.get(f"/api/v1/messages/{msg['id']}/raw", key=key)).body
    assert stored.endswith(raw), "the blob keeps the message byte-exact"
    imap = await deferToThread(_imap_body, server.imaps_port, inbox["email"], key)
    assert imap == stored, "IMAP BODY[] is the stored bytes, unchanged"


def test_parse_message_normalises_decoded_values_only():
    """Subject, names, ids and filenames are one-line; the raw header list is untouched."""
    parsed = parse_message(_hostile_message("bot@agents.test"))
    assert parsed.subject == "Hello Bcc: victim@example.com"
    assert parse_message(b"From: " + _word("Eve\x01\x7fX").encode() + b" <e@x.test>\r\n\r\n"
                         ).from_address == {"email": "e@x.test", "name": "Eve X"}
    assert [a.filename for a in parsed.attachments] == ["pwned.txt", 'evil X-Injected: 1"é.txt']
    assert ("Subject", _word("Hello\r\nBcc: victim@example.com")) in parsed.headers


def test_header_text_and_safe_filename_rules():
    """Controls become one space, NUL vanishes, spacing inside words is kept; filenames
    lose directories, dot components, leading dots and bidi overrides, keep Unicode."""
    assert header_text("a\r\n  b\x00c\t d  e\u2028") == "a bc d  e"
    assert header_text(" " * 100_000 + "x") == "x"
    cases = {
        "../../../../tmp/pwned.txt": "pwned.txt",
        "..\\..\\Windows\\win.ini": "win.ini",
        "C:\\Users\\a.txt": "a.txt",
        ".htaccess": "htaccess",
        "...": "",
        "x/..": "x",
        "résumé 2024.pdf": "résumé 2024.pdf",
        "invoice\u202efdp.exe": "invoicefdp.exe",
        "a" * 300 + ".txt": "a" * 255,
    }
    for name, safe in cases.items():
        assert safe_filename(name) == safe, name
    assert safe_mime_type("Text/Plain") == "text/plain"
    assert safe_mime_type("text/plain\r\nX: y") == "application/octet-stream"


def test_content_disposition_is_rfc6266_for_any_stored_name():
    """Legacy rows with a path or CR/LF still produce one safe header line."""
    assert content_disposition("../../etc/passwd") == (
        "attachment; filename=\"passwd\"; filename*=UTF-8''passwd")
    header = content_disposition('ré"sumé\r\n.pdf')
    assert header == ("attachment; filename=\"r__sum_ .pdf\"; "
                      "filename*=UTF-8''r%C3%A9%22sum%C3%A9%20.pdf")
    assert content_disposition("") == (
        "attachment; filename=\"attachment\"; filename*=UTF-8''attachment")


def test_migration_0010_cleans_rows_stored_before(db_dsn):
    """The 0010 data fix gives legacy subjects and filenames the same shape; rerunnable."""
    sql = (Path(__file__).parent.parent / "agentpost/storage/migrations/0010_hardening.sql"
           ).read_text()
    section = re.search(r"-- Decoded header values.*?-- \(end of the decoded-header-values "
                        r"section\)", sql, re.S)
    assert section is not None
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE t (subject text, filename text)")
        fix = section.group(0).replace("UPDATE messages", "UPDATE t").replace(
            "UPDATE threads", "UPDATE t").replace("UPDATE attachments", "UPDATE t")
        cur.execute("INSERT INTO t VALUES ('Hello\r\n Bcc: x', '../../../../tmp/pwned.txt'),"
                    " ('ok', 'a\\b\r\n.txt'), ('plain', '.hidden')")
        cur.execute(fix)
        cur.execute(fix)
        cur.execute("SELECT subject, filename FROM t ORDER BY subject")
        assert cur.fetchall() == [("Hello Bcc: x", "pwned.txt"), ("ok", "b .txt"),
                                  ("plain", "hidden")]
    conn.close()
    assert query(db_dsn, "SELECT count(*) FROM attachments") == [(0,)]


def test_a_long_references_list_keeps_its_root_and_its_newest_ids():
    """Threading needs the root (first) and the direct parent (last) of a long
    References field; the middle is what RFC 5322 3.6.4 lets a client drop."""
    from agentpost.mail.parse import MAX_MSGIDS, parse_message

    ids = [f"m{n}@example.com" for n in range(150)]  # stored without the brackets
    raw = ("From: a@example.com\r\nTo: b@example.com\r\nSubject: deep\r\n"
           "Message-ID: <m150@example.com>\r\nIn-Reply-To: <m149@example.com>\r\n"
           f"References: {' '.join(f'<{i}>' for i in ids)}\r\n\r\nbody\r\n").encode()
    parsed = parse_message(raw)
    assert len(parsed.references) == MAX_MSGIDS
    assert parsed.references[0] == "m0@example.com"
    assert parsed.references[-1] == "m149@example.com"
    assert parsed.references[1:] == ids[-(MAX_MSGIDS - 1):]
