"""COPY and MOVE find their destination in the round trip that locks the source rows,
and COPY charges the inbox in the round trip of its blob references: COPY is three
round trips (lock, references and charge, write and COMMIT), MOVE two."""

from __future__ import annotations

import pytest_twisted

from tests.helpers import query
from tests.imap_client import Client, message, new_login, session

_BY_NAME = "AND (name = %s OR (upper(%s) = 'INBOX'"  # storage.imap.get_folder's lookup
_TARGET_IN_LOCK = "json_build_object('id', t.id"


def _transfer_trips(sent: list[str]) -> list[str]:
    """The messages of the command's transaction, from its locking read to COMMIT (a
    server timer's statements that ran meanwhile are not the command's)."""
    start = next(i for i, m in enumerate(sent) if _TARGET_IN_LOCK in m)
    own = [m for m in sent[start:] if m.txn == sent[start].txn]  # type: ignore[attr-defined]
    end = next(i for i, m in enumerate(own) if "COMMIT" in m)
    return own[:end + 1]


@pytest_twisted.ensureDeferred
async def test_copy_and_move_round_trips(server, sent, db_dsn):
    user, key = await new_login(server, "transfer-trips")
    for n in range(3):
        await server.deliver(message(n, f"s{n}"), [user])

    def run(c: Client) -> dict[str, tuple[list[bytes], list[str]]]:
        c.tagged("s", "SELECT INBOX")
        out = {}
        for tag, command in (("c", "UID COPY 1:2 Trash"), ("m", "UID MOVE 3 Trash")):
            sent.clear()
            out[tag] = c.tagged(tag, command), list(sent)
        return out

    out = await session(server.imap_port, user, key, run)
    copied, copy_sent = out["c"]
    moved, move_sent = out["m"]
    assert copied[-1].startswith(b"c OK [COPYUID "), copied
    assert any(b"OK [COPYUID " in line for line in moved), moved
    for trace in (copy_sent, move_sent):
        assert not any(_BY_NAME in m for m in trace), trace
    copy_trips = _transfer_trips(copy_sent)
    assert len(copy_trips) == 3, copy_trips
    assert "INSERT INTO inbox_usage_deltas" in copy_trips[1], copy_trips
    assert len(_transfer_trips(move_sent)) == 2, move_sent
    rows = query(db_dsn, "SELECT f.name, count(*) FROM messages m JOIN folders f "
                 "ON f.id = m.folder_id JOIN inboxes i ON i.id = m.inbox_id "
                 "WHERE i.email = %s GROUP BY f.name ORDER BY f.name", (user,))
    assert rows == [("INBOX", 2), ("Trash", 3)], rows


@pytest_twisted.ensureDeferred
async def test_copy_and_move_to_a_missing_folder_change_nothing(server, db_dsn):
    user, key = await new_login(server, "transfer-missing")
    await server.deliver(message(1, "s1"), [user])

    def run(c: Client) -> list[list[bytes]]:
        c.tagged("s", "SELECT INBOX")
        return [c.tagged("c", "UID COPY 1 Nowhere"), c.tagged("m", "UID MOVE 1 Nowhere"),
                c.tagged("f", "UID FETCH 1 FLAGS")]

    copied, moved, fetched = await session(server.imap_port, user, key, run)
    assert copied[-1].startswith(b"c NO [TRYCREATE]"), copied
    assert moved[-1].startswith(b"m NO [TRYCREATE]"), moved
    assert fetched[-1].startswith(b"f OK") and b"UID 1" in fetched[0], fetched
    rows = query(db_dsn, "SELECT count(*) FROM messages m JOIN inboxes i "
                 "ON i.id = m.inbox_id WHERE i.email = %s", (user,))
    assert rows == [(1,)]
