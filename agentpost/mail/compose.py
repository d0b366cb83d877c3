"""Build an RFC 5322 message from structured fields (the send API, replies, drafts).

Pure functions: no I/O, no clock (``now`` is a parameter). Every text that ends up in
a header is checked for CR, LF and NUL first (header injection is refused with
``InvalidRequest(field=...)``, never "cleaned"), and the stdlib ``email`` package
(policy ``SMTP``: CRLF line ends, RFC 2047 encoded words for non-ASCII names and
subjects) writes the bytes, or for the common shapes ``mime_writer`` writes equivalent
bytes directly (faster; tests/test_compose_fast.py holds the two to the same result).
``SMTPUTF8`` (RFC 6532: raw UTF-8 headers) is used only when an address itself has a
non-ASCII local part, since only such a message needs the SMTPUTF8 extension on the
way out; a non-ASCII domain is written as IDNA (``xn--``) instead.

``Bcc:`` is written into the header section on purpose: the message built here is
the Sent copy, which keeps it so the sender can see whom they blind-copied, and the
queue worker strips ``Bcc:`` from every hand-off (agentpost.outbound.worker.without_bcc),
exactly as for a message submitted over SMTP.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from typing import Any

import idna

from agentpost.mail import mime_writer
from agentpost.model.errors import InvalidRequest
from agentpost.model.ids import new_id

#: Longest address (RFC 5321 path limit minus the angle brackets).
MAX_ADDRESS_LENGTH = 254
#: Longest display name, subject or custom header value we accept.
MAX_HEADER_TEXT = 998
#: Custom header names callers may set besides ``X-*``.
ALLOWED_HEADERS = frozenset({
    "list-unsubscribe", "list-unsubscribe-post", "list-id", "auto-submitted",
    "precedence", "importance", "keywords", "comments",
})
#: Custom headers one message may carry (each is a line of up to 998 bytes).
MAX_CUSTOM_HEADERS = 50
_X_HEADER = re.compile(r"^X-[A-Za-z0-9][A-Za-z0-9-]{0,75}\Z", re.IGNORECASE)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_LOCAL_RE = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*\Z")
_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_MSGID_RE = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]{1,994}>\Z")
#: NUL and every character str.splitlines() breaks a line at: the email package refuses
#: them all in a header (a ValueError, not a 400, if they got that far), and a reader
#: might take U+2028 or NEL for a line end too.
_FORBIDDEN = ("\r", "\n", "\x00", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
              "\u2028", "\u2029")


@dataclass(frozen=True)
class Address:
    """One mailbox: the address and an optional display name."""

    email: str
    name: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The API's ``{email, name}`` form."""
        return {"email": self.email, "name": self.name}


@dataclass(frozen=True)
class AttachmentPart:
    """One attachment (or inline part when ``inline`` and ``content_id`` are set)."""

    filename: str
    mime_type: str
    data: bytes
    content_id: str | None = None
    inline: bool = False


@dataclass(frozen=True)
class Composition:
    """What a sender asks for; ``compose`` turns it into bytes."""

    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    subject: str = ""
    text_body: str | None = None
    html_body: str | None = None
    reply_to: list[Address] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    in_reply_to: str | None = None
    references: list[str] = field(default_factory=list)
    attachments: list[AttachmentPart] = field(default_factory=list)

    def recipients(self) -> list[str]:
        """Every envelope recipient (To, Cc, Bcc), deduplicated case-insensitively."""
        return dedupe([*self.to, *self.cc, *self.bcc])


def dedupe(addresses: Iterable[Address]) -> list[str]:
    """Addresses in first-seen order without case-insensitive repeats."""
    seen: set[str] = set()
    out: list[str] = []
    for a in addresses:
        if a.email.lower() not in seen:
            seen.add(a.email.lower())
            out.append(a.email)
    return out


# --------------------------------------------------------------------------- checks

