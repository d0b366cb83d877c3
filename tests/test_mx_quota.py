"""The MX refuses a full inbox at RCPT (552 5.2.2), and reads an inbox's use only when
a quota is configured: without one, routing never sums the pending usage deltas."""

from __future__ import annotations

import smtplib

import pytest_twisted
from twisted.internet import threads

from tests.imap_client import new_login


def _msg(n: int, size: int) -> bytes:
    head = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: q%d\r\n"
            b"Message-ID: <q%d@example.com>\r\n\r\n" % (n, n))
    return head + (b"y" * 78 + b"\r\n") * (size // 80)


def _send(port: int, rcpt: str, raw: bytes) -> tuple[int, bytes]:
    """(code, text) of the first refusal (RCPT or DATA), or (250, b"") when accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        code, text = s.rcpt(rcpt)
        if code != 250:
            return code, text
        code, text = s.data(raw)
        return (250, b"") if code == 250 else (code, text)


@pytest_twisted.ensureDeferred
async def test_a_full_inbox_is_refused_at_rcpt(small_quota, sent):
    server = small_quota
    address, _ = await new_login(server, "mx-quota")
    answers = [await threads.deferToThread(_send, server.mx_port, address, _msg(n, 40_000))
               for n in range(3)]
    # 40 KB then 80 KB used: the third RCPT finds the inbox at or over 64 KiB.
    assert answers[0] == (250, b"") and answers[1] == (250, b""), answers
    assert answers[2][0] == 552 and answers[2][1].startswith(b"5.2.2"), answers
    routes = [m for m in sent if "AS hosted" in m]
    assert routes and all("inbox_usage_deltas" in m for m in routes), routes


@pytest_twisted.ensureDeferred
async def test_without_a_quota_routing_reads_no_usage(server, sent):
    address, _ = await new_login(server, "mx-noquota")
    for n in range(2):
        assert await threads.deferToThread(_send, server.mx_port, address,
                                           _msg(n, 40_000)) == (250, b"")
    routes = [m for m in sent if "AS hosted" in m]
    assert len(routes) >= 1, sent  # the second RCPT may come from the route cache
    assert not any("inbox_usage_deltas" in m for m in routes), routes
