"""The MX's route cache never outlives a change to a route (agentpost.core.route_cache).

Changes made through the API and straight in a database session (no application code,
so only the triggers of migration 0041 NOTIFY) take effect on the next RCPT once their
notice is in, in this process and in a second real ``agentpost serve``; an unknown
address is never cached, so a new inbox gets mail at once everywhere; a mail whose
inbox is deleted between RCPT and DATA is refused with a temporary error, never lost
or misdelivered; with the LISTEN link killed RCPT reads the database until it is back.
"""

from __future__ import annotations

import smtplib

import pytest_twisted
from twisted.internet import threads

from tests.helpers import query
from tests.mailfactory import make_message
from tests.test_key_cache import _commit, _until
from tests.test_mx import _inbox

_FROM = "sender@example.org"


async def _rcpt(port: int, address: str, sender: str = _FROM) -> int:
    """RCPT TO's reply code (a session of its own, ended with RSET and QUIT)."""
    def run() -> int:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                          timeout=30) as smtp:
            smtp.ehlo()
            smtp.mail(sender)
            code, _ = smtp.rcpt(address)
            smtp.rset()
            return code
    return await threads.deferToThread(run)


async def _cached(server, address: str, sender: str = _FROM) -> None:
    """RCPT ``address`` until this process answers it from its cache."""
    cache = server.core.route_cache
    assert await _until(lambda: cache.usable)
    assert await _rcpt(server.mx_port, address, sender) == 250
    hits = cache.hits
    assert await _rcpt(server.mx_port, address, sender) == 250
    assert cache.hits == hits + 1


async def _cached_inbox(server, name: str) -> tuple[str, dict]:
    """(key, inbox) of a new inbox in a new organization, its route cached already."""
    _, key = await server.new_org()
    inbox = await _inbox(server, key, name)
    await _cached(server, inbox["email"])
    return key, inbox


async def _noticed(cache, generation: int) -> bool:
    return await _until(lambda: cache._listener.poll() and cache.generation != generation)


@pytest_twisted.ensureDeferred
async def test_a_route_is_read_once_and_a_deleted_inbox_refused_next(server):
    key, inbox = await _cached_inbox(server, "rc-deleted")
    lookups = server.core.router._lookups
    before = lookups.statements
    assert await _rcpt(server.mx_port, inbox["email"]) == 250
    assert lookups.statements == before  # no database read for it
    # A case variant is an entry of its own (PostgreSQL's lower() decides, once).
    assert await _rcpt(server.mx_port, inbox["email"].upper()) == 250
    assert await _rcpt(server.mx_port, inbox["email"].upper()) == 250
    assert lookups.statements == before + 1
    generation = server.core.route_cache.generation
    assert (await server.api.delete(f"/api/v1/inboxes/{inbox['id']}", key=key)).status \
        in (200, 204)
    assert await _noticed(server.core.route_cache, generation)
    assert await _rcpt(server.mx_port, inbox["email"]) == 550


@pytest_twisted.ensureDeferred
async def test_unknown_addresses_are_never_cached(server):
    key, probe = await _cached_inbox(server, "rc-probe")  # the cache is on, holds routes
    address = probe["email"].replace("rc-probe", "rc-later")
    lookups = server.core.router._lookups
    for _ in range(3):
        before = lookups.statements
        assert await _rcpt(server.mx_port, address) == 550
        assert lookups.statements == before + 1  # read every time
    await _inbox(server, key, "rc-later")
    # No wait for any notice: the very next RCPT finds it.
    assert await _rcpt(server.mx_port, address) == 250


