"""SMTP replies, and the SMTP adapter's one table from domain errors to replies.

Every reply the server sends is a :class:`Reply`, so the wire format (multi-line
continuation, RFC 3463 enhanced codes, no CR/LF or non-ASCII leaking into the text)
is decided in one place.  :func:`reply_for_error` is the only translation from the
domain error hierarchy (:mod:`agentpost.model.errors`) to SMTP: the rest of the SMTP
package never chooses a code for a domain error itself.

The most important rule in the table: anything that is not a known *permanent*
refusal answers ``451 4.3.0``.  A database outage or a bug must make the sending
MTA retry later, never bounce the message (the ``twisted.mail`` ESMTP server answers
a permanent 550 for every delivery failure, which loses mail).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from agentpost.model import errors

log = logging.getLogger(__name__)

_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\Z")
# Reply text is ASCII printable (RFC 5321 §4.2: textstring is HT, SP, and %d33-126).
_UNSAFE_TEXT_RE = re.compile(r"[^\x20-\x7e\t]")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a three-digit code, an RFC 3463 enhanced code, and text.

    ``text`` is a single line or a sequence of lines; a sequence renders as a
    multi-line reply (``250-first`` … ``250 last``).  ``enhanced`` is ``None`` only
    where common practice omits it (the greeting and the EHLO capability list).
    """

    code: int
    enhanced: str | None
    text: str | Sequence[str]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if self.enhanced is not None:
            if not _ENHANCED_RE.match(self.enhanced):
                raise ValueError(f"malformed enhanced status code {self.enhanced!r}")
            if self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced} disagrees with {self.code}")

    @property
    def lines(self) -> list[str]:
        """The text lines (at least one, possibly empty)."""
        if isinstance(self.text, str):
            return [self.text]
        return list(self.text) or [""]

    @property
    def is_error(self) -> bool:
        """A permanent negative reply (5xx): these count towards the per-session error limit."""
        return self.code >= 500

    def render(self) -> bytes:
        """The reply as it goes on the wire, every line CRLF-terminated.

        Text is sanitised to printable ASCII so no caller can inject a line break
        (and with it a second, forged reply) into the stream. Kept once made: the
        constant replies below are sent with every message.
        """
        wire: bytes | None = self.__dict__.get("_wire")
        if wire is None:
            wire = self._render()
            if isinstance(self.text, str | tuple):  # a list could change after this
                object.__setattr__(self, "_wire", wire)  # frozen: a cache, not a field
        return wire

    def _render(self) -> bytes:
        lines = self.lines
        out = []
        for index, line in enumerate(lines):
            separator = " " if index == len(lines) - 1 else "-"
            safe = _UNSAFE_TEXT_RE.sub("?", line)
            if self.enhanced is not None:
                safe = f"{self.enhanced} {safe}" if safe else self.enhanced
            line_out = f"{self.code}{separator}{safe}"
            if self.code != 334:  # RFC 4954: a challenge is "334" SP [base64], even empty
                line_out = line_out.rstrip(" ")
            out.append(line_out + "\r\n")
        return "".join(out).encode("ascii")

    def __str__(self) -> str:
        return self.render().decode("ascii").rstrip("\r\n")


# --------------------------------------------------------------------------- constants
# Replies used in more than one place, so their wording stays consistent.

OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
SEND_EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO/HELO first")
UNRECOGNIZED = Reply(500, "5.5.2", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
UNSUPPORTED_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
TOO_LARGE = Reply(552, "5.3.4", "Message exceeds the size limit")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
NON_ASCII_NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
AUTH_NOT_OFFERED = Reply(503, "5.5.1", "Authentication not enabled on this port")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication "
                            "mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure; try again later")
AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
TEMPORARY = Reply(451, "4.3.0", "Temporary failure; try again later")
RATE_LIMITED = Reply(451, "4.7.0", "Too many requests; slow down and try again later")


def closing(hostname: str, enhanced: str, text: str) -> Reply:
    """A 421 service-closing reply; the caller closes the connection after sending it."""
    return Reply(421, enhanced, f"{hostname} {text}")


