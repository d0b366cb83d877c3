"""RFC 4469 CATENATE URLs (RFC 5092 syntax): what they name, and what is refused."""

from __future__ import annotations

import urllib.parse

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from agentpost.mail import imapformat
from agentpost.mail.catenate import (
    HEADER_READ_BYTES,
    MAX_URL_CHARS,
    BadUrl,
    PartReference,
    badurl_code,
    parse_catenate_url,
    read_top_header,
)
from agentpost.mail.imapformat import SectionSpec
from agentpost.model import errors


def parse(url, selected="INBOX"):
    return parse_catenate_url(url, selected_mailbox=selected)


def test_an_absolute_path_url_names_mailbox_uidvalidity_uid_and_section():
    ref = parse("/INBOX;UIDVALIDITY=123/;UID=20/;SECTION=1.2")
    assert ref == PartReference(mailbox="INBOX", uid=20, uidvalidity=123, section="1.2",
                                section_spec=SectionSpec(part=(1, 2)))


def test_a_uid_relative_url_names_a_message_of_the_selected_mailbox():
    assert parse(";UID=20", selected="Archive/2024") == \
        PartReference(mailbox="Archive/2024", uid=20)
    assert parse(";uid=7/;section=TEXT/;partial=10.20", selected="Sent") == PartReference(
        mailbox="Sent", uid=7, section="TEXT", section_spec=SectionSpec(text="TEXT"),
        partial=(10, 20))


def test_partial_length_is_optional_and_offset_may_be_zero():
    assert parse("/INBOX/;UID=1/;PARTIAL=0").partial == (0, None)
    assert parse("/INBOX/;UID=1/;PARTIAL=000.5").partial == (0, 5)


def test_mailbox_names_are_percent_decoded_utf8_and_inbox_is_canonical():
    assert parse("/inbox/;UID=1").mailbox == "INBOX"
    assert parse("/Inbox/Sub/;UID=1").mailbox == "INBOX/Sub"
    assert parse("/Entw%C3%BCrfe/;UID=1").mailbox == "Entwürfe"
    assert parse("/a%20b%3Bc%25/;UID=1").mailbox == "a b;c%"
    assert parse("/Tom&Jerry/;UID=1").mailbox == "Tom&Jerry"  # UTF-8, not modified UTF-7


def test_sections_are_percent_decoded_and_checked():
    ref = parse("/INBOX/;UID=3/;SECTION=1.HEADER.FIELDS%20(TO%20FROM)")
    assert ref.section == "1.HEADER.FIELDS (TO FROM)"
    assert ref.section_spec == SectionSpec(part=(1,), text="HEADER.FIELDS",
                                           fields=("TO", "FROM"))
    assert parse("/INBOX/;UID=3/;SECTION=2.MIME").section_spec == SectionSpec((2,), "MIME")


def test_relative_mailbox_paths_resolve_against_the_selected_mailbox():
    # RFC 3986 merge: the selected mailbox's last level is replaced.
    assert parse("Drafts/;UID=4", selected="INBOX").mailbox == "Drafts"
    assert parse("Drafts/;UID=4", selected="Work/Projects").mailbox == "Work/Drafts"
    assert parse("../Other/;UID=4", selected="Work/Projects/Q1").mailbox == "Work/Other"
    assert parse("Drafts/;UID=4", selected=None).mailbox == "Drafts"
    # RFC 5092 §9.1: "..;UIDVALIDITY=" is not a dot-segment.
    ref = parse("..;UIDVALIDITY=385759045/;UID=20", selected="INBOX")
    assert (ref.mailbox, ref.uidvalidity, ref.uid) == ("..", 385759045, 20)


def test_the_selected_mailbox_name_is_not_reinterpreted_as_url_syntax():
    odd = "50% off; ./.. & more"
    assert parse(";UID=9", selected=odd).mailbox == odd


