"""IMAP COPY shares the stored bytes: every blob of the copied messages (the raw message
and each attachment, a repeated attachment counted as often as it appears) gets one more
user, taken in one round trip for all of them (storage.mail.reference_copies_sql), and
the counts come back down exactly as the copies and then the originals are expunged."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import query
from tests.mailfactory import make_message
from tests.test_imap_e2e import _inbox, _starttls


def _refcounts(dsn: str, org_id: str) -> dict[str, int]:
    rows = query(dsn, "SELECT b.key, b.refcount FROM blobs b WHERE b.key IN ("
                      "SELECT raw_blob_key FROM messages WHERE org_id = %s UNION "
                      "SELECT blob_key FROM attachments WHERE org_id = %s)", (org_id, org_id))
    return dict(rows)


@pytest_twisted.ensureDeferred
async def test_copy_references_every_blob_once_per_use_and_expunge_gives_them_back(
        server, db_dsn, sent):
    inbox, key = await _inbox(server, "copy-refs")
    same = b"%PDF-1.4 the same bytes twice\n" * 40
    await server.deliver(make_message(to=inbox["email"], subject="with files", attachments=[
        ("a.pdf", "application/pdf", same), ("b.pdf", "application/pdf", same),
        ("c.txt", "text/plain", b"another file\n" * 30)]), [inbox["email"]])
    await server.deliver(make_message(to=inbox["email"], subject="plain"), [inbox["email"]])
    org_id = query(db_dsn, "SELECT org_id FROM inboxes WHERE id = %s", (inbox["id"],))[0][0]
    before = _refcounts(db_dsn, org_id)
    uses = dict(query(
        db_dsn, "SELECT k, count(*) FROM (SELECT raw_blob_key AS k FROM messages "
                "WHERE org_id = %s UNION ALL SELECT blob_key FROM attachments "
                "WHERE org_id = %s) u GROUP BY k", (org_id, org_id)))
    assert before == uses and len(before) == 4  # two raw messages, two distinct files

    def copy():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.create("Kept")
        imap.select("INBOX")
        sent.clear()
        answer = imap.copy("1:2", "Kept")
        copied = list(sent)
        imap.logout()
        return answer, copied

    answer, copied = await deferToThread(copy)
    assert answer[0] == "OK", answer
    assert _refcounts(db_dsn, org_id) == {k: 2 * n for k, n in uses.items()}
    # one message for every blob of both messages, not two round trips per message
    refs = [m for m in copied if "UPDATE blobs b SET refcount = b.refcount + c.n" in m]
    assert len(refs) == 1 and "FOR NO KEY UPDATE" in refs[0]

    def expunge(folder):
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select(folder)
        imap.store("1:*", "+FLAGS", "(\\Deleted)")
        answer = imap.expunge()
        imap.logout()
        return answer

    assert (await deferToThread(expunge, "Kept"))[0] == "OK"
    assert _refcounts(db_dsn, org_id) == uses
    assert (await deferToThread(expunge, "INBOX"))[0] == "OK"
    assert query(db_dsn, "SELECT count(*) FROM blobs WHERE key = ANY(%s)",
                 (list(uses),)) == [(0,)]
