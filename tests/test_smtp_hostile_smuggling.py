"""SMTP smuggling on the way out (smtphostile): the listeners store a body's bare CR and
bare LF as they came (they never end a line or the data there), so whatever sends the
message on must not pass them to another server, for which ``<CR>.<CR>`` or
``<LF>.<LF>`` may end the data and start a second, forged transaction.  The smarthost
transport turned bare LF into CRLF but passed bare CR through.

A submitted message with such bytes goes through the real listener, the real queue and
the smtp transport to an ESMTP sink on loopback.
"""

from __future__ import annotations

import re
import smtplib
import ssl

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests import test_outbound_smarthost as smarthost_tests
from tests.conftest import _DEV_TLS, start_server
from tests.test_outbound_smarthost import _settle, smarthost_config

sink_factory = smarthost_tests.sink_factory

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@pytest_twisted.ensureDeferred
async def test_a_submitted_body_s_bare_cr_and_lf_never_reach_the_next_server(
        db_dsn, openapi_checker, sink_factory, dev_tls, tmp_path):
    sink = sink_factory()
    config = smarthost_config(db_dsn, sink, dev_tls, tmp_path, "200ms")
    server = await start_server(config, openapi_checker)
    try:
        _, owner = await server.new_org()
        inbox = (await server.api.post("/api/v1/inboxes", {"username": "smuggler"},
                                       key=owner)).json
        key = (await server.api.post("/api/v1/api-keys", {
            "name": "smtp", "scopes": ["messages:send"]}, key=owner)).json["key"]
        me = inbox["email"].encode()
        forged = (b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@far.test>\r\nDATA\r\n"
                  b"From: ceo@bank.example\r\nSubject: forged\r\n")
        raw = (b"From: " + me + b"\r\nTo: victim@far.test\r\nSubject: smuggle\r\n\r\n"
               b"cr\r.\r" + forged + b"lf\n.\n" + forged + b"end\r\n")

        def submit():
            context = ssl.create_default_context(cafile=_DEV_TLS["ca"])
            with smtplib.SMTP_SSL("127.0.0.1", server.submissions_port, context=context,
                                  timeout=30) as smtp:
                smtp.login(inbox["email"], key)
                smtp.mail(inbox["email"])
                smtp.rcpt("victim@far.test")
                # smtplib would turn bare CR/LF into CRLF: send the body by hand.
                smtp.putcmd("data")
                assert smtp.getreply()[0] == 354
                smtp.send(raw + b".\r\n")
                return smtp.getreply()

        code, _ = await deferToThread(submit)
        assert code == 250
        assert await _settle(lambda: len(sink.messages) == 1, rounds=2000)
        [got] = sink.messages
        assert got.recipients == ["victim@far.test"]
        assert BARE.search(got.data) is None
        # Each would-be terminator is an ordinary line of the one message now (it was
        # dot-stuffed on the wire, and the sink, like every receiver, unstuffed it).
        assert b"\r\ncr\r\n.\r\nMAIL FROM:<ceo@bank.example>\r\n" in got.data
        assert b"\r\nlf\r\n.\r\nMAIL FROM:<ceo@bank.example>\r\n" in got.data
    finally:
        await server.service.stopService()
