"""The queue's local path: recipients hosted on this installation never leave it.

Wraps the configured transport. At hand-off each recipient is resolved with the same
Router the MX uses: a hosted inbox gets the message through the one ingest path (its
receive filters and quota apply, the event is ``message.received``); a domain that is
not ours (RelayDenied) goes to the configured transport. Delivering from the queue
rather than inside the submission's transaction keeps the submission fast and gives a
local delivery the queue's retries (a full mailbox or a database hiccup is deferred,
an unknown local address bounces with a DSN like any other).

Hosted recipients go first: their delivery is a local COMMIT whose outcome is known at
once, while the configured transport may fail or hang. Whatever the remote part does,
the local outcomes stand: a remote ``send`` that raises defers only the remote
recipients (``4.4.0``, as the worker defers a whole hand-off), and with
``remote_deadline_s`` (below the worker's ``handoff_timeout_s``) a remote part still
unanswered then is deferred (``4.4.1``) and the hand-off answers before the worker's
deadline would discard the local outcomes too. (Remote first would be worse: a remote
hand-off past the worker's deadline would still be followed by the local delivery,
whose outcome would then be discarded.) A row holds one domain, hosted or not for all
its addresses, so a row mixes the two only when the domain's hosting changes during
the hand-off (a domain deleted meanwhile, or seen not hosted through another row's
memo below) -- then the remote part's failure must not redeliver the local copy.

Duplicate window: as for any transport, a crash after the local COMMIT but before the
outcome is recorded delivers the message again when the lease runs out; so does a
local delivery that itself outlasts the worker's hand-off deadline (the worker defers
everyone), and without ``remote_deadline_s`` a remote part that outlasts it. A
cancellation (the worker never cancels a hand-off) propagates and loses the local
outcomes with it, rather than turning into a success.

As an MTA's final delivery does (RFC 5321 §4.4), the hosted copy starts with a
``Return-Path:`` of the envelope sender (any the message already had is dropped) and a
``Received:`` line of this hop, naming the queue row (and the recipient when there is
only one).
"""

from __future__ import annotations

import email.utils
import io
import logging
import time
from datetime import UTC, datetime

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from agentpost.core.context import RequestContext
from agentpost.core.ingest import Ingest, Target
from agentpost.core.routing import Router
from agentpost.model import errors
from agentpost.model.ids import new_id
from agentpost.outbound.eightbit import strip_return_path
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
    no_answer,
    transport_error,
)

log = logging.getLogger(__name__)

#: How long "this domain is not hosted here" is remembered (on the injected clock). The
#: route lookup per recipient was most of the queue's database work left for remote
#: mail; remembering the answer for a second means a domain that becomes hosted may
#: still see its mail go through the configured transport for that second (to the
#: relay, which hands it back to our MX), never the other way round.
REMOTE_MEMO_S = 1.0
_MEMO_MAX = 4096


