"""A small, seeded fuzzer for the message analysis every ingest runs on untrusted mail.

Why: every message a stranger sends goes through :func:`agentpost.core.ingest._analyse_indexed`
(API parse, IMAP ENVELOPE/BODYSTRUCTURE/BODY, section map, SEARCH keys). One input that
raises, loops, renders unbalanced IMAP or stores a NUL costs every tenant. The generator
builds realistic messages and mutates them (encodings, folding, 8-bit, NUL, bare CR/LF,
broken boundaries, nesting, truncation); :func:`check` states the properties each must keep.
It is deterministic for a given seed; the committed tests run a few hundred cases.
"""

from __future__ import annotations

import base64
import json
import quopri
import random
import time
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from agentpost.core.ingest import _analyse_indexed
from agentpost.mail import imapformat, mime_tree, parse, sanitize

# ------------------------------------------------------------------------- generation

_WORDS = ["hello", "Grüße", "naïve", "日本語", "x" * 80, "a\"b", "c\\d", "(p)", "<m@x>", "=?",
          "?=", "", " ", "\t", "Ünïcødé"]


def _encoded_word(rng: random.Random, text: str) -> str:
    data = text.encode("utf-8")
    if rng.random() < 0.5:
        return f"=?utf-8?b?{base64.b64encode(data).decode()}?="
    return "=?UTF-8?Q?" + quopri.encodestring(data, header=True).decode() + "?="


def _word(rng: random.Random) -> str:
    text = rng.choice(_WORDS)
    return _encoded_word(rng, text) if rng.random() < 0.4 else text


def _address(rng: random.Random) -> str:
    local = rng.choice(["bob", "a.b+c", '"quoted local"', "x" * 70, "", "@route:u"])
    host = rng.choice(["example.com", "[127.0.0.1]", "", "ex ample.org", "日本.jp"])
    addr = f"{local}@{host}" if host else local
    shape = rng.randrange(5)
    if shape == 0:
        return addr
    if shape == 1:
        return f"{_word(rng)} <{addr}>"
    if shape == 2:
        return f'"{_word(rng)}" <{addr}> (comment {_word(rng)})'
    if shape == 3:
        return f"group{rng.randrange(9)}: {addr}, {_word(rng)} <{addr}>;"
    return f"<@a.com,@b.com:{addr}>"


def _fold(rng: random.Random, value: str) -> str:
    if rng.random() < 0.3 and " " in value:
        return value.replace(" ", rng.choice(["\r\n ", "\r\n\t", "\n "]), rng.randrange(1, 4))
    return value


def _params(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randrange(4)):
        kind = rng.randrange(5)
        if kind == 0:
            out.append(f'name="{_word(rng)}"')
        elif kind == 1:
            out.append("filename*=utf-8''%E2%9C%93%20" + rng.choice(["ok", "%00x", "%ZZ", "../x"]))
        elif kind == 2:
            out.append("filename*0*=utf-8''%D0; filename*1*=%9E; filename*3=z")
        elif kind == 3:
            out.append(f"x{rng.randrange(99)}={rng.choice(['a', chr(0), 'é', ';', '(c)'])}")
        else:
            out.append('q="a;b\\"c"')
    return "".join("; " + p for p in out)


def _headers(rng: random.Random, extra: list[str]) -> list[str]:
    heads = [
        f"From: {_address(rng)}",
        f"To: {', '.join(_address(rng) for _ in range(rng.randrange(1, 4)))}",
        f"Subject: {_fold(rng, ' '.join(_word(rng) for _ in range(rng.randrange(1, 5))))}",
        "Date: " + rng.choice(["Mon, 1 Jan 2024 10:00:00 +0000", "garbage", "1 Jan 2020 1:2 +2359",
                               "Fri, 31 Dec 9999 23:59:59 -0100", "1 Jan 100 00:00 +1559",
                               "Tue, 31 Feb 99999 25:61:61 +9999", "", "1 Jan 1900 00:00 -2400"]),
        "Message-ID: " + rng.choice(["<a@b>", "<>", "no-brackets", "<a@b> <c@d>"]),
    ]
    if rng.random() < 0.3:
        heads.append("In-Reply-To: <x@y>\r\nReferences: <x@y> <z@w>")
    if rng.random() < 0.3:
        heads.append(f"Cc: {_address(rng)}\r\nReply-To: {_address(rng)}")
    return heads + extra


