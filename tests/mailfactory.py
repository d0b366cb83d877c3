"""Build test messages as bytes (CRLF line endings, as they arrive over SMTP)."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP


def make_message(*, frm: str = "Alice <alice@example.com>", to: str = "bot@agents.test",
                 subject: str = "Hello", body: str = "Hi there.\n",
                 msgid: str | None = None, in_reply_to: str | None = None,
                 references: str | None = None, html: str | None = None,
                 attachments: list[tuple[str, str, bytes]] | None = None,
                 extra_headers: list[tuple[str, str]] | None = None) -> bytes:
    """A well-formed message; attachments are (filename, mime type, content)."""
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Sun, 29 Nov 2026 07:00:00 +0000"
    if msgid:
        msg["Message-ID"] = msgid
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = references
    for name, value in extra_headers or []:
        msg[name] = value
    msg.set_content(body)
    if html:
        msg.add_alternative(html, subtype="html")
    for filename, mime, content in attachments or []:
        maintype, subtype = mime.split("/")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes(policy=SMTP)
