"""Delivery status notifications (RFC 3464) for mail the queue gave up on.

The DSN goes into the sending inbox like any received message, so an agent learns of a
bounce the same way over IMAP, the API and events. It carries the original's header
(text/rfc822-headers, RFC 6522), never its body: the sender has that in Sent.
"""

from __future__ import annotations

import email.utils
import quopri
import secrets
from dataclasses import dataclass
from datetime import datetime

#: The original's header is cut here (a DSN must stay small).
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the DSN reports."""

    address: str
    status_code: str  # RFC 3463, e.g. 5.1.1 or 4.4.7
    smtp_code: int | None
    diagnostic: str | None


def _original_header(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    header = raw[: end if end >= 0 else len(raw)][:MAX_HEADER_BYTES]
    return header.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


def _field(text: str | None) -> str:
    """A DSN field value on one line (the diagnostic comes from a remote server)."""
    return " ".join((text or "").split())[:900]


def _per_recipient(rcpt: FailedRecipient) -> str:
    # A non-ASCII address is typed utf-8 (RFC 6533 section 3), not rfc822.
    kind = "rfc822" if rcpt.address.isascii() else "utf-8"
    lines = [f"Final-Recipient: {kind}; {_field(rcpt.address)}",
             "Action: failed", f"Status: {rcpt.status_code}"]
    if rcpt.diagnostic:
        code = rcpt.smtp_code or (550 if rcpt.status_code.startswith("5") else 451)
        lines.append(f"Diagnostic-Code: smtp; {code} {_field(rcpt.diagnostic)}")
    return "\r\n".join(lines) + "\r\n"


def _human_text(recipients: list[FailedRecipient], hostname: str) -> str:
    lines = [f"This is the mail system at {hostname}.", "",
             "Your message could not be delivered to the following recipients:", ""]
    for rcpt in recipients:
        lines.append(f"  <{rcpt.address}>: {rcpt.status_code} {_field(rcpt.diagnostic)}")
    lines += ["", "The original message's header is attached."]
    return "\n".join(lines) + "\n"


def build_dsn(*, hostname: str, sender: str, original: bytes,
              recipients: list[FailedRecipient], arrival: datetime,
              now: datetime) -> bytes:
    """The DSN message's bytes, addressed to ``sender`` (the sending inbox's address,
    not a custom MAIL FROM envelope: the DSN is stored there). Written out by hand: the
    stdlib's generator cannot flatten a message/delivery-status part it did not parse."""
    boundary = "=_dsn_" + secrets.token_hex(12)
    header = "\r\n".join([
        f"From: Mail Delivery System <MAILER-DAEMON@{_field(hostname)}>",
        f"To: <{_field(sender)}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {email.utils.format_datetime(now)}",
        f"Message-ID: {email.utils.make_msgid('dsn', domain=_field(hostname))}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]) + "\r\n\r\n"
    human = quopri.encodestring(_human_text(recipients, hostname).replace(
        "\n", "\r\n").encode("utf-8"))
    status = (f"Reporting-MTA: dns; {_field(hostname)}\r\n"
              f"Arrival-Date: {email.utils.format_datetime(arrival)}\r\n"
              + "".join("\r\n" + _per_recipient(r) for r in recipients))
    original_header = _original_header(original)
    cte = "7bit" if original_header.isascii() else "8bit"
    # (RFC 6533: a status part naming a UTF-8 address is message/global-delivery-status)
    status_type = "message/delivery-status" if status.isascii() else \
        "message/global-delivery-status"
    parts = [
        b"This is a delivery status notification (RFC 3464).\r\n",
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode() + human + b"\r\n",
        # Each part ends with one more CRLF: the one before the next boundary belongs
        # to the delimiter (RFC 2046 section 5.1.1), and the last field keeps its own.
        f"--{boundary}\r\nContent-Type: {status_type}\r\n\r\n{status}\r\n".encode(
            "utf-8", "replace"),
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode() + original_header + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return header.encode("utf-8", "replace") + b"".join(parts)
