"""Unknown API keys over HTTP spend the shared failed-login allowances and leave the
fail2ban line; revoked keys and correct keys do not (real server, real PostgreSQL).
Sources are told apart through X-Forwarded-For from a trusted proxy (loopback)."""

import logging

import pytest_twisted

from tests.conftest import make_config, start_server
from tests.helpers import query
from tests.test_login_guard import _fail2ban_regex, _journal_line

UNKNOWN = "ap_sk_" + "x" * 43


@pytest_twisted.async_yield_fixture
async def strict(db_dsn, openapi_checker):
    config = make_config(db_dsn, http={"trusted_proxies": ["127.0.0.1"]},
                         login={"source_failures_per_minute": 3,
                                "pair_failures_per_minute": 3})
    running = await start_server(config, openapi_checker)
    yield running
    await running.service.stopService()


def _from(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def _lines(caplog) -> list[tuple[str, str, str]]:
    pattern, out = _fail2ban_regex(), []
    for record in caplog.records:
        if record.name == "agentpost.auth":
            match = pattern.match(_journal_line(record))
            assert match, _journal_line(record)
            fields = dict(p.split("=", 1) for p in record.getMessage().split()[3:])
            out.append((match["host"], fields["protocol"], fields["reason"]))
    return out


@pytest_twisted.ensureDeferred
async def test_a_source_guessing_keys_is_logged_then_refused(strict, caplog):
    caplog.set_level(logging.WARNING, logger="agentpost.auth")
    _, good = await strict.new_org()
    for _ in range(3):
        answer = await strict.api.get("/api/v1/inboxes", key=UNKNOWN,
                                      headers=_from("198.51.100.7"))
        assert answer.status == 401 and answer.json["error"]["type"] == "unauthenticated"
    throttled = await strict.api.get("/api/v1/inboxes", key=good,
                                     headers=_from("198.51.100.7"))
    assert throttled.status == 429 and int(throttled.headers["retry-after"]) >= 1
    neighbour = await strict.api.get("/api/v1/inboxes", key=good,
                                     headers=_from("198.51.100.8"))
    assert neighbour.status == 200
    assert _lines(caplog) == [("198.51.100.7", "http", "unknown-key")] * 3 + [
        ("198.51.100.7", "http", "throttled")]
    assert all(UNKNOWN not in r.getMessage() and good not in r.getMessage()
               for r in caplog.records)


@pytest_twisted.ensureDeferred
async def test_revoked_keys_are_audited_but_spend_no_allowance(strict, caplog, db_dsn):
    """An agent left running with a revoked key must not get its host refused."""
    caplog.set_level(logging.WARNING, logger="agentpost.auth")
    _, owner = await strict.new_org()
    created = await strict.api.post("/api/v1/api-keys", {"name": "old"}, key=owner)
    await strict.api.delete(f"/api/v1/api-keys/{created.json['id']}", key=owner)
    for _ in range(6):
        answer = await strict.api.get("/api/v1/inboxes", key=created.json["key"],
                                      headers=_from("198.51.100.9"))
        assert answer.status == 401
    assert (await strict.api.get("/api/v1/inboxes", key=owner,
                                 headers=_from("198.51.100.9"))).status == 200
    assert _lines(caplog) == []
    await strict.core.audit.flush()
    denied = query(db_dsn, "SELECT count(*) FROM audit_log WHERE outcome = 'denied' "
                   "AND target_id = %s", (created.json["id"],))[0][0]
    assert denied == 6  # one row per request, filed with the key's organization
