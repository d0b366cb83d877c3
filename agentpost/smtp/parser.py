"""The SMTP wire syntax, as pure functions (RFC 5321 §4.1, RFC 1870, 3030, 6152, 6531).

Nothing here does I/O or knows about sessions: the protocol in
:mod:`agentpost.smtp.server` feeds it bytes and strings and turns a
:class:`CommandError` into the reply it carries.  Keeping the grammar here makes
it testable line by line and keeps the state machine readable.

:class:`DataDecoder` is the one stateful piece: the incremental decoder for a DATA
body (dot-unstuffing, the ``CRLF.CRLF`` terminator, line-length accounting).  It is
what guarantees that nothing inside a message body is ever read as a command.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from agentpost.smtp import replies
from agentpost.smtp.replies import Reply

#: RFC 5321 §4.5.3.1.4 allows 512 octets for a command line; extensions (SIZE, BODY,
#: SMTPUTF8 addresses whose UTF-8 form is longer) may raise it, so we allow 1024 more.
MAX_COMMAND_LINE_BYTES = 512 + 1024
#: RFC 5321 §4.5.3.1.6: a text line in DATA is at most 1000 octets including CRLF.
MAX_DATA_LINE_BYTES = 1000
#: RFC 5321 §4.5.3.1.3: a reverse- or forward-path is at most 256 octets incl. "<>".
MAX_PATH_BYTES = 256

MAIL_BODY_TYPES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})


class CommandError(Exception):
    """A command could not be accepted; ``reply`` says why, in SMTP terms."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def _fail(code: int, enhanced: str, text: str) -> CommandError:
    return CommandError(Reply(code, enhanced, text))


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """A command line split into its upper-cased verb and the argument text."""

    verb: str
    args: str


_VERB_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,19}\Z")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def parse_command(line: bytes) -> Command:
    """Split one command line (without its line terminator) into verb and arguments.

    Arguments are decoded as UTF-8 (a superset of the ASCII that plain SMTP allows;
    whether non-ASCII is acceptable is decided per command, RFC 6531).  Control
    characters are refused outright, so nothing that looks like a line break can
    reach an address or a header we later write.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(500, "5.5.2", "Command line is not valid UTF-8") from None
    if _CONTROL_RE.search(text):
        raise _fail(500, "5.5.2", "Control characters in command line")
    verb, _, args = text.strip(" \t").partition(" ")
    if not _VERB_RE.match(verb):
        raise CommandError(replies.UNRECOGNIZED)
    return Command(verb.upper(), args.strip(" \t"))


def parse_bdat(args: str) -> tuple[int, bool]:
    """``BDAT <chunk-size> [LAST]`` (RFC 3030 §2) → (size, last)."""
    parts = args.split()
    if not 1 <= len(parts) <= 2 or not parts[0].isascii() or not parts[0].isdigit():
        raise CommandError(replies.SYNTAX_ERROR)
    if len(parts[0]) > 20:
        raise CommandError(replies.SYNTAX_ERROR)
    last = False
    if len(parts) == 2:
        if parts[1].upper() != "LAST":
            raise CommandError(replies.SYNTAX_ERROR)
        last = True
    return int(parts[0]), last


# --------------------------------------------------------------------------- paths

# RFC 5322 atext, plus (RFC 6531) any non-ASCII character; we check UTF-8 validity
# when decoding, so here "non-ASCII" is simply > U+007F.
_ATOM_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+")
_DOT_STRING_RE = re.compile(rf"^{_ATOM_RE.pattern}(?:\.{_ATOM_RE.pattern})*\Z")
_LABEL_RE = re.compile(
    r"^[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
    r"[A-Za-z0-9\u0080-\U0010ffff])?\Z"
)
_GENERAL_LITERAL_RE = re.compile(r"^[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")


def _bad_address(kind: str) -> CommandError:
    # RFC 3463: X.1.7 bad sender mailbox syntax, X.1.3 bad destination syntax.
    enhanced = "5.1.7" if kind == "sender" else "5.1.3"
    return _fail(501, enhanced, f"Bad {kind} address syntax")


def _parse_quoted_local(text: str, kind: str) -> tuple[str, str]:
    """Split ``"quoted"@rest`` → (unescaped content, rest after the closing quote)."""
    content = []
    i = 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 >= len(text) or not (" " <= text[i + 1] <= "~"):
                raise _bad_address(kind)
            content.append(text[i + 1])
            i += 2
            continue
        if char == '"':
            return "".join(content), text[i + 1 :]
        # qtextSMTP: %d32-33 / %d35-91 / %d93-126, plus UTF-8 (RFC 6531)
        if not (char == " " or char == "!" or "#" <= char <= "[" or "]" <= char <= "~"
                or ord(char) > 0x7F):
            raise _bad_address(kind)
        content.append(char)
        i += 1
    raise _bad_address(kind)


def _quote_local(content: str) -> str:
    """The canonical form of a local part: bare when it is a dot-string, else quoted.

    RFC 5321 §4.1.2: ``"john"@example.com`` and ``john@example.com`` are the same
    mailbox, so both normalise to the unquoted form.
    """
    if content and _DOT_STRING_RE.match(content):
        return content
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _valid_domain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal[:5].upper() == "IPV6:":
            try:
                ipaddress.IPv6Address(literal[5:])
            except ValueError:
                return False
            return True
        try:
            ipaddress.IPv4Address(literal)
        except ValueError:
            return bool(_GENERAL_LITERAL_RE.match(literal))
        return True
    labels = domain.split(".")
    return all(_LABEL_RE.match(label) for label in labels)


def normalize_domain(domain: str) -> str:
    """Lower-case a domain and drop a trailing root dot.

    U-labels stay in UTF-8 (lower-cased with Unicode rules) and A-labels stay as
    ``xn--``: which of the two forms a hosted domain is stored under is the
    delivery agent's business; we only remove the differences that never matter.
    """
    domain = domain.rstrip(".") if not domain.startswith("[") else domain
    if domain.startswith("[") and domain[1:6].upper() == "IPV6:":
        return "[IPv6:" + domain[6:].lower()
    return domain.lower()


def normalize_address(address: str) -> str:
    """``Local@Example.COM`` → ``Local@example.com``: the local part is case-sensitive
    (RFC 5321 §2.4), the domain is not."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    return f"{local}@{normalize_domain(domain)}"


