"""The changes poll (storage.imap.changes) reaches messages only through the folder row
of the asking organization: its message parts are scoped by that row, not by an
``org_id`` test of their own (which made the planner read every message of the
organization per poll), so a foreign organization naming the folder's id must see
nothing at all -- no new, changed or present messages."""

import pytest_twisted

from agentpost.storage import imap as imap_store
from tests.mailfactory import make_message
from tests.test_imap_backend import _account


async def _selected(server, name, count):
    """An account whose INBOX holds ``count`` new messages, selected."""
    account, inbox, _ = await _account(server, name)
    for i in range(count):
        await server.deliver(make_message(subject=f"{name}{i}", msgid=f"<{name}{i}@x>"),
                             [inbox["email"]])
    folder, snap = await account.select("INBOX")
    return account, folder, snap


@pytest_twisted.ensureDeferred
async def test_changes_of_a_foreign_folder_id_are_empty(server):
    account, folder, snap = await _selected(server, "pollscope", 3)
    other, _, _ = await _account(server, "pollother")
    await folder.store([1], "+", frozenset({"\\Flagged"}), None)

    async def raw(org_id):
        return await server.core.db.run_interaction(
            "t", imap_store.changes, org_id, folder.folder_id, 0, [1, 2, 3], 0)

    own = await raw(account.principal.org_id)
    assert [r["uid"] for r in own["new"]] == [1, 2, 3]
    assert own["highestmodseq"] > 0
    foreign = await raw(other.principal.org_id)
    assert other.principal.org_id != account.principal.org_id
    assert foreign == {"new": [], "changed": [], "present": set(), "highestmodseq": 0,
                       "recent_uid": None}
    # and as the owner: only known UIDs above the mark are "changed", none are new
    since = snap.highestmodseq
    again = await server.core.db.run_interaction(
        "t", imap_store.changes, account.principal.org_id, folder.folder_id, 3, [1, 2, 3],
        since)
    assert [r["uid"] for r in again["changed"]] == [1] and again["new"] == []


@pytest_twisted.ensureDeferred
async def test_changes_after_an_expunge_name_exactly_the_known_uids_left(server):
    """After something left, the poll sends back the known UIDs that are gone (not the
    ones still present) and ``present`` is the rest of the known list: a UID expunged
    here, a UID the client claims but never existed, and the untouched ones."""
    account, folder, snap = await _selected(server, "pollgone", 4)
    await folder.store([2], "+", frozenset({"\\Deleted"}), None)
    assert await folder.expunge(None) == [2]
    found = await server.core.db.run_interaction(
        "t", imap_store.changes, account.principal.org_id, folder.folder_id, 4,
        [1, 2, 3, 4, 9], snap.highestmodseq)
    assert found["present"] == {1, 3, 4}
    seen = await folder.changes([1, 2, 3, 4], snap.highestmodseq)
    assert seen.expunged == [2] and seen.new == []
