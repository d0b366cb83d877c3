"""The operator's addresses on shared domains: postmaster, abuse, admin and the rest.

A tenant must not be able to create ``admin@<shared domain>`` (certificate authorities
validate a domain by mailing it) nor receive mail for it; ``<postmaster>`` must reach
the operator (RFC 5321 §4.5.1). Real API calls and real smtplib sessions.
"""

from __future__ import annotations

import smtplib
from typing import Any

import psycopg2
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.core.reserved import ReservedNames
from tests.conftest import make_config, start_server
from tests.mailfactory import make_message


def _send(port: int, rcpts: list[str], raw: bytes) -> dict[str, tuple[int, bytes]]:
    """Deliver with smtplib; the refused recipients (all of them if none was accepted)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        try:
            return smtp.sendmail("sender@example.com", rcpts, raw)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients


async def _messages(server: Any, key: str, inbox_id: str) -> list[dict[str, Any]]:
    resp = await server.api.get(f"/api/v1/inboxes/{inbox_id}/messages", key=key)
    assert resp.status == 200, resp
    return resp.json["data"]


def _add_verified_domain(dsn: str, org_id: str, env_id: str, name: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO domains (org_id, id, environment_id, name, verified_at, "
                    "created_at) VALUES (%s, %s, %s, %s, now(), now())",
                    (org_id, "dom_" + name.replace(".", "_"), env_id, name))
    conn.close()


def _add_legacy_inbox(dsn: str, org_id: str, env_id: str, username: str, domain: str) -> None:
    """An inbox made before names were reserved (straight into the table)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("INSERT INTO inboxes (org_id, id, environment_id, username, domain, email, "
                    "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, now(), now())",
                    (org_id, "inb_legacy" + username.replace("-", ""), env_id, username, domain,
                     f"{username}@{domain}"))
    conn.close()


@pytest_twisted.ensureDeferred
async def test_reserved_usernames_are_refused_on_the_shared_domain(server, db_dsn):
    """400 reserved_address for the operator's names, in any case and with a +tag;
    look-alikes that routing treats as different addresses stay available."""
    org, key = await server.new_org()
    for username in ("postmaster", "Abuse", "ADMIN", "administrator", "webmaster",
                     "hostmaster", "root", "mailer-daemon", "admin+certs", "Postmaster+x"):
        resp = await server.api.post("/api/v1/inboxes", {"username": username}, key=key)
        assert resp.status == 400, (username, resp)
        assert resp.json["error"]["type"] == "reserved_address"
        assert resp.json["error"]["field"] == "username"
    for username in ("post.master", "administrators", "my-admin", "rooted"):
        resp = await server.api.post("/api/v1/inboxes", {"username": username}, key=key)
        assert resp.status == 201, (username, resp)
    # The organization's own verified domain is its own business.
    _add_verified_domain(db_dsn, org["id"], org["default_environment_id"], "acme.test")
    resp = await server.api.post("/api/v1/inboxes",
                                 {"username": "postmaster", "domain": "acme.test"}, key=key)
    assert resp.status == 201, resp


@pytest_twisted.ensureDeferred
async def test_without_an_operator_inbox_reserved_addresses_are_refused_at_rcpt(server, db_dsn):
    """No operator inbox: <postmaster>, postmaster@ and abuse@ the shared domain are
    550 5.1.1, and a legacy tenant inbox named admin@ gets nothing."""
    org, key = await server.new_org()
    _add_legacy_inbox(db_dsn, org["id"], org["default_environment_id"], "admin", "agents.test")
    rcpts = ["postmaster", "postmaster@agents.test", "abuse@agents.test", "admin@agents.test"]
    refused = await deferToThread(_send, server.mx_port, rcpts, make_message())
    assert sorted(refused) == sorted(rcpts)
    for code, text in refused.values():
        assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    resp = await server.api.get("/api/v1/inboxes/inb_legacyadmin/messages", key=key)
    assert resp.status == 200 and resp.json["data"] == []


@pytest_twisted.ensureDeferred
async def test_operator_inbox_receives_postmaster_and_reserved_names(db_dsn, openapi_checker):
    """With [mail] operator_inbox, <Postmaster> (any case), postmaster@ any hosted domain
    without its own, and every reserved name on the shared domain reach the operator;
    a tenant's own postmaster@ its verified domain stays the tenant's."""
    config = make_config(db_dsn, mail={"operator_inbox": "ops@agents.test"})
    server = await start_server(config, openapi_checker)
    try:
        raw = make_message(subject="for the operator")
        # Configured but not (yet) an inbox: deferred, never bounced.
        refused = await deferToThread(_send, server.mx_port, ["postmaster"], raw)
        code, text = refused["postmaster"]
        assert code == 451 and text.startswith(b"4.3.0")

        operator_org, operator_key = await server.new_org("Operator")
        ops = await server.api.post("/api/v1/inboxes", {"username": "ops"}, key=operator_key)
        assert ops.status == 201, ops
        tenant, tenant_key = await server.new_org("Tenant")
        env = tenant["default_environment_id"]
        _add_legacy_inbox(db_dsn, tenant["id"], env, "webmaster", "agents.test")
        _add_verified_domain(db_dsn, tenant["id"], env, "acme.test")
        _add_verified_domain(db_dsn, tenant["id"], env, "beta.test")
        own_pm = await server.api.post(
            "/api/v1/inboxes", {"username": "postmaster", "domain": "acme.test"},
            key=tenant_key)
        assert own_pm.status == 201, own_pm

        to_operator = ["Postmaster", "POSTMASTER@agents.test", "abuse@agents.test",
                       "admin+x@agents.test", "webmaster@agents.test", "postmaster@beta.test"]
        for rcpt in to_operator:
            assert await deferToThread(_send, server.mx_port, [rcpt], raw) == {}, rcpt
        assert await deferToThread(_send, server.mx_port, ["postmaster@acme.test"], raw) == {}
        # A reserved name other than postmaster on a tenant's domain without such an inbox.
        refused = await deferToThread(_send, server.mx_port, ["abuse@beta.test"], raw)
        assert refused["abuse@beta.test"][0] == 550

        got = await _messages(server, operator_key, ops.json["id"])
        assert len(got) == len(to_operator)
        assert await _messages(server, tenant_key, "inb_legacywebmaster") == []
        assert len(await _messages(server, tenant_key, own_pm.json["id"])) == 1
        assert operator_org["id"] != tenant["id"]
    finally:
        await server.service.stopService()


def test_reserved_names_compare_like_routing():
    """Case-insensitive, +tag stripped; dots are significant (routing keeps them)."""
    names = ReservedNames(["Admin", " postmaster "])
    assert "admin" in names and "ADMIN+x" in names and "postmaster" in names
    assert "ad.min" not in names and "admins" not in names and "" not in names


def test_check_config_warns_when_no_operator_inbox_is_set(tmp_path):
    """The configuration is valid either way, but the missing postmaster is named."""
    import os
    import subprocess
    import sys

    env = {"PATH": os.environ["PATH"], "AGENTPOST_DATABASE_URL": "postgresql:///x"}
    path = tmp_path / "a.toml"
    for text, warned in (("", True), ('[mail]\noperator_inbox = "ops@example.com"\n', False)):
        path.write_text(text)
        result = subprocess.run([sys.executable, "-m", "agentpost.cli", "--config", str(path),
                                 "check-config"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert ("operator_inbox is not set" in result.stderr) is warned
