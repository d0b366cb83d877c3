"""What hands a message to the world, behind one interface chosen by configuration.

A transport gets one hand-off (an envelope and the raw bytes) and answers each
recipient's outcome. It never retries on its own: the queue owns retries, so that a
message waits in PostgreSQL (where every process sees it) and not in a client library's
backoff loop, and so that the retry schedule is the same for every transport.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

log = logging.getLogger(__name__)

#: Recipient outcomes a transport may report.
SENT, DEFERRED, FAILED = "sent", "deferred", "failed"


@dataclass(frozen=True)
class Envelope:
    """One hand-off: the queue row's id (transports may use it to deduplicate), the
    envelope sender ('' for a DSN) and the recipients, all of one domain."""

    queue_id: str
    org_id: str
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str


@dataclass
class Outcome:
    """One recipient's result: ``SENT``, ``DEFERRED`` (try again later) or ``FAILED``
    (permanent: bounce), with the SMTP reply and enhanced status code that explain it."""

    address: str
    status: str
    smtp_code: int | None = None
    status_code: str | None = None
    diagnostic: str | None = None
    transport_id: str | None = None

    def row(self) -> dict[str, object]:
        """As storage.outbound.record_results wants it."""
        return {"address": self.address, "status": self.status, "smtp_code": self.smtp_code,
                "status_code": self.status_code, "diagnostic": self.diagnostic,
                "transport_id": self.transport_id}


@dataclass
class HandOff:
    """A transport's answer: per-recipient outcomes, and optionally a wait before the
    next attempt of the deferred ones (a relay's Retry-After or sending pause)."""

    outcomes: list[Outcome]
    retry_after_s: float | None = None
    errors: list[str] = field(default_factory=list)


class Transport(Protocol):
    """The interface the queue worker calls."""

    name: str

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff: ...


def everyone(envelope: Envelope, status: str, *, smtp_code: int | None = None,
             status_code: str | None = None, diagnostic: str | None = None,
             transport_id: str | None = None) -> HandOff:
    """The same outcome for every recipient of a hand-off."""
    return HandOff([Outcome(a, status, smtp_code, status_code, diagnostic, transport_id)
                    for a in envelope.recipients])


def no_answer(envelope: Envelope, seconds: float) -> HandOff:
    """Every recipient deferred: the transport did not answer within ``seconds``."""
    return everyone(envelope, DEFERRED, status_code="4.4.1",
                    diagnostic=f"no answer from the transport within {seconds:g}s")


def transport_error(envelope: Envelope, exc: BaseException) -> HandOff:
    """Every recipient deferred: a transport bug or an unclassified failure (later)."""
    return everyone(envelope, DEFERRED, status_code="4.4.0",
                    diagnostic=f"transport error ({type(exc).__name__})")


class HandOffTimedOut(Exception):
    """A hand-off (or its remote part) did not answer by its deadline."""


def bounded(work: defer.Deferred[HandOff], clock: IReactorTime, seconds: float,
            queue_id: str, what: str = "hand-off") -> defer.Deferred[HandOff]:
    """``work``'s result, or HandOffTimedOut once ``seconds`` passed on ``clock``.
    ``work`` is not cancelled (that cannot undo a send already on its way): it is left to
    finish, and a late outcome is only logged -- its recipients were deferred."""
    out: defer.Deferred[HandOff] = defer.Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(HandOffTimedOut())

    timer = clock.callLater(seconds, expire)

    def finished(result: HandOff | Failure) -> None:
        if timer.active():
            timer.cancel()
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        elif isinstance(result, Failure):
            log.warning("outbound %s: late %s failed: %s", queue_id, what,
                        result.getErrorMessage())
        else:
            log.warning("outbound %s: %s answered after its deadline; its outcome is "
                        "discarded (its recipients were deferred)", queue_id, what)

    work.addBoth(finished)
    return out


class LogTransport:
    """Development: records what would be sent (a log line, and the message as an .eml
    file when ``directory`` is set) and reports it sent."""

    name = "log"

    def __init__(self, directory: str | None = None) -> None:
        self._directory = Path(directory) if directory else None

    def _write(self, envelope: Envelope, raw: bytes) -> None:
        assert self._directory is not None
        self._directory.mkdir(parents=True, exist_ok=True)
        path = self._directory / f"{envelope.queue_id}.eml"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            out.write(f"X-AgentPost-Envelope-From: <{envelope.mail_from}>\r\n".encode())
            for rcpt in envelope.recipients:
                out.write(f"X-AgentPost-Envelope-To: <{rcpt}>\r\n".encode())
            out.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        log.info("outbound (log transport): %s from <%s> to %s, %d bytes",
                 envelope.message_id, envelope.mail_from,
                 ", ".join(f"<{r}>" for r in envelope.recipients), len(raw))
        if self._directory is not None:
            await threads.deferToThread(self._write, envelope, raw)
        return everyone(envelope, SENT, smtp_code=250, status_code="2.0.0",
                        diagnostic="logged (development transport)")