def parse_path(text: str, *, kind: str, allow_null: bool = False,
               allow_postmaster: bool = False) -> str:
    """Validate the inside of ``<...>`` and return the normalised mailbox.

    ``""`` is the null reverse-path (only when ``allow_null``).  A source route
    (``@relay1,@relay2:user@example.com``) is checked and dropped, as RFC 5321
    §4.1.2 tells servers to do.  ``postmaster`` without a domain is accepted for
    RCPT (RFC 5321 §4.5.1).
    """
    if text == "":
        if allow_null:
            return ""
        raise _bad_address(kind)
    if len(text.encode("utf-8")) + 2 > MAX_PATH_BYTES:
        raise _fail(501, "5.1.7" if kind == "sender" else "5.1.3", "Address too long")
    if text.startswith("@"):
        route, colon, text = text.partition(":")
        if not colon:
            raise _bad_address(kind)
        for hop in route.split(","):
            if not hop.startswith("@") or not _valid_domain(hop[1:]):
                raise _bad_address(kind)
    if allow_postmaster and text.lower() == "postmaster":
        return "postmaster"
    if text.startswith('"'):
        local, rest = _parse_quoted_local(text, kind)
        if not rest.startswith("@"):
            raise _bad_address(kind)
        domain = rest[1:]
    else:
        local, at, domain = text.partition("@")
        if not at or not _DOT_STRING_RE.match(local):
            raise _bad_address(kind)
    if domain.endswith(".") and not domain.startswith("["):
        domain = domain[:-1]  # a fully-qualified "example.com." names the same domain
    if not domain or not _valid_domain(domain):
        raise _bad_address(kind)
    return f"{_quote_local(local)}@{normalize_domain(domain)}"


def _closing_bracket(rest: str, kind: str) -> int:
    """Index of the ">" closing ``rest``'s path, outside any quoted local part."""
    i, quoted = 1, False
    while i < len(rest):
        char = rest[i]
        if quoted and char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
        i += 1
    raise _bad_address(kind)


def _split_path_and_params(args: str, keyword: str, kind: str) -> tuple[str, str]:
    """``FROM:<path> params`` → (path inside the brackets, parameter text)."""
    if args[: len(keyword) + 1].upper() != keyword + ":":
        raise CommandError(replies.SYNTAX_ERROR)
    rest = args[len(keyword) + 1 :].lstrip(" ")  # "FROM: <x>" is common; tolerate it
    if not rest.startswith("<"):
        raise _fail(501, "5.5.4", "Syntax: path must be enclosed in <>")
    # The closing ">" is the first one when no quote comes before it (the usual case:
    # one C-speed find); else it is looked for outside the quoted local part.
    i = rest.find(">", 1)
    if i < 0 or '"' in rest[1:i]:
        i = _closing_bracket(rest, kind)
    path, params = rest[1:i], rest[i + 1 :]
    if params and not params.startswith(" "):
        raise CommandError(replies.SYNTAX_ERROR)
    return path, params.strip(" ")


_KEYWORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE_RE = re.compile(r"^[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+\Z")


def parse_params(text: str) -> dict[str, str | None]:
    """``KEY=value KEY2`` → ``{"KEY": "value", "KEY2": None}`` (RFC 5321 esmtp-param).

    Keywords are case-insensitive, so they come back upper-cased; a repeated
    keyword is a syntax error rather than a silent last-one-wins.
    """
    params: dict[str, str | None] = {}
    for item in text.split():
        keyword, eq, value = item.partition("=")
        if not _KEYWORD_RE.match(keyword) or (eq and not _VALUE_RE.match(value)):
            raise _fail(501, "5.5.4", "Malformed parameter")
        keyword = keyword.upper()
        if keyword in params:
            raise _fail(501, "5.5.4", f"Duplicate parameter {keyword}")
        params[keyword] = value if eq else None
    return params


def parse_mail_from(args: str) -> tuple[str, dict[str, str | None]]:
    """``MAIL`` arguments → (normalised reverse-path, "" for ``<>``; raw params)."""
    path, params = _split_path_and_params(args, "FROM", "sender")
    return parse_path(path, kind="sender", allow_null=True), parse_params(params)


def parse_rcpt_to(args: str) -> tuple[str, dict[str, str | None]]:
    """``RCPT`` arguments → (normalised forward-path; raw params)."""
    path, params = _split_path_and_params(args, "TO", "recipient")
    return parse_path(path, kind="recipient", allow_postmaster=True), parse_params(params)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class MailParams:
    """The MAIL FROM parameters we support, validated."""

    size: int | None = None  # RFC 1870 declared size
    body: str | None = None  # RFC 6152 / RFC 3030: 7BIT, 8BITMIME, BINARYMIME
    smtputf8: bool = False  # RFC 6531


