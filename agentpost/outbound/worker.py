"""The outbound queue's worker: every process runs one, and they share the queue.

A round claims due rows with a lease (``FOR UPDATE SKIP LOCKED``, so two workers never
claim the same row), hands each to the transport, and records every recipient's
outcome only if it still holds the lease. Deferred recipients wait by the retry
policy; past the message's lifetime they bounce. Bounces owe a DSN, delivered to the
sending inbox in a later step of the round, so a crash between the two loses nothing.
A round stores DSNs up to a budget (a count, and a time on the injected clock); when
the budget runs out with DSNs still owed -- a relay refusing a whole campaign -- the
next round starts at once rather than at the next poll, so a backlog of thousands
drains in seconds while every round still claims the due mail first.

Duplicate hand-off window: a process that dies (or stalls past ``lease_s``) after the
transport accepted a message but before its outcome committed leaves the row leased;
once the lease runs out another worker hands it off again. The hand-off deadline
(``handoff_timeout_s``, on the injected clock) is the second: a transport that has not
answered by then has its recipients deferred -- recorded, so the lease is released --
and if it did in fact deliver (an SES call that succeeds after we stopped waiting), the
retry after the backoff delivers again. Nothing else can repeat a hand-off: a worker
that lost its lease may not record, and the claim skips leased rows. The late hand-off
is not cancelled: a cancellation cannot undo a send in a thread or a COMMIT already on
its way, it could only hide its outcome; transports bound their own I/O.

A round reads each message's bytes once, however many of its queue rows (one per
recipient domain) the round claimed, and lets go of them when the round's last row of
that message is handed off.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from agentpost.core.blobrefs import BlobCollector
from agentpost.jobs.periodic import Periodic
from agentpost.mail.header_fields import without_fields
from agentpost.model.ids import new_id
from agentpost.outbound.dsn import FailedRecipient, build_dsn
from agentpost.outbound.queue import RetryPolicy
from agentpost.outbound.transports import (
    DEFERRED,
    FAILED,
    SENT,
    Envelope,
    HandOff,
    HandOffTimedOut,
    Outcome,
    Transport,
    bounded,
    everyone,
    no_answer,
    transport_error,
)
from agentpost.storage import mail as mail_store
from agentpost.storage import outbound as store
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

#: Stores a DSN in the sending inbox: (org_id, environment_id, inbox_id, raw) -> None.
BounceSink = Callable[[str, str, str, bytes], Awaitable[None]]


class OutboundWorker:
    """Drains the queue through one transport."""

    def __init__(self, db: Database, blobs: BlobStore, collector: BlobCollector,
                 transport: Transport, clock: IReactorTime, *, worker_id: str,
                 hostname: str, bounce_sink: BounceSink,
                 policy: RetryPolicy | None = None, batch: int = 20, concurrency: int = 8,
                 lease_s: float = 300.0, poll_s: float = 5.0,
                 handoff_timeout_s: float = 120.0, bounce_budget: int = 100,
                 bounce_budget_s: float = 1.0) -> None:
        self._db = db
        self._blobs = blobs
        self._collector = collector
        self._transport = transport
        self._clock = clock
        self._worker_id = worker_id
        self._hostname = hostname
        self._bounce_sink = bounce_sink
        self._policy = policy or RetryPolicy()
        self._batch = batch
        self._lease = timedelta(seconds=lease_s)
        self._handoff_timeout_s = handoff_timeout_s
        self._limit = defer.DeferredSemaphore(concurrency)
        self._recorder = _Recorder(db, collector, worker_id)
        self._periodic = Periodic("outbound queue", clock, poll_s, self.drain)
        self._bounce_budget = bounce_budget
        self._bounce_budget_s = bounce_budget_s
        self._follow_up: IDelayedCall | None = None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    # ------------------------------------------------------------------ one round

    async def drain_once(self) -> int:
        """Claim and attempt one batch, then deliver owed DSNs (one budget's worth);
        returns rows attempted."""
        rows = await self._claim()
        if rows:
            _, finished = self._start(rows)
            await finished
        await self._deliver_bounces()
        return len(rows)

    async def drain(self) -> int:
        """Rounds until nothing due is left (what a wake-up runs). The next batch is
        claimed as soon as every row of the current one has a hand-off slot, so the
        slots do not sit idle while a round's last hand-offs finish (a claimed row
        waits for a slot at most one batch long). Then DSNs, one budget's worth; if
        more are owed, another drain runs right after this one."""
        total = 0
        running: list[defer.Deferred[Any]] = []
        try:
            while True:
                rows = await self._claim()
                total += len(rows)
                if rows:
                    started, finished = self._start(rows)
                    running.append(finished)
                    await started
                if len(rows) < self._batch:
                    break
        finally:
            await defer.gatherResults(running, consumeErrors=True)
        if await self._deliver_bounces():
            self._again_soon()
        return total

    def _again_soon(self) -> None:
        """A drain as soon as this one is over (on the clock: never two at once)."""
        if self._follow_up is None or not self._follow_up.active():
            self._follow_up = self._clock.callLater(0, self.wake)

    async def _claim(self) -> list[dict[str, Any]]:
        now = self._now()
        return await self._db.run_interaction(
            "outbound.claim", store.claim_due, now, now + self._lease, self._worker_id,
            self._batch)

    def _start(self, rows: list[dict[str, Any]]
               ) -> tuple[defer.Deferred[Any], defer.Deferred[Any]]:
        """Queue every row's hand-off for a slot; (all have a slot, all are recorded)."""
        reads = _RoundReads(self._read_outgoing, [row["raw_blob_key"] for row in rows])
        slots = [defer.Deferred[None]() for _ in rows]
        finished = defer.gatherResults(
            [defer.ensureDeferred(self._attempt(row, reads, slot))
             for row, slot in zip(rows, slots, strict=True)], consumeErrors=True)
        return defer.gatherResults(slots), finished

    async def _attempt(self, row: dict[str, Any], reads: _RoundReads,
                       slot: defer.Deferred[None]) -> None:
        """Hand off within a slot (``slot`` fires once it has one), then record; the
        slot is free again while the outcome waits for its (shared) transaction."""
        envelope = Envelope(row["id"], row["org_id"], row["mail_from"],
                            tuple(row["recipients"]), row["message_id"])

        suppressed = set(row.get("suppressed") or ())

        async def hand_off() -> HandOff:
            slot.callback(None)
            try:
                if not suppressed:
                    return await self._hand_off(envelope, row["raw_blob_key"], reads)
                return await self._hand_off_unsuppressed(envelope, suppressed,
                                                         row["raw_blob_key"], reads)
            finally:
                reads.done(row["raw_blob_key"])

        handoff = await self._limit.run(lambda: defer.ensureDeferred(hand_off()))
        try:
            await self._record(row, envelope, handoff)
        except Exception:  # the lease runs out and the row is tried again
            log.exception("outbound %s: recording the outcome failed", row["id"])

    async def _hand_off_unsuppressed(self, envelope: Envelope, suppressed: set[str],
                                     raw_key: str, reads: _RoundReads) -> HandOff:
        """The hand-off of the recipients not suppressed since the message was queued;
        the suppressed ones fail without being tried (a bounce in the sender's DSN),
        as the doors refuse them (550 5.7.1 / 422 suppressed_recipient)."""
        sending = replace(envelope, recipients=tuple(
            a for a in envelope.recipients if a not in suppressed))
        handoff = await self._hand_off(sending, raw_key, reads)
        refused = [Outcome(a, FAILED, 550, "5.7.1",
                           "the address is on the organization's suppression list")
                   for a in envelope.recipients if a in suppressed]
        return replace(handoff, outcomes=[*handoff.outcomes, *refused])

    async def _read_outgoing(self, raw_key: str) -> bytes:
        """The bytes that leave: the stored message without its Bcc fields."""
        return without_bcc(await self._blobs.get_bytes(raw_key))

    async def _hand_off(self, envelope: Envelope, raw_key: str,
                        reads: _RoundReads) -> HandOff:
        if not envelope.recipients:
            return HandOff([])
        try:
            raw = await reads.get(raw_key)
        except Exception as exc:
            log.warning("outbound %s: message unreadable: %s", envelope.queue_id, exc)
            return everyone(envelope, DEFERRED, status_code="4.3.0",
                            diagnostic="the message could not be read from storage")
        try:
            return await bounded(defer.ensureDeferred(self._transport.send(envelope, raw)),
                                  self._clock, self._handoff_timeout_s, envelope.queue_id)
        except HandOffTimedOut:
            log.warning("outbound %s: transport %s did not answer within %gs; deferred",
                        envelope.queue_id, self._transport.name, self._handoff_timeout_s)
            return no_answer(envelope, self._handoff_timeout_s)
        except Exception as exc:  # a transport bug or an unclassified failure: later
            log.exception("outbound %s: transport %s failed", envelope.queue_id,
                          self._transport.name)
            return transport_error(envelope, exc)

    def _settle(self, row: dict[str, Any], envelope: Envelope,
                handoff: HandOff) -> list[Outcome]:
        """Every recipient's outcome: missing answers are deferrals, transport refusals
        bounces, and deferrals past the message's lifetime bounces too (4.4.7)."""
        answered = {o.address: o for o in handoff.outcomes if o.address in envelope.recipients}
        expired = self._now() >= row["expires_at"]
        out = []
        for address in envelope.recipients:
            outcome = answered.get(address) or Outcome(
                address, DEFERRED, status_code="4.4.0", diagnostic="no answer for recipient")
            if outcome.status == FAILED:
                outcome.status = "bounced"
            elif outcome.status == DEFERRED and expired:
                outcome = Outcome(address, "bounced", outcome.smtp_code, "4.4.7",
                                  f"gave up after {row['attempts']} attempts: "
                                  f"{outcome.diagnostic or 'no delivery'}")
            elif outcome.status not in (SENT, DEFERRED):
                outcome.status = DEFERRED
            out.append(outcome)
        return out

    async def _record(self, row: dict[str, Any], envelope: Envelope,
                      handoff: HandOff) -> None:
        outcomes = self._settle(row, envelope, handoff)
        deferred = [o for o in outcomes if o.status == DEFERRED]
        bounced = [o for o in outcomes if o.status == "bounced"]
        next_at = (self._now() + timedelta(seconds=self._policy.delay(
            row["attempts"], handoff.retry_after_s)) if deferred else None)
        last_error = "; ".join(f"{o.address}: {o.diagnostic}" for o in deferred + bounced
                               if o.diagnostic)[:2000] or None
        attempt = store.Attempt(row["org_id"], row["id"], [o.row() for o in outcomes],
                                next_at, bool(bounced), last_error)
        if not await self._recorder.record(_Recording(row, attempt, bounced)):
            log.warning("outbound %s: lease lost before the outcome was recorded", row["id"])

    # ------------------------------------------------------------------ bounces

    async def _deliver_bounces(self) -> bool:
        """DSNs for rows that bounced, one row per transaction: the transaction holds the
        row while its DSN is stored (by ingest, in its own transaction), so two workers
        never both send it. A DSN that cannot be stored now goes to the back of the line
        (it is tried again later) and never holds up, or repeats, anyone else's.

        Stops when none is owed, when every owed one was tried (a postponed row came
        round again), or when the budget (``bounce_budget`` DSNs, ``bounce_budget_s``
        on the clock) is spent. True when the budget ran out and DSNs were stored: more
        may be owed and are worth a round at once. (When none could be stored, the next
        poll tries again: a store that is down is not hammered.)"""
        tried: set[tuple[str, str]] = set()
        stored = False
        deadline = self._clock.seconds() + self._bounce_budget_s

        async def txn_fn(txn: Txn) -> tuple[tuple[str, str], bool] | None:
            """(the row, whether its DSN is stored), or None: nothing left to try. (It
            runs again when the transaction is retried, so the loop keeps the tally.)"""
            rows = await store.claim_bounces(txn, 1)
            if not rows or (rows[0]["org_id"], rows[0]["id"]) in tried:
                return None
            row = rows[0]
            if row["mail_from"]:  # a bounce never bounces (RFC 3464 §2.1)
                try:
                    await self._bounce_one(txn, row)
                except Exception as exc:
                    log.warning("outbound %s: DSN not stored yet: %s", row["id"], exc)
                    await store.postpone_bounce(txn, row["org_id"], row["id"])
                    return (row["org_id"], row["id"]), False
            await store.bounce_delivered(txn, row["org_id"], row["id"])
            return (row["org_id"], row["id"]), True

        for _ in range(self._bounce_budget):
            done = await self._db.run_interaction("outbound.bounces", txn_fn)
            if done is None:
                return False
            tried.add(done[0])
            stored = stored or done[1]
            if self._clock.seconds() >= deadline:
                break
        return stored

    async def _bounce_one(self, txn: Txn, row: dict[str, Any]) -> None:
        recipients = [FailedRecipient(r["address"], r["status_code"] or "5.0.0",
                                      r["smtp_code"], r["diagnostic"])
                      for r in await store.bounced_recipients(txn, row["org_id"], row["id"])]
        if not recipients:
            return
        try:
            original = await self._blobs.get_bytes(row["raw_blob_key"])
        except Exception:  # the DSN still says who failed; the header is a courtesy
            original = b""
        # Addressed to the inbox that sent (alice@example.com), which is where it is
        # stored, never to a custom MAIL FROM envelope (alice@bounce.example.com).
        raw = build_dsn(hostname=self._hostname,
                        sender=row.get("inbox_email") or row["mail_from"], original=original,
                        recipients=recipients, arrival=row["created_at"], now=self._now())
        try:
            await self._bounce_sink(row["org_id"], row["environment_id"], row["inbox_id"], raw)
        except LookupError:  # the inbox is gone: nobody to tell
            log.info("outbound %s: DSN dropped, the sending inbox no longer exists", row["id"])

    # ------------------------------------------------------------------ timer

    def wake(self) -> None:
        """Drain now (an enqueue committed somewhere); coalesces while a drain runs."""
        self._periodic.wake()

    def start(self) -> None:
        """Drain now and every ``poll_s`` (deferred rows come due without a wake-up)."""
        self._periodic.start()

    async def stop(self) -> None:
        """Stop the timer and let a round in progress finish recording."""
        await self._periodic.stop()
        if self._follow_up is not None and self._follow_up.active():
            self._follow_up.cancel()


