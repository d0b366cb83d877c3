"""The direct parser (agentpost.mail.parse_fast, issue 12) gives exactly what the stdlib
path gives, or declines: the parsed fields, the IMAP renderings (ENVELOPE, BODYSTRUCTURE,
BODY, the section map) and the SEARCH/SORT keys, for generated messages that are right
and wrong in the ways real mail is."""

from __future__ import annotations

import base64
import dataclasses
import quopri
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agentpost.core import ingest, parse_dispatch
from agentpost.mail import parse, parse_fast
from tests.mailfactory import make_message
from tests.test_ingest_robustness import mime_messages


def _stdlib(raw: bytes) -> parse.ParsedMessage:
    """What parse_message gave before the direct parser (no part is cut out)."""
    return parse._parse(raw, raw, [], None)


def _fields(parsed: parse.ParsedMessage) -> dict:
    out = dataclasses.asdict(parsed)
    out["preview"] = parsed.preview
    return out


def _check(raw: bytes, record: bool = False) -> bool:
    """The direct parser agrees with the stdlib path (or declines); True if it parsed.
    ``record``: count which it was in hypothesis' statistics."""
    fast = parse_fast.parse_simple(raw)
    if record:
        event("direct" if fast is not None else "declined")
    if fast is None:
        return False
    assert _fields(fast) == _fields(_stdlib(raw))
    return True


# --------------------------------------------------------------------------- generation

_EOLS = st.sampled_from([b"\r\n", b"\r\n", b"\n"])
_NAMES = st.sampled_from([
    "Subject", "From", "To", "Cc", "Bcc", "Reply-To", "Date", "Message-ID", "In-Reply-To",
    "References", "MIME-Version", "X-Mailer", "Received", "Content-Type", "content-type",
    "CONTENT-TRANSFER-ENCODING", "Content-Transfer-Encoding", "Content-Disposition",
    "Content-ID", "X-AgentPost-Large-Part"] * 10 + ["X-\xe9", "Bad Name", ":", "From "])
_PIECES = st.sampled_from([b"\r\n", b"\r"] + 40 * [
    b"hello", b"Re: the plan", b" ", b"  ", b"\t", b"=?utf-8?q?caf=C3=A9?=",
    b"=?iso-8859-1?b?5w==?=", b"=?utf-8?b?!!!?=", b"=?bogus?q?x?=", b"\xc3\xa9", b"\xff",
    b"\x00", b'"Doe, J" <j@x.example>', b"a@b.example", b"<x@y.example>", b"<unterminated",
    b"group: a@b.example, c@d.example;", b"(comment)", b",", b";", b"\\", b'"',
    b"Thu, 03 Dec 2026 16:20:00 +0000", b"3 Dec 2026 16:20 -0500", b"-0000",
    b"Thu, 03 Dec 26 16:20:00 GMT", b"text/plain; charset=utf-8", b"base64", b"=?",
    b"\r\n ", b"\n\t", b"--b", b"x" * 300, b"y " * 600])
_values = st.lists(_PIECES, max_size=8).map(b"".join)


@st.composite
def _header_lines(draw, extra: list[tuple[bytes, bytes]] | None = None) -> list[bytes]:
    pairs = [(name.encode("utf-8"), value) for name, value in
             draw(st.lists(st.tuples(_NAMES, _values), max_size=10))]
    pairs += extra or []
    order = draw(st.permutations(range(len(pairs))))
    sep = draw(st.sampled_from([b": ", b":", b":  ", b": \t"]))
    return [pairs[i][0] + sep + pairs[i][1] for i in order]


_CTYPES = [None, b"text/plain", b"text/plain; charset=utf-8",
           b'text/plain; charset="UTF-8"; format=flowed', b"text/html; charset=iso-8859-1",
           b"TEXT/HTML", b"text/plain; charset=x-unknown", b"text/plain; charset*=utf-8''x",
           b"text/plain; charset=latin1", b"text/plain; charset=utf-16", b"text",
           b"text/plain;", b"text/plain; charset=us-ascii", b"application/octet-stream",
           b'application/pdf; name="r\xc3\xa9.pdf"', b"image/png", b"message/rfc822",
           b"text/html;\r\n charset=windows-1252", b"text/plain; charset=base64"]
_CTES = [None, b"7bit", b"8bit", b"quoted-printable", b"base64", b"BASE64", b"base64 ",
         b"x-uuencode", b"binary", b"junk", b" Quoted-Printable"]
_DISPOSITIONS = [None, b"inline", b"attachment", b'attachment; filename="a.txt"',
                 b"attachment; filename*=utf-8''%C3%A9.txt", b'inline; filename="../../x"',
                 b"=?utf-8?q?x?="]
