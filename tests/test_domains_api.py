"""The /api/v1/domains endpoints over real HTTP: the DNS records to publish (our own DKIM
key with the log transport; SES Easy DKIM through moto with the ses transport), name
validation and uniqueness, tenancy, deletion while inboxes use a domain, and the sealed
DKIM key the smarthost signs with.

What moto 5.2.5 does with SES v2 identities (read in moto/ses/models.py EmailIdentity and
checked here): CreateEmailIdentity for a domain answers ``DkimAttributes`` WITHOUT
``Tokens`` and with ``Status: NOT_STARTED``; GetEmailIdentity then reports
``VerificationStatus: SUCCESS`` (verified at once) but ``VerifiedForSendingStatus:
false``; PutEmailIdentityMailFromAttributes is not implemented. So the plain-moto test
checks that the identity is created and that a check verifies the domain from
``VerificationStatus``; a small test-owned shim in front of moto adds what real SES
answers (three tokens, PENDING until the test "publishes" the CNAMEs, the MAIL FROM
call) to test the token records and the pending-to-verified path.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from agentpost.auth.sealing import SealingError
from agentpost.core.domains import DkimKey, generate_key, normalize_name
from agentpost.model.errors import InvalidRequest
from tests import test_domain_verify as verify_tests
from tests.aws import AWS_REGION, ses_outbound
from tests.conftest import make_config, start_server
from tests.helpers import query
from tests.test_domain_verify import _events, _execute

# The DNS zone, master key and server fixtures are shared with the verification tests.
zone = verify_tests.zone
key_file = verify_tests.key_file
dom_server = verify_tests.dom_server


def _dsn(server) -> str:
    return server.service.config.database.url


def _by_key(domain: dict) -> dict[str, dict]:
    return {r["key"]: r for r in domain["records"]}


# ---------------------------------------------------------------------------- own DKIM


@pytest_twisted.ensureDeferred
async def test_create_with_our_own_dkim_key_lists_the_records(dom_server):
    org, key = await dom_server.new_org()
    made = await dom_server.api.post("/api/v1/domains", {"name": "Example.COM.",
                                                         "mail_from_subdomain": "Bounce"},
                                     key=key)
    assert made.status == 201, made
    d = made.json
    assert d["name"] == "example.com" and d["id"].startswith("dom_")
    assert d["status"] == "pending" and d["verified"] is False and d["shared"] is False
    assert d["dkim"] == "own" and d["dkim_selector"].startswith("ap")
    assert len(d["dkim_selector"]) == len("ap202612")
    assert d["mail_from_domain"] == "bounce.example.com"
    assert d["environment_id"] == org["default_environment_id"]
    recs = _by_key(d)
    assert set(recs) == {"mx", "spf", "dkim", "dmarc", "mail_from_mx", "mail_from_spf"}
    assert all(r["status"] == "pending" for r in d["records"])
    assert recs["mx"] == {**recs["mx"], "type": "MX", "name": "example.com",
                          "value": "mx.test", "priority": 10}
    assert recs["spf"]["value"] == "v=spf1 a:mx.test ~all"
    assert recs["dmarc"]["name"] == "_dmarc.example.com" and recs["dmarc"]["required"] is False
    assert recs["dmarc"]["value"] == "v=DMARC1; p=none; rua=mailto:postmaster@example.com"
    assert recs["mail_from_mx"]["name"] == "bounce.example.com"
    dkim = recs["dkim"]
    assert dkim["type"] == "TXT"
    assert dkim["name"] == f"{d['dkim_selector']}._domainkey.example.com"
    assert dkim["value"].startswith("v=DKIM1; k=rsa; p=")
    public = serialization.load_der_public_key(base64.b64decode(dkim["value"].split("p=")[1]))
    assert public.key_size == 2048

    # The private key is sealed at rest, and opens for the smarthost's signer.
    [(sealed,)] = query(_dsn(dom_server), "SELECT dkim_private_sealed FROM domains "
                        "WHERE id = %s", (d["id"],))
    assert b"PRIVATE KEY" not in bytes(sealed) and bytes(sealed)[:1] == b"\x01"
    signing = await dom_server.core.domains.dkim_key_for(org["id"], "EXAMPLE.com")
    assert isinstance(signing, DkimKey) and signing.selector == d["dkim_selector"]
    assert signing.dkimpy_signature_algorithm == b"rsa-sha256"
    private = serialization.load_pem_private_key(signing.private_key_pem, password=None)
    signature = private.sign(b"mail", padding.PKCS1v15(), hashes.SHA256())
    public.verify(signature, b"mail", padding.PKCS1v15(), hashes.SHA256())
    # Not the organization's domain, or a shared one: nothing to sign with.
    other, _ = await dom_server.new_org("Other")
    assert await dom_server.core.domains.dkim_key_for(other["id"], "example.com") is None
    assert await dom_server.core.domains.dkim_key_for(org["id"], "agents.test") is None


@pytest_twisted.ensureDeferred
async def test_a_sealed_key_copied_to_another_tenant_does_not_open(dom_server):
    _, key_a = await dom_server.new_org("A")
    org_b, key_b = await dom_server.new_org("B")
    a = (await dom_server.api.post("/api/v1/domains", {"name": "a.example"}, key=key_a)).json
    b = (await dom_server.api.post("/api/v1/domains", {"name": "b.example"}, key=key_b)).json
    _execute(_dsn(dom_server), "UPDATE domains SET dkim_private_sealed = (SELECT "
             "dkim_private_sealed FROM domains WHERE id = %s) WHERE id = %s",
             (a["id"], b["id"]))
    with pytest.raises(SealingError):
        await dom_server.core.domains.dkim_key_for(org_b["id"], "b.example")


def test_ed25519_keys_and_what_dkimpy_gets():
    pem, public = generate_key("ed25519")
    assert len(base64.b64decode(public)) == 32
    key = DkimKey("example.com", "ap202612", "ed25519", pem)
    assert key.dkimpy_signature_algorithm == b"ed25519-sha256"
    assert len(base64.b64decode(key.dkimpy_private_key)) == 32


def test_domain_names_are_normalized_and_validated():
    assert normalize_name("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalize_name(" MAIL.Example.com ") == "mail.example.com"
    for bad in ("localhost", "1.2.3.4", "a..b", "bad_domain.com", "-x.com", "x" * 64 + ".com",
                "", ".", "exa mple.com", 42, None):
        with pytest.raises(InvalidRequest):
            normalize_name(bad)


@pytest_twisted.ensureDeferred
async def test_names_taken_invalid_or_ours_are_refused(dom_server):
    _, key = await dom_server.new_org()
    _, other = await dom_server.new_org("Other")
    assert (await dom_server.api.post("/api/v1/domains", {"name": "taken.example"},
                                      key=key)).status == 201
    for who in (key, other):
        again = await dom_server.api.post("/api/v1/domains", {"name": "TAKEN.example."},
                                          key=who)
        assert again.status == 409 and again.json["error"]["type"] == "conflict", again
    for ours in ("agents.test", "sub.agents.test", "mx.test"):
        refused = await dom_server.api.post("/api/v1/domains", {"name": ours}, key=key)
        assert refused.status == 409, (ours, refused)
    for bad in ("not a domain", "localhost", "10.0.0.1"):
        refused = await dom_server.api.post("/api/v1/domains", {"name": bad}, key=key)
        assert refused.status == 400 and refused.json["error"]["field"] == "name", refused
    refused = await dom_server.api.post("/api/v1/domains", {"name": "ok.example",
                                                            "mail_from_subdomain": "a_b"},
                                        key=key)
    assert refused.status == 400 and refused.json["error"]["field"] == "mail_from_subdomain"
    assert (await dom_server.api.post("/api/v1/domains", {}, key=key)).status == 400


@pytest_twisted.ensureDeferred
async def test_a_stale_unverified_registration_cannot_squat_a_name(dom_server):
    """Registering first is not owning: after [domains] claim_after (7 days) without
    verification and without inboxes, another organization may take the name."""
    _, squatter = await dom_server.new_org("Squatter")
    _, owner = await dom_server.new_org("Owner")
    held = (await dom_server.api.post("/api/v1/domains", {"name": "victim.example"},
                                      key=squatter)).json
    kept = (await dom_server.api.post("/api/v1/domains", {"name": "kept.example"},
                                      key=squatter)).json
    await dom_server.api.post("/api/v1/inboxes", {"username": "x", "domain": "kept.example"},
                              key=squatter)
    assert (await dom_server.api.post("/api/v1/domains", {"name": "victim.example"},
                                      key=owner)).status == 409
    _execute(_dsn(dom_server), "UPDATE domains SET created_at = created_at - interval "
             "'8 days' WHERE id IN (%s, %s)", (held["id"], kept["id"]))
    taken = await dom_server.api.post("/api/v1/domains", {"name": "victim.example"},
                                      key=owner)
    assert taken.status == 201, taken
    assert (await dom_server.api.get(f"/api/v1/domains/{held['id']}",
                                     key=squatter)).status == 404
    # A registration with inboxes, or a fresh one, is not released.
    assert (await dom_server.api.post("/api/v1/domains", {"name": "kept.example"},
                                      key=owner)).status == 409
    assert (await dom_server.api.post("/api/v1/domains", {"name": "victim.example"},
                                      key=squatter)).status == 409


@pytest_twisted.ensureDeferred
async def test_list_get_and_foreign_ids(dom_server):
    _, key = await dom_server.new_org()
    _, other = await dom_server.new_org("Other")
    mine = (await dom_server.api.post("/api/v1/domains", {"name": "mine.example"},
                                      key=key)).json
    listed = (await dom_server.api.get("/api/v1/domains", key=key)).json["data"]
    assert [(d["name"], d["shared"], d["verified"]) for d in listed] == [
        ("agents.test", True, True), ("mine.example", False, False)]
    assert listed[1]["records"] == mine["records"]
    got = await dom_server.api.get(f"/api/v1/domains/{mine['id']}", key=key)
    assert got.status == 200 and got.json["id"] == mine["id"]
    # Another organization sees only the shared domain, and 404 for our id.
    theirs = (await dom_server.api.get("/api/v1/domains", key=other)).json["data"]
    assert [d["name"] for d in theirs] == ["agents.test"]
    for method, path in (("GET", ""), ("POST", "/verify"), ("DELETE", "")):
        answer = await dom_server.api.request(method, f"/api/v1/domains/{mine['id']}{path}",
                                              key=other)
        assert answer.status == 404, (method, path, answer)
    missing = await dom_server.api.get("/api/v1/domains/dom_01JQ8X5K2M3N4P5R6S7T8V9W0X",
                                       key=key)
    assert missing.status == 404


@pytest_twisted.ensureDeferred
async def test_environment_restricted_keys(dom_server):
    org, owner = await dom_server.new_org()
    env = (await dom_server.api.post("/api/v1/environments", {"name": "Staging"},
                                     key=owner)).json
    restricted = (await dom_server.api.post(
        "/api/v1/api-keys", {"name": "staging", "environment_ids": [env["id"]],
                             "scopes": ["domains:read", "domains:write"]}, key=owner)).json
    in_default = (await dom_server.api.post("/api/v1/domains", {"name": "prod.example"},
                                            key=owner)).json
    staged = await dom_server.api.post("/api/v1/domains", {"name": "staging.example"},
                                       key=restricted["key"])
    assert staged.status == 201 and staged.json["environment_id"] == env["id"]
    listed = (await dom_server.api.get("/api/v1/domains", key=restricted["key"])).json["data"]
    assert [d["name"] for d in listed] == ["agents.test", "staging.example"]
    assert (await dom_server.api.get(f"/api/v1/domains/{in_default['id']}",
                                     key=restricted["key"])).status == 404
    other_env = await dom_server.api.post(
        "/api/v1/domains", {"name": "x.example", "environment_id":
                            org["default_environment_id"]}, key=restricted["key"])
    assert other_env.status in (403, 404), other_env
    # An inbox of the default environment cannot use the staging domain.
    inbox = await dom_server.api.post("/api/v1/inboxes", {"username": "a",
                                                          "domain": "staging.example"},
                                      key=owner)
    assert inbox.status == 400, inbox


@pytest_twisted.ensureDeferred
async def test_delete_is_refused_while_inboxes_use_the_domain(dom_server):
    _, key = await dom_server.new_org()
    d = (await dom_server.api.post("/api/v1/domains", {"name": "busy.example"}, key=key)).json
    inbox = await dom_server.api.post("/api/v1/inboxes", {"username": "agent",
                                                          "domain": "busy.example"}, key=key)
    assert inbox.status == 201 and inbox.json["email"] == "agent@busy.example", inbox
    refused = await dom_server.api.delete(f"/api/v1/domains/{d['id']}", key=key)
    assert refused.status == 409 and refused.json["error"]["inboxes"] == 1, refused
    assert (await dom_server.api.delete(f"/api/v1/inboxes/{inbox.json['id']}",
                                        key=key)).status == 204
    assert (await dom_server.api.delete(f"/api/v1/domains/{d['id']}", key=key)).status == 204
    assert (await dom_server.api.get(f"/api/v1/domains/{d['id']}", key=key)).status == 404
    # The name is free again.
    assert (await dom_server.api.post("/api/v1/domains", {"name": "busy.example"},
                                      key=key)).status == 201


@pytest_twisted.ensureDeferred
async def test_scopes(dom_server):
    _, owner = await dom_server.new_org()
    reader = (await dom_server.api.post("/api/v1/api-keys", {"scopes": ["domains:read"]},
                                        key=owner)).json["key"]
    assert (await dom_server.api.get("/api/v1/domains", key=reader)).status == 200
    refused = await dom_server.api.post("/api/v1/domains", {"name": "r.example"}, key=reader)
    assert refused.status == 403


@pytest_twisted.ensureDeferred
async def test_without_a_master_key_own_dkim_domains_are_refused(db_dsn, openapi_checker):
    server = await start_server(make_config(db_dsn, secrets={"key_file": ""}), openapi_checker)
    try:
        _, key = await server.new_org()
        refused = await server.api.post("/api/v1/domains", {"name": "nokey.example"}, key=key)
        assert refused.status == 503 and "key_file" in refused.json["error"]["message"], refused
        assert query(_dsn(server), "SELECT count(*) FROM domains")[0][0] == 0
    finally:
        await server.service.stopService()


# ---------------------------------------------------------------------------- SES


class SesShim:
    """Forwards to moto, adding what moto's SES v2 leaves out: Easy DKIM tokens, a
    PENDING state until :meth:`publish` (the owner's CNAMEs appear), and the MAIL FROM
    call (recorded)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.published: set[str] = set()
        self.mail_from: dict[str, str] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self.endpoint_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @staticmethod
    def tokens(domain: str) -> list[str]:
        return [f"tok{i}{domain.replace('.', '')}" for i in range(1, 4)]

    def _rewrite(self, method: str, path: str, body: bytes, data: bytes) -> bytes:
        answer = json.loads(data or b"{}")
        if method == "POST" and path == "/v2/email/identities":
            domain = json.loads(body)["EmailIdentity"]
        elif method == "GET" and path.startswith("/v2/email/identities/"):
            domain = unquote(path.rsplit("/", 1)[1])
        else:
            return data
        if "DkimAttributes" not in answer:
            return data
        ok = domain in self.published
        answer["DkimAttributes"].update(Tokens=self.tokens(domain),
                                        Status="SUCCESS" if ok else "PENDING")
        answer["VerifiedForSendingStatus"] = ok
        if "VerificationStatus" in answer:
            answer["VerificationStatus"] = "SUCCESS" if ok else "PENDING"
        if domain in self.mail_from:
            answer["MailFromAttributes"] = {
                "MailFromDomain": self.mail_from[domain],
                "MailFromDomainStatus": "SUCCESS" if ok else "PENDING"}
        return json.dumps(answer).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        shim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _reply(self, status: int, data: bytes, headers: list[tuple[str, str]]) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and self.path.endswith("/mail-from"):
                    domain = unquote(self.path.split("/")[-2])
                    shim.mail_from[domain] = json.loads(body)["MailFromDomain"]
                    self._reply(200, b"{}", [("Content-Type", "application/json")])
                    return
                upstream = http.client.HTTPConnection(*shim._upstream, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body,
                                     headers=dict(self.headers.items()))
                    answer = upstream.getresponse()
                    data = answer.read()
                    if answer.status == 200:
                        data = shim._rewrite(self.command, self.path, body, data)
                    self._reply(answer.status, data, answer.getheaders())
                finally:
                    upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = _relay

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _ses_config(db_dsn: str, endpoint: str, zone: Any) -> Any:
    return make_config(db_dsn, outbound=ses_outbound(endpoint),
        domains={"dns_servers": [zone.address], "dns_timeout": "1s"})


@pytest_twisted.ensureDeferred
async def test_ses_identity_through_plain_moto(db_dsn, openapi_checker, moto_server,
                                               _moto_ses_client, zone):
    moto_server.reset()
    running = await start_server(_ses_config(db_dsn, moto_server.endpoint_url, zone),
                                 openapi_checker)
    try:
        await running.core.domain_verify.stop()
        _, key = await running.new_org()
        made = await running.api.post("/api/v1/domains", {"name": "ses.example"}, key=key)
        assert made.status == 201, made
        d = made.json
        assert d["dkim"] == "ses" and d["status"] == "pending"
        recs = _by_key(d)
        assert recs["spf"]["value"] == "v=spf1 include:amazonses.com ~all"
        assert not any(k.startswith("dkim") for k in recs)  # moto gives no tokens
        identity = _moto_ses_client.get_email_identity(EmailIdentity="ses.example")
        assert identity["IdentityType"] == "DOMAIN"
        assert identity["VerifiedForSendingStatus"] is False
        assert identity["DkimAttributes"]["Status"] == "NOT_STARTED"
        # moto's VerificationStatus is SUCCESS at once: the first check verifies.
        checked = await running.api.post(f"/api/v1/domains/{d['id']}/verify", key=key)
        assert checked.status == 200 and checked.json["status"] == "verified", checked
        assert len(_events(running, d["id"])) == 1
        # Deleting the domain deletes the identity.
        assert (await running.api.delete(f"/api/v1/domains/{d['id']}", key=key)).status == 204
        names = [i["IdentityName"] for i in
                 _moto_ses_client.list_email_identities()["EmailIdentities"]]
        assert "ses.example" not in names
    finally:
        await running.service.stopService()


@pytest.fixture
def ses_shim(moto_server):
    moto_server.reset()
    shim = SesShim(moto_server.endpoint_url)
    shim.start()
    yield shim
    shim.stop()


@pytest_twisted.ensureDeferred
async def test_ses_easy_dkim_tokens_mail_from_and_verification(db_dsn, openapi_checker,
                                                               ses_shim, zone):
    running = await start_server(_ses_config(db_dsn, ses_shim.endpoint_url, zone),
                                 openapi_checker)
    try:
        await running.core.domain_verify.stop()
        _, key = await running.new_org()
        made = await running.api.post("/api/v1/domains", {"name": "easy.example",
                                                          "mail_from_subdomain": "mail"},
                                      key=key)
        assert made.status == 201, made
        d = made.json
        recs = _by_key(d)
        tokens = SesShim.tokens("easy.example")
        assert [(recs[f"dkim{i}"]["type"], recs[f"dkim{i}"]["name"], recs[f"dkim{i}"]["value"])
                for i in (1, 2, 3)] == [
            ("CNAME", f"{t}._domainkey.easy.example", f"{t}.dkim.amazonses.com")
            for t in tokens]
        assert ses_shim.mail_from == {"easy.example": "mail.easy.example"}
        assert recs["mail_from_mx"]["value"] == f"feedback-smtp.{AWS_REGION}.amazonses.com"
        assert recs["mail_from_spf"]["value"] == "v=spf1 include:amazonses.com ~all"

        # SES has not seen the CNAMEs yet: still pending, through the timer's round too.
        pending = await running.api.post(f"/api/v1/domains/{d['id']}/verify", key=key)
        assert pending.json["status"] == "pending", pending
        assert await running.core.domain_verify.round_once() == 0  # not due for a minute
        assert _events(running, d["id"]) == []

        ses_shim.published.add("easy.example")
        done = (await running.api.post(f"/api/v1/domains/{d['id']}/verify", key=key)).json
        assert done["status"] == "verified"
        recs = _by_key(done)
        assert [recs[f"dkim{i}"]["status"] for i in (1, 2, 3)] == ["verified"] * 3
        assert recs["mail_from_mx"]["status"] == "verified"
        assert len(_events(running, d["id"])) == 1
        # A repeated create of the same name elsewhere: 409 before SES is asked.
        _, other = await running.new_org("Other")
        assert (await running.api.post("/api/v1/domains", {"name": "easy.example"},
                                       key=other)).status == 409
    finally:
        await running.service.stopService()

