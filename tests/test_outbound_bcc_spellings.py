"""Bcc never leaves, however the client spelled the field: RFC 5322's obsolete syntax
lets a submitted header say ``Bcc :`` or ``BCC<TAB>:``, and the worker's quick test
looked for ``bcc:`` only, so such a Bcc went out to every recipient (found by the HTTP
door's review)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from agentpost.outbound.worker import without_bcc
from tests.test_smtp_submission import _count, _login, _setup, _wait_for
from tests.test_smtp_submission import outbox as outbox
from tests.test_smtp_submission import sub as sub

_SPELLINGS = [b"Bcc", b"Bcc ", b"BCC\t", b"bcc  ", b"Resent-Bcc ", b"X-SES-SOURCE-ARN "]


@pytest.mark.parametrize("name", _SPELLINGS)
def test_every_spelling_is_removed_with_its_folded_lines(name):
    raw = (b"From: a@example.org\r\n" + name + b": carol@example.org,\r\n dave@example.org"
           b"\r\nSubject: s\r\n\r\nBcc: a body line stays\r\n")
    assert without_bcc(raw) == (b"From: a@example.org\r\nSubject: s\r\n\r\n"
                                b"Bcc: a body line stays\r\n")


@pytest_twisted.ensureDeferred
async def test_a_submitted_bcc_with_a_space_before_the_colon_does_not_leave(sub, outbox):
    _, sender, _, _, key = await _setup(sub)
    raw = (f"From: {sender['email']}\r\nTo: bob@remote.example\r\n"
           "Bcc : carol@remote.example\r\nSubject: spaced\r\n\r\nBody.\r\n").encode()

    def send():
        with _login(sub.submission_port, sender["email"], key) as smtp:
            smtp.sendmail(sender["email"], ["bob@remote.example", "carol@remote.example"],
                          raw)

    await deferToThread(send)

    async def emls():
        return sorted(outbox.glob("*.eml")) if outbox.exists() else []

    assert await _wait_for(lambda: defer.ensureDeferred(_count(emls, 1)))
    for path in await emls():
        data = path.read_bytes()
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        assert b"carol@remote.example" not in head.replace(
            b"x-agentpost-envelope-to: <carol@remote.example>", b""), data
        assert b"bcc" not in head, data
