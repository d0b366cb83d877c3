"""The MX delivers to an inbox only if its own organization holds the address's domain
(verified, or a shared domain): an inbox another tenant left on a name that an
organization verified later (the races the outbound review closed, or any row that
predates them) is an unknown user, never a way to read the verified owner's mail."""

from __future__ import annotations

import smtplib

import pytest_twisted
from twisted.internet import threads

from tests.helpers import execute as _execute
from tests.helpers import query

_MSG = b"From: a@example.com\r\nTo: x\r\nSubject: route\r\n\r\nbody\r\n"


def _rcpt(port: int, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        code, text = s.rcpt(rcpt)
        if code == 250:
            code, text = s.data(_MSG)
        return code, text


async def squatted_name(server, name: str) -> tuple[dict, dict, str]:
    """Two organizations: the owner holds ``name``, verified, with inbox ``boss@`` on
    it; the squatter's inbox ``ceo@`` sits on the same name. Returns both inboxes and
    the squatter's key."""
    dsn = server.service.config.database.url
    _, owner_key = await server.new_org("Owner")
    _, other_key = await server.new_org("Squatter")
    mine = (await server.api.post("/api/v1/inboxes", {"username": "boss"},
                                  key=owner_key)).json
    theirs = (await server.api.post("/api/v1/inboxes", {"username": "ceo"},
                                    key=other_key)).json
    _execute(dsn, "INSERT INTO domains (org_id, id, environment_id, name, created_at, "
             "verified_at) SELECT org_id, 'dom_' || %s, environment_id, %s, now(), now() "
             "FROM inboxes WHERE id = %s", (name.replace(".", "_"), name, mine["id"]))
    for inbox, local in ((mine, "boss"), (theirs, "ceo")):
        _execute(dsn, "UPDATE inboxes SET domain = %s, email = %s WHERE id = %s",
                 (name, f"{local}@{name}", inbox["id"]))
    return mine, theirs, other_key


@pytest_twisted.ensureDeferred
async def test_an_inbox_on_a_name_another_tenant_verified_is_unknown(server):
    dsn = server.service.config.database.url
    mine, theirs, _ = await squatted_name(server, "victim.example")
    to_owner = await threads.deferToThread(_rcpt, server.mx_port, "boss@victim.example")
    to_squatter = await threads.deferToThread(_rcpt, server.mx_port, "CEO@victim.example")
    assert to_owner[0] == 250, to_owner
    assert to_squatter[0] == 550 and to_squatter[1].startswith(b"5.1.1"), to_squatter
    stored = query(dsn, "SELECT inbox_id FROM messages WHERE inbox_id IN (%s, %s)",
                   (mine["id"], theirs["id"]))
    assert stored == [(mine["id"],)]