_TEXTS = st.sampled_from([
    "plain words\n", "Gr\u00fc\u00dfe, caf\u00e9\n", "<p>html <b>bold</b></p>\n", "",
    "a line\nanother line\n\n", "--b\nnot a delimiter\n", "--b \n", "tab\there\n",
    "\x00nul\n", "x" * 2000 + "\n", "=3D not qp\n", "--bb--\n"])


@st.composite
def _body(draw, cte: bytes | None, eol: bytes) -> bytes:
    text = draw(_TEXTS)
    data = text.encode(draw(st.sampled_from(["utf-8", "latin-1"])), "replace")
    mode = (cte or b"").strip().lower()
    if mode == b"base64" and draw(st.booleans()):
        data = base64.encodebytes(data)
    elif mode == b"quoted-printable" and draw(st.booleans()):
        data = quopri.encodestring(data)
    else:
        data += draw(st.sampled_from([b"", b"\xff\xfe", b"=\n", b"!!!", b"=E9"]))
    return data.replace(b"\n", eol)


@st.composite
def _leaf(draw, eol: bytes) -> bytes:
    lines, blank, body = draw(_leaf_parts(eol))
    head = eol.join(lines) + eol if lines else b""
    return head + blank + body


@st.composite
def _leaf_parts(draw, eol: bytes) -> tuple[list[bytes], bytes, bytes]:
    """(MIME field lines, the blank line or b"", the body) of a leaf part."""
    ctype = draw(st.sampled_from(_CTYPES))
    cte = draw(st.sampled_from(_CTES))
    disposition = draw(st.sampled_from(_DISPOSITIONS))
    fields = [(b"Content-Type", ctype), (b"Content-Transfer-Encoding", cte),
              (b"Content-Disposition", disposition),
              (b"Content-ID", draw(st.sampled_from([None, b"<cid1@x.example>", b"junk"])))]
    lines = [name + b": " + value for name, value in fields if value is not None]
    if draw(st.integers(0, 9)) == 0:
        lines.append(b"Content-Type: application/x-second")  # only the first one counts
    blank = eol if draw(st.integers(0, 19)) else b""  # sometimes none at all
    return lines, blank, draw(_body(cte, eol))


_BOUNDARIES = st.sampled_from(["b", "bb", "=_Part_1.2", "000000000000abcd", "a'b(c)+_,-./:=?",
                               "with space", "b\xe9", ""])


@st.composite
def _multipart(draw, eol: bytes, depth: int = 0) -> tuple[bytes, bytes]:
    """(the Content-Type value, the body) of a multipart entity."""
    boundary = draw(_BOUNDARIES)
    subtype = draw(st.sampled_from([b"alternative", b"mixed", b"related", b"digest",
                                    b"Alternative"]))
    quoted = draw(st.booleans()) or " " in boundary
    bvalue = boundary.encode("utf-8")
    bparam = b'"' + bvalue + b'"' if quoted else bvalue
    ctype = draw(st.sampled_from([
        b"multipart/" + subtype + b"; boundary=" + bparam,
        b"multipart/" + subtype + b";" + eol + b" boundary=" + bparam,
        b"multipart/" + subtype + b"; boundary=" + bparam + b'; type="text/html"',
        b"Multipart/" + subtype + b";\tboundary=" + bparam + b"; boundary=other",
        b"multipart/" + subtype,
    ]))
    delim = b"--" + bvalue
    pieces = [draw(st.sampled_from([b"", b"This is a multi-part message." + eol]))]
    for _ in range(draw(st.integers(1, 4))):
        opener = draw(st.sampled_from([delim + eol] * 8 + [delim + b" " + eol,
                                                           delim + eol + delim + eol,
                                                           delim + b"x" + eol]))
        if depth < 2 and draw(st.integers(0, 4)) == 0:
            inner_type, inner_body = draw(_multipart(eol, depth + 1))
            part = b"Content-Type: " + inner_type + eol + eol + inner_body
        else:
            part = draw(_leaf(eol))
        pieces += [opener, part, eol]
    closer = draw(st.sampled_from([delim + b"--" + eol] * 6 + [delim + b"--", b"",
                                                                delim + b"-- " + eol]))
    epilogue = draw(st.sampled_from([b"", b"epilogue" + eol, delim + eol]))
    return ctype, b"".join(pieces) + closer + epilogue