@pytest.mark.parametrize("url, selected", [
    ("imap://joe@example.com/INBOX/;UID=20", "INBOX"),   # absolute: another server?
    ("IMAP://example.com/INBOX/;UID=20", "INBOX"),
    ("//example.com/INBOX/;UID=20", "INBOX"),            # network-path
    ("http://example.com/;UID=1", "INBOX"),
    ("/INBOX/;UID=20/;URLAUTH=anonymous:internal:" + "0" * 32, "INBOX"),
    ("/INBOX/;UID=20/;EXPIRE=2030-01-01T00:00:00Z;URLAUTH=authuser", "INBOX"),
    ("/INBOX", "INBOX"),                                   # a mailbox, not a message
    ("/INBOX?SUBJECT%20x", "INBOX"),                       # a search
    ("/INBOX/;UID=20#frag", "INBOX"),
    (";UID=20", None),                                     # nothing selected
    (";SECTION=1", "INBOX"),                               # needs a base message
    (";PARTIAL=0.10", "INBOX"),
    ("/INBOX/;UID=0", "INBOX"),
    ("/INBOX/;UID=01", "INBOX"),
    ("/INBOX/;UID=4294967296", "INBOX"),
    ("/INBOX/;UID=-1", "INBOX"),
    ("/INBOX/;UID=", "INBOX"),
    ("/INBOX/;UID=1/;PARTIAL=1.0", "INBOX"),
    ("/INBOX/;UID=1/;PARTIAL=x", "INBOX"),
    ("/INBOX;UIDVALIDITY=0/;UID=1", "INBOX"),
    ("/INBOX/;UID=1/;UID=2", "INBOX"),
    ("/INBOX/;SECTION=1/;UID=2", "INBOX"),                # wrong order
    ("/INBOX/;UID=1;SECTION=1", "INBOX"),                 # missing "/"
    ("/INBOX;UID=1", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=1.BOGUS", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=0", "INBOX"),
    ("/INBOX/;UID=1/;FOO=bar", "INBOX"),
    ("/;UID=1", "INBOX"),                                  # empty mailbox
    ("/a/../;UID=1", "INBOX"),
    ("/IN%ZZBOX/;UID=1", "INBOX"),                         # bad escape
    ("/IN%FFBOX/;UID=1", "INBOX"),                         # not UTF-8
    ("/IN%0ABOX/;UID=1", "INBOX"),                         # control character
    ("/IN BOX/;UID=1", "INBOX"),                           # unencoded space
    ("/INBOX/;UID=1\r\n", "INBOX"),
    ("/Entwürfe/;UID=1", "INBOX"),                         # unencoded non-ASCII
    ("mailbox:x/;UID=1", "INBOX"),                         # colon in the first segment
    ("", "INBOX"),
    ("/INBOX/;UID=1/;SECTION=" + "1." * MAX_URL_CHARS, "INBOX"),
])
def test_anything_else_is_a_bad_url(url, selected):
    with pytest.raises(BadUrl) as caught:
        parse(url, selected)
    assert caught.value.url == url
    assert caught.value.type == "bad_url"
    assert isinstance(caught.value, errors.InvalidRequest)


def test_the_badurl_response_code_cannot_break_out_of_its_brackets():
    assert badurl_code("/INBOX/;UID=20") == "BADURL /INBOX/;UID=20"
    assert badurl_code('/a]b\\c\r\n d\u00e9') == "BADURL /abcd"
    assert badurl_code("]]") == "BADURL ?"


_MAILBOX = st.text(st.characters(blacklist_categories=("Cs", "Cc")),
                   min_size=1, max_size=20).filter(lambda n: "/" not in n and n not in
                                                   (".", "..") and n.upper() != "INBOX")


@settings(max_examples=300, deadline=None)
@given(_MAILBOX, st.integers(1, 2**32 - 1), st.one_of(st.none(), st.integers(1, 2**32 - 1)),
       st.one_of(st.none(), st.lists(st.integers(1, 99), min_size=1, max_size=4)),
       st.one_of(st.none(), st.tuples(st.integers(0, 10**9), st.integers(1, 10**9))))
def test_generated_urls_parse_back_to_what_they_encode(mailbox, uid, uidvalidity, part,
                                                       partial):
    url = "/" + urllib.parse.quote(mailbox, safe="")
    url += f";UIDVALIDITY={uidvalidity}" if uidvalidity else ""
    url += f"/;UID={uid}"
    section = ".".join(map(str, part)) if part else None
    url += f"/;SECTION={section}" if section else ""
    url += f"/;PARTIAL={partial[0]}.{partial[1]}" if partial else ""
    ref = parse(url, selected=None)
    assert (ref.mailbox, ref.uid, ref.uidvalidity, ref.section, ref.partial) == \
        (mailbox, uid, uidvalidity, section, partial)
    assert ref.section_spec == (SectionSpec(part=tuple(part)) if part else None)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_input_either_parses_or_is_a_bad_url(text):
    try:
        parse(text)
    except BadUrl as exc:
        assert badurl_code(exc.url).startswith("BADURL ")


# ----------------------------------------------------- the header block by range reads

_HEADER_CASES = [
    b"Subject: a\r\nX-A: 1\r\n\r\nbody\r\n",
    b"Subject: lf only\nX-A: 1\n\nbody\n\nmore\n",
    b"\r\nno header at all\r\n",
    b"\nno header, LF\n",
    b"Subject: all header, no body\r\nX-B: 2\r\n",
    b"Subject: ends in CR\n\r",
    b"Subject: folded\r\n  on two lines\r\n\r\n",
    b"Subject: mixed\n\r\nbody",
    b"",
    b"X-Big: " + b"y" * 200_000 + b"\r\nX-After: 1\r\n\r\n" + b"z" * 1000,
]


