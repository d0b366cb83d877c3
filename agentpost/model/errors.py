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


class MalformedMessage(InvalidRequest):
    """A message whose header section cannot be read one way only (a bare CR or LF, a
    line that is not a field): SMTP 554 5.6.0 at the end of DATA, where 501 is no
    reply RFC 5321 §4.3.2 allows; HTTP 400 as any invalid request."""

    type = "malformed_message"
    default_message = "The message's header section is malformed."


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


class SendRateLimited(RateLimited):
    """Sending faster than the organization's or the inbox's send rate allows (HTTP 429
    with Retry-After, SMTP 451 4.7.0). ``scope`` says whose bucket ran dry:
    ``organization`` or ``inbox``."""

    type = "rate_limited"
    default_message = "The sending rate limit is reached; try again later."

    def __init__(self, retry_after_s: float, message: str | None = None, *,
                 scope: str = "organization") -> None:
        super().__init__(retry_after_s, message)
        self.details = {"scope": scope}


class DailyQuotaExceeded(SendRateLimited):
    """The organization's or inbox's messages for this UTC day are used up (HTTP 429
    ``daily_quota_exceeded`` with Retry-After until midnight UTC, SMTP 451 4.7.0: the
    condition ends by itself, so the client keeps the message and tries again)."""

    type = "daily_quota_exceeded"
    default_message = "The daily sending quota is used up; try again after midnight UTC."


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


class DomainNotVerified(Forbidden):
    """The inbox is on an organization domain whose DNS records are not verified yet: it
    may not send (HTTP 403, SMTP 550 5.7.1 -- RFC 3463 "delivery not authorized, message
    refused": a policy refusal the client must not retry as is)."""

    type = "domain_not_verified"
    default_message = ("The inbox's domain is not verified yet; publish its DNS records "
                       "and verify it (POST /api/v1/domains/{id}/verify) before sending.")


class RecipientBlocked(Forbidden):
    """A send-direction filter rule blocks this recipient (SMTP 550 5.7.1)."""

    type = "recipient_blocked"
    default_message = "Recipient refused by the sending inbox's policy."


class SuppressedRecipient(Unprocessable):
    """The recipient is on the organization's suppression list (a hard bounce, a
    complaint, or added by hand): HTTP 422, SMTP 550 5.7.1. Sending again would hurt the
    installation's sender reputation, so it is refused before anything is queued."""

    type = "suppressed_recipient"
    default_message = "The recipient is on this organization's suppression list."


class SessionEnded(Unauthenticated):
    """A long-lived session's key was revoked, expired or narrowed (SMTP 421 4.7.0)."""

    type = "session_ended"
    default_message = "The API key is no longer valid; closing the session."


class IdempotencyConflict(Conflict):
    """An Idempotency-Key reused with a different request (HTTP 409)."""

    type = "idempotency_conflict"
    default_message = "This Idempotency-Key was used with a different request."


class IdempotencyInProgress(Conflict):
    """A request with this Idempotency-Key is still running (HTTP 409; retry later)."""

    type = "idempotency_in_progress"
    default_message = "A request with this Idempotency-Key is still in progress."


class TooManyRecipients(InvalidRequest):
    """More recipients than one message may have (HTTP 400, like SMTP's 452 4.5.3)."""

    type = "too_many_recipients"
    default_message = "The message has too many recipients."


class InvalidUploadSignature(Forbidden):
    """An upload URL whose signature is wrong or whose time has passed (HTTP 403)."""

    type = "invalid_signature"
    default_message = "The upload URL is invalid or has expired."


class WebhookURLNotAllowed(InvalidRequest):
    """A webhook URL we refuse to call: not https in production, or resolving to a
    loopback, private, link-local, metadata or otherwise internal address (HTTP 400)."""

    type = "webhook_url_not_allowed"
    default_message = "This webhook URL is not allowed."
