"""Bad input gets clear JSON errors; every response carries the security headers."""

import pytest_twisted

from tests.conftest import make_config, start_server
from tests.helpers import SECURITY_HEADERS


def _assert_security_headers(resp):
    for name in SECURITY_HEADERS:
        assert name in resp.headers, (name, resp)
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["strict-transport-security"].startswith("max-age=31536000")
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert "server" not in resp.headers  # no version banner


@pytest_twisted.ensureDeferred
async def test_security_headers_on_2xx_4xx_and_5xx(server, pg):
    """Headers are present on success, client errors, unknown routes and database outages."""
    _, owner = await server.new_org()
    ok = await server.api.get("/api/v1/inboxes", key=owner)
    assert ok.status == 200
    unauth = await server.api.get("/api/v1/inboxes")
    unknown = await server.api.get("/api/v1/nothing-here")
    wrong_method = await server.api.request("PUT", "/api/v1/inboxes", key=owner)
    spec = await server.api.get("/api/v1/openapi.json")
    for resp in (ok, unauth, unknown, wrong_method, spec):
        _assert_security_headers(resp)
    assert unknown.status == 404 and unknown.json["error"]["type"] == "not_found"
    assert wrong_method.status == 405 and wrong_method.json["error"]["type"] == \
        "method_not_allowed"
    assert ok.headers["x-request-id"] != unauth.headers["x-request-id"]
    assert unauth.json["error"]["request_id"] == unauth.headers["x-request-id"]

    pg.stop()
    try:
        down = await server.api.get("/api/v1/inboxes", key=owner)
    finally:
        pg.start()
    assert down.status == 503
    assert down.json["error"]["type"] == "temporarily_unavailable"
    assert "retry-after" in down.headers
    _assert_security_headers(down)


@pytest_twisted.ensureDeferred
async def test_bad_bodies_get_clear_4xx(server):
    """Malformed JSON, wrong types, unknown fields, wrong media type and oversize bodies."""
    _, owner = await server.new_org()
    post = server.api.request
    cases = [
        (dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, None),
        (dict(json_body={"username": 42}), 400, "username"),
        (dict(json_body={"username": "ok", "colour": "red"}), 400, "colour"),
        (dict(json_body=["a", "list"]), 400, "body"),
        (dict(data=b"username=x", headers={"Content-Type": "application/x-www-form-urlencoded"}),
         415, None),
        (dict(data=b'{"display_name": "' + b"x" * 2_000_000 + b'"}',
              headers={"Content-Type": "application/json"}), 413, None),
        (dict(data=b'{"username": "\xff\xfe"}', headers={"Content-Type": "application/json"}),
         400, None),
    ]
    for kwargs, status, field in cases:
        resp = await post("POST", "/api/v1/inboxes", key=owner, **kwargs)
        assert resp.status == status, (kwargs.get("json_body"), resp)
        assert resp.json["error"]["type"] in ("invalid_request", "unsupported_media_type",
                                              "payload_too_large")
        assert resp.json["error"]["request_id"].startswith("req_")
        if field:
            assert resp.json["error"]["field"] == field
        assert "Traceback" not in resp.body.decode("utf-8", "replace")
    body_on_get = await post("GET", "/api/v1/inboxes", key=owner, data=b"{}",
                             headers={"Content-Type": "application/json"})
    assert body_on_get.status == 400
    listed = await server.api.get("/api/v1/inboxes", key=owner)
    assert listed.json["data"] == []


@pytest_twisted.ensureDeferred
async def test_rate_limit_answers_429_with_retry_after(db_dsn, openapi_checker):
    """A key exceeding its bucket is told when to come back; other keys are unaffected."""
    running = await start_server(make_config(db_dsn, rate_limit={"rate": 1.0, "burst": 3}),
                                 openapi_checker)
    try:
        _, key = await running.new_org("A")
        _, other = await running.new_org("B")
        statuses = [(await running.api.get("/api/v1/inboxes", key=key)).status
                    for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429
        limited = await running.api.get("/api/v1/inboxes", key=key)
        assert limited.json["error"]["type"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        assert (await running.api.get("/api/v1/inboxes", key=other)).status == 200
    finally:
        await running.service.stopService()


def test_token_bucket_refills_on_the_injected_clock():
    """Unit: the bucket refills at the configured rate, driven by task.Clock."""
    from twisted.internet import task

    from agentpost.auth.ratelimit import TokenBuckets
    from agentpost.model.errors import RateLimited

    clock = task.Clock()
    buckets = TokenBuckets(clock, rate=2.0, burst=2)
    buckets.take("k")
    buckets.take("k")
    try:
        buckets.take("k")
    except RateLimited as exc:
        assert 0 < exc.retry_after_s <= 0.5
    else:
        raise AssertionError("third request within the burst was allowed")
    clock.advance(0.5)
    buckets.take("k")


@pytest_twisted.ensureDeferred
async def test_listener_can_terminate_tls_itself(db_dsn, tmp_path, openapi_checker):
    """With http.tls = true the API speaks HTTPS (TLS 1.2+) with the configured certificate."""
    import ssl
    import urllib.request

    from twisted.internet.threads import deferToThread

    from agentpost.dev.tls import ensure_dev_tls

    tls = ensure_dev_tls(tmp_path / "tls")
    config = make_config(db_dsn, http={"tls": True},
                         tls={"cert": str(tls.cert), "key": str(tls.key)})
    running = await start_server(config, openapi_checker)
    port = running.service.ports["http"].getHost().port
    try:
        def fetch(context):
            with urllib.request.urlopen(f"https://localhost:{port}/healthz", context=context,
                                        timeout=5) as resp:
                return resp.status, resp.headers["Strict-Transport-Security"], \
                    resp.fp.raw._sock.version()

        trusted = ssl.create_default_context(cafile=str(tls.ca_cert))
        status, hsts, version = await deferToThread(fetch, trusted)
        assert status == 200 and hsts.startswith("max-age=31536000")
        assert version in ("TLSv1.2", "TLSv1.3")
        untrusted = ssl.create_default_context()
        try:
            await deferToThread(fetch, untrusted)
        except urllib.error.URLError as exc:
            assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
        else:
            raise AssertionError("a certificate from an unknown CA was accepted")
    finally:
        await running.service.stopService()
