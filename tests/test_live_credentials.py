"""A key revoked, expired or narrowed during a long-lived IMAP session ends the session.

Unit half: ``LiveCredentials`` on ``task.Clock`` with the key rows scripted, driving
real ``IMAP4ServerProtocol`` transcripts (StringTransport). The end-to-end half, on
the real store with a second ``agentpost serve`` process, is
test_live_credentials_e2e.py.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from agentpost.auth import sessions
from agentpost.auth.cred import principal_from_key
from agentpost.auth.sessions import EXPIRED, NARROWED, REVOKED, LiveCredentials
from agentpost.model import errors
from agentpost.storage import keys as key_store
from tests.test_imap_protocol import FakeAccount, FakeBackend, Session, store  # noqa: F401


def key_row(key_id: str, *, scopes: tuple[str, ...] = ("messages:read", "messages:write"),
            expires_at: float | None = None) -> dict[str, Any]:
    """A live key as ``storage.keys.live_api_keys`` returns it (an owner-seat key)."""
    return {"org_id": "org_1", "id": key_id, "role": "admin", "scopes": list(scopes),
            "env_restricted": False, "environment_ids": [], "tier": "free", "user_id": None,
            "org_has_owner": True,
            "expires_at": None if expires_at is None else datetime.fromtimestamp(expires_at,
                                                                                 UTC)}


class ScriptedKeys:
    """The database as LiveCredentials reads it: live key rows by id; statements counted,
    failures on demand. Expired rows are left out, as the SQL does."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: dict[str, dict[str, Any]] = {}
        self.fail = False
        self.reads: list[list[str]] = []

    def run_read(self, desc: str, fn: Any, pairs: list[tuple[str, str]]) -> defer.Deferred:
        assert fn is key_store.live_api_keys and desc == "auth.live_keys"
        self.reads.append([key for _, key in pairs])
        if self.fail:
            return defer.fail(errors.TemporaryFailure())
        now = self.clock.seconds()
        return defer.succeed([
            row for _, key in pairs if (row := self.rows.get(key)) is not None
            and (row["expires_at"] is None or row["expires_at"].timestamp() > now)])


class FakeNotifier:
    """Notifier.watch/notify as storage.notify offers them, without PostgreSQL."""

    def __init__(self) -> None:
        self.watchers: dict[str, list[Any]] = {}

    def watch(self, key: str, callback: Any) -> Any:
        self.watchers.setdefault(key, []).append(callback)
        return lambda: self.watchers[key].remove(callback)

    def notify(self, key: str | None) -> None:
        for callbacks in ([self.watchers.get(key, [])] if key else self.watchers.values()):
            for callback in list(callbacks):
                callback()


class KeyedBackend(FakeBackend):
    """LOGIN's password names a scripted key; the account carries its Principal."""

    def __init__(self, store_: Any, keys: ScriptedKeys, revoke_after_login: bool = False):
        super().__init__(store_)
        self.keys = keys
        self.revoke_after_login = revoke_after_login

    async def authenticate(self, username: str, password: str, peer: str) -> FakeAccount:
        row = self.keys.rows.get(password)
        if row is None:
            raise errors.Unauthenticated()
        account = FakeAccount(self.shared, username)
        account.principal = principal_from_key(row)  # type: ignore[attr-defined]
        self.accounts[username] = account
        if self.revoke_after_login:  # revoked between the portal's check and tracking
            del self.keys.rows[password]
        return account


