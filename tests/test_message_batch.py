"""Issue 12: a group-commit batch's message rows travel as ONE JSON document in ONE
statement (storage.message_batch); what is stored is exactly what the per-copy
statement (storage.message_insert._insert_message_sql, still used for a lone delivery
and as the fallback) stores, odd values included.

Batches are made with a ``task.Clock`` (``delay_s``), as in tests/test_group_commit.py.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta, timezone

import pytest
import pytest_twisted

from agentpost.core import ingest as ingest_module
from agentpost.storage import message_batch
from agentpost.storage.message_insert import NotStored
from agentpost.storage.prepared import StatementCache
from tests.mailfactory import make_message
from tests.test_group_commit_batched import _batch, _rows, _setup

_PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
_MINUS_0800 = timezone(timedelta(hours=-8))
_LONG = "x" * 20000 + " end"
_ODD_TEXT = "é😀 \\ back\\slash 'single' \"double\" \t tab \x01 ctl \\u0000 literal / ∞\r\n"

#: Per subject, what the row gets instead of what the parser made.
_ODD: dict[str, dict] = {
    "odd zone": {
        "received_at": datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=_PLUS_0530),
        "sent_at": datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=_MINUS_0800),
        "labels": ["\\Important", "é😀", "quote'\"", "back\\slash", ""],
        "text_body": _ODD_TEXT * 50, "html_body": "<p>" + _ODD_TEXT + "</p>",
        "extracted_text": None, "preview": "",
        "headers": [["X-Long", _LONG], ["Subject", _ODD_TEXT], ["X-Empty", ""]],
        "reply_to": [{"email": "r@x.test", "name": "Ré \"q\" \\"}],
        "from_address": None, "cc_addresses": [], "envelope_from": None,
        "in_reply_to": "<p\\1@x>", "reference_ids": ["<a@x>", "<b'@x>", "<a@x>"],
        "sort_cc": "", "cc_text": None, "sent_date": None,
    },
    "odd utc": {
        "received_at": datetime(2026, 6, 1, 0, 0, 0, 1, tzinfo=UTC),
        "sent_at": None, "labels": [], "envelope_to": ["a@x.test", "b\\@x.test"],
        "subject": _ODD_TEXT + _LONG,
    },
    "plain": {"received_at": datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=UTC)},
}

_COMPARED = [c for c in message_batch.ROW_COLUMNS
             if c not in ("org_id", "id", "inbox_id", "environment_id", "thread_id",
                          "folder_id", "raw_blob_key", "created_at", "size",
                          "envelope_to", "imap_sections", "imap_envelope", "to_text",
                          "sort_to", "sort_display_to", "to_addresses")]


def _odd_rows(monkeypatch, drop: str | None = None) -> None:
    """Rows of the subjects in :data:`_ODD` get those values (``drop``: a column left
    out of every row, which the batch cannot carry: the per-copy fallback)."""
    real = ingest_module._build_copy

    def odd(txn, target, parsed, *args):
        copy = real(txn, target, parsed, *args)
        copy.row.update(_ODD.get(parsed.subject, {}))
        if drop:
            del copy.row[drop]
        return copy

    monkeypatch.setattr(ingest_module, "_build_copy", odd)


async def _stored(server, inbox_id: str) -> dict[str, dict]:
    rows = await _rows(server, "SELECT m.*, f.name AS folder FROM messages m "
                               "JOIN folders f ON f.id = m.folder_id WHERE m.inbox_id = %s "
                               "ORDER BY m.uid", inbox_id)
    return {r["message_id_header"]: r for r in rows}


#: The same bytes for both ways (a MIME boundary is random per message made).
_RAWS = [make_message(subject=subject, msgid=f"<{n}-{subject[-3:]}@x>",
                      attachments=[("a é.txt", "text/plain", b"\\x\x00y")])
         for n, subject in enumerate(_ODD)]


def _deliveries(target) -> list:
    return [([target], raw) for raw in _RAWS]


@pytest_twisted.ensureDeferred
async def test_a_batch_stores_odd_values_exactly_as_one_copy_at_a_time(server, monkeypatch,
                                                                        sent):
    _odd_rows(monkeypatch)
    _, [batched, alone], [t_batch, t_alone], clock, gc = await _setup(server, "jb1", "jb2")
    sent.clear()
    results = await _batch(server, gc, clock, _deliveries(t_batch))
    assert all(ok for ok, _ in results), results
    assert gc.batches == 1
    [write] = [m for m in sent if "populate_recordset(NULL::messages" in m]
    assert "INSERT INTO messages" in write
    for targets, raw in _deliveries(t_alone):  # the per-copy statement, no batch
        await server.core.ingest.store(targets, io.BytesIO(raw), envelope_from="a@example.com")
    got, want = await _stored(server, batched["id"]), await _stored(server, alone["id"])
    assert len(got) == len(want) == 3
    for key, row in got.items():
        assert {c: row[c] for c in _COMPARED} == {c: want[key][c] for c in _COMPARED}
        assert row["internal_date_zone"] == want[key]["internal_date_zone"]
    odd = got["0-one@x"]
    assert odd["received_at"] == _ODD["odd zone"]["received_at"]  # microseconds, instant
    assert odd["internal_date_zone"] == 330
    assert odd["labels"] == _ODD["odd zone"]["labels"]
    assert odd["text_body"] == _ODD_TEXT * 50
    assert odd["headers"][0] == ["X-Long", _LONG]
    assert odd["from_address"] is None and odd["extracted_text"] is None
    assert got["1-utc@x"]["envelope_to"] == ["a@x.test", "b\\@x.test"]
    assert got["1-utc@x"]["internal_date_zone"] is None
    # References and attachments, per message, as the per-copy statement writes them.
    refs = await _rows(server, "SELECT r.ref FROM message_refs r JOIN messages m "
                               "ON m.id = r.message_id WHERE m.inbox_id = %s ORDER BY r.ref",
                       batched["id"])
    assert [r["ref"] for r in refs] == ["<a@x>", "<b'@x>", "<p\\1@x>"]  # + In-Reply-To
    atts = await _rows(server, "SELECT a.filename, a.mime_type, a.size, a.part_index, "
                               "a.org_id = m.org_id AS same_org FROM attachments a "
                               "JOIN messages m ON m.id = a.message_id "
                               "WHERE m.inbox_id = %s", batched["id"])
    assert len(atts) == 3 and all(a["filename"] == "a é.txt" and a["same_org"] for a in atts)
    assert all(r["has_attachments"] for r in got.values())


@pytest_twisted.ensureDeferred
async def test_uids_modseqs_and_usage_follow_the_batch_order_in_each_folder(server,
                                                                           monkeypatch):
    from agentpost.core import group_commit as gc_module

    real = gc_module.mail_store.insert_messages
    order: list[str] = []  # the subjects, in the order the batch writes them

    async def spy(txn, writes, **kw):
        order.extend(row["subject"] for row, _, _ in writes)
        return await real(txn, writes, **kw)

    monkeypatch.setattr(gc_module.mail_store, "insert_messages", spy)
    _, [one, two], targets, clock, gc = await _setup(server, "jo1", "jo2")
    deliveries = [([targets[n % 2]], make_message(subject=f"o {n}", msgid=f"<o{n}@x>"))
                  for n in range(7)]
    results = await _batch(server, gc, clock, deliveries)
    assert all(ok for ok, _ in results) and gc.batches == 1
    for n, inbox in enumerate((one, two)):
        rows = await _rows(server, "SELECT m.uid, m.modseq, m.subject, f.uidnext, "
                                   "f.highestmodseq FROM messages m JOIN folders f "
                                   "ON f.id = m.folder_id WHERE m.inbox_id = %s "
                                   "ORDER BY m.uid", inbox["id"])
        subjects = [s for s in order if int(s[2:]) % 2 == n]
        assert len(subjects) == len(range(n, 7, 2))
        assert [r["subject"] for r in rows] == subjects  # UIDs in the batch's order
        assert [r["uid"] for r in rows] == list(range(1, len(subjects) + 1))
        modseqs = [r["modseq"] for r in rows]
        assert modseqs == sorted(set(modseqs))
        assert rows[-1]["uidnext"] == len(subjects) + 1
        assert rows[-1]["highestmodseq"] == modseqs[-1]
        [use] = await _rows(server, "SELECT count(*) AS n, sum(bytes) AS b "
                                    "FROM inbox_usage_deltas WHERE inbox_id = %s", inbox["id"])
        sizes = await _rows(server, "SELECT sum(size) AS b FROM messages WHERE inbox_id = %s",
                            inbox["id"])
        assert use == {"n": len(subjects), "b": sizes[0]["b"]}  # one delta per message


@pytest_twisted.ensureDeferred
async def test_a_row_json_cannot_carry_goes_one_statement_per_copy(server, monkeypatch, sent):
    """A row without every column (JSON would store NULL where the table has a default)
    is written by the per-copy statements, in the same batch transaction."""
    _odd_rows(monkeypatch, drop="sort_cc")
    _, [inbox], [target], clock, gc = await _setup(server, "jfall")
    sent.clear()
    results = await _batch(server, gc, clock, _deliveries(target))
    assert all(ok for ok, _ in results) and gc.batches == 1
    assert not [m for m in sent if "populate_recordset(NULL::messages" in m]
    got = await _stored(server, inbox["id"])
    assert {r["sort_cc"] for r in got.values()} == {""}  # the column's default
    assert sorted(r["uid"] for r in got.values()) == [1, 2, 3]


def test_values_json_cannot_carry_make_no_batch():
    row = dict.fromkeys(message_batch.ROW_COLUMNS)
    row["received_at"] = datetime(2026, 1, 1, tzinfo=UTC)
    assert message_batch.batch_insert_sql([(row, [])], "c") is not None
    assert message_batch.batch_insert_sql([({**row, "text_body": object()}, [])], "c") is None
    # A lone surrogate reaches psycopg2, which refuses to encode it, as it always did
    # (Txn._send: InvalidRequest).
    odd = message_batch.batch_insert_sql([({**row, "subject": "\ud800"}, [])], "c")
    with pytest.raises(UnicodeEncodeError):
        odd[1][0].encode()
    assert message_batch.batch_insert_sql([({**row, "extra": 1}, [])], "c") is None
    assert message_batch.batch_insert_sql([], "c") is None


@pytest_twisted.ensureDeferred
async def test_a_batch_with_a_vanished_inbox_names_its_message(server, monkeypatch,
                                                                sent):
    """An inbox deleted between staging and the write: its copy is not stored (named,
    run alone), its batch-mates are."""
    _, [keep, _], targets, clock, gc = await _setup(server, "jk", "jg")
    real = ingest_module._build_copy

    def vanished(txn, target, parsed, *args):
        copy = real(txn, target, parsed, *args)
        if parsed.subject == "lost":
            copy.row["inbox_id"] = "inb_does_not_exist"
        return copy

    monkeypatch.setattr(ingest_module, "_build_copy", vanished)
    sent.clear()
    results = await _batch(server, gc, clock, [
        ([targets[0]], make_message(subject="kept", msgid="<kept@x>")),
        ([targets[1]], make_message(subject="lost", msgid="<lost@x>")),
        ([targets[0]], make_message(subject="kept too", msgid="<kept2@x>")),
    ])
    assert results[0][0] and results[2][0] and not results[1][0]
    assert isinstance(results[1][1].value, NotStored)
    writes = [m for m in sent if "INSERT INTO messages" in m]
    assert "populate_recordset(NULL::messages" in writes[0]  # the batch's attempt
    assert all("populate_recordset" not in m for m in writes[1:])  # two, then one: alone
    rows = await _rows(server, "SELECT count(*) AS n FROM messages WHERE inbox_id = %s",
                       keep["id"])
    assert rows == [{"n": 2}]
    [deltas] = await _rows(server, "SELECT count(*) AS n FROM inbox_usage_deltas "
                                   "WHERE inbox_id = %s", keep["id"])
    assert deltas == {"n": 2}  # the failed attempt's were rolled back with it


def test_a_new_string_of_statements_run_often_enough_elsewhere_is_prepared_at_once():
    """A batch's write is the same statements, a different number of them each time:
    its strings rarely repeat whole, so the threshold also counts their statements."""
    cache = StatementCache(3)
    each, last = "INSERT INTO t VALUES (%s)", "SELECT %s::int"

    def batch(n: int) -> str:
        return "; ".join([each] * n + ["SET LOCAL a TO b", last])

    assert cache.template(batch(1), [1, 2]) is None  # each: 1, last: 1
    assert cache.template(batch(2), [1, 2, 3]) is None  # each: 3, last: 2
    assert cache.template(batch(3), [1, 2, 3, 4]) is not None  # each: 6, last: 3
    assert cache.template("SELECT %s::int + 7", [1]) is None  # a statement seen once
    assert cache.template("SET LOCAL a TO b", None) is None  # seen 3 times, but not
    # a statement that can be prepared: the whole string's own count decides, as before


@pytest_twisted.ensureDeferred
async def test_a_nul_in_one_row_does_not_block_its_batch_mates(server, monkeypatch):
    """PostgreSQL text cannot hold NUL: in the batch's JSON it fails the one statement
    (``\\u0000`` in jsonb), as psycopg2's refusal failed the per-copy ones before; every
    delivery is then run alone, so the others are stored and that one gets the same
    error as when it was alone (InvalidRequest: a 5xx to the client, never a 500)."""
    from agentpost.model.errors import InvalidRequest

    real = ingest_module._build_copy

    def nul(txn, target, parsed, *args):
        copy = real(txn, target, parsed, *args)
        if parsed.subject == "nul":
            copy.row["text_body"] = "before\x00after"
        return copy

    monkeypatch.setattr(ingest_module, "_build_copy", nul)
    _, [inbox], [target], clock, gc = await _setup(server, "jnul")
    results = await _batch(server, gc, clock, [
        ([target], make_message(subject=s, msgid=f"<{s}@x>")) for s in ("a", "nul", "b")])
    assert results[0][0] and results[2][0] and not results[1][0]
    assert isinstance(results[1][1].value, InvalidRequest)
    assert gc.batches == 4  # the shared attempt, then each alone
    rows = await _rows(server, "SELECT subject FROM messages WHERE inbox_id = %s "
                               "ORDER BY subject", inbox["id"])
    assert [r["subject"] for r in rows] == ["a", "b"]
