"""A single APPEND's insert carries its COMMIT (storage.message_insert, ``commit``):
one round trip fewer, the folder's UID lock held through no further exchange, and a
refusal (the quota) still leaves nothing behind."""

from __future__ import annotations

import pytest_twisted

from agentpost.storage.database import _UNLOCK_THEN_FLUSH
from tests.helpers import query
from tests.imap_client import Client, Lit, new_login, session


def _msg(n: int, size: int = 0) -> bytes:
    return (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: c%d\r\n"
            b"Message-ID: <c%d@example.com>\r\n\r\nbody\r\n" % (n, n)) + b"y" * size


@pytest_twisted.ensureDeferred
async def test_append_commits_in_the_insert_round_trip(server, sent):
    user, key = await new_login(server, "append-commit")

    def run(c: Client) -> list[bytes]:
        sent.clear()
        return c.tagged("a", "APPEND INBOX (\\Seen $Work) ", Lit(_msg(1)))

    ok = await session(server.imap_port, user, key, run)
    assert ok[-1].startswith(b"a OK [APPENDUID ")
    inserts = [m for m in sent if "INSERT INTO messages" in m]
    assert len(inserts) == 1 and "COMMIT" in inserts[0], inserts
    # No ending of its own after it (other transactions -- the audit buffer's flush, a
    # timer -- may commit meanwhile: they never send the early-unlock ending alone).
    after = sent[sent.index(inserts[0]) + 1:]
    assert _UNLOCK_THEN_FLUSH not in after, after

    def check(c: Client) -> list[bytes]:
        c.tagged("s", "SELECT INBOX")
        return c.tagged("f", "UID FETCH 1:* (FLAGS RFC822.SIZE)")

    fetched = await session(server.imap_port, user, key, check)
    assert b"\\Seen" in fetched[0] and b"$Work" in fetched[0]


@pytest_twisted.ensureDeferred
async def test_append_over_quota_commits_nothing_of_the_message(small_quota, db_dsn):
    server = small_quota
    user, key = await new_login(server, "append-quota")

    def run(c: Client) -> tuple[list[bytes], list[bytes]]:
        first = c.tagged("a", "APPEND INBOX ", Lit(_msg(1, 40_000)))
        second = c.tagged("b", "APPEND INBOX ", Lit(_msg(2, 40_000)))
        return first, second

    first, second = await session(server.imap_port, user, key, run)
    assert first[-1].startswith(b"a OK")
    assert second[-1].startswith(b"b NO [OVERQUOTA]"), second
    rows = query(db_dsn, "SELECT subject FROM messages m JOIN inboxes i ON i.id = m.inbox_id "
                 "WHERE i.email = %s ORDER BY subject", (user,))
    assert [r[0] for r in rows] == ["c1"]
    threads = query(db_dsn, "SELECT t.subject FROM threads t JOIN inboxes i "
                    "ON i.id = t.inbox_id WHERE i.email = %s", (user,))
    assert [t[0] for t in threads] == ["c1"]  # c2's thread rolled back with it
