"""The API's latency settings (issue 12): the garbage-collector tuning a serving process
applies once started comes from ``[server]`` and takes effect exactly as configured, and
a burst of GETs much larger than one audit slice still leaves one row per answer."""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
from twisted.application import service
from twisted.internet import defer

from agentpost.config import ConfigError
from agentpost.config.loader import parse_config
from agentpost.core.audit import FLUSH_SLICE
from agentpost.workers import GC_YOUNG_THRESHOLD, HeapTuning
from tests.helpers import query


class _Started(service.Service):
    """A sibling service whose start-up finishes when the test says so."""

    def __init__(self) -> None:
        self._started: defer.Deferred[None] = defer.Deferred()


def _tune_as_configured(server_section: dict[str, object]) -> tuple[tuple[int, ...], int]:
    """Start HeapTuning with the [server] settings parsed from a config document, finish
    the sibling's start-up, and report the collector's threshold and frozen count then;
    the interpreter's own settings are restored afterwards."""
    config = parse_config({"server": server_section}, "test", environ={})
    threshold, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    main = _Started()
    tuning = HeapTuning(main, freeze=config.server.gc_freeze,
                        young_threshold=config.server.gc_young_threshold)
    try:
        tuning.startService()
        assert gc.get_threshold() == threshold  # nothing before start-up has finished
        main._started.callback(None)
        return gc.get_threshold(), gc.get_freeze_count() - frozen_before
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_the_defaults_freeze_start_up_objects_and_raise_the_young_threshold():
    threshold, newly_frozen = _tune_as_configured({})
    assert threshold[0] == GC_YOUNG_THRESHOLD
    assert newly_frozen > 0


def test_configured_values_take_effect():
    before = gc.get_threshold()
    threshold, newly_frozen = _tune_as_configured(
        {"gc_freeze": False, "gc_young_threshold": 2500})
    assert threshold == (2500, before[1], before[2])
    assert newly_frozen == 0


def test_zero_and_false_leave_the_collector_as_python_set_it():
    before = gc.get_threshold()
    threshold, newly_frozen = _tune_as_configured(
        {"gc_freeze": False, "gc_young_threshold": 0})
    assert threshold == before
    assert newly_frozen == 0


def test_a_negative_young_threshold_is_refused():
    with pytest.raises(ConfigError, match="gc_young_threshold"):
        parse_config({"server": {"gc_young_threshold": -1}}, "test", environ={})


@pytest_twisted.ensureDeferred
async def test_a_burst_of_reads_leaves_one_audit_row_per_answer(server, db_dsn):
    """More GETs than two audit slices, 32 in flight at a time (as the benchmark sends
    them): each answer's request id is on record exactly once after the buffer is
    written."""
    _, key = await server.new_org()
    burst, in_flight = 2 * FLUSH_SLICE + 7, 32
    answers = []
    for start in range(0, burst, in_flight):
        answers += await defer.gatherResults([
            defer.ensureDeferred(server.api.get("/api/v1/inboxes", key=key))
            for _ in range(min(in_flight, burst - start))])
    assert {a.status for a in answers} == {200}
    request_ids = sorted(a.headers["x-request-id"] for a in answers)
    assert len(set(request_ids)) == burst
    await server.core.audit.flush()
    rows = query(db_dsn, "SELECT request_id FROM audit_log WHERE action = 'inboxes.list' "
                 "AND outcome = 'allowed' ORDER BY request_id")
    assert sorted(r[0] for r in rows) == request_ids