#: Fields that never leave: blind copies (RFC 5322 §3.6.3, §3.6.6), and SES's control
#: headers, with which a tenant could pick another configuration set (no feedback, so no
#: suppression), tag the send, or send as another account's identity.
_NEVER_LEAVES = (b"bcc", b"resent-bcc")
_CONTROL_PREFIX = b"x-ses-"


def _leaves(name: bytes) -> bool:
    field_name = name.strip().lower()
    return field_name not in _NEVER_LEAVES and not field_name.startswith(_CONTROL_PREFIX)


def without_bcc(raw: bytes) -> bytes:
    """The message without ``Bcc:``, ``Resent-Bcc:`` and ``X-SES-*`` fields (and their
    folded lines): the stored Sent copy keeps them, what leaves never carries them."""
    end = raw.find(b"\r\n\r\n")
    head = raw if end < 0 else raw[:end]
    lowered = head.lower()
    # (b"bcc", not b"bcc:": RFC 5322's obsolete syntax allows "Bcc :", which a client
    # may submit; the quick test must not let that spelling through)
    if b"bcc" not in lowered and _CONTROL_PREFIX not in lowered:
        return raw
    return (without_fields(head, lambda name: not _leaves(name))
            + (b"" if end < 0 else raw[end:]))


async def _bounced_event(txn: Txn, row: dict[str, Any], bounced: list[Outcome]) -> None:
    await mail_store.insert_event(
        txn, org_id=row["org_id"], event_id=new_id("evt"),
        environment_id=row["environment_id"], inbox_id=row["inbox_id"],
        type_="message.bounced",
        data={"message_id": row["message_id"], "inbox_id": row["inbox_id"],
              "recipients": [{"address": o.address, "status_code": o.status_code,
                              "smtp_code": o.smtp_code, "diagnostic": o.diagnostic}
                             for o in bounced]})


