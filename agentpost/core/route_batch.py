"""RCPT lookups that arrive together share one statement (issue 12).

Each RCPT of the MX asks PostgreSQL where its address goes (storage.mx_routes). Under
load that was one statement per message: one execution, one backend wake-up, one
result to read, each on its own pooled connection. Here a lookup goes at once when
fewer than ``parallel`` are in flight (so a lone session waits for nothing extra);
lookups that arrive meanwhile wait for the next free slot and then go together, so
batches grow with the load by themselves, as the group commit's do.

A batch that fails as a whole for a reason of its own (not the database being away)
is run again one lookup at a time, so one odd address never fails its batch-mates'
RCPTs; each then gets exactly the answer or error a lookup of its own gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from agentpost.core.inflight_batches import InflightBatches
from agentpost.core.route_cache import RouteCache
from agentpost.model.errors import TemporaryFailure
from agentpost.storage import mx_routes
from agentpost.storage.database import Database

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Lookup:
    address: str
    domain: str
    done: defer.Deferred[dict[str, Any]] = field(default_factory=defer.Deferred)


class RouteLookups:
    """The MX's routing reads, batched while others are in flight."""

    def __init__(self, db: Database, clock: IReactorTime, *, with_usage: bool,
                 parallel: int = 2, max_batch: int = 64, delay_s: float = 0.0,
                 cache: RouteCache | None = None) -> None:
        """``cache``: routes to inboxes kept between changes (core.route_cache); never
        consulted when the rows must carry the inbox's use (``with_usage``)."""
        self._db = db
        self._with_usage = with_usage
        self._cache = None if with_usage else cache
        self._batches: InflightBatches[_Lookup] = InflightBatches(
            self._run, clock, max_batch=max_batch, parallel=parallel, delay_s=delay_s)
        self.statements = 0  # batches sent, for tests and diagnostics

    def route(self, address: str, domain: str) -> defer.Deferred[dict[str, Any]]:
        """storage.mx_routes.route's row for ``address`` (at ``domain``)."""
        cache = self._cache
        if cache is not None:
            key = cache.key(address, domain)
            row = cache.get(key)
            if row is not None:
                return defer.succeed(row)
            generation = cache.generation
        lookup = _Lookup(address, domain)
        self._batches.add(lookup)
        if cache is not None:
            lookup.done.addCallback(_kept, cache, key, generation)
        return lookup.done

    async def _run(self, batch: list[_Lookup]) -> None:
        self.statements += 1
        if len(batch) == 1:
            await self._alone(batch[0])
            return
        try:
            rows = await self._db.run_read(
                "routing.resolve_many", mx_routes.route_many,
                [(lookup.address, lookup.domain) for lookup in batch],
                with_usage=self._with_usage)
        except TemporaryFailure as exc:  # the database is away: every RCPT gets 451
            failure = Failure(exc)
            for lookup in batch:
                lookup.done.errback(failure)
            return
        except Exception as exc:
            log.info("routing: a batch of %d failed (%s); one at a time", len(batch),
                     str(exc).strip())
            for lookup in batch:
                await self._alone(lookup)
            return
        for lookup, row in zip(batch, rows, strict=True):
            lookup.done.callback(row)

    async def _alone(self, lookup: _Lookup) -> None:
        try:
            row = await self._db.run_read("routing.resolve", mx_routes.route,
                                          lookup.address, lookup.domain,
                                          with_usage=self._with_usage)
        except Exception:
            lookup.done.errback(Failure())
            return
        lookup.done.callback(row)


def _kept(row: dict[str, Any], cache: RouteCache, key: tuple[str, str],
          generation: int) -> dict[str, Any]:
    cache.put(key, row, generation)
    return row
