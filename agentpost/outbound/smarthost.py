"""The ``smtp`` transport: hand mail to a smarthost (a relay that sends it on).

How it behaves:

* **TLS.** ``required`` (the default): the smarthost must offer STARTTLS and present a
  certificate valid for its name (system trust store, or ``smtp_ca_file``); otherwise
  nothing is sent and the hand-off is deferred. ``implicit``: TLS from the first byte
  (RFC 8314 "submissions", port 465), with the same verification and SNI; a failed
  handshake defers before a byte of SMTP. ``opportunistic`` uses STARTTLS when it
  is offered; ``none`` never does (loopback tests). Once STARTTLS has been tried, a
  failed handshake never falls back to plain text. Credentials never cross a plain
  connection unless ``tls = "none"`` says so (and production refuses that).
* **AUTH** PLAIN (with an initial response) or LOGIN, with the configured name and
  password. A refusal defers the hand-off; the password is never logged or recorded.
* **PIPELINING** when offered: MAIL, every RCPT and DATA go out in one write, and the
  replies are matched in order (RFC 2920).
* **One connection for many hand-offs.** A small pool (``smtp_pool_size``) keeps
  connections open between hand-offs; an idle one is closed after ``smtp_idle_timeout``
  on the injected clock. A pooled connection the smarthost closed meanwhile is replaced
  once, transparently.
* **Per-recipient outcomes.** 2xx: sent (the queue id from the final 250 text is kept as
  ``transport_id``); 4xx: deferred; 5xx: bounced, with the enhanced status code and the
  smarthost's text. A connection, TLS, AUTH or protocol failure, and the hand-off's
  deadline (``smtp_deadline``, on the injected clock), defer every recipient not yet
  answered.
* **8-bit.** A message with 8-bit bytes goes out with ``BODY=8BITMIME`` when the
  smarthost offers it; otherwise non-UTF-8 parts are transfer-encoded
  (:mod:`agentpost.outbound.eightbit`), and a message that still holds 8-bit bytes then
  bounces (5.6.3). Non-ASCII envelope addresses need SMTPUTF8 (5.6.7 otherwise).
* **DKIM.** With a signer (:mod:`agentpost.outbound.dkim_signing`), the message is
  signed after any conversion, so the signature covers exactly the bytes sent.

The wire and the deadline are in :mod:`agentpost.outbound.smarthost_client`, the
session set-up (TLS, AUTH) and the pool in :mod:`agentpost.outbound.smarthost_session`;
this module maps a hand-off onto SMTP transactions and the replies onto outcomes.

Duplicate window: if the connection breaks after the final ``.`` but before the
smarthost's answer arrives, the hand-off is deferred and repeated later, and the
smarthost may deliver it twice (as with any relay).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool

from agentpost.config.sections import OutboundSection
from agentpost.outbound.dkim_signing import DkimSigner
from agentpost.outbound.eightbit import encode_8bit_parts, strip_return_path
from agentpost.outbound.smarthost_client import (
    Deadline,
    Reply,
    SmarthostError,
    SMTPClientProtocol,
    StaleConnection,
    all_replies,
    as_smarthost_error,
    describe_error,
    queue_id_of,
)
from agentpost.outbound.smarthost_session import (
    TLS_MODES,
    ConnectionPool,
    Connector,
    Session,
    SmarthostSettings,
)
from agentpost.outbound.transports import DEFERRED, FAILED, SENT, Envelope, HandOff, Outcome

log = logging.getLogger(__name__)

__all__ = ["Reply", "SmarthostSettings", "SmarthostTransport", "queue_id_of"]

#: Recipients per SMTP transaction (RFC 5321 §4.5.3.1.8 asks servers for at least 100).
MAX_RCPTS = 100
#: A CR or LF that is not half of a CRLF. Both become CRLF before the message leaves:
#: a bare one passed on is a line end to some receivers and not to others, which is
#: how ``<CR>.<CR>`` or ``<LF>.<LF>`` smuggles a second message (SMTP smuggling).
_BARE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_DOT_LINE = re.compile(rb"(?m)^\.")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ---------------------------------------------------------------------- the message


def plausible(address: str, *, allow_empty: bool = False) -> bool:
    """Safe to put in a MAIL/RCPT line: no control characters (a CR/LF would inject a
    command), no angle brackets, a domain. The doors validated it; this is the last
    line of defence before the wire."""
    if not address:
        return allow_empty
    return ("@" in address and len(address) <= 512 and "<" not in address
            and ">" not in address and not _CONTROL.search(address))


def needs_smtputf8(addresses: Sequence[str]) -> bool:
    return not all(a.isascii() for a in addresses)


def normalise(raw: bytes) -> bytes:
    """What is sent: without a leading Return-Path, CRLF line ends (no bare CR or LF),
    ending in CRLF."""
    raw = strip_return_path(raw)
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:  # (counting: a tenth of the regex)
        raw = _BARE_EOL.sub(b"\r\n", raw)
    return raw if raw.endswith(b"\r\n") else raw + b"\r\n"


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency: a line starting with '.' gets another."""
    if not data.startswith(b".") and b"\n." not in data:  # the usual message: no copy
        return data
    return _DOT_LINE.sub(b"..", data)


