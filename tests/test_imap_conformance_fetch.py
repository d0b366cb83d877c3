"""FETCH conformance: what a session may still say of a message another session expunged
(RFC 3501 §7.4.1, RFC 2180 §4.1.3, RFC 5530 EXPUNGEISSUED), and the section-text forms
of BINARY (``BINARY[HEADER]``, ``[n.MIME]``, ``[n.HEADER.FIELDS (...)]``, ``[TEXT]``),
accepted beyond RFC 3516's grammar as Dovecot accepts them."""

from __future__ import annotations

import base64

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.mail import imapformat
from tests.imap_client import Client, message, new_inbox
from tests.test_imap_protocol import FakeBackend, FakeStore, Session, _big_multipart

# ------------------------------------------------------------------ expunged elsewhere


def _expunged_elsewhere(port: int, user: str, key: str, fetch: str) -> list[bytes]:
    """Two sessions on INBOX holding 3 messages; the second expunges message 2, then the
    first sends ``fetch`` and NOOP; the first session's lines of both."""
    reader = Client(port, user, key)
    writer = Client(port, user, key)
    try:
        for n in range(1, 4):
            writer.append("INBOX", message(n, f"m{n}"))
        reader.ok("SELECT INBOX")
        writer.ok("SELECT INBOX")
        writer.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        writer.ok("EXPUNGE")
        writer.logout()
        return reader.cmd(fetch) + reader.cmd("NOOP")
    finally:
        reader.close()


@pytest_twisted.ensureDeferred
async def test_fetch_of_view_data_for_a_message_expunged_elsewhere_succeeds(server):
    """UID, FLAGS and MODSEQ are what the session itself knows of a message the client
    still holds: they are answered, the FETCH is OK, the EXPUNGE waits for NOOP."""
    inbox, key = await new_inbox(server, "expview")
    got = await deferToThread(_expunged_elsewhere, server.imap_port, inbox["email"], key,
                              "FETCH 2 (UID FLAGS)")
    assert got[0].startswith(b"* 2 FETCH (UID 2 FLAGS ("), got
    assert got[1].split(b" ")[1] == b"OK", got
    assert got[2:] == [b"* 2 EXPUNGE", got[-1]] and b" OK " in got[-1], got


@pytest_twisted.ensureDeferred
async def test_fetch_needing_the_stored_message_still_says_expungeissued(server):
    """RFC822.SIZE needs the stored row: the messages that exist are answered, the gone
    one is not, and the FETCH ends NO [EXPUNGEISSUED]."""
    inbox, key = await new_inbox(server, "expsize")
    got = await deferToThread(_expunged_elsewhere, server.imap_port, inbox["email"], key,
                              "FETCH 1:3 (UID RFC822.SIZE)")
    fetched = [line for line in got if b" FETCH " in line]
    assert [line.split(b" ")[1] for line in fetched] == [b"1", b"3"], got
    done = got[len(fetched)]
    assert done.split(b" ")[1:3] == [b"NO", b"[EXPUNGEISSUED]"], got
    assert b"* 2 EXPUNGE" in got[len(fetched) + 1:], got


# ------------------------------------------------------------------ BINARY section texts

MIME = (b"From: a@example.org\r\nSubject: outer\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\nprologue\r\n'
        b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"hello\x00world") +
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: in@example.org\r\nSubject: inner\r\nX-Foo: 1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n"
        b"--b--\r\n")


@pytest.fixture
def fake() -> FakeStore:
    return FakeStore()


def _binary_session(store: FakeStore, threshold: int = 10**9) -> tuple[Session, int]:
    uid = store.deliver("INBOX", MIME)
    return Session(FakeBackend(store), stream_threshold=threshold).selected(), uid


def _fetch(s: Session, uid: int, items: str) -> bytes:
    s.raw()
    s.send(f"f UID FETCH {uid} ({items})\r\n".encode())
    out = s.raw()
    assert out.endswith(b"f OK FETCH completed\r\n"), out
    return out


def _fetch_body(spec: str) -> bytes:
    """BODY[spec] of MIME."""
    return imapformat.section(MIME, spec)


@pytest.mark.parametrize("spec", ["HEADER", "2.HEADER", "1.MIME", "2.MIME",
                                  "2.HEADER.FIELDS (SUBJECT X-FOO)",
                                  "2.HEADER.FIELDS.NOT (SUBJECT)", "1.HEADER", "9.MIME"])
