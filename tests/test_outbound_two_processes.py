"""Two real server processes draining one outbound queue (issue 11).

This process and a second ``agentpost serve`` (tests/second_process) run the outbound
worker on the same database, each handing off over the smtp transport to a sink of its
own. Every recipient must be counted exactly once over both sinks (no loss, no
duplicate), and both processes must have taken part: the claim (``FOR UPDATE SKIP
LOCKED`` plus a lease) is what keeps them apart, not luck or a single drainer.
"""

from __future__ import annotations

from collections import Counter

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from tests.conftest import start_server
from tests.helpers import query
from tests.second_process import SecondProcess
from tests.test_outbound_queue import _enqueue, _sent_message
from tests.test_outbound_smarthost import PASSWORD, USER, sink_factory, smarthost_config

__all__ = ["sink_factory"]  # the fixture, used by name

N = 200


def _done(dsn: str) -> bool:
    return query(dsn, "SELECT count(*) FILTER (WHERE status = 'done'), count(*) "
                      "FROM outbound_queue") == [(N, N)]


@pytest_twisted.ensureDeferred
async def test_two_processes_hand_every_recipient_off_exactly_once(
        db_dsn, openapi_checker, sink_factory, dev_tls, tmp_path):
    here_sink, there_sink = sink_factory(), sink_factory()
    config = smarthost_config(db_dsn, here_sink, dev_tls, tmp_path, "200ms")
    config.outbound.concurrency = 2  # small claims, so the two interleave
    running = await start_server(config, openapi_checker)
    (tmp_path / "pw2").write_text(PASSWORD + "\n")
    second = SecondProcess(tmp_path, db_dsn, running, extra=(
        '[outbound]\ntransport = "smtp"\nsmtp_host = "localhost"\n'
        f"smtp_port = {there_sink.port}\nsmtp_ca_file = \"{dev_tls.ca_cert}\"\n"
        f'smtp_username = "{USER}"\nsmtp_password_file = "{tmp_path / "pw2"}"\n'
        'poll_interval = "200ms"\nconcurrency = 2\n'))
    try:
        assert await deferToThread(second.ready), "second process did not start"
        message, _, _ = await _sent_message(running, "pair")
        for n in range(N):  # one queue row each: a domain per recipient
            await _enqueue(running, message, [f"r{n}@d{n}.example"])
        for _ in range(3000):
            if _done(db_dsn):
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert _done(db_dsn), query(db_dsn, "SELECT status, count(*) FROM outbound_queue "
                                            "GROUP BY status")
        await task.deferLater(reactor, 1.0, lambda: None)  # room for a stray duplicate
    finally:
        await running.service.stopService()
        out = second.stop()
    assert "Traceback" not in out, out
    here = Counter(r for m in here_sink.messages for r in m.recipients)
    there = Counter(r for m in there_sink.messages for r in m.recipients)
    hits = here + there
    assert sorted(hits) == sorted(f"r{n}@d{n}.example" for n in range(N))
    assert set(hits.values()) == {1}, [k for k, v in hits.items() if v > 1]
    assert here and there, (len(here), len(there))  # both processes drained
    assert query(db_dsn, "SELECT count(*) FROM outbound_recipients WHERE status = 'sent'") \
        == [(N,)]
