"""The submission listener's DeliveryAgent: AUTH, then send as the authenticated inbox.

The SMTP protocol is the MX's (same parser, same state machine); the listener's policy
(:data:`agentpost.smtp.policy.SUBMISSION`) makes it offer AUTH inside TLS and require
it for MAIL. This adapter holds the session's account and its live credential; the
rules of sending are core's (:mod:`agentpost.core.submission`) and the login check is
the one IMAP uses (:mod:`agentpost.core.mailbox_logins`, scope ``messages:send``).

The credential is re-checked at MAIL, RCPT and the end of DATA (DESIGN.md §3.11), and a
revocation noticed in between (PostgreSQL NOTIFY) ends the session at once with
``421 4.7.0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import IO

from agentpost.auth.sessions import LiveCredentials, LiveSession
from agentpost.core.context import RequestContext
from agentpost.core.mailbox_logins import MailboxLogins
from agentpost.core.submission import Sender, Submission
from agentpost.model.errors import SessionEnded, Unauthenticated
from agentpost.model.ids import new_id
from agentpost.smtp.interfaces import Envelope, SessionInfo


class SubmissionAccount:
    """An authenticated session's inbox and its hold on the key."""

    def __init__(self, sender: Sender, credential: LiveSession | None) -> None:
        self.sender = sender
        self._credential = credential

    async def check(self) -> None:
        """SessionEnded (421 4.7.0) once the key may no longer be used."""
        if self._credential is not None:
            reason = await self._credential.check()
            if reason is not None:
                raise SessionEnded(reason)

    def close(self) -> None:
        """Stop watching the key (the session is over)."""
        if self._credential is not None:
            credential, self._credential = self._credential, None
            credential.close()


class SubmissionDelivery:
    """AUTH through the shared login check; MAIL/RCPT/DATA through core.Submission."""

    def __init__(self, logins: MailboxLogins, submission: Submission,
                 credentials: LiveCredentials | None) -> None:
        self._logins = logins
        self._submission = submission
        self._credentials = credentials

    async def authenticate(self, session: SessionInfo, username: str, password: str,
                           on_revoked: Callable[[str], None]) -> SubmissionAccount:
        """Username = inbox address, password = an API key with ``messages:send``."""
        principal, inbox = await self._logins.authenticate(
            username, password, session.peer_host, protocol="smtp", scope="messages:send",
            action="smtp.auth")
        credential = None
        if self._credentials is not None:
            credential = await self._credentials.register(principal, on_revoked)
        return SubmissionAccount(Sender.of(principal, inbox), credential)

    @staticmethod
    async def _account(session: SessionInfo) -> SubmissionAccount:
        account = session.principal
        if not isinstance(account, SubmissionAccount):
            raise Unauthenticated("Authentication required.")
        await account.check()
        return account

    async def check_sender(self, session: SessionInfo, mail_from: str) -> None:
        """MAIL FROM must be the authenticated inbox (553 5.7.1)."""
        account = await self._account(session)
        self._submission.check_sender(account.sender, mail_from)

    async def check_recipient(self, session: SessionInfo, mail_from: str, rcpt: str) -> str:
        """Any address, unless sending is paused or a send filter blocks it. The token
        is the queue rows' envelope sender the check decided (core.submission: the
        domain's custom MAIL FROM, or the inbox address), for :meth:`deliver`."""
        account = await self._account(session)
        return await self._submission.check_recipients(account.sender, [rcpt])

    async def deliver(self, session: SessionInfo, envelope: Envelope, message: IO[bytes],
                      size: int) -> str:
        """Store the Sent copy and queue it; the Sent copy's id once committed."""
        account = await self._account(session)
        origin = RequestContext(new_id("req"), session.peer_host or None, "smtp.submit",
                                details={"listener": session.listener,
                                         "tls": session.tls_version})
        # Every RCPT's check read the same inbox's domain: the latest answer counts.
        envelope_from = envelope.recipients[-1] if envelope.recipients else None
        submitted = await self._submission.submit(
            account.sender, envelope.mail_from, list(envelope.recipient_addresses), message,
            origin, envelope_from=envelope_from)
        return submitted.message_id