class LocalFirstTransport:
    """Hosted recipients through ingest; the rest through ``remote``.

    ``remote_deadline_s`` (needs ``clock``): seconds from the call after which remote
    recipients still unanswered are deferred and the local outcomes returned; set it
    below the worker's ``handoff_timeout_s`` (None: the remote part is unbounded)."""

    def __init__(self, router: Router, ingest: Ingest, remote: Transport, *,
                 hostname: str = "localhost", clock: IReactorTime | None = None,
                 remote_deadline_s: float | None = None) -> None:
        self._router = router
        self._ingest = ingest
        self._remote = remote
        self._hostname = hostname
        self._clock = clock
        self._remote_deadline_s = remote_deadline_s if clock is not None else None
        self.name = f"local+{remote.name}"
        self._remote_until: dict[str, float] = {}  # domain -> remembered until

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        started = self._seconds()
        outcomes: list[Outcome] = []
        remote: list[str] = []
        local: list[tuple[str, Target]] = []
        for address in envelope.recipients:
            domain = address.rpartition("@")[2].lower()
            if self._known_remote(domain):
                remote.append(address)
                continue
            try:
                local.append((address, await self._router.resolve(address,
                                                                   envelope.mail_from)))
            except errors.RelayDenied:
                remote.append(address)
                self._remember_remote(domain)
            except errors.UnknownRecipient:
                outcomes.append(Outcome(address, FAILED, 550, "5.1.1", "no such mailbox here"))
            except errors.SenderBlocked:
                outcomes.append(Outcome(address, FAILED, 550, "5.7.1",
                                        "refused by the recipient's policy"))
            except errors.MailboxFull:
                outcomes.append(Outcome(address, DEFERRED, 452, "4.2.2", "mailbox full"))
            except errors.AgentPostError as exc:
                outcomes.append(Outcome(address, DEFERRED, 451, "4.3.0", exc.message))
        if local:
            outcomes += await self._deliver_locally(envelope, raw, local)
        retry_after = None
        if remote:
            handoff = await self._send_remote(
                Envelope(envelope.queue_id, envelope.org_id, envelope.mail_from,
                         tuple(remote), envelope.message_id), raw, started)
            outcomes += handoff.outcomes
            retry_after = handoff.retry_after_s
        return HandOff(outcomes, retry_after)

    async def _send_remote(self, envelope: Envelope, raw: bytes,
                           started: float) -> HandOff:
        """The remote recipients' hand-off; whatever goes wrong defers them alone (the
        local ones are committed: deferring them too would deliver them again)."""
        try:
            if self._remote_deadline_s is None:
                return await self._remote.send(envelope, raw)
            left = self._remote_deadline_s - (self._seconds() - started)
            if left <= 0:  # the local part used the time up: not sent at all
                raise HandOffTimedOut()
            assert self._clock is not None  # a deadline needs the clock (__init__)
            return await bounded(defer.ensureDeferred(self._remote.send(envelope, raw)),
                                 self._clock, left, envelope.queue_id, "remote hand-off")
        except defer.CancelledError:
            raise  # the caller gave up on the whole hand-off: never a success
        except HandOffTimedOut:
            log.warning("outbound %s: transport %s did not answer within %gs of the "
                        "hand-off; its recipients deferred", envelope.queue_id,
                        self._remote.name, self._remote_deadline_s)
            return no_answer(envelope, self._remote_deadline_s or 0.0)
        except Exception as exc:  # a transport bug or an unclassified failure: later
            log.exception("outbound %s: transport %s failed", envelope.queue_id,
                          self._remote.name)
            return transport_error(envelope, exc)

    def _seconds(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.monotonic()

    def _known_remote(self, domain: str) -> bool:
        until = self._remote_until.get(domain)
        return until is not None and self._seconds() < until

    def _remember_remote(self, domain: str) -> None:
        if not domain:
            return
        now = self._seconds()
        if len(self._remote_until) >= _MEMO_MAX:
            self._remote_until = {d: t for d, t in self._remote_until.items() if t > now}
            if len(self._remote_until) >= _MEMO_MAX:
                self._remote_until.clear()
        self._remote_until[domain] = now + REMOTE_MEMO_S

    async def _deliver_locally(self, envelope: Envelope, raw: bytes,
                               local: list[tuple[str, Target]]) -> list[Outcome]:
        targets: list[Target] = []
        for _, target in local:
            if target not in targets:
                targets.append(target)
        origin = RequestContext(new_id("req"), None, "outbound.local",
                                details={"queue_id": envelope.queue_id})
        raw = self._trace(envelope, [a for a, _ in local]) + strip_return_path(raw)
        try:
            await self._ingest.store(targets, io.BytesIO(raw),
                                     envelope_from=envelope.mail_from or None, origin=origin)
        except Exception as exc:
            log.warning("outbound %s: local delivery failed: %s", envelope.queue_id, exc)
            return [Outcome(a, DEFERRED, 451, "4.3.0", "local delivery failed")
                    for a, _ in local]
        return [Outcome(a, SENT, 250, "2.0.0", "delivered locally") for a, _ in local]

    def _trace(self, envelope: Envelope, recipients: list[str]) -> bytes:
        """``Return-Path:`` and ``Received:`` for the hosted copy, CRLF-terminated."""
        seconds = self._clock.seconds() if self._clock is not None else time.time()
        now = datetime.fromtimestamp(seconds, UTC)
        lines = [f"Return-Path: <{_clean(envelope.mail_from)}>",
                 f"Received: by {self._hostname} (AgentPost outbound queue)",
                 f"\tid {envelope.queue_id}"]
        if len(recipients) == 1:
            lines.append(f"\tfor <{_clean(recipients[0])}>; "
                         f"{email.utils.format_datetime(now)}")
        else:
            lines[-1] += f"; {email.utils.format_datetime(now)}"
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _clean(address: str) -> str:
    """An address as a header may carry it: no control characters (no CR/LF)."""
    return "".join(ch for ch in address if ch >= " " and ch != "\x7f")