class _Ranges:
    """A stored message read only by ranges, counting the octets read."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.read = 0

    async def __call__(self, start: int, length: int) -> bytes:
        assert 0 <= start and start + length <= len(self.raw)
        self.read += length
        return self.raw[start:start + length]


def _top_header(raw: bytes, limit: int = 1 << 30) -> tuple[bytes | None, int]:
    """Run the coroutine to its end: its reads never wait."""
    reader = _Ranges(raw)
    coro = read_top_header(reader, len(raw), limit)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value, reader.read
    raise AssertionError("read_top_header waited on a read that never waits")


@pytest.mark.parametrize("raw", _HEADER_CASES)
def test_the_top_header_by_ranges_is_what_imapformat_sections(raw):
    header, _ = _top_header(raw)
    assert header == imapformat.section(raw, "HEADER")
    assert imapformat.filter_header_fields(header, ("subject",), True) == \
        imapformat.section(raw, "HEADER.FIELDS (SUBJECT)")


def test_only_the_header_block_is_read_of_a_large_message():
    raw = b"Subject: big\r\n\r\n" + b"x" * 5_000_000
    header, read = _top_header(raw)
    assert header == b"Subject: big\r\n\r\n"
    assert read == HEADER_READ_BYTES  # one read; never the 5 MB


def test_a_header_over_the_limit_is_none():
    assert _top_header(b"X-Big: " + b"y" * 300_000 + b"\r\n\r\nbody", limit=100_000)[0] \
        is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b":", b" ", b"\r", b"\n", b"\r\n"]), max_size=40)
       .map(b"".join))
def test_arbitrary_bytes_split_where_imapformat_splits(raw):
    import agentpost.mail.catenate as catenate

    original = catenate.HEADER_READ_BYTES
    catenate.HEADER_READ_BYTES = 3  # many reads: blank lines across read boundaries
    try:
        header, _ = _top_header(raw)
    finally:
        catenate.HEADER_READ_BYTES = original
    assert header == imapformat.section(raw, "HEADER")


@pytest_twisted.ensureDeferred
async def test_catenate_header_fields_of_an_unmapped_message_reads_only_the_header(
        server, monkeypatch):
    """Over IMAP: a message stored without a section map (imap_sections NULL), a large
    body: ``;SECTION=HEADER.FIELDS (...)`` and ``;SECTION=HEADER`` copy exactly what
    FETCH BODY.PEEK returns, and the whole message is never read."""
    from agentpost.core.imap_messages import InboxFolder
    from tests.imap_client import Client, Lit, new_inbox, session

    inbox, key = await new_inbox(server, "cat-unmapped")
    raw = (f"From: a@example.org\r\nTo: {inbox['email']}\r\nSubject: kept\r\n"
           "X-Note: one\r\n  folded\r\n\r\n").encode() + b"body\r\n" * 400_000
    await server.deliver(raw, [inbox["email"]])

    async def unmap(txn):  # type: ignore[no-untyped-def]
        await txn.execute("UPDATE messages SET imap_sections = NULL WHERE inbox_id = %s",
                          (inbox["id"],))

    await server.core.db.run_interaction("test.unmap", unmap)
    whole_reads: list[int] = []
    original = InboxFolder.read_message

    async def spy(self, row):  # type: ignore[no-untyped-def]
        whole_reads.append(row.uid)
        return await original(self, row)

    monkeypatch.setattr(InboxFolder, "read_message", spy)

    def work(c: Client) -> dict[str, list[bytes]]:
        c.ok("SELECT INBOX")
        out = {"fields": c.tagged("a", 'APPEND Drafts CATENATE (URL '
                                  '"/INBOX/;UID=1/;SECTION=HEADER.FIELDS%20(SUBJECT%20X-NOTE)")'),
               "header": c.tagged("b", "APPEND Drafts CATENATE (URL ",
                                  Lit(b";UID=1/;SECTION=HEADER/;PARTIAL=5.20"), ")"),
               "reads": [b"%d" % len(whole_reads)],
               "fetch": c.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT X-NOTE)] "
                             "BODY.PEEK[HEADER]<5.20>)")}
        c.ok("EXAMINE Drafts")
        out["drafts"] = c.ok("UID FETCH 1:2 (BODY.PEEK[])")
        return out

    out = await session(server.imap_port, inbox["email"], key, work)
    assert out["fields"][-1].startswith(b"a OK [APPENDUID "), out["fields"]
    assert out["header"][-1].startswith(b"b OK [APPENDUID "), out["header"]
    fields = b"Subject: kept\r\nX-Note: one\r\n  folded\r\n\r\n"
    header = raw[5:25]
    assert fields in out["fetch"][0] and b"{20}\r\n" + header in out["fetch"][0]
    assert out["drafts"][0].endswith(b"{%d}\r\n" % len(fields) + fields + b")")
    assert out["drafts"][1].endswith(b"{20}\r\n" + header + b")")
    assert out["reads"] == [b"0"]  # by the CATENATEs (FETCH then reads it, to map it)
    assert whole_reads and whole_reads[0] == 1
