"""A group-commit batch threads its messages as one delivery at a time would, also when
they refer to each other (core.batch_threads): a reply whose parent is in the same
batch joins the parent's thread, a parent whose reply came first joins the reply's, a
stored parent wins over one in the batch, a parent in the batch over a stored reply.

Each case is delivered once as one batch (a ``task.Clock`` holds it, as in
tests/test_group_commit.py) and once one message at a time into a twin inbox; the
messages must fall into the same threads, with the same thread rows.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from agentpost.core.batch_threads import link_threads
from agentpost.storage import migrations
from agentpost.storage.message_insert import DeliveryAnswer, DeliveryProbe
from tests.mailfactory import make_message
from tests.test_group_commit import _wait_pending
from tests.test_group_commit_batched import _rows, _setup


def _msg(subject: str, msgid: str, *, parent: str | None = None,
         refs: str | None = None) -> bytes:
    return make_message(subject=subject, msgid=msgid, in_reply_to=parent, references=refs)


#: name: (stored first in both inboxes, then the batch), each a list of messages.
_CASES: dict[str, tuple[list[bytes], list[bytes]]] = {
    "parent, reply, other, reply to the reply": ([], [
        _msg("p", "<p@x>"), _msg("r", "<r@x>", parent="<p@x>"), _msg("o", "<o@x>"),
        _msg("rr", "<rr@x>", parent="<r@x>", refs="<p@x> <r@x>")]),
    "the reply first, then its parent": ([], [
        _msg("r", "<r@x>", parent="<p@x>", refs="<p@x>"), _msg("o", "<o@x>"),
        _msg("p", "<p@x>")]),
    "the reply first, naming its parent in In-Reply-To only": ([], [
        _msg("r", "<r@x>", parent="<p@x>"), _msg("o", "<o@x>"), _msg("p", "<p@x>")]),
    "a stored parent wins over one in the batch": ([_msg("sp", "<sp@x>")], [
        _msg("q", "<q@x>"), _msg("o", "<o@x>"),
        _msg("r", "<r@x>", parent="<q@x>", refs="<sp@x> <q@x>")]),
    "a parent in the batch wins over a stored reply": (
        [_msg("sr", "<sr@x>", parent="<p2@x>")], [
            _msg("x", "<x@x>"), _msg("o", "<o@x>"), _msg("p2", "<p2@x>", parent="<x@x>")]),
    "a stored reply, no parent anywhere": ([_msg("sr", "<sr@x>", parent="<p3@x>")], [
        _msg("o", "<o@x>"), _msg("p3", "<p3@x>"), _msg("o2", "<o2@x>")]),
}


async def _threads(server, inbox_id: str) -> list[tuple]:
    """The inbox's messages grouped by thread (subjects), with each thread's count."""
    rows = await _rows(server, "SELECT t.id, t.message_count, m.subject FROM messages m "
                               "JOIN threads t ON t.id = m.thread_id "
                               "WHERE m.inbox_id = %s ORDER BY m.subject", inbox_id)
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row["id"], [row["message_count"]]).append(row["subject"])
    orphans = await _rows(server, "SELECT count(*) AS n FROM threads t WHERE t.inbox_id = %s "
                                  "AND NOT EXISTS (SELECT 1 FROM messages m "
                                  "WHERE m.thread_id = t.id)", inbox_id)
    assert orphans == [{"n": 0}]
    return sorted(tuple(g) for g in groups.values())


def _store(server, target, raw: bytes, group: bool) -> defer.Deferred:
    return defer.ensureDeferred(server.core.ingest.store(
        [target], io.BytesIO(raw), envelope_from="a@example.com", group=group))


@pytest.mark.parametrize("case", list(_CASES))
@pytest_twisted.ensureDeferred
async def test_a_batch_threads_as_one_delivery_at_a_time(server, case):
    stored, batch = _CASES[case]
    _, [batched, alone], [t_batch, t_alone], clock, gc = await _setup(server, "bt1", "bt2")
    for raw in stored:
        for target in (t_batch, t_alone):
            await _store(server, target, raw, group=False)
    pending = []
    for raw in batch:  # in this order
        pending.append(_store(server, t_batch, raw, group=True))
        await _wait_pending(gc, len(pending))
    clock.advance(1.0)
    results = await defer.DeferredList(pending, consumeErrors=True)
    assert all(ok for ok, _ in results), results
    assert gc.batches == 1
    for raw in batch:
        await _store(server, t_alone, raw, group=False)
    got = await _threads(server, batched["id"])
    assert got == await _threads(server, alone["id"])
    assert sum(len(g) - 1 for g in got) == len(stored) + len(batch)
    if case.startswith("parent, reply"):
        assert (3, "p", "r", "rr") in got and (1, "o") in got
    if case.startswith("the reply first"):
        assert (2, "p", "r") in got and (1, "o") in got


@pytest_twisted.ensureDeferred
async def test_rows_from_before_migration_0039_get_their_in_reply_to(server):
    """Messages stored before In-Reply-To was recorded in message_refs get it from the
    migration, so a parent arriving later still finds their thread."""
    _, [inbox], [target], _, _ = await _setup(server, "btm")
    server.core.ingest.group_commit = None
    await _store(server, target, _msg("r", "<mr@x>", parent="<mp@x>"), group=False)
    await _rows(server, "DELETE FROM message_refs r USING messages m WHERE m.id = "
                        "r.message_id AND m.inbox_id = %s RETURNING r.ref", inbox["id"])
    sql = (Path(migrations.__file__).parent / "migrations"
           / "0039_refs_in_reply_to.sql").read_text()
    await server.core.db.run_interaction("t", lambda txn: txn.execute(sql))
    refs = await _rows(server, "SELECT r.ref FROM message_refs r JOIN messages m "
                               "ON m.id = r.message_id WHERE m.inbox_id = %s", inbox["id"])
    assert refs == [{"ref": "mp@x"}]
    await _store(server, target, _msg("p", "<mp@x>"), group=False)
    assert await _threads(server, inbox["id"]) == [(2, "p", "r")]


def _probe(msgid: str, related: list[str], inbox: str = "i") -> DeliveryProbe:
    return DeliveryProbe("o", inbox, "INBOX", [], msgid, related)


def test_links_are_per_inbox_and_follow_the_stored_kinds():
    none = DeliveryAnswer(None, None, [])
    stored_child = DeliveryAnswer(None, "thr_child", [], thread_kind=1)
    stored_parent = DeliveryAnswer(None, "thr_parent", [], thread_kind=0)
    probes = [_probe("<a>", []), _probe("<b>", ["<a>"], inbox="other"),
              _probe("<c>", ["<a>"]), _probe("<d>", ["<a>"]), _probe("<e>", ["<a>"])]
    out = link_threads(probes, [none, none, stored_child, stored_parent, none])
    assert out[0].starts_thread and out[0].thread_id  # the first starts the thread ...
    assert out[1] == none  # ... another inbox's reply does not join it
    assert out[2].thread_id == out[0].thread_id  # a parent in the batch beats a referrer
    assert out[3] == stored_parent  # a stored parent is kept
    assert out[4].thread_id == out[0].thread_id and not out[4].starts_thread
    # Nobody refers to anybody: the answers are unchanged.
    alone = [_probe("<x>", []), _probe("<y>", ["<z>"])]
    assert link_threads(alone, [none, none]) == [none, none]


def test_a_large_batch_is_linked_in_linear_time():
    """A batch may hold 16 deliveries of a thousand copies each: the links are found
    through maps, not by comparing every pair (which would hold the reactor)."""
    n = 20000
    probes = [_probe(f"<m{k}>", [f"<m{k - 1}>"] if k else []) for k in range(n)]
    out = link_threads(probes, [DeliveryAnswer(None, None, [])] * n)
    assert len({a.thread_id for a in out}) == 1 and out[0].starts_thread
    assert sum(a.starts_thread for a in out) == 1