def test_binary_header_sections_are_the_body_sections(fake, spec):
    """Headers have no transfer encoding to undo: BINARY[...] of a header section is
    the BODY[...] octets, BINARY.SIZE their length."""
    s, uid = _binary_session(fake)
    expected = _fetch_body(spec)
    got = _fetch(s, uid, f"BINARY.PEEK[{spec}] BINARY.SIZE[{spec}]")
    assert (b"BINARY[%s] {%d}\r\n" % (spec.encode(), len(expected)) + expected +
            b" BINARY.SIZE[%s] %d)" % (spec.encode(), len(expected))) in got, got


def test_binary_text_of_a_single_part_message_is_decoded(fake):
    """[2.TEXT] is the encapsulated message's body, its quoted-printable undone (the
    CRLF before the boundary is the delimiter's, RFC 2046 §5.1.1)."""
    s, uid = _binary_session(fake)
    got = _fetch(s, uid, "BINARY.PEEK[2.TEXT] BINARY.SIZE[2.TEXT]")
    text = "café".encode()
    assert b"BINARY[2.TEXT] {%d}\r\n%s BINARY.SIZE[2.TEXT] %d)" % (
        len(text), text, len(text)) in got, got


def test_binary_text_of_a_multipart_is_returned_as_it_is(fake):
    """A multipart has only identity encodings (RFC 2045 §6.4): BINARY[TEXT] is the
    BODY[TEXT] octets, the base64 part inside still encoded under its own header."""
    s, uid = _binary_session(fake)
    text = _fetch_body("TEXT")
    got = _fetch(s, uid, "BINARY.PEEK[TEXT]<0.20> BINARY.SIZE[TEXT]")
    assert b"BINARY[TEXT]<0> {20}\r\n" + text[:20] + b" BINARY.SIZE[TEXT] %d)" % len(text) \
        in got, got


def test_binary_header_section_partial_and_seen(fake):
    """A partial range applies to the header octets; without PEEK it sets \\Seen."""
    s, uid = _binary_session(fake)
    header = _fetch_body("HEADER")
    got = _fetch(s, uid, "BINARY[HEADER]<5.10>")
    assert b"BINARY[HEADER]<5> {10}\r\n" + header[5:15] in got, got
    assert b"\\Seen" in got, got


@pytest.mark.parametrize("items", ["BINARY.SIZE[HEADER]<0.5>", "BINARY[1.TEXTX]",
                                   "BINARY[MIME]", "BINARY[HEADER.FIELDS]",
                                   "BINARY[0.HEADER]", "BINARY[HEADER.FIELDS ()]"])
def test_bad_binary_sections_are_bad(fake, items):
    s, uid = _binary_session(fake)
    s.raw()
    s.send(f"f UID FETCH {uid} ({items})\r\n".encode())
    assert s.raw().startswith(b"f BAD "), items


@pytest.mark.parametrize("items", [
    "BINARY.PEEK[HEADER]", "BINARY.PEEK[2.HEADER.FIELDS (SUBJECT)]", "BINARY.SIZE[1.MIME]",
    "BINARY.PEEK[TEXT]<2.300000>", "BINARY.SIZE[TEXT]", "BINARY.PEEK[2.TEXT]",
    "BINARY.SIZE[3.TEXT]", "BINARY.PEEK[9.9.TEXT]"])
def test_streamed_binary_sections_equal_sliced(fake, items):
    """From the section map of a large message (no whole read) the answer is the same
    as from the message in memory."""
    raw = _big_multipart(900_000)
    uid = fake.deliver("INBOX", raw)
    sliced = Session(FakeBackend(fake), stream_threshold=10**9).selected()
    expected = _fetch(sliced, uid, items)
    fake.calls.clear()
    streamed = Session(FakeBackend(fake), stream_threshold=1000).selected()
    assert _fetch(streamed, uid, items) == expected
    assert ("fetch_raw", uid) not in fake.calls


def test_binary_size_of_a_large_header_section_is_its_length(fake):
    """BINARY.SIZE[HEADER] of a streamed message counts the header octets."""
    raw = _big_multipart(900_000)
    uid = fake.deliver("INBOX", raw)
    s = Session(FakeBackend(fake), stream_threshold=1000).selected()
    header = raw[:raw.index(b"\r\n\r\n") + 4]
    assert b"BINARY.SIZE[HEADER] %d)" % len(header) in _fetch(s, uid, "BINARY.SIZE[HEADER]")