class World:
    """A clock, scripted keys, a notifier, one LiveCredentials, and sessions on them."""

    def __init__(self, store_: Any, **backend: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.keys = ScriptedKeys(self.clock)
        self.notifier = FakeNotifier()
        self.live = LiveCredentials(self.keys, self.clock, self.notifier)  # type: ignore
        self.backend = KeyedBackend(store_, self.keys, **backend)

    def add_key(self, key_id: str, **kwargs: Any) -> None:
        self.keys.rows[key_id] = key_row(key_id, **kwargs)

    def session(self, key_id: str = "key_a", *, select: bool = True) -> Session:
        s = Session(self.backend, clock=self.clock, credentials=self.live)
        s.lines()
        assert s.cmd(f"l LOGIN agent@example.com {key_id}")[-1].startswith("l OK")
        if select:
            assert s.cmd("s SELECT INBOX")[-1].startswith("s OK")
        return s


def ended(s: Session, reason: str) -> bool:
    return f"* BYE {reason}" in s.lines() and bool(s.transport.disconnecting)


def test_a_notified_revocation_ends_sessions_doing_nothing_and_idling(store):  # noqa: F811
    w = World(store)
    w.add_key("key_a")
    quiet, idling = w.session(), w.session()
    idling.send("i IDLE\r\n")
    assert idling.lines() == ["+ idling"]
    del w.keys.rows["key_a"]  # revoked, committed: then the NOTIFY arrives
    w.notifier.notify("key_a")
    w.clock.advance(0)
    assert ended(quiet, REVOKED)
    assert ended(idling, REVOKED)
    assert w.keys.reads[-1] == ["key_a"]


def test_the_next_command_after_a_notification_is_refused(store):  # noqa: F811
    """A command that arrives between the NOTIFY and its queued re-read waits for the
    re-read: it is answered NO [EXPIRED], then BYE, then the connection closes."""
    w = World(store)
    w.add_key("key_a")
    s = w.session()
    del w.keys.rows["key_a"]
    w.notifier.notify("key_a")  # the queued re-read has not run (no clock advance)
    assert s.cmd("f FETCH 1 (FLAGS)") == [f"f NO [EXPIRED] {REVOKED}", f"* BYE {REVOKED}"]
    assert s.transport.disconnecting
    assert not any(call[0] == "fetch" for call in store.calls)


def test_a_missed_notification_is_caught_by_the_periodic_reread(store):  # noqa: F811
    """One statement re-reads every key with live sessions, every 30 s."""
    w = World(store)
    w.add_key("key_a")
    w.add_key("key_b")
    a1, a2, b = w.session("key_a"), w.session("key_a"), w.session("key_b")
    reads = len(w.keys.reads)
    del w.keys.rows["key_b"]  # revoked, but the notification was lost
    w.clock.advance(sessions.RECHECK_INTERVAL_S)
    assert len(w.keys.reads) == reads + 1
    assert sorted(w.keys.reads[-1]) == ["key_a", "key_b"]
    assert ended(b, REVOKED)
    assert a1.cmd("n NOOP")[-1] == "n OK NOOP completed"
    assert a2.cmd("n NOOP")[-1] == "n OK NOOP completed"
    assert len(w.keys.reads) == reads + 1  # commands cost no statement


def test_a_reconnected_listener_rereads_every_key_in_one_statement(store):  # noqa: F811
    w = World(store)
    for key in ("key_a", "key_b", "key_c"):
        w.add_key(key)
        w.session(key)
    reads = len(w.keys.reads)
    w.notifier.notify(None)  # storage.notify wakes every watcher after reconnecting
    w.clock.advance(0)
    assert len(w.keys.reads) == reads + 1


def test_expiry_ends_an_idle_session_by_timer(store):  # noqa: F811
    w = World(store)
    w.add_key("key_a", expires_at=w.clock.seconds() + 100)
    idling, quiet = w.session(), w.session(select=False)
    idling.send("i IDLE\r\n")
    idling.lines()
    w.clock.advance(99)
    assert not idling.transport.disconnecting and not quiet.transport.disconnecting
    w.clock.advance(1)
    assert ended(idling, EXPIRED)
    assert ended(quiet, EXPIRED)


def test_a_key_not_confirmed_for_two_intervals_is_read_before_the_command(store):  # noqa: F811
    """While the database cannot be read the commands fail (NO [UNAVAILABLE]) but the
    session stays; once it can, the command runs."""
    w = World(store)
    w.add_key("key_a")
    s = w.session()
    w.keys.fail = True
    w.clock.advance(2 * sessions.RECHECK_INTERVAL_S + 1)  # the periodic re-reads failed
    assert s.lines() == []
    assert s.cmd("n NOOP")[-1].startswith("n NO [UNAVAILABLE]")
    assert not s.transport.disconnecting
    w.keys.fail = False
    assert s.cmd("n NOOP")[-1] == "n OK NOOP completed"


def test_a_narrowed_key_ends_the_sessions_that_had_more(store):  # noqa: F811
    w = World(store)
    w.add_key("key_a")
    s = w.session()
    w.keys.rows["key_a"] = key_row("key_a", scopes=("messages:read", "messages:write",
                                                    "inboxes:read"))
    w.notifier.notify("key_a")
    w.clock.advance(0)
    assert s.cmd("n NOOP")[-1] == "n OK NOOP completed"  # widened: nothing to end
    w.keys.rows["key_a"] = key_row("key_a", scopes=("messages:read",))
    w.notifier.notify("key_a")
    w.clock.advance(0)
    assert ended(s, NARROWED)


def test_a_key_revoked_while_logging_in_fails_the_login(store):  # noqa: F811
    w = World(store, revoke_after_login=True)
    w.add_key("key_a")
    s = Session(w.backend, clock=w.clock, credentials=w.live)
    s.lines()
    assert s.cmd("l LOGIN agent@example.com key_a") == [
        "l NO [AUTHENTICATIONFAILED] Authentication failed"]
    assert s.cmd("n NOOP")[-1] == "n OK NOOP completed"  # still not authenticated


def test_a_close_the_peer_never_completes_is_aborted(store):  # noqa: F811
    """TLS: loseConnection waits for the client's close_notify; a client that never
    sends it is cut off after CLOSE_GRACE_S. A client that closes in time is not."""
    from agentpost.imap.server import CLOSE_GRACE_S

    w = World(store)
    w.add_key("key_a")
    s, t = w.session(), w.session()
    aborted: list[Session] = []
    s.transport.abortConnection = lambda: aborted.append(s)  # type: ignore[method-assign]
    t.transport.abortConnection = lambda: aborted.append(t)  # type: ignore[method-assign]
    del w.keys.rows["key_a"]
    w.notifier.notify("key_a")
    w.clock.advance(0)
    assert ended(s, REVOKED) and ended(t, REVOKED)
    t.protocol.connectionLost(None)  # t's client closed
    w.clock.advance(CLOSE_GRACE_S)
    assert aborted == [s]


def test_logout_still_works_and_closing_forgets_the_key(store):  # noqa: F811
    w = World(store)
    w.add_key("key_a")
    s = w.session()
    assert s.cmd("o LOGOUT")[-1] == "o OK LOGOUT completed"
    s.protocol.connectionLost(None)
    assert w.live._keys == {} and w.notifier.watchers["key_a"] == []
    reads = len(w.keys.reads)
    w.clock.advance(sessions.RECHECK_INTERVAL_S)
    assert len(w.keys.reads) == reads  # nothing left to re-read


def test_only_api_keys_are_tracked():
    w = World(None)
    user = dataclasses.replace(principal_from_key(key_row("key_a")), credential_type="user")
    failures: list[Any] = []
    defer.ensureDeferred(w.live.register(user, lambda _: None)).addErrback(failures.append)
    assert failures[0].check(ValueError) and "cannot track user" in str(failures[0].value)