@pytest_twisted.ensureDeferred
async def test_sql_changes_reach_the_cache_through_the_triggers(server, db_dsn):
    """A receive filter rule and a readdressed inbox, each by plain SQL."""
    _, inbox = await _cached_inbox(server, "rc-sql")
    cache = server.core.route_cache
    generation = cache.generation
    await _commit(db_dsn, "INSERT INTO filter_rules (org_id, id, environment_id, inbox_id, "
                  "direction, action, match_type, value, created_at) "
                  "SELECT org_id, 'fr_rc_sql', environment_id, id, 'receive', 'block', "
                  "'domain', 'example.org', now() FROM inboxes WHERE id = %s",
                  (inbox["id"],))
    assert await _noticed(cache, generation)
    assert await _rcpt(server.mx_port, inbox["email"]) == 550  # blocked sender
    assert await _rcpt(server.mx_port, inbox["email"], "ok@example.net") == 250

    await _cached(server, inbox["email"], "ok@example.net")
    generation = cache.generation
    moved = inbox["email"].replace("rc-sql", "rc-moved")
    await _commit(db_dsn, "UPDATE inboxes SET email = %s, username = 'rc-moved' "
                  "WHERE id = %s", (moved, inbox["id"]))
    assert await _noticed(cache, generation)
    assert await _rcpt(server.mx_port, inbox["email"], "ok@example.net") == 550
    assert await _rcpt(server.mx_port, moved, "ok@example.net") == 250

    # Columns routing does not read change without a notice: an inbox's display name,
    # a domain's checker bookkeeping (0042). A sentinel NOTIFY sent after them arrives
    # after any notice they caused (one session's notices keep their commit order).
    await _commit(db_dsn, "INSERT INTO domains (org_id, id, environment_id, name, "
                  "created_at) SELECT org_id, 'dom_rc_sql', environment_id, "
                  "'rc-sql.example', now() FROM inboxes WHERE id = %s", (inbox["id"],))
    payloads: list[str] = []
    listener = cache._listener
    original = listener._on_notify

    def record(notify):
        payloads.append(notify.payload)
        original(notify)

    listener._on_notify = record
    try:
        await _commit(db_dsn, "SELECT pg_notify('agentpost_route_changed', 'before')")
        assert await _until(lambda: listener.poll() and "before" in payloads)
        await _commit(db_dsn, "UPDATE inboxes SET display_name = 'Renamed' WHERE id = %s",
                      (inbox["id"],))
        await _commit(db_dsn, "UPDATE domains SET next_check_at = now(), check_count = 3 "
                      "WHERE id = 'dom_rc_sql'")
        await _commit(db_dsn, "SELECT pg_notify('agentpost_route_changed', 'sentinel')")
        assert await _until(lambda: listener.poll() and "sentinel" in payloads)
        assert payloads[payloads.index("before") + 1:] == ["sentinel"]
        await _commit(db_dsn, "UPDATE domains SET verified_at = now() "
                      "WHERE id = 'dom_rc_sql'")
        assert await _until(lambda: listener.poll() and payloads[-1] == "")
    finally:
        del listener._on_notify


async def _with_slow_notices(cache, change, delay_s: float = 0.3) -> int:
    """Run ``change`` while every route notice reaches the cache ``delay_s`` late (a
    busy machine's slow hop from COMMIT to this process); how many notices reached the
    cache before ``change`` returned."""
    from twisted.internet import reactor

    listener = cache._listener
    original = listener._on_notify
    delivered: list[object] = []

    def deliver(notify) -> None:
        original(notify)
        delivered.append(notify)

    listener._on_notify = lambda notify: reactor.callLater(delay_s, deliver, notify)
    try:
        await change()
        return len(delivered)
    finally:
        del listener._on_notify


@pytest_twisted.ensureDeferred
async def test_an_api_rule_change_is_in_force_when_the_api_answers(server):
    """Removing a block rule (or deleting an inbox) through the API answers only once the
    change's notice has emptied this process's cache: the next RCPT, sent at once, sees
    the change although the notice took 0.3 s to arrive. Without the wait the kept route,
    block rule and all, refused the sender for good (550) in that window."""
    key, inbox = await _cached_inbox(server, "rc-rule")
    rule = await server.api.post("/api/v1/filter-rules", {
        "direction": "receive", "action": "block", "match_type": "domain",
        "value": "example.org", "inbox_id": inbox["id"]}, key=key)
    assert rule.status == 201
    assert await _rcpt(server.mx_port, inbox["email"]) == 550  # blocked at once
    await _cached(server, inbox["email"], "ok@example.net")  # block rule and all

    async def remove_rule():
        response = await server.api.delete(f"/api/v1/filter-rules/{rule.json['id']}",
                                           key=key)
        assert response.status == 204

    assert await _with_slow_notices(server.core.route_cache, remove_rule) >= 1
    assert await _rcpt(server.mx_port, inbox["email"]) == 250

    await _cached(server, inbox["email"])

    async def delete_inbox():
        response = await server.api.delete(f"/api/v1/inboxes/{inbox['id']}", key=key)
        assert response.status in (200, 204)

    assert await _with_slow_notices(server.core.route_cache, delete_inbox) >= 1
    assert await _rcpt(server.mx_port, inbox["email"]) == 550