@st.composite
def messages(draw) -> bytes:
    """Whole messages: top-level headers (random, plus MIME fields), then a body."""
    eol = draw(_EOLS)
    if draw(st.booleans()):
        ctype, body = draw(_multipart(eol))
        mime = [b"Content-Type: " + ctype]
        blank = eol
    else:
        mime, blank, body = draw(_leaf_parts(eol))
    lines = draw(_header_lines([(b"MIME-Version", b"1.0")]))
    at = draw(st.integers(0, len(lines)))
    lines[at:at] = mime
    if draw(st.integers(0, 9)) == 0:  # a line ending of another kind somewhere
        other = draw(st.sampled_from([b"\r", b"\n", b"\r\n"]))
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, b"X-Odd: 1" + other)
    return eol.join(line.replace(b"\r\n", eol) for line in lines) + eol + blank + body


# --------------------------------------------------------------------------- properties


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages())
def test_the_direct_parser_agrees_with_the_stdlib(raw):
    _check(raw, record=True)


@settings(max_examples=400, deadline=None)
@given(mime_messages())
def test_malformed_messages_agree_or_are_declined(raw):
    _check(raw, record=True)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=messages())
def test_the_whole_analysis_is_the_same_either_way(raw, monkeypatch_module):
    """What ingest stores: parsed fields, IMAP renderings and search/sort keys."""
    fast = ingest._analyse_indexed(raw)
    with monkeypatch_module.context() as patch:
        patch.setattr(parse_fast, "parse_simple", lambda raw: None)
        slow = ingest._analyse_indexed(raw)
    assert _fields(fast[0]) == _fields(slow[0])
    assert fast[1:] == slow[1:]


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


# --------------------------------------------------------------------------- examples


def _realistic() -> list[bytes]:
    """Shapes the MX sees every day; the direct parser must take all of them."""
    crlf = b"\r\n"
    gmail = crlf.join([
        b"Received: from mail.example.com by mx.agents.test; Thu, 3 Dec 2026 16:00:00 +0000",
        b"From: =?UTF-8?Q?Ren=C3=A9e_Dupont?= <renee@example.com>",
        b"Date: Thu, 3 Dec 2026 17:00:01 +0100",
        b"Message-ID: <CAF=abc+123@mail.gmail.com>",
        b"Subject: =?UTF-8?Q?R=C3=A9union_demain?=",
        b"To: bot@agents.test, \"Ops, Team\" <ops@agents.test>",
        b"Cc: x@example.com",
        b"In-Reply-To: <prev@mail.gmail.com>",
        b"References: <root@mail.gmail.com>\r\n\t<prev@mail.gmail.com>",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/alternative; boundary="000000000000a1b2c3"',
        b"",
        b"--000000000000a1b2c3",
        b'Content-Type: text/plain; charset="UTF-8"',
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        b"Bonjour, =C3=A0 demain =",
        b"10h.",
        b"",
        b"--000000000000a1b2c3",
        b'Content-Type: text/html; charset="UTF-8"',
        b"Content-Transfer-Encoding: quoted-printable",
        b"",
        b'<div dir=3D"ltr">Bonjour, =C3=A0 demain 10h.</div>',
        b"",
        b"--000000000000a1b2c3--",
        b""])
    outlook = crlf.join([
        b"From: Ops <ops@corp.example>", b"To: bot@agents.test", b"Subject: report",
        b"Date: Thu, 3 Dec 2026 16:00:00 +0000", b"Message-ID: <1@corp.example>",
        b'Content-Type: multipart/mixed;\r\n\tboundary="_004_abc_"', b"MIME-Version: 1.0",
        b"", b"--_004_abc_",
        b'Content-Type: multipart/alternative;\r\n\tboundary="_000_abc_"', b"",
        b"--_000_abc_", b'Content-Type: text/plain; charset="iso-8859-1"',
        b"Content-Transfer-Encoding: quoted-printable", b"", b"Caf=E9 report attached.",
        b"", b"--_000_abc_", b'Content-Type: text/html; charset="iso-8859-1"',
        b"Content-Transfer-Encoding: quoted-printable", b"", b"<p>Caf=E9</p>", b"",
        b"--_000_abc_--", b"", b"--_004_abc_",
        b'Content-Type: application/pdf; name="r.pdf"',
        b'Content-Disposition: attachment; filename="r.pdf"; size=5',
        b"Content-ID: <r.pdf@corp.example>",
        b"Content-Transfer-Encoding: base64", b"", b"JVBERi0=", b"", b"--_004_abc_--", b""])
    return [
        make_message(),
        make_message(subject="=?utf-8?q?caf=C3=A9?= report", body="body\n" * 50,
                     msgid="<same@example.com>", html="<p>hi</p>",
                     attachments=[("a.txt", "text/plain", b"x" * 300)]),
        make_message(body="Gr\u00fc\u00dfe " * 400),
        make_message(body="=\u00e9 " * 900, references="<a@b> <c@d>", in_reply_to="<c@d>"),
        make_message(attachments=[("p.png", "image/png", bytes(range(256)) * 4)]),
        gmail, outlook, outlook.replace(b"\r\n", b"\n"),
        b"From: a@b.example\nTo: c@d.example\nSubject: bare LF\n\nhi\n",
        b"Subject: hi\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\nPGI+aGk8L2I+\r\n",
    ]


