"""IMAP's one translation table from domain errors to tagged responses (DESIGN.md §3.7).

Handlers raise :class:`IMAPError` (through :func:`no` and :func:`bad`) for protocol
refusals and let domain errors from :mod:`agentpost.model.errors` propagate: the
dispatcher turns them into ``NO [code]`` here, as :mod:`agentpost.smtp.replies` does for
SMTP. Keeping the table in one place is what keeps the RFC 5530 codes consistent
across commands.
"""

from __future__ import annotations

import logging
import re
import secrets

from agentpost.mail.binary import InvalidTransferEncoding, UnknownTransferEncoding
from agentpost.mail.catenate import BadUrl, badurl_code
from agentpost.model import errors

log = logging.getLogger(__name__)

__all__ = ["Answered", "IMAPError", "bad", "error_for", "no", "response_text"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def response_text(text: str) -> str:
    """``text`` fit for one response line: control characters become ``?``.

    Why: error texts quote what the client sent (``Bad date ...``, a tag it named), and
    a literal may hold any octet -- a CRLF in one made ``BAD Bad date x`` go on with a
    forged ``* OK [ALERT] ...`` line of the client's choosing, and a NUL is not TEXT-CHAR
    (RFC 3501 §9). One line per response, whatever the input."""
    return _CONTROL.sub("?", text)


class IMAPError(Exception):
    """Answer the current command with ``status [code] text``."""

    def __init__(self, status: str, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code

    def render(self) -> str:
        return f"{self.status} [{self.code}] {self.text}" if self.code else \
            f"{self.status} {self.text}"


class Answered(Exception):
    """The handler already wrote the tagged response (STARTTLS, COMPRESS, a dead key)."""


def no(text: str, code: str | None = None) -> IMAPError:
    """A ``NO``: the command was understood and refused."""
    return IMAPError("NO", text, code)


def bad(text: str) -> IMAPError:
    """A ``BAD``: the command cannot be run as given (syntax, state)."""
    return IMAPError("BAD", text)


def error_for(exc: BaseException, *, missing: str = "NONEXISTENT") -> IMAPError:
    """The one table from domain errors to IMAP responses (RFC 5530 codes). ``missing``
    is the code for NotFound: COPY, MOVE and APPEND answer ``[TRYCREATE]``."""
    if isinstance(exc, IMAPError):
        return exc
    if isinstance(exc, errors.NotFound):
        text = "Mailbox does not exist" if missing == "TRYCREATE" else exc.message
        return no(text, missing)
    if isinstance(exc, errors.Conflict):
        return no(exc.message, "ALREADYEXISTS")
    if isinstance(exc, errors.Forbidden):
        return no(exc.message, "NOPERM")
    if isinstance(exc, errors.Unauthenticated):
        return no("Authentication failed", "AUTHENTICATIONFAILED")
    if isinstance(exc, errors.PayloadTooLarge):
        return no(exc.message, "TOOBIG")
    if isinstance(exc, errors.MailboxFull):
        return no(exc.message, "OVERQUOTA")
    if isinstance(exc, UnknownTransferEncoding):  # FETCH BINARY (RFC 3516 §4.2)
        return no(f"Unknown Content-Transfer-Encoding {exc.cte}", "UNKNOWN-CTE")
    if isinstance(exc, InvalidTransferEncoding):  # as Dovecot answers a corrupt body
        return no(exc.message, "PARSE")
    if isinstance(exc, BadUrl):  # CATENATE (RFC 4469 §4.1)
        return no(exc.message, badurl_code(exc.url))
    if isinstance(exc, errors.AgentPostError):
        if exc.temporary:
            return no(exc.message, "UNAVAILABLE")
        return no(exc.message, "CANNOT")
    ref = secrets.token_hex(4)
    log.error("imap: internal error ref %s", ref, exc_info=(type(exc), exc, exc.__traceback__))
    return no(f"Internal error (ref {ref}); try again", "UNAVAILABLE")
