"""Group commit for MX deliveries (issue 12): messages that arrive together share one
transaction, so one COMMIT and one fsync, instead of one each.

A delivery hands itself (:class:`Delivery`) to :meth:`GroupCommit.run` and waits. At most
``parallel`` batch transactions run at once; deliveries that arrive meanwhile wait for
the next free one and then go together (up to ``max_batch``), so batches grow with the
load by themselves and a lone delivery is not delayed (``delay_s`` > 0 makes a batch
that could start wait that long for company, on the injected clock).

In the batch's transaction ONE round trip stages every delivery (blob references,
folders, thread lookups: storage.message_insert.prepare_deliveries), and ONE more writes
every thread, event and message row of the batch, the messages last, and COMMITs
(Txn.commit_with): the folders' UID locks are taken at the very end and held only
through that statement and the COMMIT's processing, not while the batch is staged, not
while the server's reactor turns around, nor through the WAL fsync. A batch whose
staging answers the process can predict (messages that name no parent, to folders seen
before, their bytes kept in PostgreSQL: core.known_folders) skips the staging round
trip: the write leads with the staging's statements and a check of every guess, and a
guess that no longer holds fails it before anything is written
(storage.message_insert.StaleGuess), after which the batch is staged by asking. Every
caller's Deferred fires only after the shared COMMIT is on disk, so the SMTP ``250``
still means "committed".

Failure isolation: when one delivery fails (its staging raises, or its message row was
not written: the write then fails before its COMMIT, naming the message), the
transaction is rolled back and the others are run again without it; the failed one is
then run alone, so it gets exactly the error (and the translation) it would have had
without batching. When the shared staging or write fails without naming a culprit,
every delivery of the batch is run alone. Lost links and deadlocks are the
transaction's, not a message's: run_interaction retries the batch (never once the
COMMIT may have happened: a link lost in the round trip that carries it); if it gives
up, every caller gets that error (a 4xx: nothing was acknowledged, the clients retry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg2
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python import failure
from txpostgres import txpostgres

from agentpost.core.batch_threads import link_threads
from agentpost.core.inflight_batches import InflightBatches
from agentpost.model.errors import TemporaryFailure
from agentpost.storage import mail as mail_store
from agentpost.storage.copy_rows import CopyRows, Statements
from agentpost.storage.database import Database, Txn
from agentpost.storage.message_insert import NotStored

log = logging.getLogger(__name__)


class StagedWork(Protocol):
    """What a staging body returns (core.ingest.Staged)."""

    def writes(self) -> list[tuple[dict[str, Any], list[dict[str, Any]],
                                   CopyRows | Statements]]: ...

    def finish(self, uids: dict[str, int]) -> Any: ...


class Delivery(Protocol):
    """A delivery waiting for its batch (core.ingest._Delivery)."""

    def probes(self) -> list[mail_store.DeliveryProbe]:
        """What each of its copies asks the batch's staging statement."""
        ...

    async def stage(self, txn: Txn, answers: list[mail_store.DeliveryAnswer]) -> StagedWork:
        """Its copies, staged from the answers to :meth:`probes` (raises: it fails)."""
        ...

    def guess(self, probes: list[mail_store.DeliveryProbe]
              ) -> list[mail_store.DeliveryAnswer] | None:
        """The answers to its ``probes`` without asking, for the write to check; None
        when they must be asked (core.known_folders)."""
        ...

    def forget_guess(self) -> None:
        """Its guess did not hold (storage.message_insert.StaleGuess)."""
        ...


@dataclass(eq=False)
class _Pending:
    key: tuple[str, ...]
    body: Delivery
    done: defer.Deferred[Any] = field(default_factory=defer.Deferred)
    may_guess: bool = True  # False once its guess failed, or when it runs after a batch


class _ItemFailed(Exception):
    """One delivery of a batch failed: roll back, go on without it."""

    def __init__(self, item: _Pending | None) -> None:
        super().__init__("a delivery of the batch failed")
        self.item = item


