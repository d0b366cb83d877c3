"""Uploads with the S3 store, against moto in server mode over real HTTP: POST
/attachments answers a presigned S3 PUT to a staging object, a plain HTTP client PUTs
the file there, a send with the key adopts it (size-checked, hashed into the blob
store, staging object deleted) and the attachment arrives intact; an oversized staged
object is a 413 at send time; another organization's key is 404; the sweep removes
staged objects never used.

moto checks neither presigned signatures nor expiry (see
/work/shared/notes/aws-local-testing.md section 5.5), so the URL's security is checked
here by recomputing its SigV4 query signature with the known test secret: a tampered,
expired, resized or unencrypted PUT does not verify. Real S3 applies the same check.
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.request
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote, urlsplit

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import make_config, start_server
from tests.helpers import query

DATA = b"%PDF-1.7\n" + bytes(range(256)) * 800  # ~200 KiB


@pytest_twisted.async_yield_fixture
async def s3up(db_dsn, s3_bucket, openapi_checker):
    config = make_config(db_dsn, storage={
        "backend": "s3", "bucket": s3_bucket.name, "endpoint_url": s3_bucket.endpoint_url,
        "region": s3_bucket.region, "access_key_id": s3_bucket.access_key,
        "secret_access_key": s3_bucket.secret_key}, mail={"max_upload_size": "1MiB"})
    running = await start_server(config, openapi_checker)
    running.bucket = s3_bucket
    yield running
    await running.service.stopService()


_SEQ = iter(range(1_000_000))


async def _setup(server):
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": f"s3up{next(_SEQ)}"},
                                   key=owner)).json
    return owner, inbox


async def _ticket(server, key, size, mime="application/pdf"):
    resp = await server.api.post("/api/v1/attachments", {
        "filename": "report.pdf", "mime_type": mime, "size": size}, key=key)
    assert resp.status == 201, resp
    return resp.json


def _put(url: str, data: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=data, method="PUT", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return int(resp.status)


def _objects(bucket, prefix: str) -> list[str]:
    listed = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])]


def _sigv4_ok(url: str, headers: dict[str, str], secret: str, now: datetime) -> bool:
    """Whether a PUT of ``url`` with ``headers`` passes S3's SigV4 query-auth check
    (signature over method, path, query, signed headers; not expired)."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature", "")
    signed = params["X-Amz-SignedHeaders"].split(";")
    sent = {k.lower(): v.strip() for k, v in headers.items()} | {"host": parts.netloc}
    if any(h not in sent for h in signed):
        return False
    enc = lambda v: quote(v, safe="-_.~")  # noqa: E731
    canonical = "\n".join([
        "PUT", parts.path,
        "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(params.items())),
        "".join(f"{h}:{sent[h]}\n" for h in signed), ";".join(signed), "UNSIGNED-PAYLOAD"])
    stamp = params["X-Amz-Date"]
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    good = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    issued = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    fresh = now <= issued + timedelta(seconds=int(params["X-Amz-Expires"]))
    return hmac.compare_digest(good, signature) and fresh


@pytest_twisted.ensureDeferred
async def test_presigned_put_then_send_adopts_the_staged_object(s3up):
    owner, inbox = await _setup(s3up)
    bucket = s3up.bucket
    ticket = await _ticket(s3up, owner, len(DATA))
    url, headers = ticket["upload_url"], ticket["upload_headers"]
    assert url.startswith(bucket.endpoint_url + f"/{bucket.name}/uploads/")
    assert headers == {"Content-Type": "application/pdf",
                       "x-amz-server-side-encryption": "AES256"}
    assert await deferToThread(_put, url, DATA, headers) == 200
    staged = await deferToThread(_objects, bucket, "uploads/")
    assert len(staged) == 1 and staged[0].endswith(ticket["key"])
    head = await deferToThread(bucket.client.head_object, Bucket=bucket.name, Key=staged[0])
    assert head["ServerSideEncryption"] == "AES256"

    resp = await s3up.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", {
        "to": "bob@remote.example", "subject": "Report", "text_body": "Attached.",
        "attachments": [{"key": ticket["key"]}]}, key=owner)
    assert resp.status == 201, resp
    [att] = resp.json["attachments"]
    assert att["filename"] == "report.pdf" and att["size"] == len(DATA)
    redirect = await s3up.api.get(
        f"/api/v1/messages/{resp.json['id']}/attachments/{att['id']}", key=owner)
    assert redirect.status == 302

    def fetch(location):
        with urllib.request.urlopen(location, timeout=10) as got:
            return got.read()

    assert await deferToThread(fetch, redirect.headers["location"]) == DATA
    # Adopted: the staging object is gone, the content lives under its address.
    assert await deferToThread(_objects, bucket, "uploads/") == []
    digest = hashlib.sha256(DATA).hexdigest()
    assert query(s3up.service.config.database.url,
                 "SELECT blob_key, size, sha256 FROM uploads WHERE key = %s",
                 (ticket["key"],)) == [(f"sha256/{digest[:2]}/{digest}", len(DATA), digest)]
    again = await s3up.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", {
        "to": "carol@remote.example", "attachments": [{"key": ticket["key"]}]}, key=owner)
    assert again.status == 201 and again.json["attachments"][0]["size"] == len(DATA)


