"""Hostile-tenant review of submission's From: check (smtphostile).

The originator fields were parsed with ``email.utils.getaddresses``, whose comment and
group parsing recurses once per nesting level: ``From: ((((...`` or ``From: a:a:a:...``
a thousand deep raised RecursionError, which the SMTP door answered as an unexpected
bug -- ``451 4.3.0`` (the client retries the same message forever) and an error-level
traceback per attempt.  A field nobody can read names no address, so it is refused
like any other From: that is not the inbox: ``550 5.7.1``, nothing stored; so is one
over 8 KiB, unparsed.

A client's own ``Return-Path:`` was kept: it left with the message (RFC 5321 §4.4: an
originating system SHOULD NOT send one) and sat under the true one in every hosted
copy (the queue's local path drops only leading ones, and ours come first).  Submission
now drops it, as Postfix's cleanup does.

A header section submission would not read answered ``501 5.5.4`` after the final
dot, a reply RFC 5321 §4.3.2 does not allow there (and the MX answers an oversized
header ``552 5.3.4``): now ``554 5.6.0`` for a malformed one, ``552 5.3.4`` for one over
1 MiB.

Real listener (implicit TLS), real AUTH, real store.
"""

from __future__ import annotations

import logging

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import query
from tests.test_smtp_hostile_lines import Wire, _b64, _sender
from tests.test_smtp_submission import _count, _dsn, _login, _setup, _wait_for
from tests.test_smtp_submission import outbox as outbox
from tests.test_smtp_submission import sub as sub


def _folded(piece: bytes, times: int) -> bytes:
    """``piece`` repeated, folded over lines (a DATA line holds at most 1000 octets)."""
    return b"\r\n ".join([piece] * times)


def _nested(me: bytes) -> dict[str, bytes]:
    return {
        "open comments": _folded(b"(" * 400, 3) + b" " + me,
        "closed comments": _folded(b"(" * 400, 3) + _folded(b")" * 400, 3) + b" " + me,
        "nested groups": _folded(b"a:" * 200, 6) + b" " + me + b";",
        # Not nested, readable, but over core.submission.MAX_ORIGINATOR_BYTES: refused
        # unparsed (the parser costs ~2 us a byte with the GIL held).
        "9 KiB of comments": _folded(b"(" + b"x" * 900 + b")", 10) + b" " + me,
    }


@pytest.mark.parametrize("field", ["From", "Sender"])
@pytest_twisted.ensureDeferred
async def test_an_originator_nested_or_oversized_is_550_not_451(
        server, caplog, field):
    address, key = await _sender(server)
    me = address.encode()

    def session():
        wire = Wire(server.submissions_port, tls=True)
        answers = {}
        try:
            wire.cmd("EHLO client.test")
            assert wire.cmd("AUTH PLAIN " + _b64(f"\0{address}\0{key}"))[0].startswith(b"235")
            for name, value in _nested(me).items():
                wire.cmd(f"MAIL FROM:<{address}>")
                wire.cmd("RCPT TO:<bob@remote.example>")
                assert wire.cmd("DATA")[0].startswith(b"354")
                head = (b"From: " + value if field == "From"
                        else b"From: " + me + b"\r\nSender: " + value)
                wire.sock.sendall(head + b"\r\nSubject: nested\r\n\r\nbody\r\n.\r\n")
                answers[name] = wire.reply()
            return answers
        finally:
            wire.close()

    with caplog.at_level(logging.ERROR, logger="agentpost"):
        answers = await deferToThread(session)
    for name, reply in answers.items():
        assert reply[0].startswith(b"550 5.7.1 "), (name, reply)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert query(_dsn(server), "SELECT count(*) FROM messages") == [(0,)]
    assert query(_dsn(server), "SELECT count(*) FROM outbound_queue") == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_client_s_return_path_neither_leaves_nor_reaches_a_hosted_copy(sub, outbox):
    _, sender, other, _, key = await _setup(sub)
    raw = (f"Return-Path: <ceo@bank.example>\r\nFrom: {sender['email']}\r\n"
           f"To: {other['email']}, bob@remote.example\r\nSubject: rp\r\n"
           "return-path:\r\n <cfo@bank.example>\r\n\r\nReturn-Path: a body line\r\n"
           ).encode()

    def send():
        with _login(sub.submission_port, sender["email"], key) as smtp:
            return smtp.sendmail(sender["email"], [other["email"], "bob@remote.example"], raw)

    assert await deferToThread(send) == {}

    async def emls():
        return sorted(outbox.glob("*.eml")) if outbox.exists() else []
    assert await _wait_for(lambda: _count(emls, 1)), "nothing left through the log transport"
    [left] = [path.read_bytes() for path in await emls()]
    head, _, body = left.partition(b"\r\n\r\n")
    assert b"bank.example" not in head and b"return-path" not in head.lower()
    assert body == b"Return-Path: a body line\r\n"  # the body is the body

    async def hosted():
        got = (await sub.api.get(f"/api/v1/inboxes/{other['id']}/messages", key=key)).json
        return got["data"]
    [copy] = await _wait_for(hosted)
    stored = (await sub.api.get(f"/api/v1/messages/{copy['id']}/raw", key=key)).body
    head = stored.partition(b"\r\n\r\n")[0]
    assert head.lower().count(b"return-path:") == 1
    assert head.startswith(f"Return-Path: <{sender['email']}>\r\n".encode())
    assert b"bank.example" not in head


@pytest_twisted.ensureDeferred
async def test_an_unreadable_or_oversized_header_gets_a_reply_data_may_have(server):
    address, key = await _sender(server)
    me = address.encode()
    heads = {
        "bare LF": b"From: " + me + b"\nSubject: x",
        "bare CR": b"From: " + me + b"\rSubject: x",
        "not a field": b"From: " + me + b"\r\nX-Junk\r\nSubject: x",
        "over 1 MiB": b"From: " + me + b"\r\nX-Big: " + _folded(b"a" * 900, 1200),
    }

    def session():
        wire = Wire(server.submissions_port, tls=True)
        answers = {}
        try:
            wire.cmd("EHLO client.test")
            assert wire.cmd("AUTH PLAIN " + _b64(f"\0{address}\0{key}"))[0].startswith(b"235")
            for name, head in heads.items():
                wire.cmd(f"MAIL FROM:<{address}>")
                wire.cmd("RCPT TO:<bob@remote.example>")
                assert wire.cmd("DATA")[0].startswith(b"354")
                wire.sock.sendall(head + b"\r\n\r\nbody\r\n.\r\n")
                answers[name] = wire.reply()
            return answers
        finally:
            wire.close()

    answers = await deferToThread(session)
    assert {name: reply[0][:9] for name, reply in answers.items()} == {
        "bare LF": b"554 5.6.0", "bare CR": b"554 5.6.0", "not a field": b"554 5.6.0",
        "over 1 MiB": b"552 5.3.4"}
    assert query(_dsn(server), "SELECT count(*) FROM messages") == [(0,)]
