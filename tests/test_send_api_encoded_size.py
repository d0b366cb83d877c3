"""`[smtp] max_message_size` counts the message as it leaves -- after base64 and the MIME
structure -- not the attachment bytes a client sent: 50,000 bytes of attachment are
under a 64 KiB limit, their message (about 68,000 bytes) is not."""

import base64

import pytest_twisted

from tests.helpers import query
from tests.test_send_api import _dsn, _send_path, _setup, outbox, sub

__all__ = ["outbox", "sub"]  # the fixtures, used by name

LIMIT = 64 * 1024  # the `sub` fixture's max_message_size


@pytest_twisted.ensureDeferred
async def test_a_message_over_the_limit_only_once_encoded_is_413(sub):
    _, sender, _, key = await _setup(sub, scopes=("messages:send", "messages:read",
                                                  "messages:write"))
    raw = b"\x00\xff" * 25_000  # 50,000 bytes: under the limit as bytes
    assert len(raw) < LIMIT < len(base64.b64encode(raw))
    resp = await sub.api.post(_send_path(sender), {
        "to": "bob@remote.example",
        "attachments": [{"content": base64.b64encode(raw).decode(), "filename": "a.bin"}]},
        key=key)
    assert resp.status == 413 and resp.json["error"]["type"] == "message_too_large", resp
    draft = await sub.api.post(f"/api/v1/inboxes/{sender['id']}/drafts", {
        "to": "bob@remote.example",
        "attachments": [{"content": base64.b64encode(raw).decode(), "filename": "a.bin"}]},
        key=key)
    assert draft.status == 413, draft
    assert query(_dsn(sub), "SELECT count(*) FROM messages WHERE inbox_id = %s",
                 (sender["id"],)) == [(0,)]
    # Well under it once encoded: accepted.
    small = base64.b64encode(raw[:30_000]).decode()
    ok = await sub.api.post(_send_path(sender), {
        "to": "bob@remote.example", "attachments": [{"content": small, "filename": "a.bin"}]},
        key=key)
    assert ok.status == 201, ok
