"""IMAP's hot statements ask PostgreSQL for their generic plan (storage.prepared.
GENERIC_PLANS): the poll, SELECT, FETCH's row read and the last round trip of STORE and
EXPUNGE. Under ``plan_cache_mode = auto`` each of them was planned again on every use;
the answers must not change (the IMAP suites check them), and the setting must never
outlive the statement's transaction (SET LOCAL, sent only where the transaction ends
with the message)."""

from __future__ import annotations

import pytest_twisted

from agentpost.storage.prepared import GENERIC_PLANS
from tests.helpers import query
from tests.imap_client import Client, Lit, new_login, session


def _msg(n: int) -> bytes:
    return (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: g%d\r\n"
            b"Message-ID: <g%d@example.com>\r\n\r\nbody %d\r\n" % (n, n, n))


@pytest_twisted.ensureDeferred
async def test_hot_imap_statements_go_with_the_generic_plan_setting(server, sent, db_dsn):
    user, key = await new_login(server, "generic-plans")

    def run(c: Client) -> tuple[list[bytes], ...]:
        for n in range(3):
            c.tagged(f"a{n}", "APPEND INBOX ", Lit(_msg(n)))
        sent.clear()
        selected = c.tagged("s", "SELECT INBOX")
        fetched = c.tagged("f", "FETCH 1:* (UID RFC822.SIZE ENVELOPE)")
        stored = c.tagged("t", "STORE 2 +FLAGS (\\Deleted $Done)")
        expunged = c.tagged("e", "EXPUNGE")
        noop = c.tagged("n", "NOOP")
        return selected, fetched, stored, expunged, noop

    selected, fetched, stored, expunged, noop = await session(server.imap_port, user, key, run)
    assert selected[-1].startswith(b"s OK [READ-WRITE]")
    assert sum(1 for line in fetched if b" FETCH (UID " in line) == 3
    assert stored[-1].startswith(b"t OK") and any(b"$Done" in line for line in stored)
    assert b"* 2 EXPUNGE" in expunged and expunged[-1].startswith(b"e OK")
    assert noop[-1].startswith(b"n OK")
    generic = [m for m in sent if GENERIC_PLANS in m]
    kinds = {
        "select": any("AS folder_name" in m for m in generic),
        "fetch": any("imap_envelope FROM messages" in m for m in generic),
        "store": any("UPDATE messages m SET seen" in m for m in generic),
        "expunge": any("DELETE FROM messages" in m for m in generic),
        "poll": any("'folder' AS part" in m for m in generic),
    }
    assert all(kinds.values()), kinds
    # SET LOCAL: it ends with the statement's own transaction (a read sent alone, or
    # the round trip that commits), never in a transaction that goes on after it.
    for message in generic:
        assert message.startswith(GENERIC_PLANS) or "COMMIT" in message, message
    left = query(db_dsn, "SELECT count(*) FROM messages m JOIN inboxes i ON i.id = "
                 "m.inbox_id WHERE i.email = %s", (user,))
    assert left == [(2,)]
