"""One error hierarchy for every protocol.

Each error has a stable ``type`` that clients may branch on, a temporary flag that
protocols map to 4xx-SMTP / 503-HTTP / [UNAVAILABLE] replies, and client-safe text.
Each adapter (HTTP, SMTP, IMAP) has exactly one table translating these.
"""

from __future__ import annotations

from typing import Any


class AgentPostError(Exception):
    """Base of every error a client may be told about."""

    type = "internal_error"
    temporary = False
    default_message = "An internal error occurred."

    def __init__(self, message: str | None = None, **details: Any) -> None:
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)


class InvalidRequest(AgentPostError):
    """The request is malformed or fails validation."""

    type = "invalid_request"
    default_message = "The request is invalid."


class ReservedAddress(InvalidRequest):
    """A local part reserved for the operator of a shared domain (postmaster, abuse, ...)."""

    type = "reserved_address"
    default_message = "This address is reserved for the operator of the domain."


class Unauthenticated(AgentPostError):
    """No credential, or a credential that is unknown, revoked or expired."""

    type = "unauthenticated"
    default_message = "A valid API key is required."


class Forbidden(AgentPostError):
    """The credential is valid but lacks a scope or role."""

    type = "forbidden"
    default_message = "This credential may not do that."


class NotFound(AgentPostError):
    """Missing, or belongs to another organization or environment (never distinguished)."""

    type = "not_found"
    default_message = "No such resource."


class Conflict(AgentPostError):
    """The request clashes with existing state."""

    type = "conflict"
    default_message = "The request conflicts with the current state."


class PayloadTooLarge(AgentPostError):
    """The request body exceeds the configured limit."""

    type = "payload_too_large"
    default_message = "The request body is too large."


class UnsupportedMediaType(AgentPostError):
    """The request body is not JSON."""

    type = "unsupported_media_type"
    default_message = "Send the request body as application/json."


class Unprocessable(AgentPostError):
    """Well-formed but semantically impossible."""

    type = "unprocessable"
    default_message = "The request cannot be carried out."


class RateLimited(AgentPostError):
    """Too many requests for one credential."""

    type = "rate_limited"
    temporary = True
    default_message = "Too many requests; slow down."

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TemporaryFailure(AgentPostError):
    """A dependency (database, blob store) failed; retrying later may succeed."""

    type = "temporarily_unavailable"
    temporary = True
    default_message = "The service is temporarily unavailable; try again shortly."


class UnknownRecipient(NotFound):
    """No inbox with that address on a hosted domain (SMTP 550 5.1.1)."""

    type = "unknown_recipient"
    default_message = "No such mailbox here."


class RelayDenied(Forbidden):
    """The recipient's domain is not hosted here; we are not an open relay (SMTP 550 5.7.1)."""

    type = "relay_denied"
    default_message = "Relaying denied."


class SenderBlocked(Forbidden):
    """A receive-direction filter rule blocks this sender (SMTP 550 5.7.1)."""

    type = "sender_blocked"
    default_message = "Message refused by the recipient's policy."


class MessageTooLarge(PayloadTooLarge):
    """A message over the size limit (SMTP 552 5.3.4)."""

    type = "message_too_large"
    default_message = "Message exceeds the size limit."


class MailboxFull(AgentPostError):
    """The inbox has reached its storage quota (SMTP 552 5.2.2, IMAP NO [OVERQUOTA])."""

    type = "mailbox_full"
    default_message = "The mailbox is full."


class StorageFailure(TemporaryFailure):
    """The blob store failed; nothing was acknowledged (SMTP 451 4.3.0, HTTP 503)."""

    type = "temporarily_unavailable"
    default_message = "Storage is temporarily unavailable; try again shortly."


class SenderNotAllowed(Forbidden):
    """Submission: the envelope sender is not the authenticated inbox (SMTP 553 5.7.1)."""

    type = "sender_not_allowed"
    default_message = "The sender must be the authenticated inbox's address."


class FromHeaderNotAllowed(Forbidden):
    """Submission: the From: header is not the authenticated inbox (SMTP 550 5.7.1)."""

    type = "from_header_not_allowed"
    default_message = "The From: header must be the authenticated inbox's address."


class SendingPaused(Forbidden):
    """The inbox's ``send_paused`` is set: a policy refusal (SMTP 550 5.7.1)."""

    type = "sending_paused"
    default_message = "Sending is paused for this inbox."


class RecipientBlocked(Forbidden):
    """A send-direction filter rule blocks this recipient (SMTP 550 5.7.1)."""

    type = "recipient_blocked"
    default_message = "Recipient refused by the sending inbox's policy."


class SessionEnded(Unauthenticated):
    """A long-lived session's key was revoked, expired or narrowed (SMTP 421 4.7.0)."""

    type = "session_ended"
    default_message = "The API key is no longer valid; closing the session."