@pytest_twisted.ensureDeferred
async def test_an_inbox_deleted_between_rcpt_and_data_is_a_temporary_failure(server,
                                                                              db_dsn):
    key, inbox = await _cached_inbox(server, "rc-race")
    smtp = await threads.deferToThread(smtplib.SMTP, "127.0.0.1", server.mx_port,
                                       local_hostname="client.test", timeout=30)
    try:
        await threads.deferToThread(smtp.ehlo)
        await threads.deferToThread(smtp.mail, _FROM)
        code, _ = await threads.deferToThread(smtp.rcpt, inbox["email"])
        assert code == 250
        assert (await server.api.delete(f"/api/v1/inboxes/{inbox['id']}",
                                        key=key)).status in (200, 204)
        raw = make_message(to=inbox["email"], subject="raced", msgid="<raced@rc.test>")
        code, _ = await threads.deferToThread(smtp.data, raw)
        assert 400 <= code < 500
    finally:
        await threads.deferToThread(smtp.close)
    assert query(db_dsn, "SELECT count(*) FROM messages WHERE message_id_header = %s",
                 ("<raced@rc.test>",)) == [(0,)]
    assert await _rcpt(server.mx_port, inbox["email"]) == 550


@pytest_twisted.ensureDeferred
async def test_a_second_process_follows_changes_made_in_the_first(server, db_dsn,
                                                                  tmp_path):
    from tests.second_process import SecondProcess

    second = SecondProcess(tmp_path, db_dsn, server, mx=True)
    try:
        assert await threads.deferToThread(second.ready)
        _, key = await server.new_org()
        inbox = await _inbox(server, key, "rc-two")
        address = inbox["email"].replace("rc-two", "rc-two-later")
        assert await _rcpt(second.mx_port, address) == 550  # unknown there
        later = await _inbox(server, key, "rc-two-later")
        assert await _rcpt(second.mx_port, address) == 250  # found at once
        for _ in range(5):  # cached there by now (its LISTEN was confirmed at start)
            assert await _rcpt(second.mx_port, inbox["email"]) == 250
        assert (await server.api.delete(f"/api/v1/inboxes/{later['id']}", key=key)).status \
            in (200, 204)
        # The other process learns of it by its notice: within moments, for good.
        for _ in range(100):
            code = await _rcpt(second.mx_port, address)
            if code == 550:
                break
        assert code == 550
        assert await _rcpt(second.mx_port, address) == 550
        assert await _rcpt(second.mx_port, inbox["email"]) == 250
        # That the other process answers from its cache at all, and that the notice is
        # what empties it: readdress the inbox with the triggers off (no notice), and
        # its old address still routes there; a bare NOTIFY then ends that.
        moved = inbox["email"].replace("rc-two", "rc-two-moved")
        await _commit(db_dsn, "SET LOCAL session_replication_role = replica; "
                      "UPDATE inboxes SET email = %s WHERE id = %s", (moved, inbox["id"]))
        assert await _rcpt(second.mx_port, inbox["email"]) == 250  # stale: cached there
        await _commit(db_dsn, "SELECT pg_notify('agentpost_route_changed', '')")
        for _ in range(100):
            code = await _rcpt(second.mx_port, inbox["email"])
            if code == 550:
                break
        assert code == 550
        assert await _rcpt(second.mx_port, moved) == 250
    finally:
        second.stop()


@pytest_twisted.ensureDeferred
async def test_a_killed_listen_link_reads_the_database_until_it_is_back(server, db_dsn):
    key, inbox = await _cached_inbox(server, "rc-link")
    cache = server.core.route_cache
    pids = [server.core.notify_link.backend_pid]
    await _commit(db_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE pid = ANY(%s)", (pids,))
    # Deleted while nobody listens: the notice is lost, the answer must still be right.
    await _commit(db_dsn, "DELETE FROM inboxes WHERE id = %s", (inbox["id"],))
    assert await _rcpt(server.mx_port, inbox["email"]) == 550
    assert await _until(lambda: cache.usable, timeout=30)
    other = await _inbox(server, key, "rc-link-2")
    await _cached(server, other["email"])  # and caching is back