def _leaf(rng: random.Random) -> str:
    body = " ".join(_word(rng) for _ in range(rng.randrange(1, 30)))
    cte = rng.choice(["7bit", "8bit", "base64", "quoted-printable", "x-unknown"])
    ctype = rng.choice(["text/plain; charset=utf-8", "text/html; charset=\"iso-8859-1\"",
                        "application/octet-stream", "image/png", "text/plain; charset=bogus",
                        "text", "text/plain/extra"])
    data = body.encode("utf-8")
    if cte == "base64":
        text = base64.encodebytes(data).decode()
    elif cte == "quoted-printable":
        text = quopri.encodestring(data).decode()
    else:
        text = body
    disp = ""
    if rng.random() < 0.4:
        disp = f"\r\nContent-Disposition: {rng.choice(['attachment', 'inline', ''])}{_params(rng)}"
    return (f"Content-Type: {ctype}{_params(rng)}\r\nContent-Transfer-Encoding: {cte}{disp}"
            f"\r\n\r\n{text}")


def _entity(rng: random.Random, depth: int) -> str:
    kind = rng.randrange(6) if depth < 6 else 0
    if kind in (0, 1):
        return _leaf(rng)
    if kind == 5:
        inner = "\r\n".join(_headers(rng, [])) + "\r\n" + _entity(rng, depth + 1)
        return f"Content-Type: message/rfc822\r\n\r\n{inner}"
    sub = rng.choice(["mixed", "alternative", "digest", "related"])
    boundary = rng.choice(["b", "bb", "b1", "=_x", f"lvl{depth}", "b" * 70, "a b"])
    parts = [_entity(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    out = f'Content-Type: multipart/{sub}; boundary="{boundary}"{_params(rng)}\r\n\r\npreamble\r\n'
    for p in parts:
        out += f"--{boundary}\r\n{p}\r\n"
    if rng.random() < 0.8:
        out += f"--{boundary}--\r\nepilogue\r\n"
    return out


def message(rng: random.Random) -> bytes:
    """One realistic message (before mutation)."""
    body = _entity(rng, 0)
    return ("\r\n".join(_headers(rng, ["MIME-Version: 1.0"])) + "\r\n" + body).encode(
        "utf-8", "surrogateescape")


_SPLICES = [b"\x00", b"\r", b"\n", b"\xff\xfe", b"\xc3", b"--b\r\n", b"--b--\r\n", b"--\r\n",
            b"\r\n\r\n", b"\r\n ", b"=?utf-8?q?=00?=", b"=?x?b?////?=", b"\"", b"\\", b"(", b")",
            b"{5}\r\n", b";", b"; boundary=b", b"Content-Type: multipart/mixed; boundary=b\r\n",
            b"Content-Type: message/rfc822\r\n", b"\t", b":", b"=\r\n", b"=0", b"\x85"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with a few random edits (splices, cuts, duplications, byte flips)."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(7)
        at = rng.randrange(len(buf) + 1)
        if op == 0:
            buf[at:at] = rng.choice(_SPLICES)
        elif op == 1 and buf:
            del buf[at:at + rng.randrange(1, 40)]
        elif op == 2 and buf:
            piece = buf[at:at + rng.randrange(1, 200)]
            buf[at:at] = piece * rng.randrange(1, 4)
        elif op == 3 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif op == 4:
            del buf[at:]
        elif op == 5:
            buf = buf.replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n"]))
        else:
            buf[at:at] = rng.choice(_SPLICES) * rng.randrange(1, 50)
    return bytes(buf)


def hostile(rng: random.Random) -> bytes:
    """Inputs that cost more than they look: many parts/headers/params, deep nesting."""
    kind = rng.randrange(8)
    n = rng.randrange(100, 3000)
    if kind == 6:  # many entities at every level
        inner = b"Content-Type: multipart/digest; boundary=c\n\n" + b"--c\n" * (n // 10)
        return b"Content-Type: multipart/mixed; boundary=b\n\n" + (b"--b\n" + inner) * 30
    if kind == 7:  # nested forwards in the subject
        return ("Subject: " + "[fwd: Re: " * n + "x" + "]" * n + "\r\n\r\nx").encode()
    if kind == 0:
        body = "".join("--b\r\n\r\nx\r\n" for _ in range(n))
        return f"Content-Type: multipart/mixed; boundary=b\r\n\r\n{body}--b--\r\n".encode()
    if kind == 1:
        return ("".join(f"X-H{i}: v\r\n" for i in range(n)) + "\r\nbody").encode()
    if kind == 2:
        params = "".join(f"; p*{i}*=%41" for i in range(n))
        return f"Content-Type: text/plain{params}\r\n\r\nx".encode()
    if kind == 3:
        head = "".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n"
                       for i in range(min(n, 200)))
        return head.encode() + b"x"
    if kind == 4:
        head = "Content-Type: message/rfc822\r\n\r\n" * min(n, 300)
        return head.encode() + b"Subject: deep\r\n\r\nx"
    # boundaries that prefix each other
    return (b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n"
            b"Content-Type: multipart/mixed; boundary=aa\r\n\r\n--aa\r\nx\r\n--a\r\ny\r\n"
            b"--aa--\r\n--a--\r\n") * rng.randrange(1, 4)


# ------------------------------------------------------------------------- properties


class ImapSyntaxError(ValueError):
    """A rendered structure that is not well-formed IMAP."""


def imap_balanced(text: str) -> int:
    """Check ``text`` (sent UTF-8 encoded) tokenises as IMAP: parentheses balance outside
    quoted strings and literals, quoted strings hold no CR/LF/NUL and end, literal
    lengths match and literals hold no NUL. Returns the maximum nesting depth."""
    data = text.encode("utf-8")
    depth = top = 0
    i = 0
    while i < len(data):
        ch = data[i:i + 1]
        if ch == b"(":
            depth += 1
            top = max(top, depth)
        elif ch == b")":
            depth -= 1
            if depth < 0:
                raise ImapSyntaxError(f"unbalanced ')' at {i}")
        elif ch == b'"':
            i += 1
            while i < len(data) and data[i:i + 1] != b'"':
                if data[i:i + 1] in (b"\r", b"\n", b"\x00") or data[i] > 0x7F:
                    raise ImapSyntaxError(f"raw {data[i:i + 1]!r} in quoted string at {i}")
                i += 2 if data[i:i + 1] == b"\\" else 1
            if i >= len(data):
                raise ImapSyntaxError("unterminated quoted string")
        elif ch == b"{":
            close = data.index(b"}", i)
            count = int(data[i + 1:close])
            if data[close + 1:close + 3] != b"\r\n":
                raise ImapSyntaxError("literal without CRLF")
            body = data[close + 3:close + 3 + count]
            if len(body) != count:
                raise ImapSyntaxError("literal length exceeds the text")
            if b"\x00" in body:
                raise ImapSyntaxError("NUL in a literal")
            i = close + 2 + count
        elif data[i] in (0x0D, 0x0A, 0x00) or data[i] > 0x7F:
            raise ImapSyntaxError(f"raw {data[i:i + 1]!r} outside strings at {i}")
        i += 1
    if depth:
        raise ImapSyntaxError("unbalanced '('")
    return top


def _walk_map(node: list[Any], raw_len: int, lo: int, hi: int, path: tuple[int, ...],
              out: list[tuple[tuple[int, ...], list[Any]]], depth: int = 0) -> None:
    hstart, bstart, end = node[0], node[1], node[2]
    if not lo <= hstart <= bstart <= end <= hi <= raw_len:
        raise AssertionError(f"section {path} offsets {node[:3]} outside [{lo}, {hi}]")
    if depth > imapformat.MAX_DEPTH + 2:
        raise AssertionError("section map deeper than MAX_DEPTH")
    out.append((path, node))
    if len(node) > 3 and node[3] == "m":
        if len(node[4]) > imapformat.MAX_PARTS:
            raise AssertionError("more parts than MAX_PARTS")
        for n, child in enumerate(node[4], 1):
            _walk_map(child, raw_len, bstart, end, (*path, n), out, depth + 1)
    elif len(node) > 3 and node[3] == "r":
        inner = node[4][0]
        _walk_map(inner, raw_len, bstart, end, path, out, depth + 1)


def _check_sections(raw: bytes, smap: str) -> None:
    nodes: list[tuple[tuple[int, ...], list[Any]]] = []
    _walk_map(json.loads(smap), len(raw), 0, len(raw), (), nodes)
    if len(nodes) > 2 * mime_tree.MAX_ENTITIES:  # (+1 empty part per delimiter-less multipart)
        raise AssertionError(f"{len(nodes)} entities: more than MAX_ENTITIES allows")
    specs = ["", "TEXT", "HEADER", "HEADER.FIELDS (SUBJECT FROM)"]
    for path, _node in nodes[:12]:
        if path:
            num = ".".join(map(str, path))
            specs += [num, f"{num}.MIME", f"{num}.HEADER", f"{num}.TEXT"]
    for text in dict.fromkeys(specs):
        spec = imapformat.parse_section(text)
        plan = imapformat.plan_section(smap, spec)
        if not 0 <= plan.start <= plan.end <= len(raw):
            raise AssertionError(f"BODY[{text}] plan {plan} outside the message")
        data = raw[plan.start:plan.end]
        if plan.fields is not None:
            data = imapformat.filter_header_fields(data, *plan.fields)
        if data != imapformat.section(raw, spec):
            raise AssertionError(f"BODY[{text}] from the map differs from a re-parse")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _check_parsed(parsed: Any) -> None:
    texts = _strings([parsed.headers, parsed.subject, parsed.from_address, parsed.to_addresses,
                      parsed.cc_addresses, parsed.bcc_addresses, parsed.reply_to,
                      parsed.message_id, parsed.in_reply_to, parsed.references,
                      parsed.text_body, parsed.html_body, parsed.extracted_text, parsed.preview])
    if parsed.sent_at is not None:  # PostgreSQL's displacement limit; psycopg2's years
        offset = parsed.sent_at.utcoffset()
        if offset is None or abs(offset.total_seconds()) >= 16 * 3600:
            raise AssertionError(f"sent_at {parsed.sent_at!r} has no storable offset")
        if not 1 <= parsed.sent_at.astimezone(UTC).year <= 9999:
            raise AssertionError(f"sent_at {parsed.sent_at!r} outside years 1-9999")
    if len(parsed.attachments) > parse.MAX_ATTACHMENTS:
        raise AssertionError(f"{len(parsed.attachments)} attachments extracted")
    for att in parsed.attachments:
        texts += _strings([att.filename, att.mime_type, att.content_id, att.disposition])
        if att.filename != sanitize.safe_filename(att.filename):
            raise AssertionError(f"unsafe attachment name {att.filename!r}")
        if att.mime_type != sanitize.safe_mime_type(att.mime_type):
            raise AssertionError(f"unsafe attachment type {att.mime_type!r}")
    one_line = _strings([parsed.subject, parsed.from_address, parsed.to_addresses,
                         parsed.cc_addresses, parsed.reply_to, parsed.message_id])
    for text in one_line:
        if "\r" in text or "\n" in text:
            raise AssertionError(f"line break in a one-line value {text[:60]!r}")
    for text in texts:
        if "\x00" in text:
            raise AssertionError(f"NUL in stored text {text[:60]!r}")
        text.encode("utf-8")  # no lone surrogates: PostgreSQL takes UTF-8 only


def _check_index(index: dict[str, Any]) -> None:
    for text in _strings(list(index.values())):
        if "\x00" in text:
            raise AssertionError(f"NUL in a search/sort column {text[:60]!r}")
        text.encode("utf-8")


@dataclass
class Outcome:
    """What a run found: failures (input, error) and the slowest calls."""

    failures: list[tuple[bytes, str]] = field(default_factory=list)
    slow: list[tuple[float, bytes]] = field(default_factory=list)
    cases: int = 0


def check(raw: bytes) -> float:
    """Run ``raw`` through the ingest analysis and check every property (raises
    AssertionError/ImapSyntaxError on a violation). Returns the seconds it took (for
    reporting only, never asserted)."""
    t0 = time.perf_counter()
    parsed, imap, index = _analyse_indexed(raw)
    elapsed = time.perf_counter() - t0
    try:
        tree = imapformat.parse_tree(raw)
        rendered = (imapformat.envelope(raw, tree), imapformat.bodystructure(raw, True, tree),
                    imapformat.bodystructure(raw, False, tree), imapformat.section_map(raw, tree))
        for i, stored in enumerate(imap):
            if stored is not None and stored != rendered[i]:
                raise AssertionError("stored rendering differs from a fresh one")
        for text in rendered[:3]:
            if imap_balanced(text) > 3 * (imapformat.MAX_DEPTH + 2):
                raise AssertionError("structure nested deeper than MAX_DEPTH allows")
        if len(rendered[1]) > 400 * len(raw) + 4096:
            raise AssertionError("BODYSTRUCTURE out of proportion to the message")
        _check_sections(raw, rendered[3])
        _check_parsed(parsed)
        _check_index(index)
    finally:
        parsed.discard()
    return elapsed


def run(seed: int, cases: int) -> Outcome:
    """``cases`` generated inputs from ``seed``: mutated messages, hostile shapes, and
    every truncation of one small message."""
    rng = random.Random(seed)
    out = Outcome()
    inputs: list[bytes] = []
    small = message(random.Random(seed))[:600]
    inputs += [small[:i] for i in range(len(small) + 1)][: max(cases // 5, 1)]
    while len(inputs) < cases:
        r = rng.random()
        if r < 0.1:
            inputs.append(hostile(rng))
        elif r < 0.25:
            inputs.append(message(rng))
        else:
            inputs.append(mutate(rng, message(rng)))
    for raw in inputs:
        out.cases += 1
        try:
            elapsed = check(raw)
        except Exception as exc:  # collected and reported
            out.failures.append((raw, f"{type(exc).__name__}: {exc}"))
            continue
        if elapsed > 2.0:
            out.slow.append((elapsed, raw))
    return out