@pytest.mark.parametrize("n", range(len(_realistic())))
def test_everyday_shapes_take_the_direct_path(n):
    raw = _realistic()[n]
    assert _check(raw)
    assert parse.parse_message(raw) is not None
    fast = ingest._analyse_indexed(raw)
    assert fast[1][0] and fast[1][1]  # ENVELOPE and BODYSTRUCTURE rendered


@pytest.mark.parametrize("raw", [
    b"From nobody Thu Dec  3 16:00:00 2026\r\nSubject: mbox\r\n\r\nx\r\n",  # unix from
    b"Subject: x\rTo: y\r\n\r\nbare CR\r\n",
    b" continuation first\r\nSubject: x\r\n\r\nbody",
    b"Subject: x\r\nno colon here\r\n\r\nbody",
    b"Subject: headers only\r\n",
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx\r\n",
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n',  # not closed
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b \r\n\r\nx\r\n--b--\r\n',
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n--b\r\n\r\nx\r\n--b--\r\n',
    b'Content-Type: multipart/digest; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n',
    b"Content-Type: text/plain; charset=x-unknown\r\n\r\nx\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n",
])
def test_odd_shapes_are_left_to_the_stdlib(raw):
    assert parse_fast.parse_simple(raw) is None
    assert _fields(parse.parse_message(raw)) == _fields(_stdlib(raw))


def test_large_messages_keep_cutting_their_parts(tmp_path):
    """Past the cut threshold the direct parser is not asked (parts go to spool files)."""
    raw = make_message(attachments=[("a.bin", "application/octet-stream", b"\x01" * 5000)])
    parsed = parse.parse_message(raw, large_part_bytes=1000, spool_dir=str(tmp_path))
    try:
        assert parsed.claimed == 1 and parsed.attachments[0].path
    finally:
        parsed.discard()


# --------------------------------------------------------------------------- the gate


def _stray_delimiters() -> bytes:
    """A body full of "--b" inside lines: one find per line-start delimiter, not per hit."""
    body = b"x--b" * 3000
    return (b'Subject: x\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\n'
            + body + b"\r\n--b--\r\n")


@pytest.mark.parametrize("shape,raw", [
    ("stray delimiters", _stray_delimiters()),
    ("a long header line without a colon", b"Subject: x\r\n" + b"a" * 12000 + b"\r\n\r\nx"),
    ("many fields", b"".join(b"X-%d: v\r\n" % i for i in range(140)) + b"\r\nx"),
    ("a long folded field", b"Subject: x" + b"\r\n y" * 140 + b"\r\n\r\nx"),
])
def test_what_the_gate_lets_inline_stays_cheap(shape, raw):
    """Shapes aimed at the direct parser: either the gate sends them to the pool, or the
    work is a few linear scans (the parse agrees with the stdlib either way)."""
    if parse_dispatch.looks_plain(raw):
        _check(raw)
    assert _fields(parse.parse_message(raw)) == _fields(_stdlib(raw)), shape


# --------------------------------------------------------------------------- header reads
# parse_headers is shared by both paths; these check its shortcuts against the stdlib
# calls they replace.

_DATE_PIECES = st.sampled_from([
    "Thu, ", "Thu,", "03 ", "3 ", "31 ", "Dec ", "Feb ", "dec ", "2026 ", "26 ", "99 ", "0999 ",
    "16:20:00 ", "16:20 ", "23:59:60 ", "+0000", "-0000", "+0100", "-0530", "+2400", "GMT",
    "EST", "UT", "(comment)", " ", "\t", "\r\n ", "\x00", "\xe9", "=?utf-8?q?x?=", "x",
    "Thu, 03 Dec 2026 16:20:00 +0000", "1 Jan 1970 00:00:00 -0000", "29 Feb 2025 1:2:3 Z"])


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.lists(_DATE_PIECES, max_size=8).map("".join),
                 st.text(max_size=40), st.just("x" * 1100 + " 3 Dec 2026")))