def for_server(raw: bytes, eightbit: bool) -> bytes | None:
    """The message as this server may take it: as it is with 8BITMIME (or when it is
    7-bit), else with non-UTF-8 parts transfer-encoded; None when 8-bit bytes remain."""
    if eightbit or raw.isascii():
        return raw
    converted = encode_8bit_parts(raw)
    return converted if converted.isascii() else None


# ---------------------------------------------------------------------- the transport


class SmarthostTransport:
    """Hands messages to one smarthost (see the module doc)."""

    name = "smtp"

    def __init__(self, settings: SmarthostSettings, *, clock: IReactorTime, reactor: Any,
                 signer: DkimSigner | None = None) -> None:
        if settings.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}")
        self.settings = settings
        self._clock = clock
        self._reactor = reactor
        self._signer = signer
        self._connector = Connector(settings, reactor, clock)
        self.pool = ConnectionPool(self._connector.open, clock, settings.pool_size,
                                   settings.idle_timeout_s)

    @classmethod
    def from_config(cls, out: OutboundSection, *, hostname: str, clock: IReactorTime,
                    reactor: Any, signer: DkimSigner | None = None) -> SmarthostTransport:
        """The transport ``[outbound]`` describes (check_config has vetted it)."""
        password = out.smtp_password or None
        if out.smtp_password_file:
            lines = Path(out.smtp_password_file).read_text("utf-8").splitlines()
            password = lines[0] if lines else ""
        settings = SmarthostSettings(
            host=out.smtp_host, port=out.smtp_port, tls=out.smtp_tls,
            tls_verify=out.smtp_tls_verify, ca_file=out.smtp_ca_file or None,
            username=out.smtp_username or None, password=password,
            helo=out.smtp_helo or hostname, pool_size=out.smtp_pool_size,
            idle_timeout_s=out.smtp_idle_timeout, deadline_s=out.smtp_deadline)
        return cls(settings, clock=clock, reactor=reactor, signer=signer)

    def start(self) -> None:
        """Nothing to start: connections open on demand."""

    def stop(self) -> None:
        """Close the pooled connections."""
        self.pool.close()

    async def send(self, envelope: Envelope, raw: bytes) -> HandOff:
        """Send ``raw`` to the envelope's recipients over a pooled connection."""
        deadline = Deadline(self._clock, self.settings.deadline_s)
        try:
            return await self._send(envelope, normalise(raw), deadline)
        except SmarthostError as exc:
            log.info("outbound %s: smarthost: %s", envelope.queue_id, exc.diagnostic)
            return HandOff([Outcome(r, DEFERRED, exc.smtp_code or 451, exc.status_code,
                                    exc.diagnostic) for r in envelope.recipients],
                           errors=[exc.diagnostic])
        finally:
            deadline.cancel()

    async def _send(self, envelope: Envelope, raw: bytes, deadline: Deadline) -> HandOff:
        for attempt in range(2):
            session = await self.pool.acquire(deadline)
            deadline.watch(session.proto)
            clean = False
            try:
                outcomes, clean = await self._deliver(session, envelope, raw)
                return HandOff(outcomes)
            except StaleConnection:
                if attempt == 1:
                    raise
            except SmarthostError as exc:
                clean = exc.reusable
                raise
            except Exception as exc:
                raise as_smarthost_error(deadline, exc,
                                         "connection to the smarthost lost") from None
            finally:
                deadline.unwatch(session.proto)
                self.pool.release(session, clean and not deadline.expired)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _deliver(self, session: Session, envelope: Envelope,
                       raw: bytes) -> tuple[list[Outcome], bool]:
        """All recipients, MAX_RCPTS per transaction; (outcomes, connection reusable)."""
        if not plausible(envelope.mail_from, allow_empty=True):
            return [Outcome(r, FAILED, 553, "5.1.7", "unusable sender address")
                    for r in envelope.recipients], True
        outcomes = [Outcome(r, FAILED, 553, "5.1.3", "unusable recipient address")
                    for r in envelope.recipients if not plausible(r)]
        recipients = [r for r in envelope.recipients if plausible(r)]
        if not recipients:
            return outcomes, True
        utf8 = needs_smtputf8([envelope.mail_from, *recipients])
        if utf8 and not session.has("SMTPUTF8"):
            return outcomes + [Outcome(r, FAILED, 553, "5.6.7", "non-ASCII address and the "
                                       "smarthost does not offer SMTPUTF8")
                               for r in recipients], True
        data = await self._prepare(envelope, raw, session)
        if data is None:
            return outcomes + [Outcome(r, FAILED, 554, "5.6.3", "8-bit message and the "
                                       "smarthost does not offer 8BITMIME")
                               for r in recipients], True
        size_limit = session.size_limit
        if size_limit and len(data) > size_limit:
            return outcomes + [Outcome(r, FAILED, 552, "5.3.4", "message too big for the "
                                       f"smarthost ({len(data)} > {size_limit} bytes)")
                               for r in recipients], True
        params = self._mail_params(session, data, utf8)
        clean = True
        stuffed = dot_stuff(data)
        for start in range(0, len(recipients), MAX_RCPTS):
            chunk = recipients[start:start + MAX_RCPTS]
            first = start == 0
            done, clean = await self._transaction(session, envelope.mail_from, chunk,
                                                  stuffed, params, first)
            outcomes += done
            if not clean:
                break
        answered = {o.address for o in outcomes}
        outcomes += [Outcome(r, DEFERRED, 451, "4.4.2", "not attempted: an earlier "
                             "transaction failed") for r in recipients if r not in answered]
        return outcomes, clean

    async def _prepare(self, envelope: Envelope, raw: bytes, session: Session) -> bytes | None:
        """Convert for the server, then sign (in a thread: both are CPU work). A message
        that needs no conversion (7-bit, or a server with 8BITMIME: the usual case) skips
        the thread: the check is one pass in C, the thread hop costs more than it."""
        eightbit = session.has("8BITMIME")
        data: bytes | None
        if eightbit or raw.isascii():
            data = raw
        else:
            data = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                           for_server, raw, eightbit)
        if data is not None and self._signer is not None:
            try:
                data = await self._signer.sign(envelope.org_id, data)
            except Exception as exc:  # unsigned mail from a DMARC domain would be refused
                log.error("outbound %s: DKIM signing failed: %s", envelope.queue_id, exc)
                raise SmarthostError(f"DKIM signing failed ({type(exc).__name__}: {exc})",
                                     "4.7.5", reusable=True) from None
        return data

    @staticmethod
    def _mail_params(session: Session, data: bytes, utf8: bool) -> bytes:
        params = b""
        if session.has("SIZE"):
            params += b" SIZE=%d" % len(data)
        if not data.isascii() and session.has("8BITMIME"):
            params += b" BODY=8BITMIME"
        if utf8:
            params += b" SMTPUTF8"
        return params

    async def _transaction(self, session: Session, mail_from: str, rcpts: list[str],
                           stuffed: bytes, params: bytes,
                           first: bool) -> tuple[list[Outcome], bool]:
        proto = session.proto
        mail = b"MAIL FROM:<" + mail_from.encode("utf-8") + b">" + params
        rcpt_lines = [b"RCPT TO:<" + r.encode("utf-8") + b">" for r in rcpts]
        session.transactions += 1
        heard = proto.replies
        try:
            if session.has("PIPELINING"):
                replies = await all_replies(proto.send([mail, *rcpt_lines, b"DATA"]))
                mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
            else:
                mail_reply = await proto.command(mail)
                rcpt_replies, data_reply = [], None
                if mail_reply.positive:
                    rcpt_replies = [await proto.command(line) for line in rcpt_lines]
                    if any(r.positive for r in rcpt_replies):
                        data_reply = await proto.command(b"DATA")
        except Exception as exc:
            if session.reused and first and proto.replies == heard:
                raise StaleConnection(f"pooled connection closed: {describe_error(exc)}") from None
            raise
        return await self._finish(session, rcpts, stuffed, mail_reply, rcpt_replies,
                                  data_reply)

    async def _finish(self, session: Session, rcpts: list[str], stuffed: bytes,
                      mail_reply: Reply, rcpt_replies: list[Reply],
                      data_reply: Reply | None) -> tuple[list[Outcome], bool]:
        proto = session.proto
        if not mail_reply.positive:
            await self._abandon(session, data_reply)
            return [_outcome(r, mail_reply, "MAIL FROM") for r in rcpts], await _reset(proto)
        accepted = [r for r, reply in zip(rcpts, rcpt_replies, strict=True) if reply.positive]
        outcomes = [_outcome(r, reply, "RCPT TO")
                    for r, reply in zip(rcpts, rcpt_replies, strict=True) if not reply.positive]
        if not accepted:
            await self._abandon(session, data_reply)
            return outcomes, await _reset(proto)
        assert data_reply is not None
        if data_reply.code != 354:
            return (outcomes + [_outcome(r, data_reply, "DATA") for r in accepted],
                    await _reset(proto))
        final = await proto.data(stuffed)
        if final.positive:
            transport_id = queue_id_of(final)
            outcomes += [Outcome(r, SENT, final.code, final.enhanced(), final.describe(),
                                 transport_id) for r in accepted]
            return outcomes, True
        return outcomes + [_outcome(r, final, "the message") for r in accepted], True

    @staticmethod
    async def _abandon(session: Session, data_reply: Reply | None) -> None:
        """A pipelined DATA the server took despite no recipient: end it empty."""
        if data_reply is not None and data_reply.code == 354:
            await session.proto.data(b"")


async def _reset(proto: SMTPClientProtocol) -> bool:
    """RSET after a refused transaction; whether the connection is still good."""
    reply = await proto.command(b"RSET")
    return reply.code == 250


def _outcome(address: str, reply: Reply, step: str) -> Outcome:
    """A refusal's outcome: 5xx bounces, anything else waits. A 530 (authentication
    required) is the configuration's fault, not the recipient's: it waits too."""
    permanent = reply.code >= 500 and reply.code != 530
    status_code = reply.enhanced()
    if not permanent and status_code.startswith("5"):
        status_code = "4" + status_code[1:]
    return Outcome(address, FAILED if permanent else DEFERRED, reply.code, status_code,
                   f"{step}: {reply.describe()}")
