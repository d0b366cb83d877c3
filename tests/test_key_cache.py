"""The per-process API-key cache never outlives a revocation (agentpost.auth.key_cache).

Revocations made straight in a database session (no application code, so only the
triggers of migration 0026 NOTIFY) are refused on the very next request, in this
process and in a second real ``agentpost serve``; with the LISTEN link killed the
server reads keys from the database until the link is back; expiry needs no NOTIFY.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta

import pytest_twisted
from twisted.internet import task

from tests.helpers import ApiClient, query


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await task.deferLater(reactor, seconds, lambda: None)


async def _until(predicate, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` on the reactor (never blocking it) until true or timeout."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            return False
        await _sleep(0.05)
        waited += 0.05
    return True


async def _noticed(cache, generation: int) -> bool:
    """Wait until the trigger's NOTIFY reached this process (PostgreSQL hands it to every
    listener after COMMIT, within microseconds to milliseconds): from then on no request
    may be answered from the old entry. The wait reads the socket the way a lookup does."""
    return await _until(lambda: cache._drain() and cache.generation != generation)


async def _new_key(server, owner: str, name: str) -> dict:
    created = await server.api.post("/api/v1/api-keys", {"name": name}, key=owner)
    assert created.status == 201, created
    return created.json


async def _commit(db_dsn: str, sql: str, params: tuple = ()) -> None:
    """Run one statement in its own committed transaction, like a psql user: from
    another thread, so the reactor keeps running. Blocking it here could wait forever
    on a row lock held by a transaction of the server under test (the key's
    last_used_at touch) whose COMMIT needs the reactor."""
    from twisted.internet import threads

    await threads.deferToThread(_commit_blocking, db_dsn, sql, params)


def _commit_blocking(db_dsn: str, sql: str, params: tuple) -> None:
    import psycopg2

    conn = psycopg2.connect(db_dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
    finally:
        conn.close()


async def _revoke_in_db(db_dsn: str, key_id: str) -> None:
    """A revocation by a plain SQL session: only the trigger can tell the processes."""
    await _commit(db_dsn, "UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id,))


async def _cached_in_both(server, other, owner: str, name: str) -> dict:
    """A new key, used until both processes answer it from their caches."""
    key = await _new_key(server, owner, name)
    cache = server.core.key_cache
    assert await _until(lambda: cache.usable)
    for _ in range(3):
        assert (await server.api.get("/api/v1/inboxes", key=key["key"])).status == 200
    for _ in range(20):  # the second process's LISTEN may still be connecting
        assert (await other.get("/api/v1/inboxes", key=key["key"])).status == 200
    hits = cache.hits
    assert (await server.api.get("/api/v1/inboxes", key=key["key"])).status == 200
    assert cache.hits == hits + 1  # served from the cache
    return key


@pytest_twisted.ensureDeferred
async def test_revocation_reaches_both_processes_on_the_next_request(
        server, db_dsn, openapi_checker, tmp_path):
    """Cached in two processes (this one and a real second ``agentpost serve``):
    revoked through the API, then by plain SQL in a database session; the very next
    request is 401 in both processes."""
    from tests.second_process import SecondProcess

    second = SecondProcess(tmp_path, db_dsn, server)
    try:
        from twisted.internet import threads

        assert await threads.deferToThread(second.ready)
        http_port = tomllib.loads(second.config.read_text())["http"]["port"]
        other = ApiClient(f"http://127.0.0.1:{http_port}", openapi_checker)
        _, owner = await server.new_org()
        cache = server.core.key_cache

        # Through the API: the DELETE answers once the NOTIFY is back (KeyCache.settle).
        key = await _cached_in_both(server, other, owner, "by-api")
        revoked = await server.api.delete(f"/api/v1/api-keys/{key['id']}", key=owner)
        assert revoked.status == 200
        assert (await other.get("/api/v1/inboxes", key=key["key"])).status == 401
        assert (await server.api.get("/api/v1/inboxes", key=key["key"])).status == 401

        # By SQL in a database session: no application code, only the trigger's NOTIFY.
        key = await _cached_in_both(server, other, owner, "by-sql")
        generation = cache.generation
        await _revoke_in_db(db_dsn, key["id"])
        assert await _noticed(cache, generation)
        assert (await other.get("/api/v1/inboxes", key=key["key"])).status == 401
        assert (await server.api.get("/api/v1/inboxes", key=key["key"])).status == 401
        # And it stays refused (nothing re-caches a dead key).
        assert (await server.api.get("/api/v1/inboxes", key=key["key"])).status == 401
    finally:
        second.stop()


@pytest_twisted.ensureDeferred
async def test_role_change_by_sql_takes_effect_on_the_next_request(server, db_dsn):
    """A narrowed key (scopes cut by SQL) loses the route at once, cache or not."""
    _, owner = await server.new_org()
    key = await _new_key(server, owner, "narrowed")
    assert await _until(lambda: server.core.key_cache.usable)
    for _ in range(2):
        assert (await server.api.get("/api/v1/inboxes", key=key["key"])).status == 200
    generation = server.core.key_cache.generation
    await _commit(db_dsn, "UPDATE api_keys SET scopes = '{}' WHERE id = %s", (key["id"],))
    assert await _noticed(server.core.key_cache, generation)
    assert (await server.api.get("/api/v1/inboxes", key=key["key"])).status == 403


@pytest_twisted.ensureDeferred
async def test_killed_listen_link_falls_back_to_the_database_and_recovers(server, db_dsn):
    """While the LISTEN link is down every request reads the database; then caching resumes."""
    _, owner = await server.new_org()
    first = await _new_key(server, owner, "first")
    cache = server.core.key_cache
    assert await _until(lambda: cache.usable)
    for _ in range(2):
        assert (await server.api.get("/api/v1/inboxes", key=first["key"])).status == 200
    assert cache.hits >= 1

    pids = [server.core.notify_link.backend_pid]  # the process's one LISTEN connection
    assert pids[0] is not None
    await _commit(db_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE pid = ANY(%s)", (pids,))

    def gone() -> bool:
        return not query(db_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))

    assert await _until(gone)
    # Revoked while nobody listens: the NOTIFY is lost, the answer must still be right.
    await _revoke_in_db(db_dsn, first["id"])
    assert (await server.api.get("/api/v1/inboxes", key=first["key"])).status == 401
    assert not cache.usable or cache.generation > 0

    assert await _until(lambda: cache.usable, timeout=30)
    second = await _new_key(server, owner, "second")
    for _ in range(2):
        assert (await server.api.get("/api/v1/inboxes", key=second["key"])).status == 200
    hits = cache.hits
    assert (await server.api.get("/api/v1/inboxes", key=second["key"])).status == 200
    assert cache.hits == hits + 1  # the cache is back
    generation = cache.generation
    await _revoke_in_db(db_dsn, second["id"])
    # As in the SQL case above: the notice travels from PostgreSQL's listening backend
    # after the COMMIT; once it is here, no stale entry answers.
    assert await _noticed(cache, generation)
    assert (await server.api.get("/api/v1/inboxes", key=second["key"])).status == 401


@pytest_twisted.ensureDeferred
async def test_expiry_without_any_notify_refuses_the_next_request(db_dsn):
    """A cached key past expires_at is refused on the next use, judged by the clock."""
    from twisted.cred.error import UnauthorizedLogin
    from twisted.internet import reactor

    from agentpost.app import build_core
    from agentpost.auth.cred import APIKeyChecker, APIKeyCredentials
    from agentpost.auth.key_cache import KeyCache
    from agentpost.core.context import RequestContext
    from agentpost.model.principal import Principal
    from agentpost.model.scopes import ALL_SCOPES
    from tests.conftest import make_config

    clock = task.Clock()
    clock.advance(datetime.now(UTC).timestamp())
    config = make_config(db_dsn)
    core = build_core(config, reactor, clock=clock)
    cache = KeyCache(config.database.url, reactor=reactor, clock=clock, now=core.db.now,
                     ttl_s=86400)
    await cache.start()
    try:
        org, owner = await core.organizations.bootstrap("Org")
        p = Principal(org_id=org["id"], role="owner", scopes=ALL_SCOPES,
                      credential_type="api_key", credential_id=owner.row["id"])
        ctx = RequestContext("req_x", "127.0.0.1", "api_keys.create", principal=p)
        expires = datetime.fromtimestamp(clock.seconds(), UTC) + timedelta(minutes=10)
        minted = await core.api_keys.create(ctx, name="short", scopes=["inboxes:read"],
                                            environment_ids=None, expires_at=expires,
                                            role="member")
        assert cache.usable
        checker = APIKeyChecker(core.db, cache)
        for _ in range(2):
            ok = await checker.requestAvatarId(APIKeyCredentials(minted.plaintext))
            assert ok.row["id"] == minted.row["id"]
        assert cache.hits == 1
        generation = cache.generation
        clock.advance(11 * 60)
        try:
            await checker.requestAvatarId(APIKeyCredentials(minted.plaintext))
        except UnauthorizedLogin:
            pass
        else:
            raise AssertionError("an expired key was accepted from the cache")
        assert cache.generation == generation  # no NOTIFY was involved
    finally:
        cache.stop()
        await core.db.close()


@pytest_twisted.ensureDeferred
async def test_no_cache_before_listen_is_confirmed(db_dsn):
    """A cache that never connected answers nothing: every lookup reads the database."""
    from twisted.internet import reactor

    from agentpost.auth.key_cache import KeyCache

    clock = task.Clock()
    cache = KeyCache("postgresql://127.0.0.1:1/none", reactor=reactor, clock=clock,
                     now=lambda: datetime.now(UTC))
    generation = cache.generation
    cache.put(b"d" * 32, {"expires_at": None}, generation)
    assert cache.get(b"d" * 32) is None
    assert not cache.usable
