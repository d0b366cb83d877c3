"""Section cuts of messages with very many lines run off the reactor thread.

A header of 50,000 short fields (or as many folded lines) costs ~3 µs a line to walk in
Python: on the reactor, one client's ``BODY.PEEK[HEADER.FIELDS (...)]`` of such a message
would stall every session. These tests check where the cut runs and that what comes back
over a real socket is still exact."""

from __future__ import annotations

import re
import threading

import pytest_twisted

from agentpost.imap.commands import offload
from agentpost.mail import imapformat
from tests.imap_client import Client, new_inbox, session


def _where(data: bytes) -> tuple[str, int]:
    return threading.current_thread().name, len(data)


@pytest_twisted.ensureDeferred
async def test_short_inputs_are_cut_inline_and_long_ones_in_the_pool():
    here = threading.current_thread().name
    short = b"Subject: a\r\n" * offload.INLINE_MAX_LINES
    long = short + b"X: b\r\n"
    from twisted.internet import reactor, task

    assert await offload.cut(reactor, _where, short) == (here, len(short))
    name, size = await offload.cut(reactor, _where, long)
    assert name != here and size == len(long)
    # a clock without a thread pool (the in-memory protocol tests' task.Clock): inline
    assert await offload.cut(task.Clock(), _where, long) == (here, len(long))


def _huge_header(to: str, fields: int) -> bytes:
    return (f"From: a@example.org\r\nTo: {to}\r\nSubject: many fields\r\n".encode()
            + b"".join(b"X-Pad-%d: v\r\n" % i for i in range(fields))
            + b"Subject-Extra: folded\r\n" + b" more\r\n" * 5000
            + b"\r\nbody line\r\n")


@pytest_twisted.ensureDeferred
async def test_header_fields_of_a_huge_header_come_back_exact(server):
    """FETCH of HEADER.FIELDS, HEADER.FIELDS.NOT and HEADER of a 50,000-field header:
    the same bytes imapformat gives when run directly."""
    inbox, key = await new_inbox(server, "offload-huge")
    raw = _huge_header(inbox["email"], 50_000)
    await server.deliver(raw, [inbox["email"]])

    def work(c: Client) -> bytes:
        c.transcript(b"SELECT INBOX")
        return c.transcript(b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT X-PAD-49999)] "
                            b"BODY.PEEK[HEADER.FIELDS.NOT (X-PAD-1)])")

    out = await session(server.imap_port, inbox["email"], key, work)
    assert out.rstrip().endswith(b"OK FETCH completed"), out[-200:]
    literals = [(m, int(m.group(1))) for m in re.finditer(rb"\{(\d+)\}\r\n", out)]
    got = [out[m.end():m.end() + n] for m, n in literals]
    assert got[0] == b"Subject: many fields\r\nX-Pad-49999: v\r\n\r\n"
    header = raw[:raw.index(b"\r\n\r\n") + 4]
    assert got[1] == imapformat.filter_header_fields(header, ("X-PAD-1",), False)
    assert b"X-Pad-1: v\r\n" not in got[1] and got[1].count(b"\r\n") > 50_000
