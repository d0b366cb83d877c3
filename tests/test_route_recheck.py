"""A copy is written only while no other organization holds its inbox's domain
(storage.message_batch.NAME_KEPT_SQL, checked in the delivering transaction).

A route is read at RCPT (or kept by core.route_cache until a change's notice arrives)
and used at DATA; a domain that changed hands in between must not bring the new
holder's mail to the former holder's inbox. What must hold: the copy fails with a
temporary error and nothing of it is stored; in a group-commit batch its batch-mates
are stored all the same; an inbox whose name nobody else holds is written as before.
"""

from __future__ import annotations

import smtplib

import pytest_twisted
from twisted.internet import threads

from tests.helpers import query
from tests.mailfactory import make_message
from tests.test_group_commit_batched import _batch, _setup
from tests.test_key_cache import _commit

_NAME = "moved-name.test"


async def _holder_inbox(server, db_dsn: str, key: str, org: dict, username: str) -> dict:
    """An inbox of ``org`` on ``_NAME``, which ``org`` holds verified."""
    await _commit(db_dsn, "INSERT INTO domains (org_id, id, environment_id, name, created_at, "
                  "verified_at) VALUES (%s, 'dom_moved_name', %s, %s, now(), now()) "
                  "ON CONFLICT (id) DO NOTHING",
                  (org["id"], org["default_environment_id"], _NAME))
    made = (await server.api.post("/api/v1/inboxes", {"username": username}, key=key)).json
    address = f"{username}@{_NAME}"
    await _commit(db_dsn, "UPDATE inboxes SET domain = %s, email = %s WHERE id = %s",
                  (_NAME, address, made["id"]))
    return {**made, "email": address}


async def _move_name(db_dsn: str, to: dict) -> None:
    await _commit(db_dsn, "UPDATE domains SET org_id = %s, environment_id = %s WHERE name = %s",
                  (to["id"], to["default_environment_id"], _NAME))


def _stored(db_dsn: str, inbox_id: str, msgid: str) -> int:
    [(n,)] = query(db_dsn, "SELECT count(*) FROM messages WHERE inbox_id = %s "
                           "AND message_id_header = %s", (inbox_id, msgid.strip("<>")))
    return n


@pytest_twisted.ensureDeferred
async def test_a_name_moved_between_rcpt_and_data_is_a_temporary_failure(server, db_dsn):
    former, former_key = await server.new_org("Former holder")
    new, _ = await server.new_org("New holder")
    inbox = await _holder_inbox(server, db_dsn, former_key, former, "boss")
    smtp = await threads.deferToThread(smtplib.SMTP, "127.0.0.1", server.mx_port,
                                       local_hostname="client.test", timeout=30)
    try:
        await threads.deferToThread(smtp.ehlo)
        await threads.deferToThread(smtp.mail, "sender@example.org")
        code, _ = await threads.deferToThread(smtp.rcpt, inbox["email"])
        assert code == 250  # still the former holder's name here
        await _move_name(db_dsn, new)
        raw = make_message(to=inbox["email"], subject="moved", msgid="<moved@name.test>")
        code, _ = await threads.deferToThread(smtp.data, raw)
        assert 400 <= code < 500
    finally:
        await threads.deferToThread(smtp.close)
    assert _stored(db_dsn, inbox["id"], "<moved@name.test>") == 0
    # the name back with its holder: mail flows again (the check is on the name, live)
    await _move_name(db_dsn, former)
    [stored] = await server.deliver(make_message(to=inbox["email"], msgid="<back@name.test>"),
                                    [inbox["email"]])
    assert stored.inbox_id == inbox["id"]


@pytest_twisted.ensureDeferred
async def test_in_a_batch_only_the_moved_copy_fails(server, db_dsn):
    _, _, targets, clock, gc = await _setup(server, "keep-a", "keep-b")
    former, former_key = await server.new_org("Batch former holder")
    new, _ = await server.new_org("Batch new holder")
    inbox = await _holder_inbox(server, db_dsn, former_key, former, "batched")
    moved = await server.core.router.resolve(inbox["email"], "a@example.com")  # at RCPT
    await _move_name(db_dsn, new)
    deliveries = [([targets[0]], make_message(subject="kept 1", msgid="<kept1@x>")),
                  ([moved], make_message(subject="moved", msgid="<moved-batch@x>")),
                  ([targets[1]], make_message(subject="kept 2", msgid="<kept2@x>")),
                  ([targets[0]], make_message(subject="kept 3", msgid="<kept3@x>"))]
    results = await _batch(server, gc, clock, deliveries)
    oks = [ok for ok, _ in results]
    assert oks == [True, False, True, True], results
    assert _stored(db_dsn, inbox["id"], "<moved-batch@x>") == 0
    for target, msgid in ((targets[0], "<kept1@x>"), (targets[1], "<kept2@x>"),
                          (targets[0], "<kept3@x>")):
        assert _stored(db_dsn, target.inbox_id, msgid) == 1