def validate_mail_params(params: dict[str, str | None], *, max_size_bytes: int,
                         chunking: bool = True) -> MailParams:
    """Check MAIL parameters against what we advertise.

    An unknown keyword is ``555 5.5.4`` (RFC 5321 §4.1.1.11); a declared SIZE over
    our limit is ``552 5.3.4`` (RFC 1870 §6.1) so the client never sends the body.
    """
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    for keyword, value in params.items():
        if keyword == "SIZE":
            if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
                raise _fail(501, "5.5.4", "SIZE requires a number")
            size = int(value)
            if size > max_size_bytes:
                raise CommandError(Reply(552, "5.3.4",
                                         f"Message size exceeds fixed limit of {max_size_bytes}"))
        elif keyword == "BODY":
            body = (value or "").upper()
            if body not in MAIL_BODY_TYPES:
                raise _fail(501, "5.5.4", "BODY must be 7BIT, 8BITMIME or BINARYMIME")
            if body == "BINARYMIME" and not chunking:
                raise _fail(501, "5.5.4", "BODY=BINARYMIME requires CHUNKING")
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise _fail(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
        else:
            raise CommandError(replies.UNSUPPORTED_PARAM)
    return MailParams(size=size, body=body, smtputf8=smtputf8)


def validate_rcpt_params(params: dict[str, str | None]) -> None:
    """We support no RCPT parameters (no DSN): any is ``555 5.5.4``."""
    if params:
        raise CommandError(replies.UNSUPPORTED_PARAM)


# --------------------------------------------------------------------------- DATA body


def _a_line_too_long(region: bytes, start: int, end: int, limit: int) -> bool:
    """Whether a line of ``region[start:end]`` (whole lines, each ending in CRLF) is
    longer than ``limit`` octets with its CRLF. Each step jumps to the last CRLF within
    ``limit`` octets: a few C-speed searches per KiB instead of a split into every line
    (which cost a tenth of the reactor's time receiving 100 KiB messages)."""
    while end - start > limit:  # (what is left after that: one window, ending in CRLF)
        crlf = region.rfind(b"\r\n", start, start + limit)
        if crlf < 0:
            return True
        start = crlf + 2
    return False


#: A line that starts with a dot (stuffed, or the terminator). A compiled search finds
#: it at about twice the speed of ``bytes.find`` in text where every line ends in CRLF
#: (it skips from CR to CR; find's skip table steps a few bytes at a time).
_CRLF_DOT = re.compile(rb"\r\n\.")


class DataDecoder:
    """Incremental decoder of a DATA body, fed bytes exactly as they arrive.

    - The body ends only at ``CRLF . CRLF`` (the leading CRLF is either the last
      body line's or the DATA command's own).  A bare LF or CR never ends a line
      here, so ``LF . LF`` and friends stay body bytes: no SMTP-smuggling.
    - A line starting with ``.`` loses that dot (RFC 5321 §4.5.2).
    - Over-long lines are noted in :attr:`line_too_long` but never change how the
      stream is read: the body is consumed to its real end whatever its lines
      look like (the twisted.mail bug: after a >16 KiB line it went back to
      command mode, executing the rest of the body as commands).
    - It holds back at most two bytes between calls, whatever the line length.
    """

    def __init__(self, max_line_bytes: int = MAX_DATA_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.line_too_long = False
        self.done = False
        self._pending = b""
        self._at_line_start = True
        self._line_bytes = 0  # octets of the current line so far, as received

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Decode ``data``; returns (body bytes, leftover).

        ``leftover`` is ``None`` while the body continues, and the bytes after the
        terminating ``.CRLF`` (the next pipelined commands, possibly empty) once
        it has ended.
        """
        if self.done:
            raise RuntimeError("DataDecoder fed after the end of data")
        buf = self._pending + data if self._pending else data
        self._pending = b""
        if self._at_line_start and buf[:1] == b".":
            if len(buf) < 3 and b".\r\n".startswith(buf):
                self._pending = buf  # maybe the terminator: need more
                return b"", None
            if buf[1:3] == b"\r\n":
                self.done = True
                return b"", buf[3:]
        # Whole-buffer work (a few C-speed scans, not a Python step per line): every
        # CRLF ends a line, so the terminator is the first CRLF "." CRLF. Most buffers
        # hold no line starting with a dot at all: one scan says so, and then there is
        # neither a terminator to find nor a stuffing dot to remove.
        found = _CRLF_DOT.search(buf)  # twice bytes.find's speed for this needle
        if found is None:
            return self._plain(buf)
        first_dot = found.start()
        rest: bytes | None = None
        stop = buf.find(b"\r\n.\r\n", first_dot)
        if stop >= 0:
            rest = buf[stop + 5:]
            stop += 2
            self.done = True
        elif buf.endswith(b"\r\n.\r"):  # hold back what may begin the terminator ...
            stop = len(buf) - 2
        elif buf.endswith((b"\r\n.", b"\r")):  # ... or a CRLF
            stop = len(buf) - 1
        else:
            stop = len(buf)
        self._pending = buf[stop:] if rest is None else b""
        region = buf[:stop] if stop < len(buf) else buf
        if not region:
            return b"", rest
        self._count_lines(region)
        if self._at_line_start and region[:1] == b".":
            region = region[1:]  # dot-stuffing: drop the first dot of every line
        self._at_line_start = region.endswith(b"\r\n")
        if first_dot >= stop - 2:  # that CRLF "." is not all in the region: no stuffing
            return region, rest
        return region.replace(b"\r\n.", b"\r\n"), rest

    def _plain(self, buf: bytes) -> tuple[bytes, None]:
        """:meth:`feed` for a buffer without CRLF "." (only a line start at its very
        beginning, handled by the caller, or a CR at its end, held back, can matter)."""
        stop = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        self._pending = buf[stop:]
        region = buf[:stop] if stop < len(buf) else buf
        if not region:
            return b"", None
        self._count_lines(region)
        if self._at_line_start and region[:1] == b".":
            region = region[1:]
        self._at_line_start = region.endswith(b"\r\n")
        return region, None

    def _count_lines(self, region: bytes) -> None:
        """Note an over-long line in ``region`` (octets as received, stuffing dot and
        CRLF included), which continues the current line."""
        if self.line_too_long:
            return
        limit = self.max_line_bytes
        first = region.find(b"\r\n")
        if first < 0:
            self._line_bytes += len(region)
            if self._line_bytes + 2 > limit:
                self.line_too_long = True
            return
        last = region.rfind(b"\r\n")
        if self._line_bytes + first + 2 > limit:
            self.line_too_long = True
        elif last - first > limit and _a_line_too_long(region, first + 2, last + 2, limit):
            self.line_too_long = True
        self._line_bytes = len(region) - last - 2
        if self._line_bytes and self._line_bytes + 2 > limit:
            self.line_too_long = True