def test_date_text_is_the_date_header_text(value):
    msg = EmailMessage(policy=parse._POLICY)
    msg._headers = [("Date", value)]
    assert parse._date_text(msg) == parse._header_text(msg, "date")
    assert parse._date_text(parse._Fields(msg)) == parse._header_text(msg, "date")


def _outcome(lookup, name: str) -> tuple:
    """What a lookup answers, or the exception it raises (the stdlib's header classes
    raise on some malformed values; parse_headers handles that either way)."""
    try:
        return ("value", lookup(name))
    except Exception as exc:
        return ("raised", type(exc))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["To", "to", "TO", "Cc", "Date", "X-A", "x-a"]),
                          st.text(max_size=20)), max_size=12),
       st.sampled_from(["to", "cc", "date", "x-a", "bcc", "To"]))
def test_indexed_fields_answer_like_the_message(headers, name):
    msg = EmailMessage(policy=parse._POLICY)
    msg._headers = list(headers)
    fields = parse._Fields(msg)
    assert _outcome(fields.get, name) == _outcome(msg.get, name)
    assert _outcome(fields.get_all, name) == _outcome(msg.get_all, name)
    assert list(fields.raw_items()) == list(msg.raw_items())
    assert parse._first_raw(fields, name.lower()) == parse._first_raw(msg, name.lower())


@given(st.text(st.characters(exclude_categories=()) | st.sampled_from("\x00\udce9a")))
def test_clean_is_the_round_trip(text):
    assert parse._clean(text) == text.replace("\x00", "").encode("utf-8", "replace").decode()


# --------------------------------------------------------------------------- boundaries

_UNQUOTED = st.text(st.sampled_from(list("aZ09!#$%&+.^_`{|}~-'*=/?:,()")), min_size=1,
                    max_size=12)
_QUOTED = st.text(st.sampled_from(list("aZ09!#$%&'*+.^_`{|}~=/?:,()- \t;<>@[]\xe9\\\"")),
                  max_size=12).map(lambda v: '"' + v + '"')


@st.composite
def _multipart_types(draw) -> str:
    out = draw(st.sampled_from(["multipart/", "Multipart/", "MULTIPART/"])) + draw(
        st.sampled_from(["mixed", "Alternative", "related", "digest", "x-foo", "", "a b"]))
    for _ in range(draw(st.integers(0, 3))):
        out += draw(st.sampled_from(["; ", ";", ";\r\n ", ";\n\t", " ;", "\t;\r\n\t ",
                                     ";\r\n"]))
        out += draw(st.sampled_from(["boundary", "Boundary", "type", "charset", "x-y",
                                     "boundary*", "boundary*0"]))
        out += "=" + draw(st.one_of(_UNQUOTED, _QUOTED))
    return out + draw(st.sampled_from(["", " ", "\t", ";"]))


@settings(max_examples=3000, deadline=None)
@given(_multipart_types())
def test_a_plain_multipart_type_reads_like_the_stdlib(value):
    """The boundary and type of the plain form (parse_fast._MULTIPART) are what
    Message.get_content_type and Message.get_boundary give; other forms are left to
    those."""
    msg = EmailMessage(policy=parse._POLICY)
    msg._headers = [("Content-Type", value)]
    try:
        plan = parse_fast._multipart_plan(value)
    except parse_fast.Unsupported:
        assert msg.get_content_type() == "multipart/digest" or not msg.get_boundary()
        return
    if plan is not None:
        assert (plan.ctype, plan.boundary) == (msg.get_content_type(), msg.get_boundary())


@pytest.mark.parametrize(("raw", "bare"), [
    (b"", False), (b"a\r\nb\r\n", False), (b"a\r", True), (b"a\r\n\r", True),
    (b"a\rb\r\n", True), (b"\r\r\n", True), (b"x\r\n" * 50000, False),
    (b"x\r\n" * 50000 + b"\r", True), (b"x\r\n" * 25000 + b"\rx" + b"x\r\n" * 25000, True),
])
def test_a_bare_cr_is_found_anywhere_and_each_message_gets_its_own_answer(raw, bare):
    """Asked twice of the same bytes (the MX does), then of equal-length bytes that
    differ: the answer kept for the last message is never another message's."""
    assert parse_fast.has_bare_cr(raw) is bare
    assert parse_fast.has_bare_cr(raw) is bare
    twin = raw.replace(b"\r", b"\n") if bare else raw[:-1] + b"\r" if raw else raw
    assert len(twin) == len(raw)
    assert parse_fast.has_bare_cr(twin) is (not bare and bool(raw))
    assert parse_fast.has_bare_cr(bytearray(raw)) is bare