@dataclass(frozen=True)
class _Recording:
    """One hand-off's outcome on its way to the database, and the bounces it reports."""

    row: dict[str, Any]
    attempt: store.Attempt
    bounced: list[Outcome]


@dataclass(eq=False)
class _Waiting:
    recording: _Recording
    done: defer.Deferred[bool] = field(default_factory=defer.Deferred)


class _Recorder:
    """Outcomes recorded together (a group commit of hand-offs): while one recording
    transaction runs, the outcomes that arrive meanwhile wait and then go in the next
    one -- one COMMIT and three round trips for a whole round instead of one COMMIT per
    hand-off. A lone outcome is not delayed.

    A hand-off's outcome is still committed before its row can be claimed again (the
    lease holds it); what batching adds to the duplicate window (see the module doc) is
    the wait for the transaction in progress. When a batch's transaction fails, each of
    its outcomes is recorded alone, so one unwritable outcome cannot hold up the others
    (it fails alone; its row is tried again when the lease runs out)."""

    def __init__(self, db: Database, collector: BlobCollector, worker_id: str,
                 max_batch: int = 100) -> None:
        self._db = db
        self._collector = collector
        self._worker_id = worker_id
        self._max_batch = max_batch
        self._pending: list[_Waiting] = []
        self._running = False
        self.transactions = 0  # for tests and the bench

    def record(self, recording: _Recording) -> defer.Deferred[bool]:
        """Fires after COMMIT with whether this worker still held the row's lease."""
        waiting = _Waiting(recording)
        self._pending.append(waiting)
        if not self._running:
            self._next()
        return waiting.done

    def _next(self) -> None:
        batch = self._pending[:self._max_batch]
        del self._pending[:self._max_batch]
        if not batch:
            self._running = False
            return
        self._running = True
        defer.ensureDeferred(self._flush(batch)).addBoth(lambda _: self._next())

    async def _flush(self, batch: list[_Waiting]) -> None:
        try:
            held = await self._write([w.recording for w in batch])
        except Exception:
            if len(batch) == 1:
                batch[0].done.errback()
                return
            log.warning("outbound: recording %d outcomes together failed; one by one",
                        len(batch), exc_info=True)
            for waiting in batch:
                await self._flush([waiting])
            return
        for waiting in batch:
            waiting.done.callback(waiting.recording.attempt.queue_id in held)

    async def _write(self, batch: list[_Recording]) -> set[str]:
        async def txn_fn(txn: Txn) -> tuple[set[str], list[str]]:
            held, released = await store.record_attempts(
                txn, self._worker_id, [r.attempt for r in batch])
            for r in batch:
                if r.bounced and r.attempt.queue_id in held:
                    await _bounced_event(txn, r.row, r.bounced)
            return held, released

        self.transactions += 1
        held, released = await self._db.run_interaction("outbound.record", txn_fn)
        if released:  # rare: the Sent copy was deleted meanwhile
            await self._collector.collect(released)  # logs, never raises
        return held