class GroupCommit:
    """Collects staging bodies and runs each batch in one transaction."""

    def __init__(self, db: Database, clock: IReactorTime, *, max_batch: int = 16,
                 delay_s: float = 0.0, parallel: int = 2) -> None:
        self._db = db
        self._batches: InflightBatches[_Pending] = InflightBatches(
            self._commit, clock, max_batch=max_batch, parallel=parallel, delay_s=delay_s)
        self.batches = 0  # transactions started, for tests and diagnostics
        self.guessed = 0  # batches staged without a round trip (core.known_folders)
        self.stale_guesses = 0  # ... whose guess failed, staged again by asking

    @property
    def _pending(self) -> list[_Pending]:
        """The deliveries waiting for a batch (tests wait for them to gather)."""
        return self._batches.pending

    def run(self, key: tuple[str, ...], body: Delivery) -> defer.Deferred[Any]:
        """Stage ``body`` in the next batch; fires with its staged work's ``finish``
        result after COMMIT. ``key`` orders deliveries in a batch (the first recipient
        inbox)."""
        item = _Pending(key, body)
        self._batches.add(item)
        return item.done

    def flush(self) -> None:
        """Start a batch of what is waiting (no-op when empty)."""
        self._batches.flush()

    async def _commit(self, batch: list[_Pending]) -> None:
        remaining = sorted(batch, key=lambda item: item.key)
        alone: list[_Pending] = []
        while remaining:
            self.batches += 1
            try:
                results = await self._db.run_interaction(
                    "ingest.group_commit", self._txn_body, remaining, unlock_before_flush=True)
            except mail_store.StaleGuess:  # the batch is staged again, by asking
                self.stale_guesses += 1
                for item in remaining:
                    item.may_guess = False
                    item.body.forget_guess()
                continue
            except _ItemFailed as failed:
                if failed.item is None:  # no culprit named: each on its own
                    alone += remaining
                    break
                alone.append(failed.item)
                remaining = [item for item in remaining if item is not failed.item]
                continue
            except BaseException as exc:  # the transaction's fault: nobody is stored
                for item in remaining:
                    item.done.errback(exc)
                break
            for item, result in zip(remaining, results, strict=True):
                if isinstance(result, failure.Failure):
                    item.done.errback(result)
                else:
                    item.done.callback(result)
            break
        for item in alone:
            self.batches += 1
            item.may_guess = False
            self._db.run_interaction("ingest.store", self._txn_body, [item],
                                     unlock_before_flush=True).addCallbacks(
                lambda results, item=item: item.done.callback(results[0]),
                item.done.errback)

    async def _txn_body(self, txn: Txn, batch: list[_Pending]) -> list[Any]:
        """Stage every delivery in one round trip, write all rows in another, finish
        each. A batch of one raises its own errors (run_interaction translates them as
        usual)."""
        single = len(batch) == 1
        probes = [item.body.probes() for item in batch]
        counts = [len(some) for some in probes]
        flat = [probe for some in probes for probe in some]
        guesses = [item.body.guess(some) if item.may_guess else None
                   for item, some in zip(batch, probes, strict=True)]
        lead: tuple[str, list[Any]] = ("", [])
        if all(guess is not None for guess in guesses):  # no staging round trip
            self.guessed += 1
            answers = [answer for guess in guesses if guess for answer in guess]
            # A lone delivery is built while PostgreSQL writes its bytes ahead: its
            # session waits on that chain alone. (A batch does not: at 20 sessions the
            # overlap made batches smaller and cost the reactor more per message.)
            lead = await mail_store.guessed_delivery_sql(
                txn, flat, [answer.folder for answer in answers if answer.folder],
                overlap=single)
        else:
            try:
                answers = link_threads(flat, await mail_store.prepare_deliveries(txn, flat))
            except Exception as exc:
                if single or _transaction_fault(exc):
                    raise
                raise _ItemFailed(None) from exc
        staged: list[StagedWork] = []
        offset = 0
        for item, count in zip(batch, counts, strict=True):
            mine = answers[offset:offset + count]
            offset += count
            try:
                staged.append(await item.body.stage(txn, mine))
            except Exception as exc:
                if single or _transaction_fault(exc):
                    raise
                raise _ItemFailed(item) from exc
        owners: dict[str, _Pending] = {}
        writes: list[tuple[dict[str, Any], list[dict[str, Any]], CopyRows | Statements]] = []
        for item, work in zip(batch, staged, strict=True):
            for write in work.writes():
                owners[write[0]["id"]] = item
                writes.append(write)
        try:  # the write and the COMMIT: a statement that fails leaves nothing behind
            uids = await mail_store.insert_messages(txn, writes, commit=True, lead=lead) \
                if writes else {}
        except mail_store.StaleGuess:  # the whole batch is staged again (_commit)
            raise
        except NotStored as exc:  # its inbox or folder went away since RCPT
            if single:
                raise
            raise _ItemFailed(owners.get(exc.message_id)) from exc
        except Exception as exc:
            if single or _transaction_fault(exc):
                raise
            raise _ItemFailed(None) from exc
        # Committed: from here on nothing may be run again.
        results: list[Any] = []
        for work in staged:
            try:
                results.append(work.finish(uids))
            except Exception as exc:  # cannot happen: NotStored came first
                if single:
                    raise
                results.append(failure.Failure(exc))
        return results


def _transaction_fault(exc: BaseException) -> bool:
    """Errors of the link or the transaction, not of one message (TemporaryFailure: the
    link was lost while the COMMIT travelled, so the batch may be stored: never again)."""
    return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError
                      | psycopg2.errors.SerializationFailure
                      | psycopg2.errors.DeadlockDetected | txpostgres.RollbackFailed
                      | TemporaryFailure)