@pytest_twisted.ensureDeferred
async def test_the_url_is_short_lived_and_signs_size_type_and_encryption(s3up):
    owner, _ = await _setup(s3up)
    ticket = await _ticket(s3up, owner, len(DATA))
    url, headers = ticket["upload_url"], ticket["upload_headers"]
    params = dict(parse_qsl(urlsplit(url).query))
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and params["X-Amz-Expires"] == "900"
    assert params["X-Amz-SignedHeaders"].split(";") == [
        "content-length", "content-type", "host", "x-amz-server-side-encryption"]
    secret, now = s3up.bucket.secret_key, datetime.now(UTC)
    sent = {**headers, "Content-Length": str(len(DATA))}
    assert _sigv4_ok(url, sent, secret, now)
    # What S3 refuses (moto does not check; see the module doc):
    assert not _sigv4_ok(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), sent, secret,
                         now)
    assert not _sigv4_ok(url.replace(ticket["key"], "upl_" + "0" * 32), sent, secret, now)
    assert not _sigv4_ok(url, {**sent, "Content-Length": str(len(DATA) + 1)}, secret, now)
    assert not _sigv4_ok(url, {**sent, "Content-Type": "text/html"}, secret, now)
    unencrypted = {k: v for k, v in sent.items() if k != "x-amz-server-side-encryption"}
    assert not _sigv4_ok(url, unencrypted, secret, now)
    assert not _sigv4_ok(url, sent, "wrong-secret", now)
    assert not _sigv4_ok(url, sent, secret, now + timedelta(seconds=901))
    expires = datetime.fromisoformat(ticket["expires_at"].replace("Z", "+00:00"))
    assert timedelta(seconds=890) <= expires - now <= timedelta(seconds=910)


@pytest_twisted.ensureDeferred
async def test_an_oversized_staged_object_is_413_at_send_time(s3up):
    owner, inbox = await _setup(s3up)
    ticket = await _ticket(s3up, owner, 1000)
    # moto takes any length (real S3 refuses a body other than the signed 1000 bytes).
    big = b"z" * 4000
    assert await deferToThread(_put, ticket["upload_url"], big, ticket["upload_headers"]) == 200
    resp = await s3up.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", {
        "to": "bob@remote.example", "attachments": [{"key": ticket["key"]}]}, key=owner)
    assert resp.status == 413, resp
    error = resp.json["error"]
    assert error["type"] == "payload_too_large" and "4000 bytes" in error["message"]
    assert await deferToThread(_objects, s3up.bucket, "uploads/") == []  # deleted
    again = await s3up.api.post(f"/api/v1/inboxes/{inbox['id']}/messages", {
        "to": "bob@remote.example", "attachments": [{"key": ticket["key"]}]}, key=owner)
    assert again.status == 400 and "not arrived" in again.json["error"]["message"], again


@pytest_twisted.ensureDeferred
async def test_another_organizations_upload_key_is_404_and_not_adopted(s3up):
    owner, _ = await _setup(s3up)
    ticket = await _ticket(s3up, owner, len(DATA))
    assert await deferToThread(_put, ticket["upload_url"], DATA, ticket["upload_headers"]) == 200
    stranger, theirs = await _setup(s3up)
    resp = await s3up.api.post(f"/api/v1/inboxes/{theirs['id']}/messages", {
        "to": "bob@remote.example", "attachments": [{"key": ticket["key"]}]}, key=stranger)
    assert resp.status == 404, resp
    assert len(await deferToThread(_objects, s3up.bucket, "uploads/")) == 1  # untouched


@pytest_twisted.ensureDeferred
async def test_the_sweep_removes_staged_objects_never_used(s3up):
    owner, _ = await _setup(s3up)
    bucket = s3up.bucket
    ticket = await _ticket(s3up, owner, len(DATA))
    assert await deferToThread(_put, ticket["upload_url"], DATA, ticket["upload_headers"]) == 200
    orphan = f"uploads/org_gone/upl_{'a' * 32}"  # e.g. a PUT repeated after adoption
    await deferToThread(bucket.client.put_object, Bucket=bucket.name, Key=orphan, Body=b"x")
    assert await s3up.core.uploads.sweep() == 0  # nothing expired, nothing old enough
    assert len(await deferToThread(_objects, bucket, "uploads/")) == 2
    dsn = s3up.service.config.database.url
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("UPDATE uploads SET expires_at = now() - interval '1 second' "
                        "WHERE key = %s", (ticket["key"],))
    finally:
        conn.close()
    assert await s3up.core.uploads.sweep() == 1
    assert await deferToThread(_objects, bucket, "uploads/") == [orphan]
    # The listing sweep (run by sweep() for objects older than any upload can be).
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert await s3up.core.uploads.staging.sweep(later) == 1
    assert await deferToThread(_objects, bucket, "uploads/") == []
