"""One LISTEN connection per process (agentpost.storage.notify.NotifyLink).

PostgreSQL signals every listening backend of a database at each COMMIT that sent a
NOTIFY, so every LISTEN connection a process holds costs database CPU on every mail
delivery. These tests hold a real server to one LISTEN connection with every feature
on, check that notices reach exactly their channel's subscribers (also when read by
another subscriber's ``poll``), and kill the listening backend to see every subscriber
go down together and come back, with its watchers woken.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg2
import pytest_twisted
from twisted.internet import defer, task

from agentpost.storage.keys import KEY_CHANNEL
from agentpost.storage.mail import EVENTS_CHANNEL, MAIL_CHANNEL
from agentpost.storage.mx_routes import ROUTE_CHANNEL
from agentpost.storage.notify import Notifier, NotifyLink
from agentpost.storage.outbound import OUTBOUND_CHANNEL
from agentpost.storage.webhooks import WAKEUP_CHANNEL
from tests.conftest import make_config, start_server
from tests.helpers import query

ALL_CHANNELS = frozenset({MAIL_CHANNEL, KEY_CHANNEL, EVENTS_CHANNEL, OUTBOUND_CHANNEL,
                          WAKEUP_CHANNEL, ROUTE_CHANNEL})
#: Every connection that LISTENs, whatever it calls itself.
_LISTENERS = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
              "AND (application_name IN ('agentpost-listen', 'agentpost-key-cache') "
              "OR query ~* '^\\s*(UN)?LISTEN') ORDER BY pid")


async def _until(predicate: Any, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` on the reactor (never blocking it) until true or timeout."""
    from twisted.internet import reactor

    waited = 0.0
    while not predicate():
        if waited >= timeout:
            return False
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02
    return True


def _notify(dsn: str, *notices: tuple[str, str]) -> None:
    """Commit one transaction that NOTIFYs each (channel, payload), like a psql user."""
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            for channel, payload in notices:
                cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))
    finally:
        conn.close()


class Recorder(Notifier):
    """A subscriber that writes down what it was told, in a log shared by all."""

    def __init__(self, name: str, channel: str, link: NotifyLink, log: list[tuple[str, str]]):
        super().__init__("unused", channel, reactor=None, clock=None,  # type: ignore[arg-type]
                         link=link)
        self.name = name
        self.payloads: list[str] = []
        self.log = log
        self.link_state_at_down: list[tuple[bool, frozenset[str]]] = []

    def _on_notify(self, notify: Any) -> None:
        self.payloads.append(notify.payload)

    def _link_up(self) -> None:
        self.log.append(("up", self.name))
        super()._link_up()

    def _link_down(self) -> None:
        self.log.append(("down", self.name))
        self.link_state_at_down.append((self.link.connected, self.link.channels))


def _listeners(dsn: str) -> list[int]:
    return [row[0] for row in query(dsn, _LISTENERS)]


def _everything_listens(srv: Any) -> bool:
    core = srv.core
    return (core.notify_link.channels == ALL_CHANNELS and core.notifier.connected
            and core.key_cache.usable and core.route_cache.usable
            and srv.service.ws_hub.listener.connected)


@pytest_twisted.ensureDeferred
async def test_a_server_holds_one_listen_connection_for_every_channel(server, db_dsn,
                                                                      openapi_checker):
    """Mail, keys (cache and sessions), routes, events, outbound and webhooks listen on one
    connection; a second server in the same test process has a link of its own."""
    assert await _until(lambda: _everything_listens(server))
    link = server.core.notify_link
    assert _listeners(db_dsn) == [link.backend_pid]
    [(name,)] = query(db_dsn, "SELECT application_name FROM pg_stat_activity "
                              "WHERE pid = %s", (link.backend_pid,))
    assert name == "agentpost-listen"

    other = await start_server(make_config(db_dsn), openapi_checker)
    try:
        assert await _until(lambda: _everything_listens(other))
        assert other.core.notify_link is not link
        assert _listeners(db_dsn) == sorted([link.backend_pid,
                                             other.core.notify_link.backend_pid])
    finally:
        await other.service.stopService()
    assert other.core.notify_link.backend_pid is None
    assert await _until(lambda: _listeners(db_dsn) == [link.backend_pid])


