"""Idempotency keys: a retried POST gets the first answer instead of a second send.

A client that lost the answer to ``POST .../messages`` cannot know whether the mail
left; with ``Idempotency-Key`` it simply retries. Keys are scoped by organization and
credential (two keys of one organization never see each other's answers) and kept
24 hours.

How a request runs (:meth:`Idempotency.run`):

1. claim: insert a ``pending`` row holding the request's fingerprint (a hash of method,
   path and body). An existing row answers instead: ``done`` with the same fingerprint
   replays the stored status and JSON; another fingerprint is ``idempotency_conflict``
   (409); ``pending`` is ``idempotency_in_progress`` (409; retry later);
2. the operation runs and is handed a :data:`Recorder`: the sending code calls it
   *inside the transaction that stores and queues the message*, so the answer is on
   record exactly when the mail is queued: a crash cannot send without recording, and
   a recorded answer always means the mail was queued;
3. an operation that never called the recorder is recorded afterwards; one that failed
   releases its claim, so the retry runs again (errors are not replayed).

A ``pending`` row older than ``stale_s`` belongs to a process that died before its
transaction committed (had it committed, the row would be ``done``), so the next
request takes it over; should the slow original still commit later, its recorder finds
the claim gone and rolls its send back.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.interfaces import IReactorTime

from agentpost.core.context import RequestContext
from agentpost.model.errors import (
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
)
from agentpost.storage import idempotency as store
from agentpost.storage.database import Database, Txn

#: How long an answer is kept and replayed.
TTL_S = 24 * 3600
#: After this long a pending claim is taken to be abandoned by a crashed process.
STALE_S = 600
MAX_KEY_LENGTH = 255

#: ``await recorder(txn, status, body)``: store the answer in the caller's transaction.
Recorder = Callable[[Txn, int, Any], Awaitable[None]]
Operation = Callable[[Recorder | None], Awaitable[tuple[int, Any]]]


def check_key(value: str | None) -> str | None:
    """The header's value: 1-255 printable ASCII characters, or None when absent."""
    if value is None:
        return None
    if not (0 < len(value) <= MAX_KEY_LENGTH) or not all(
            "\x21" <= c <= "\x7e" for c in value):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters.",
                             field="Idempotency-Key")
    return value


def fingerprint(method: str, path: str, body: Any) -> str:
    """sha256 of the method, the path and the body's canonical JSON (key order and
    white space do not make two requests different)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{method.upper()}\n{path}\n{canonical}".encode()).hexdigest()


class _Claim:
    """One request's hold on a key, and whether its answer is on record."""

    def __init__(self, org_id: str, credential_id: str, key: str) -> None:
        self.org_id = org_id
        self.credential_id = credential_id
        self.key = key
        self.token = secrets.token_hex(16)
        self.recorded = False

    async def record(self, txn: Txn, status: int, body: Any) -> None:
        """The Recorder: fails (rolling the caller back) when the claim was taken over."""
        if not await store.record(txn, self.org_id, self.credential_id, self.key,
                                  self.token, status, body):
            raise IdempotencyInProgress()
        txn.after_commit(self._mark)

    def _mark(self) -> None:
        self.recorded = True


class Idempotency:
    """Runs operations at most once per (organization, credential, key)."""

    def __init__(self, db: Database, clock: IReactorTime, ttl_s: float = TTL_S,
                 stale_s: float = STALE_S) -> None:
        self._db = db
        self._clock = clock
        self._ttl_s = ttl_s
        self._stale_s = stale_s

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    async def run(self, ctx: RequestContext, key: str | None, request_fingerprint: str,
                  fn: Operation) -> tuple[int, Any]:
        """``fn(recorder)`` once per key; a repeat gets the first (status, body).

        Without a key ``fn(None)`` simply runs. A replay sets
        ``ctx.details["idempotent_replay"]``.
        """
        if key is None:
            return await fn(None)
        p = ctx.org_principal
        claim = _Claim(p.org_id, p.credential_id, key)
        stored = await self._claim(claim, request_fingerprint)
        if stored is not None:
            ctx.details["idempotent_replay"] = True
            return stored
        try:
            status, body = await fn(claim.record)
        except BaseException:
            await self._db.run_interaction("idempotency.release", store.release,
                                           claim.org_id, claim.credential_id, key,
                                           claim.token)
            raise
        if not claim.recorded:
            await self._db.run_interaction("idempotency.record", claim.record, status, body)
        return status, body

    async def _claim(self, claim: _Claim, request_fingerprint: str) -> tuple[int, Any] | None:
        now = self._now()
        expires = now + timedelta(seconds=self._ttl_s)

        async def txn_fn(txn: Txn) -> tuple[int, Any] | None:
            row = await store.claim(txn, claim.org_id, claim.credential_id, claim.key,
                                    request_fingerprint, claim.token, expires)
            if row is None:
                return None
            abandoned = (row["state"] == "pending" and
                         row["created_at"] < now - timedelta(seconds=self._stale_s))
            if row["expires_at"] <= now or abandoned:
                await store.take_over(txn, claim.org_id, claim.credential_id, claim.key,
                                      request_fingerprint, claim.token, expires)
                return None
            if row["fingerprint"] != request_fingerprint:
                raise IdempotencyConflict()
            if row["state"] == "pending":
                raise IdempotencyInProgress()
            return row["status"], row["response"]

        return await self._db.run_interaction("idempotency.claim", txn_fn)


    async def sweep(self, batch: int = 1000) -> int:
        """Delete answers past their 24 hours (the retention job calls this)."""
        total = 0
        while True:
            deleted = await self._db.run_interaction("idempotency.sweep", store.delete_expired,
                                                     self._now(), batch)
            total += deleted
            if deleted < batch:
                return total
