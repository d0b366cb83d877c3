"""What the SMTP protocol layer needs from the rest of the system.

The protocol code knows nothing of inboxes, tenants or SQL: it asks a
``DeliveryAgent`` about senders and recipients and hands it a finished envelope.
Errors come back as domain errors (``agentpost.model.errors``), translated to SMTP
replies by the one table in ``agentpost.smtp.replies``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol


@dataclass
class SessionInfo:
    """Facts about the connection, for policy decisions and the Received: header."""

    peer_host: str
    peer_port: int
    helo: str | None = None
    tls_version: str | None = None  # e.g. "TLSv1.3" once STARTTLS completed
    tls_cipher: str | None = None
    listener: str = "mx"  # "mx" or "submission"
    esmtp: bool = False
    principal: Any = None  # the account AUTH returned (submission); None on MX


@dataclass
class Envelope:
    """One mail transaction: MAIL FROM, accepted RCPT TOs, and the body on disk."""

    mail_from: str  # "" for the null reverse-path <>
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Any] = field(default_factory=list)  # tokens returned by check_recipient
    recipient_addresses: list[str] = field(default_factory=list)
    smtputf8: bool = False
    body_8bitmime: bool = False


class DeliveryAgent(Protocol):
    """Implemented by the ingest side (agentpost.smtp.delivery)."""

    def check_sender(self, session: SessionInfo, mail_from: str) -> Any:
        """Raise (or fail) with a domain error to refuse MAIL FROM (rarely used on MX).
        A plain function, a coroutine function or one returning a Deferred: the
        protocol takes all three, and one that answers at once costs it least."""

    async def check_recipient(self, session: SessionInfo, mail_from: str, rcpt: str) -> Any:
        """Return an opaque token for an acceptable recipient, or raise
        UnknownRecipient / RelayDenied / SenderBlocked / TemporaryFailure."""

    async def deliver(self, session: SessionInfo, envelope: Envelope, message: IO[bytes],
                      size: int) -> str | None:
        """Durably store the message (already prefixed with Return-Path: and Received:)
        for every accepted recipient. Return only after commit; raise TemporaryFailure
        (-> 451 4.3.0) or another domain error otherwise. ``message`` is a binary file
        positioned at 0 holding exactly ``size`` bytes with CRLF line endings and
        dot-unstuffing already undone. A returned id is quoted in the reply
        (``250 2.0.0 Ok: queued as <id>``)."""


class AuthenticatedAccount(Protocol):
    """What AUTH yields (kept in ``SessionInfo.principal``)."""

    def close(self) -> None:
        """The session is over: stop watching the credential."""


class SubmissionAgent(DeliveryAgent, Protocol):
    """A delivery agent that also checks AUTH credentials (submission)."""

    async def authenticate(self, session: SessionInfo, username: str, password: str,
                           on_revoked: Callable[[str], None]) -> AuthenticatedAccount:
        """The account, or Unauthenticated (535 5.7.8) / RateLimited (454 4.7.0).
        ``on_revoked(reason)`` is called if the key dies while the session lasts."""