class _RoundReads:
    """One read per message per round: the queue rows of one message (one per
    recipient domain) share its bytes, which are dropped once the round's last row of
    that message is done (so a round holds no more messages than it hands off)."""

    def __init__(self, read: Callable[[str], Coroutine[Any, Any, bytes]],
                 keys: list[str]) -> None:
        self._read = read
        self._left: dict[str, int] = {}
        for key in keys:
            self._left[key] = self._left.get(key, 0) + 1
        self._reads: dict[str, defer.Deferred[bytes]] = {}
        self.reads = 0  # how many reads the blob store saw (for tests and the bench)

    def get(self, key: str) -> defer.Deferred[bytes]:
        """The bytes of ``key``; a read already in flight or done is shared."""
        shared = self._reads.get(key)
        if shared is None:
            self.reads += 1
            shared = self._reads[key] = defer.ensureDeferred(self._read(key))
        out: defer.Deferred[bytes] = defer.Deferred()

        def pass_on(result: bytes | Failure) -> bytes | Failure:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
            return result  # for the next row of the same message

        shared.addBoth(pass_on)
        return out

    def done(self, key: str) -> None:
        """A row of ``key`` is handed off: forget the bytes after the last one."""
        self._left[key] -= 1
        if self._left[key] <= 0:
            shared = self._reads.pop(key, None)
            if shared is not None:
                shared.addErrback(lambda _failure: None)  # reported to each row already