def check_text(value: Any, field_name: str, *, limit: int = MAX_HEADER_TEXT) -> str:
    """A header text without CR/LF/NUL (header injection) and not absurdly long."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{field_name} must be a string.", field=field_name)
    if any(c in value for c in _FORBIDDEN):
        raise InvalidRequest(f"{field_name} must not contain line breaks or NUL.",
                             field=field_name)
    if len(value) > limit:
        raise InvalidRequest(f"{field_name} is too long.", field=field_name)
    return value


def normalize_email(value: str, field_name: str) -> str:
    """A checked ``local@domain``: dot-atom local part (UTF-8 allowed), the domain
    lower-cased and in IDNA form; anything else is ``InvalidRequest``."""
    check_text(value, field_name, limit=MAX_ADDRESS_LENGTH)
    local, at, domain = value.strip().rpartition("@")
    if not at or not _LOCAL_RE.match(local) or len(local) > 64:
        raise InvalidRequest(f"{field_name} holds an invalid address.", field=field_name)
    try:
        # IDNA 2008 / UTS #46 as for registered domains (core.domains), not Python's
        # IDNA 2003 codec, which maps straße.de to strasse.de: another domain.
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        raise InvalidRequest(f"{field_name} holds an invalid address.",
                             field=field_name) from None
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL_RE.match(label) for label in labels):
        raise InvalidRequest(f"{field_name} holds an invalid address.", field=field_name)
    address = f"{local}@{ascii_domain}"
    if len(address.encode("utf-8")) > MAX_ADDRESS_LENGTH:
        raise InvalidRequest(f"{field_name} holds an invalid address.", field=field_name)
    return address


def _one_address(item: Any, field_name: str) -> list[Address]:
    if isinstance(item, dict):
        unknown = set(item) - {"email", "name"}
        if unknown or "email" not in item:
            raise InvalidRequest(f"{field_name} entries are strings or {{email, name}}.",
                                 field=field_name)
        name = item.get("name")
        if name is not None:
            name = check_text(name, field_name).strip() or None
        return [Address(normalize_email(item["email"], field_name), name)]
    if not isinstance(item, str):
        raise InvalidRequest(f"{field_name} entries are strings or {{email, name}}.",
                             field=field_name)
    check_text(item, field_name)
    out = []
    try:
        found = email.utils.getaddresses([item])
    except (RecursionError, ValueError):  # comments or groups nested past its depth
        raise InvalidRequest(f"{field_name} holds an invalid address.",
                             field=field_name) from None
    for name, addr in found:
        if not addr:
            raise InvalidRequest(f"{field_name} holds an invalid address.", field=field_name)
        out.append(Address(normalize_email(addr, field_name), name.strip() or None))
    if not out:
        raise InvalidRequest(f"{field_name} holds an invalid address.", field=field_name)
    return out


def parse_address_list(value: Any, field_name: str = "to") -> list[Address]:
    """``None``, a string (``"a@b"``, ``"Name <a@b>"``, or several comma-separated),
    an ``{email, name}`` object, or a list of those, as checked ``Address`` values."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[Address] = []
    for item in items:
        out.extend(_one_address(item, field_name))
    return out