@pytest_twisted.ensureDeferred
async def test_notices_reach_only_the_subscribers_of_their_channel(db_dsn):
    """Subscribers starting together share one LISTEN round trip; one added later is
    connected only once its LISTEN is confirmed; a notice goes to its channel's
    subscribers only, also when another subscriber's poll() reads it; the last
    subscriber of a channel leaving UNLISTENs; the last of all closes the connection."""
    from twisted.internet import reactor

    link = NotifyLink(db_dsn, reactor=reactor, clock=reactor)
    log: list[tuple[str, str]] = []
    a1, a2 = Recorder("a1", "t_a", link, log), Recorder("a2", "t_a", link, log)
    b, c = Recorder("b", "t_b", link, log), Recorder("c", "t_c", link, log)
    try:
        await defer.DeferredList([defer.ensureDeferred(s.start()) for s in (a1, a2, b)])
        assert a1.connected and a2.connected and b.connected
        assert link.channels == {"t_a", "t_b"}
        [(sql,)] = query(db_dsn, "SELECT query FROM pg_stat_activity WHERE pid = %s",
                         (link.backend_pid,))
        assert sql == 'LISTEN "t_a"; LISTEN "t_b"'  # one round trip for both

        joining = defer.ensureDeferred(c.start())
        assert not c.connected  # its LISTEN is on the wire, not confirmed
        assert not a1.poll()  # the socket belongs to that statement until it answers
        await joining
        assert c.connected and a1.poll()
        assert sorted(log) == [("up", "a1"), ("up", "a2"), ("up", "b"), ("up", "c")]

        _notify(db_dsn, ("t_a", "1"), ("t_b", "2"), ("t_c", "3"), ("t_none", "4"))
        assert await _until(lambda: a1.payloads and a2.payloads and b.payloads
                            and c.payloads)
        assert (a1.payloads, a2.payloads, b.payloads, c.payloads) == (
            ["1"], ["1"], ["2"], ["3"])

        # c's poll() hands b its notice, the reactor not running meanwhile.
        _notify(db_dsn, ("t_b", "5"))
        deadline = time.monotonic() + 10
        while b.payloads == ["2"] and time.monotonic() < deadline:
            assert c.poll()
        assert b.payloads == ["2", "5"] and c.payloads == ["3"] and a1.payloads == ["1"]

        c.stop()
        assert not c.connected
        assert await _until(lambda: link.channels == {"t_a", "t_b"})
        a2.stop()  # t_a still has a1: nothing to UNLISTEN
        _notify(db_dsn, ("t_a", "6"), ("t_c", "7"))
        assert await _until(lambda: a1.payloads == ["1", "6"])
        assert link.channels == {"t_a", "t_b"}
        assert a2.payloads == ["1"] and c.payloads == ["3"]
        pid = link.backend_pid
        a1.stop()
        b.stop()
        assert not link.connected and link.backend_pid is None
        assert await _until(lambda: not query(
            db_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)))
    finally:
        link.close()


@pytest_twisted.ensureDeferred
async def test_a_killed_link_takes_every_subscriber_down_and_back_together(server,
                                                                           db_dsn):
    """pg_terminate_backend of the listening backend: every subscriber (the server's
    own and these recorders) is down at once, one reconnect LISTENs every channel
    again, each subscriber is up again and the watchers look again."""
    assert await _until(lambda: _everything_listens(server))
    link = server.core.notify_link
    log: list[tuple[str, str]] = []
    recorders = [Recorder(ch, ch, link, log) for ch in sorted(ALL_CHANNELS)]
    for rec in recorders:
        await rec.start()
    assert all(rec.connected for rec in recorders)
    woken: list[int] = []
    unwatch = server.core.notifier.watch("\x00test-watcher", lambda: woken.append(1))
    cache = server.core.key_cache
    generation = cache.generation
    log.clear()
    old_pid = link.backend_pid
    try:
        _notify(db_dsn, ("agentpost_no_such_channel", "x"))  # a live link stays up
        query(db_dsn, "SELECT pg_terminate_backend(%s)", (old_pid,))
        assert await _until(lambda: len(log) == 2 * len(recorders))
        downs = log[:len(recorders)]
        assert sorted(downs) == sorted(("down", rec.name) for rec in recorders)
        assert sorted(log[len(recorders):]) == sorted(("up", rec.name) for rec in recorders)
        for rec in recorders:
            assert rec.link_state_at_down == [(False, frozenset())]
            assert rec.connected
        assert _everything_listens(server)
        assert woken  # the server's MAIL_CHANNEL watchers looked again
        assert cache.generation > generation  # the key cache was emptied (missed notices)
        assert link.backend_pid not in (None, old_pid)
        assert _listeners(db_dsn) == [link.backend_pid]

        # And notices flow again, to the right subscribers.
        _notify(db_dsn, (OUTBOUND_CHANNEL, "after"))
        by_name = {rec.name: rec for rec in recorders}
        assert await _until(lambda: by_name[OUTBOUND_CHANNEL].payloads == ["after"])
        assert all(not rec.payloads for rec in recorders if rec.name != OUTBOUND_CHANNEL)
    finally:
        unwatch()
        for rec in recorders:
            rec.stop()
    assert link.channels == ALL_CHANNELS  # the server's own subscribers still listen