# --------------------------------------------------------------------------- the table
# Ordered most specific first: the first class in an exception's MRO that appears
# here wins (UnknownRecipient before NotFound, MessageTooLarge before PayloadTooLarge).
ERROR_REPLIES: dict[type[errors.AgentPostError], tuple[int, str]] = {
    errors.UnknownRecipient: (550, "5.1.1"),
    errors.RelayDenied: (550, "5.7.1"),
    errors.SenderNotAllowed: (553, "5.7.1"),
    errors.SenderBlocked: (550, "5.7.1"),
    errors.SuppressedRecipient: (550, "5.7.1"),
    errors.MessageTooLarge: (552, "5.3.4"),
    errors.MailboxFull: (552, "5.2.2"),
    errors.PayloadTooLarge: (552, "5.3.4"),
    errors.RateLimited: (451, "4.7.0"),
    errors.StorageFailure: (451, "4.3.0"),
    errors.TemporaryFailure: (451, "4.3.0"),
    errors.NotFound: (550, "5.1.1"),
    errors.Forbidden: (550, "5.7.1"),
    errors.SessionEnded: (421, "4.7.0"),  # the key died mid-session: 421 closes it
    errors.Unauthenticated: (530, "5.7.0"),
    errors.MalformedMessage: (554, "5.6.0"),  # after DATA: RFC 3463 media error
    errors.InvalidRequest: (501, "5.5.4"),
}

#: Fixed client text for some errors, whatever message the raiser chose.
_FIXED_TEXT: dict[type[errors.AgentPostError], str] = {
    errors.RelayDenied: "Relaying denied",
}


def _table_entry(exc: errors.AgentPostError) -> tuple[type[errors.AgentPostError], int, str]:
    for cls in type(exc).__mro__:
        if cls in ERROR_REPLIES:
            code, enhanced = ERROR_REPLIES[cls]
            return cls, code, enhanced
    raise KeyError(type(exc).__name__)


def new_error_id() -> str:
    """A short id that ties a generic client reply to the detailed log line."""
    return "err_" + secrets.token_hex(6)


def reply_for_error(exc: BaseException, *, context: str = "",
                    traceback_text: str | None = None) -> Reply:
    """The reply for an exception raised by the delivery agent or by our own code.

    Mapped domain errors get their table entry with the error's client-safe text.
    Anything else — an unmapped domain error, a bug, a timeout — is logged with a
    fresh id and answered ``451 4.3.0`` quoting only that id: the sender retries,
    nothing is bounced, and no traceback or internal detail reaches the client.
    ``traceback_text`` is logged instead of ``exc.__traceback__`` when given (a
    :class:`~twisted.python.failure.Failure` may have dropped the live traceback).
    """
    if isinstance(exc, errors.AgentPostError):
        try:
            cls, code, enhanced = _table_entry(exc)
        except KeyError:
            pass
        else:
            if exc.temporary:
                log.warning("smtp %s: temporary failure %s: %s", context, exc.type, exc.message)
            text = _FIXED_TEXT.get(cls, exc.message)
            return Reply(code, enhanced, text)
    error_id = new_error_id()
    if traceback_text is not None:  # from a twisted Failure, whose traceback is text
        log.error("smtp %s: unexpected error %s: %s", context, error_id, traceback_text)
    else:
        log.error("smtp %s: unexpected error %s", context, error_id,
                  exc_info=(type(exc), exc, exc.__traceback__))
    return Reply(451, "4.3.0", f"Temporary internal error; try again later (ref {error_id})")


def reply_for_auth_error(exc: BaseException, *, context: str = "",
                         traceback_text: str | None = None) -> Reply:
    """The reply to a failed AUTH (RFC 4954 §6): a refused credential is ``535 5.7.8``
    whatever the reason (unknown, revoked, expired, wrong scope or environment: the
    client learns nothing more); a throttled source or a temporary failure is
    ``454 4.7.0``, which a client may retry.  Everything else as :func:`reply_for_error`."""
    if isinstance(exc, errors.Unauthenticated):
        return AUTH_FAILED
    if isinstance(exc, errors.RateLimited):
        return AUTH_TEMPORARY
    if isinstance(exc, errors.TemporaryFailure):
        reply_for_error(exc, context=context)  # logs it
        return AUTH_TEMPORARY
    return reply_for_error(exc, context=context, traceback_text=traceback_text)