def check_headers(value: Any) -> dict[str, str]:
    """Custom headers: only ``X-*`` and the allow-list; never From/To/Date/... (the
    server writes those) nor SES's ``X-SES-*`` control headers (the queue strips those
    from whatever leaves anyway), values without CR/LF/NUL."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("headers must be an object.", field="headers")
    if len(value) > MAX_CUSTOM_HEADERS:
        raise InvalidRequest(f"headers holds at most {MAX_CUSTOM_HEADERS} fields.",
                             field="headers")
    out: dict[str, str] = {}
    seen: set[str] = set()
    for name, text in value.items():
        if not isinstance(name, str) or name.lower().startswith("x-ses-") or not (
                _X_HEADER.match(name) or name.lower() in ALLOWED_HEADERS):
            raise InvalidRequest(f"The header {str(name)[:80]!r} may not be set.",
                                 field="headers")
        if name.lower() in seen:  # X-Tag and x-tag would both be written
            raise InvalidRequest(f"The header {name[:80]!r} is named twice.", field="headers")
        seen.add(name.lower())
        out[name] = check_text(text, "headers")
    return out


def usable_message_id(value: str | None) -> str | None:
    """``<value>`` when a stored (stranger's) Message-ID makes a valid ``<id>``, else
    None: a reply leaves an unusable id out rather than failing on it."""
    if not value:
        return None
    text = value if value.startswith("<") else f"<{value}>"
    return text if _MSGID_RE.match(text) else None


def check_message_id(value: Any, field_name: str) -> str:
    """A ``<id>`` message id without spaces or control characters."""
    text = check_text(value, field_name).strip()
    if not _MSGID_RE.match(text):
        raise InvalidRequest(f"{field_name} must be a <message-id>.", field=field_name)
    return text


# --------------------------------------------------------------------------- compose

def _header_address(a: Address) -> HeaderAddress:
    local, _, domain = a.email.rpartition("@")
    if not domain.isascii():
        domain = domain.encode("idna").decode("ascii")
    return HeaderAddress(display_name=a.name or "", username=local, domain=domain)


def needs_smtputf8(c: Composition, from_addr: Address) -> bool:
    """True when some address has a non-ASCII local part (RFC 6531/6532)."""
    everyone = [from_addr, *c.to, *c.cc, *c.bcc, *c.reply_to]
    return any(not a.email.rpartition("@")[0].isascii() for a in everyone)


def new_message_id(from_addr: Address, hostname: str, now: datetime) -> str:
    """``<ULID@sender-domain>`` (the host name when the domain is unusable)."""
    domain = from_addr.email.rpartition("@")[2] or hostname
    ulid = new_id("msg", int(now.timestamp() * 1000))[4:]
    return f"<{ulid}@{domain}>"


def _cte(text: str) -> str | None:
    """Quoted-printable for non-ASCII text, so the message is 7-bit clean and needs no
    8BITMIME on the way out; the stdlib's choice otherwise."""
    return None if text.isascii() else "quoted-printable"


def _body(msg: EmailMessage, c: Composition) -> None:
    """text, html or both (multipart/alternative); inline parts join the HTML part
    as multipart/related; the rest make the whole multipart/mixed."""
    inline = [a for a in c.attachments if a.inline and a.content_id and c.html_body]
    files = [a for a in c.attachments if a not in inline]
    if c.html_body is not None and c.text_body is not None:
        msg.set_content(c.text_body, cte=_cte(c.text_body))
        msg.add_alternative(c.html_body, subtype="html", cte=_cte(c.html_body))
        html_part: EmailMessage | None = msg.get_payload()[1]  # type: ignore[index,assignment]
    elif c.html_body is not None:
        msg.set_content(c.html_body, subtype="html", cte=_cte(c.html_body))
        html_part = msg
    else:
        msg.set_content(c.text_body or "", cte=_cte(c.text_body or ""))
        html_part = None
    for part in inline:
        assert html_part is not None and part.content_id is not None
        maintype, _, subtype = part.mime_type.partition("/")
        html_part.add_related(part.data, maintype, subtype or "octet-stream",
                              cid=f"<{part.content_id.strip('<>')}>",
                              filename=part.filename, disposition="inline")
    for part in files:
        maintype, _, subtype = part.mime_type.partition("/")
        disposition = "inline" if part.inline else "attachment"
        kwargs: dict[str, Any] = {"filename": part.filename, "disposition": disposition}
        if part.content_id:
            kwargs["cid"] = f"<{part.content_id.strip('<>')}>"
        msg.add_attachment(part.data, maintype, subtype or "octet-stream", **kwargs)


def compose(c: Composition, *, from_addr: Address, hostname: str, now: datetime,
            message_id: str | None = None) -> bytes:
    """The message as CRLF bytes, ready for the Sent copy and the queue.

    The common shapes are written directly (``mime_writer``: the stdlib's header parsing
    and generator were the send API's largest CPU bar); anything that writer does not
    handle, and every message needing SMTPUTF8, goes through the stdlib as before. The
    checks (subject, In-Reply-To, References, custom headers) run in the same order on
    both paths, so a refusal is the same whichever writes the bytes."""
    heads = None if needs_smtputf8(c, from_addr) else _address_lines(c, from_addr)
    if heads is not None:
        subject = check_text(c.subject, "subject")
        message_id = message_id or new_message_id(from_addr, hostname, now)
        in_reply_to = check_message_id(c.in_reply_to, "in_reply_to") if c.in_reply_to else None
        references = [check_message_id(r, "references") for r in c.references]
        custom = check_headers(c.headers)
        try:
            heads += [mime_writer.unstructured("Subject", subject),
                      f"Date: {email.utils.format_datetime(now)}\r\n",
                      mime_writer.message_id_header("Message-ID", [message_id])]
            if in_reply_to:
                heads.append(mime_writer.message_id_header("In-Reply-To", [in_reply_to]))
            if references:
                heads.append(mime_writer.message_id_header("References", references))
            heads += [mime_writer.unstructured(name, value) for name, value in custom.items()]
            body = mime_writer.body_structure(c.text_body, c.html_body, c.attachments)
            return mime_writer.message_bytes(heads, body)
        except mime_writer.Unsupported:
            pass
    return compose_stdlib(c, from_addr=from_addr, hostname=hostname, now=now,
                          message_id=message_id)


def _address_lines(c: Composition, from_addr: Address) -> list[str] | None:
    """From, To, Cc, Bcc, Reply-To written directly, or None when some mailbox is
    unusual enough for the stdlib."""
    lines = []
    for name, addrs in (("From", [from_addr]), ("To", c.to), ("Cc", c.cc), ("Bcc", c.bcc),
                        ("Reply-To", c.reply_to)):
        if addrs:
            line = mime_writer.address_header(name, addrs)
            if line is None:
                return None
            lines.append(line)
    return lines


def compose_stdlib(c: Composition, *, from_addr: Address, hostname: str, now: datetime,
                   message_id: str | None = None) -> bytes:
    """``compose`` through the stdlib ``email`` package (every shape, SMTPUTF8 too)."""
    smtputf8 = needs_smtputf8(c, from_addr)
    pol = email_policy.SMTPUTF8 if smtputf8 else email_policy.SMTP
    msg = EmailMessage(policy=pol)
    msg["From"] = _header_address(from_addr)
    for name, addrs in (("To", c.to), ("Cc", c.cc), ("Bcc", c.bcc), ("Reply-To", c.reply_to)):
        if addrs:
            msg[name] = [_header_address(a) for a in addrs]
    msg["Subject"] = check_text(c.subject, "subject")
    msg["Date"] = email.utils.format_datetime(now)
    msg["Message-ID"] = message_id or new_message_id(from_addr, hostname, now)
    if c.in_reply_to:
        msg["In-Reply-To"] = check_message_id(c.in_reply_to, "in_reply_to")
    if c.references:
        msg["References"] = " ".join(check_message_id(r, "references") for r in c.references)
    for name, value in check_headers(c.headers).items():
        msg[name] = value
    _body(msg, c)
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # the stdlib adds it to parts; only the top needs it
    return msg.as_bytes(policy=pol)


# --------------------------------------------------------------------------- replies

_PREFIX_RE = re.compile(r"^\s*((re|fwd?|aw|wg|sv|tr|rif|vs)\s*(\[\d+\])?\s*:\s*)+",
                        re.IGNORECASE)


def prefixed_subject(subject: str | None, prefix: str) -> str:
    """``Re: x`` / ``Fwd: x`` once: ``Re: Re: x`` and ``Re: Fwd: x`` become ``Re: x``
    for a reply; a forward keeps a leading ``Re:`` off too."""
    text = "".join(" " if c in _FORBIDDEN else c for c in (subject or ""))
    stem = _PREFIX_RE.sub("", text, count=1).strip()
    # A stranger's subject may be longer than the one line we accept (a folded header):
    # cut it, or every reply to that message would be refused as "subject too long".
    stem = stem[:MAX_HEADER_TEXT - len(prefix) - 2].rstrip()
    return f"{prefix}: {stem}" if stem else f"{prefix}:"


def reply_references(message_id: str | None, references: list[str]) -> list[str]:
    """The original's References plus its Message-ID (RFC 5322 §3.6.4), valid ids only,
    the oldest trimmed when the list grows beyond what one header line should hold."""
    ids = [r for r in references if _MSGID_RE.match(r)]
    if message_id and _MSGID_RE.match(message_id) and message_id not in ids:
        ids.append(message_id)
    while len(" ".join(ids)) > 900 and len(ids) > 2:
        del ids[1]  # keep the thread root and the newest
    return ids


def quote_text(text: str | None, attribution: str) -> str:
    """``attribution`` and the original text with ``> `` before each line."""
    lines = (text or "").replace("\r\n", "\n").split("\n")
    return attribution + "\n" + "\n".join(("> " + line) if line else ">" for line in lines)
