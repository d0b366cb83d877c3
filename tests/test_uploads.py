"""Uploads: POST /attachments for a signed URL, PUT the bytes (no API key), send with
``{key}``; wrong or expired signatures 403, oversize 413 (before the body is read),
another organization's key 404, and the sweep after a day."""

from __future__ import annotations

import hashlib
import time
from urllib.parse import urlsplit

import pytest_twisted
import treq

from tests.conftest import make_config, start_server
from tests.helpers import execute as _execute
from tests.helpers import query

MAX_UPLOAD = 2 * 1024 * 1024  # larger than [http] max_body (1 MiB) on purpose


@pytest_twisted.async_yield_fixture
async def up(db_dsn, openapi_checker):
    """A server taking uploads of up to 2 MiB."""
    config = make_config(db_dsn, mail={"max_upload_size": "2MiB"})
    running = await start_server(config, openapi_checker)
    yield running
    await running.service.stopService()


_SEQ = iter(range(1_000_000))


async def _setup(server):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": f"up{next(_SEQ)}"},
                                   key=owner)).json
    return owner, inbox


async def _ticket(server, key, size, filename="report.pdf", mime="application/pdf"):
    resp = await server.api.post("/api/v1/attachments", {
        "filename": filename, "mime_type": mime, "size": size}, key=key)
    assert resp.status == 201, resp
    return resp.json


async def _put(server, url: str, data: bytes):
    """PUT to the signed URL's path on our server, like any HTTP client would."""
    parts = urlsplit(url)
    resp = await treq.request("PUT", server.base_url + parts.path + "?" + parts.query,
                              data=data, persistent=False)
    return resp.code, await treq.json_content(resp)


def _dsn(server) -> str:
    return server.service.config.database.url


@pytest_twisted.ensureDeferred
async def test_upload_then_send_with_its_key(up):
    owner, inbox = await _setup(up)
    data = b"%PDF-1.7\n" + bytes(range(256)) * 6000  # ~1.5 MiB, over [http] max_body
    ticket = await _ticket(up, owner, len(data))
    assert ticket["key"].startswith("upl_") and ticket["max_size"] == MAX_UPLOAD
    assert "signature=" in ticket["upload_url"] and "expires=" in ticket["upload_url"]
    code, body = await _put(up, ticket["upload_url"], data)
    assert code == 200, body
    assert body["size"] == len(data) and body["sha256"] == hashlib.sha256(data).hexdigest()
    code, again = await _put(up, ticket["upload_url"], data)
    assert code == 409, again  # one content per upload

    resp = await up.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", {
        "to": "bob@remote.example", "subject": "The report", "text_body": "Attached.",
        "attachments": [{"key": ticket["key"]}]}, key=owner)
    assert resp.status == 201, resp
    [att] = resp.json["attachments"]
    assert att["filename"] == "report.pdf" and att["mime_type"] == "application/pdf"
    got = await up.api.get(f"/api/v1/messages/{resp.json['id']}/attachments/{att['id']}",
                           key=owner)
    assert got.status == 200 and got.body == data


@pytest_twisted.ensureDeferred
async def test_wrong_and_expired_signatures_are_403(up):
    owner, _ = await _setup(up)
    ticket = await _ticket(up, owner, 10)
    url = ticket["upload_url"]
    code, body = await _put(up, url.replace("signature=", "signature=0"), b"0123456789")
    assert code == 403 and body["error"]["type"] == "invalid_signature"
    code, _ = await _put(up, url.split("&signature=")[0], b"0123456789")
    assert code == 403
    past = int(time.time()) - 10
    signature = await up.core.uploads.sign(ticket["key"], past)
    code, body = await _put(up, url.split("?")[0] + f"?expires={past}&signature={signature}",
                            b"0123456789")
    assert code == 403 and body["error"]["type"] == "invalid_signature"


@pytest_twisted.ensureDeferred
async def test_oversize_uploads_are_413(up):
    owner, _ = await _setup(up)
    resp = await up.api.post("/api/v1/attachments", {
        "filename": "huge.bin", "mime_type": "application/octet-stream",
        "size": MAX_UPLOAD + 1}, key=owner)
    assert resp.status == 413, resp
    ticket = await _ticket(up, owner, 10)
    code, body = await _put(up, ticket["upload_url"], b"x" * (MAX_UPLOAD + 1))
    assert code == 413, body
    # Other requests keep [http] max_body: a 1.5 MiB JSON body is refused.
    big = await up.api.request("POST", "/api/v1/attachments", key=owner,
                               data=b"{" + b" " * (1536 * 1024) + b"}",
                               headers={"Content-Type": "application/json"})
    assert big.status == 413


@pytest_twisted.ensureDeferred
async def test_only_a_signed_url_may_send_a_large_body(up):
    """The larger limit is granted from the URL's signature, before the body is read: an
    anonymous client cannot make the server spool upload-sized bodies."""
    owner, _ = await _setup(up)
    ticket = await _ticket(up, owner, 1536 * 1024)
    large = b"y" * (1536 * 1024)  # over [http] max_body (1 MiB), under max_upload_size
    forged = ticket["upload_url"].replace("signature=", "signature=0")
    code, body = await _put(up, forged, large)
    assert code == 413 and body["error"]["type"] == "payload_too_large", body
    code, body = await _put(up, ticket["upload_url"], large)
    assert code == 200 and body["size"] == len(large), body


@pytest_twisted.ensureDeferred
async def test_another_organizations_upload_is_404_and_a_pending_one_400(up):
    owner, inbox = await _setup(up)
    ticket = await _ticket(up, owner, 3)
    stranger, theirs = await _setup(up)
    body = {"to": "bob@remote.example", "attachments": [{"key": ticket["key"]}]}
    resp = await up.api.post(f"/api/v1/inboxes/{theirs['id']}/messages", body, key=stranger)
    assert resp.status == 404, resp
    resp = await up.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", body, key=owner)
    assert resp.status == 400 and "not arrived" in resp.json["error"]["message"], resp


@pytest_twisted.ensureDeferred
async def test_the_sweep_removes_expired_uploads_and_their_blobs(up):
    owner, _ = await _setup(up)
    ticket = await _ticket(up, owner, 5)
    code, _ = await _put(up, ticket["upload_url"], b"hello")
    assert code == 200
    [(blob,)] = query(_dsn(up), "SELECT blob_key FROM uploads WHERE key = %s",
                      (ticket["key"],))
    assert await up.core.uploads.sweep() == 0  # not expired yet
    _execute(_dsn(up), "UPDATE uploads SET expires_at = now() - interval '1 second' "
             "WHERE key = %s", (ticket["key"],))
    assert await up.core.uploads.sweep() == 1
    assert query(_dsn(up), "SELECT count(*) FROM uploads WHERE key = %s",
                 (ticket["key"],)) == [(0,)]
    assert query(_dsn(up), "SELECT count(*) FROM blobs WHERE key = %s", (blob,)) == [(0,)]
    assert not await up.core.blobs.exists(blob)
