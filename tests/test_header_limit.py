"""The 1 MiB header limit: refused over SMTP (552 5.3.4) and IMAP APPEND (NO [TOOBIG])
with nothing stored; a large header under the limit still goes through."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.core.header_limit import MAX_HEADER_BYTES, check_header_size, header_length
from agentpost.model.errors import MessageTooLarge
from tests.helpers import query
from tests.imap_client import Client, Lit, new_inbox, session
from tests.test_mx import _inbox, _send


@pytest.mark.parametrize(("raw", "expected"), [
    (b"Subject: a\r\n\r\nbody\r\n", 12),
    (b"Subject: a\n\nbody\n", 11),
    (b"\r\nbody only\r\n", 0),
    (b"Subject: no body\r\n", 18),
    (b"A: 1\n\nB: 2\r\n\r\n", 5),  # the first blank line ends the header, LF or CRLF
])
def test_header_length(raw, expected):
    assert header_length(raw) == expected


def test_a_large_body_is_not_a_large_header():
    raw = b"Subject: x\r\n\r\n" + b"line\r\n" * 400_000
    check_header_size(raw)  # 2.4 MB message, 12-byte header: accepted
    with pytest.raises(MessageTooLarge):
        check_header_size(b"X-A: b\r\n" * 140_000 + b"\r\nbody\r\n")


def _fields(total: int) -> bytes:
    return b"".join(b"X-Pad-%06d: v\r\n" % i for i in range(total // 16))


@pytest_twisted.ensureDeferred
async def test_smtp_refuses_an_oversized_header_and_accepts_a_large_one(server, db_dsn):
    _, key = await server.new_org("HeaderLimit")
    inbox = await _inbox(server, key, "hdr")
    head = b"From: a@example.org\r\nTo: %s\r\nSubject: big header\r\n" % inbox["email"].encode()
    over = head + _fields(MAX_HEADER_BYTES + 4096) + b"\r\nbody\r\n"
    under = head + _fields(MAX_HEADER_BYTES - 65536) + b"\r\nbody\r\n"
    kind, (code, text) = await deferToThread(_send, server.mx_port, "a@example.org",
                                             [inbox["email"]], over)
    assert (kind, code) == ("data", 552) and text.startswith(b"5.3.4"), text
    assert await deferToThread(_send, server.mx_port, "a@example.org", [inbox["email"]],
                               under) == ("ok", {})
    [(size,)] = query(db_dsn, "SELECT size FROM messages WHERE inbox_id = %s", (inbox["id"],))
    assert len(under) < size < len(under) + 4096  # plus the MX's own trace fields


@pytest_twisted.ensureDeferred
async def test_imap_append_of_an_oversized_header_is_toobig(server, db_dsn):
    inbox, key = await new_inbox(server, "hdr-append")
    raw = b"Subject: big\r\n" + _fields(MAX_HEADER_BYTES + 4096) + b"\r\nbody\r\n"

    def work(c: Client) -> list[bytes]:
        return c.cmd("APPEND INBOX ", Lit(raw))

    out = await session(server.imap_port, inbox["email"], key, work)
    assert b"NO [TOOBIG]" in out[-1], out[-1]
    assert query(db_dsn, "SELECT count(*) FROM messages WHERE inbox_id = %s",
                 (inbox["id"],)) == [(0,)]
