"""ENVELOPE, BODYSTRUCTURE and BODY[section] rendered from raw message bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail.imapformat import (
    SectionSpec,
    bodystructure,
    envelope,
    filter_header_fields,
    parse_section,
    plan_section,
    quote,
    section,
    section_map,
)
from tests.test_ingest_robustness import mime_messages

SIMPLE = (
    b"Date: Mon, 2 Feb 2026 10:00:00 +0000\r\n"
    b"From: \"Doe, Jane\" <jane@example.org>\r\n"
    b"To: bob@example.com, Carol <carol@example.net>\r\n"
    b"Cc: team: a@x.org, b@y.org;\r\n"
    b"Subject: Hello\r\n \"world\"\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"In-Reply-To: <m0@example.org>\r\n"
    b"\r\n"
    b"Line one\r\nLine two\r\n"
)

ALTERNATIVE = (
    b"From: a@example.org\r\n"
    b"Subject: alt\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative; boundary=\"XX\"\r\n"
    b"\r\n"
    b"preamble\r\n"
    b"--XX\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe\r\n"
    b"--XX\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Disposition: inline\r\n"
    b"\r\n"
    b"<p>Hi</p>\r\n"
    b"--XX--\r\n"
    b"epilogue\r\n"
)

NESTED = (
    b"From: outer@example.org\r\n"
    b"Subject: fwd\r\n"
    b"Content-Type: multipart/mixed; boundary=outer\r\n"
    b"\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"see attached\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Disposition: attachment; filename=\"fwd.eml\"\r\n"
    b"\r\n"
    b"From: inner@example.org\r\n"
    b"Subject: inner\r\n"
    b"Content-Type: multipart/mixed; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"\r\n"
    b"inner text\r\n"
    b"--inner\r\n"
    b"Content-Type: application/pdf; name=x.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0=\r\n"
    b"--inner--\r\n"
    b"--outer--\r\n"
)


def test_quote():
    assert quote(None) == "NIL"
    assert quote("") == '""'
    assert quote('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert quote("Grüße") == "{7}\r\nGrüße"
    assert quote("a\r\nb") == "{4}\r\na\r\nb"


def test_envelope_simple_with_groups_and_folding():
    assert envelope(SIMPLE) == (
        '("Mon, 2 Feb 2026 10:00:00 +0000" "Hello \\"world\\"" '
        '(("Doe, Jane" NIL "jane" "example.org")) '
        '(("Doe, Jane" NIL "jane" "example.org")) '
        '(("Doe, Jane" NIL "jane" "example.org")) '
        '((NIL NIL "bob" "example.com")("Carol" NIL "carol" "example.net")) '
        '((NIL NIL "team" NIL)(NIL NIL "a" "x.org")(NIL NIL "b" "y.org")(NIL NIL NIL NIL)) '
        'NIL "<m0@example.org>" "<m1@example.org>")')


def test_envelope_utf8_subject_is_a_literal():
    raw = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nFrom: x@y\r\n\r\nbody"
    env = envelope(raw)
    assert env.startswith("(NIL {7}\r\nGrüße ((NIL NIL \"x\" \"y\"))")
    assert len("Grüße".encode()) == 7


def test_bodystructure_simple():
    assert bodystructure(SIMPLE) == (
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2 NIL NIL NIL NIL)')
    assert bodystructure(SIMPLE, extensible=False) == (
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 20 2)')


def test_bodystructure_alternative():
    assert bodystructure(ALTERNATIVE) == (
        '(("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 7 1 NIL NIL NIL NIL)'
        '("text" "html" ("charset" "utf-8") NIL NIL "7bit" 9 1 NIL ("inline" NIL) NIL NIL) '
        '"alternative" ("boundary" "XX") NIL NIL NIL)')
    assert bodystructure(ALTERNATIVE, False) == (
        '(("text" "plain" ("charset" "utf-8") NIL NIL "8bit" 7 1)'
        '("text" "html" ("charset" "utf-8") NIL NIL "7bit" 9 1) "alternative")')


def test_bodystructure_nested_rfc822():
    inner_size = len(NESTED[NESTED.index(b"From: inner"):NESTED.index(b"\r\n--outer--")])
    bs = bodystructure(NESTED, False)
    assert bs == (
        '(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 12 1)'
        f'("message" "rfc822" NIL NIL NIL "7bit" {inner_size} '
        '(NIL "inner" ((NIL NIL "inner" "example.org")) ((NIL NIL "inner" "example.org")) '
        '((NIL NIL "inner" "example.org")) NIL NIL NIL NIL NIL) '
        '(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 1)'
        '("application" "pdf" ("name" "x.pdf") NIL NIL "base64" 8) "mixed") 13) "mixed")')
    assert '("attachment" ("filename" "fwd.eml"))' in bodystructure(NESTED)


def test_sections_byte_exact():
    assert section(NESTED, "") == NESTED
    assert section(NESTED, "1") == b"see attached"
    assert section(NESTED, "1.MIME") == b"Content-Type: text/plain\r\n\r\n"
    inner = NESTED[NESTED.index(b"From: inner"):NESTED.index(b"\r\n--outer--")]
    assert section(NESTED, "2") == inner
    assert section(NESTED, "2.HEADER") == inner[:inner.index(b"\r\n\r\n") + 4]
    assert section(NESTED, "2.TEXT") == inner[inner.index(b"\r\n\r\n") + 4:]
    assert section(NESTED, "2.1") == b"inner text"
    assert section(NESTED, "2.2") == b"JVBERi0="
    assert section(NESTED, "2.2.MIME").startswith(b"Content-Type: application/pdf")
    assert section(NESTED, "3") == b""
    assert section(NESTED, "2.1.5") == b""
    assert section(SIMPLE, "1") == b"Line one\r\nLine two\r\n"
    assert section(SIMPLE, "TEXT") == b"Line one\r\nLine two\r\n"
    assert section(SIMPLE, "HEADER.FIELDS (subject to)") == (
        b"To: bob@example.com, Carol <carol@example.net>\r\n"
        b"Subject: Hello\r\n \"world\"\r\n\r\n")
    not_fields = section(SIMPLE, "HEADER.FIELDS.NOT (SUBJECT TO CC DATE FROM)")
    assert not_fields == (b"Message-ID: <m1@example.org>\r\nIn-Reply-To: <m0@example.org>\r\n"
                          b"\r\n")
    assert section(SIMPLE, SectionSpec(partial=(6, 3))) == b"Mon"
    assert section(SIMPLE, SectionSpec(text="TEXT", partial=(100, 3))) == b""


def test_parse_section_rejects_garbage():
    assert parse_section("1.2.HEADER.FIELDS (A B)").render() == "1.2.HEADER.FIELDS (A B)"
    for bad in ("0", "HEADER.FIELDS", "MIME", "1.FOO", "TEXT (A)", "x"):
        with pytest.raises(ValueError):
            parse_section(bad)


@pytest.mark.parametrize("raw", [
    b"", b"garbage without header", b"\r\n\r\n", b"Content-Type: multipart/mixed\r\n\r\nx",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nno end",
    b"Content-Type: ;;;\r\nFrom: <<<@@@>>>, \"unterminated\r\n\r\nx",
    b"Content-Type: message/rfc822\r\n\r\n", b"\xff\xfe\x00: \x80\r\n\r\n\xff",
    b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\nContent-Type: "
    b"multipart/mixed; boundary=a\r\n\r\n" * 100,
])
def test_malformed_never_raises(raw):
    assert envelope(raw).startswith("(")
    assert bodystructure(raw).startswith("(")
    for spec in ("", "HEADER", "TEXT", "1", "1.MIME", "1.1.1", "2.HEADER"):
        assert isinstance(section(raw, spec), bytes)


def test_missing_boundary_is_text_plain():
    raw = b"Content-Type: multipart/mixed\r\n\r\nhello\r\n"
    assert bodystructure(raw, False) == (
        '("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 7 1)')


_SPECS = ["", "HEADER", "TEXT", "1", "1.MIME", "1.1", "1.2.TEXT", "2", "2.HEADER", "2.TEXT",
          "2.1", "2.MIME", "3", "HEADER.FIELDS (FROM X-DUP)", "1.HEADER.FIELDS.NOT (SUBJECT)",
          "2.HEADER.FIELDS (SUBJECT)", "9.9"]


def _via_map(raw: bytes, spec: SectionSpec) -> bytes:
    plan = plan_section(section_map(raw), spec)
    data = raw[plan.start:plan.end]
    if plan.fields is not None:
        data = filter_header_fields(data, *plan.fields)
    if spec.partial is not None:
        data = data[spec.partial[0]:spec.partial[0] + spec.partial[1]]
    return data


@settings(max_examples=200, deadline=None)
@given(st.one_of(mime_messages(), st.sampled_from([SIMPLE, ALTERNATIVE, NESTED])),
       st.sampled_from(_SPECS), st.one_of(st.none(), st.tuples(
           st.integers(0, 300), st.integers(0, 300))))
def test_section_map_plans_equal_slicing(raw, text, partial):
    """The stored section map (what FETCH streams from) locates exactly the bytes that
    parsing the whole message finds, for well- and ill-formed messages alike."""
    spec = parse_section(text)
    spec = SectionSpec(spec.part, spec.text, spec.fields, partial)
    assert _via_map(raw, spec) == section(raw, spec)


def test_section_map_is_small_and_rejects_garbage():
    assert len(section_map(ALTERNATIVE)) < 100
    with pytest.raises(ValueError):
        plan_section("not json", SectionSpec())


def test_envelope_keeps_source_routes_in_the_adl_field():
    """RFC 3501 address (name adl mailbox host): a route-addr's route is the adl, written
    as Dovecot does (no white space); it used to be NIL and mailbox/host came out empty."""
    raw = (b"From: Name <@r1.example, @r2.example:user@host.example>\r\n"
           b"To: <@a.example:x@y.example>, plain@z.example\r\n"
           b"Cc: \"Quoted <@not:a route>\" <q@r.example>\r\n"
           b"Bcc: team: <@hop.example:a@b.example>;\r\n"
           b"\r\nbody")
    assert envelope(raw) == (
        '(NIL NIL (("Name" "@r1.example,@r2.example" "user" "host.example")) '
        '(("Name" "@r1.example,@r2.example" "user" "host.example")) '
        '(("Name" "@r1.example,@r2.example" "user" "host.example")) '
        '((NIL "@a.example" "x" "y.example")(NIL NIL "plain" "z.example")) '
        '(("Quoted <@not:a route>" NIL "q" "r.example")) '
        '((NIL NIL "team" NIL)(NIL "@hop.example" "a" "b.example")(NIL NIL NIL NIL)) '
        'NIL NIL)')


RFC2231 = (
    b"From: a@example.org\r\n"
    b"Content-Type: multipart/mixed; boundary=b\r\n"
    b"\r\n"
    b"--b\r\n"
    b"Content-Type: application/pdf;\r\n"
    b" name=\"=?utf-8?B?0J7RgtGH0ZHRgi5wZGY=?=\"\r\n"
    b"Content-Disposition: attachment;\r\n"
    b" filename*=utf-8''%D0%9E%D1%82%D1%87%D1%91%D1%82.pdf; size=3\r\n"
    b"\r\n"
    b"JVBE\r\n"
    b"--b\r\n"
    b"Content-Type: text/plain; charset=utf-8; format=flowed;\r\n"
    b"Content-Disposition: inline; filename*1*=%D1%82.txt; filename*0*=utf-8'ru'%D0%9E\r\n"
    b"\r\n"
    b"text\r\n"
    b"--b--\r\n"
)


def test_bodystructure_parameters_are_sent_as_in_the_header():
    """RFC 2231 and RFC 2047 parameters stay encoded (7-bit, no literal): the server does
    not offer UTF8=ACCEPT, and Dovecot sends them the same way. Continuations are joined
    into one ``name*`` parameter; a trailing ``;`` adds no empty parameter."""
    bs = bodystructure(RFC2231)
    assert bs.isascii() and "{" not in bs
    assert bs == (
        '(("application" "pdf" ("name" "=?utf-8?B?0J7RgtGH0ZHRgi5wZGY=?=") NIL NIL "7bit" 4 '
        'NIL ("attachment" ("size" "3" "filename*" '
        '"utf-8\'\'%D0%9E%D1%82%D1%87%D1%91%D1%82.pdf")) NIL NIL)'
        '("text" "plain" ("charset" "utf-8" "format" "flowed") NIL NIL "7bit" 4 1 '
        'NIL ("inline" ("filename*" "utf-8\'ru\'%D0%9E%D1%82.txt")) NIL NIL) '
        '"mixed" ("boundary" "b") NIL NIL NIL)')


@pytest.mark.parametrize("params, expected", [
    # Dovecot's own rfc2231_parse test vectors (src/lib-mail/test-rfc2231-parser.c).
    ("; key4*=us-ascii''foo; key*2=ba%; key2*0=a; key3*0*=us-ascii'en'xyz; key*0=\"foo\"; "
     "key2*1*=b%25; key3*1=plop%; key*1=baz",
     [("key", "foobazba%"), ("key2*", "''ab%25"), ("key3*", "us-ascii'en'xyzplop%25"),
      ("key4*", "us-ascii''foo")]),
    ("; a=1; f*0*=x; f*2*=y", [("a", "1"), ("f*0*", "x"), ("f*2*", "y")]),  # index gap
    ('; name="a;b\\"c"; x*y=z', [("name", 'a;b"c'), ("x*y", "z")]),
])
def test_rfc2231_parameters_are_joined_like_dovecot(params, expected):
    from agentpost.mail.imapformat import _content_params
    assert _content_params("application/x" + params) == ("application/x", expected)
