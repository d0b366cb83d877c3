"""Sending drafts: now (``POST /drafts/{id}/send``) or when ``send_at`` comes.

Both go through the one send core (core.sending ``send_composition``: recipient
checks, the Sent copy, the queue rows), and both delete the draft -- its copy in
Drafts, and so its row -- *inside the transaction that stores the Sent copy and
queues it*, through the send core's ``record`` hook (the same hook that records an
``Idempotency-Key`` answer). So a draft is either still there or sent, never both and
never neither; a crash in between leaves it as it was.

While it is leaving, a draft is ``sending`` under a lease (``leased_by``): edits,
cancels and other senders keep off it, and the hook checks the lease is still ours
before anything commits (a job whose lease ran out while it was slow rolls back and
the one that took over sends). A lease that is never released (a process died) runs
out, and the scheduled-send job picks the draft up again.

A scheduled send acts with the power of the key that scheduled it *as it is when the
time comes* (revoked, expired, or narrowed out of the inbox's environment: the
draft is ``failed`` with ``last_error``, not sent). Any refusal by the send core
(``send_paused`` meanwhile, a blocked or suppressed recipient) leaves the draft
``failed`` with the reason; a temporary failure (the database, storage) is retried
after the lease, up to :data:`MAX_ATTEMPTS`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.cred.error import UnauthorizedLogin

from agentpost.auth.cred import principal_from_key
from agentpost.core.context import RequestContext
from agentpost.core.drafts import Drafts, composition
from agentpost.core.idempotency import Idempotency, Recorder, check_key, fingerprint
from agentpost.mail import keywords
from agentpost.model.errors import AgentPostError, Conflict
from agentpost.model.ids import new_id
from agentpost.model.principal import Principal
from agentpost.storage import drafts as draft_store
from agentpost.storage import keys as key_store
from agentpost.storage.database import Database, Txn

log = logging.getLogger(__name__)

#: Tries of one scheduled send that fail temporarily before the draft is ``failed``.
MAX_ATTEMPTS = 5


class DraftSending:
    """Send a draft through core.sending, deleting it in the same transaction."""

    def __init__(self, db: Database, drafts: Drafts, sending: Any, clock: Any, *,
                 lease_s: float, idempotency: Idempotency | None = None) -> None:
        self._db = db
        self._drafts = drafts
        self._sending = sending  # core.sending.Sending
        self._clock = clock
        self._lease_s = lease_s
        self._idempotency = idempotency

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    async def send(self, ctx: RequestContext, draft_id: str, send_at: datetime | None, *,
                   idempotency_key: str | None = None, request_body: Any = None,
                   path: str = "", render: Callable[[dict[str, Any]], Any] | None = None
                   ) -> tuple[int, dict[str, Any]]:
        """Send now (no ``send_at``, or one already past), or schedule. The answer is
        ``{status: sent|scheduled, draft, message}``; a scheduled answer's draft is
        ``render(row)`` (the HTTP layer's view), or the row without ``render``.

        The Idempotency-Key covers both: a scheduling request is recorded too (given
        ``render``, so the record is the JSON answered), so the same key with another
        body is a 409 whether the first request sent or scheduled."""
        p = ctx.org_principal
        p.require("messages:send")
        ctx.target_id = draft_id
        key = check_key(idempotency_key)
        scheduling = send_at is not None and send_at > self._now()

        async def operation(recorder: Recorder | None) -> tuple[int, dict[str, Any]]:
            if scheduling:
                row = await self._drafts.set_plan(ctx, draft_id,
                                                  self._drafts.schedule(ctx, send_at))
                return 200, {"status": "scheduled", "draft": render(row) if render else row,
                             "message": None}
            return 200, await self._send_now(ctx, draft_id, recorder)

        if self._idempotency is None or (scheduling and render is None):
            return await operation(None)
        return await self._idempotency.run(ctx, key, fingerprint("POST", path, request_body),
                                           operation)

    async def _send_now(self, ctx: RequestContext, draft_id: str,
                        recorder: Recorder | None) -> dict[str, Any]:
        worker = "api:" + secrets.token_hex(8)
        lease_until = self._now() + timedelta(seconds=self._lease_s)

        async def claim(txn: Txn) -> dict[str, Any]:
            row = await self._drafts.read(txn, ctx, draft_id, for_update=True)
            if row["status"] == "sending":
                raise Conflict("The draft is being sent.")
            await draft_store.take_lease(txn, row["org_id"], draft_id, worker, lease_until)
            return row

        row = await self._db.run_interaction("drafts.send.claim", claim)
        try:
            return await self._deliver(ctx, row, worker, recorder)
        except BaseException:
            # Refused or failed: the draft is as it was (its plan too), for the caller
            # to fix and send again.
            await self._release(row, worker, row["status"], None)
            raise

    async def _deliver(self, ctx: RequestContext, row: dict[str, Any], worker: str,
                       recorder: Recorder | None) -> dict[str, Any]:
        """Compose the draft and hand it to the send core; the draft goes in its
        transaction, if (and only if) ``worker`` still holds the lease."""
        attachments = await self._drafts.attachment_parts(row["attachments"])
        comp = composition(row["fields"], attachments)
        labels = tuple(keywords.split(row["labels"])[0])
        freed: list[str] = []
        answer: dict[str, Any] = {}

        async def hook(txn: Txn, status: int, body: Any) -> None:
            if not await draft_store.holds_lease(txn, row["org_id"], row["id"], worker):
                raise Conflict("The draft was taken over by another sender.")
            freed[:] = await self._drafts.delete_copy(txn, ctx, row["message_id"])
            answer.clear()
            answer.update(status="sent", draft=None, message=body)
            if recorder is not None:
                await recorder(txn, 200, dict(answer))

        await self._sending.send_composition(ctx, row["inbox_id"], comp, labels=labels,
                                             record=hook)
        await self._drafts.collect(freed)
        return answer

    async def _release(self, row: dict[str, Any], worker: str, status: str,
                       error: str | None) -> None:
        """Give a draft back after a send that did not happen: its earlier plan
        (``draft``/``scheduled``/``failed``), with ``error`` when it failed."""
        async def txn_fn(txn: Txn) -> None:
            if not await draft_store.holds_lease(txn, row["org_id"], row["id"], worker):
                return
            keep = status in ("scheduled", "failed")
            await draft_store.set_schedule(
                txn, row["org_id"], row["id"], status=status,
                send_at=row["send_at"] if keep else None,
                scheduled_by=row["scheduled_by"] if keep else None, last_error=error)

        try:
            await self._db.run_interaction("drafts.send.release", txn_fn)
        except Exception as exc:  # the lease runs out on its own
            log.warning("could not release draft %s: %s", row["id"], exc)

    # ------------------------------------------------------------------ scheduled

    async def _scheduler(self, claimed: dict[str, Any]) -> Principal | str:
        """The principal of the key that scheduled the send, with its power as it is
        now; or why there is none."""
        key_id = claimed["scheduled_by"]
        if not key_id:
            return "No API key scheduled this send."
        rows = await self._db.run_interaction(
            "drafts.send.key", key_store.live_api_keys, [(claimed["org_id"], key_id)])
        if not rows:
            return "The API key that scheduled this send was revoked or has expired."
        try:
            principal = principal_from_key(rows[0])
        except UnauthorizedLogin:
            return "The API key that scheduled this send no longer belongs to a member."
        if "messages:send" not in principal.scopes:
            return "The API key that scheduled this send may no longer send."
        if not principal.may_use_environment(claimed["environment_id"]):
            return "The API key that scheduled this send may no longer use this inbox."
        return principal

    async def send_claimed(self, claimed: dict[str, Any], worker: str) -> str:
        """Send one draft the scheduled-send job has leased (storage.drafts.claim_due);
        returns what happened: sent, failed, retry or gone."""
        principal = await self._scheduler(claimed)
        if isinstance(principal, str):
            await self._release(claimed, worker, "failed", principal)
            return "failed"
        ctx = RequestContext(new_id("req"), None, "drafts.send_scheduled",
                             principal=principal, target_id=claimed["id"])
        try:
            row = await self._db.run_interaction(
                "drafts.send.read", lambda txn: self._drafts.read(txn, ctx, claimed["id"]))
        except AgentPostError:
            # Its copy left Drafts (moved away by an IMAP client): not a draft any
            # more, and its schedule ends here (it is a draft again if moved back).
            await self._release({**claimed, "send_at": None}, worker, "draft", None)
            return "gone"
        try:
            await self._deliver(ctx, row, worker, None)
        except Exception as exc:
            temporary = not isinstance(exc, AgentPostError) or exc.temporary
            if temporary and claimed["attempts"] < MAX_ATTEMPTS:
                # Temporary (or unexpected): the lease runs out and it is tried again.
                log.warning("scheduled send of %s failed, retried after the lease: %s",
                            claimed["id"], exc)
                return "retry"
            reason = (f"{exc.type}: {exc.message}" if isinstance(exc, AgentPostError)
                      else "internal_error: the send failed repeatedly.")
            await self._release(row, worker, "failed", reason[:500])
            return "failed"
        return "sent"
