"""A hostile client's input at the IMAP door: what it may not make the server say, keep
open or name. Transcripts over StringTransport and task.Clock (see test_imap_protocol.py).

- Error texts quote the client (``Bad date x``); a literal may hold CRLF, and once made
  that quote a second, forged response line (``* OK [ALERT] ...``).
- A continuation line (AUTHENTICATE's response, IDLE's DONE) that was too long ended
  the command with its tail, and the client's next command was swallowed as the rest.
- Before login, every command restarted the login timer: a NOOP a minute held a
  connection slot for ever.
- UIDs past 32 bits were taken (``UID FETCH 1:4294967296`` answered as ``1:*``).
- Mailbox names that are not the one modified UTF-7 spelling (bytes that are not UTF-8,
  ``&AGE-`` for "a", two base64 runs in a row) reached a folder named otherwise.
"""

from __future__ import annotations

import base64

import pytest

from agentpost.imap import parser
from agentpost.model import errors
from tests.test_imap_protocol import FakeBackend, Session, store  # noqa: F401 - fixture

FORGED = b"x\r\n* OK [ALERT] forged\r\nmore"


def _lit(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


@pytest.mark.parametrize("command", [
    b"a SEARCH BEFORE " + _lit(FORGED),
    b"a SEARCH SINCE " + _lit(b"\x00"),
    b"a CANCELUPDATE " + _lit(FORGED),
    b"a SEARCH ON " + _lit(FORGED),
    b"a STATUS INBOX (" + _lit(FORGED) + b")",
    b"a THREAD " + _lit(FORGED) + b" UTF-8 ALL",
])
def test_a_literal_in_an_error_text_stays_on_its_line(store, command):  # noqa: F811
    s = Session(FakeBackend(store)).selected()
    s.send(command + b"\r\n")
    out = s.raw()
    assert out.endswith(b"\r\n") and out.count(b"\r\n") == 1, out
    assert out.startswith(b"a ") and b"\x00" not in out, out
    assert s.cmd("b NOOP") == ["b OK NOOP completed"]


def test_an_overlong_authenticate_response_does_not_swallow_the_next_command():
    s = Session()
    s.lines()
    assert s.cmd("a AUTHENTICATE PLAIN") == ["+ "]
    s.send(b"A" * 300_000)
    assert s.lines() == ["* BAD Command line too long"]
    s.send(b"A" * 1000 + b"\r\nb NOOP\r\n")
    assert s.lines() == ["a BAD Malformed PLAIN response", "b OK NOOP completed"]
    plain = base64.b64encode(b"\0agent@example.com\0secret").decode()
    assert s.cmd(f"c AUTHENTICATE PLAIN {plain}")[-1].startswith("c OK")


def test_an_overlong_line_during_idle_ends_it_and_the_next_command_runs(store):  # noqa: F811
    s = Session(FakeBackend(store)).selected()
    assert s.cmd("a IDLE") == ["+ idling"]
    s.send(b"D" * 300_000 + b"DONE\r\nb NOOP\r\n")
    assert s.lines() == ["* BAD Command line too long", "a BAD Expected DONE",
                         "b OK NOOP completed"]


def test_an_overlong_line_pipelined_with_more_commands_skips_only_itself(store):  # noqa: F811
    s = Session(FakeBackend(store)).selected()
    s.send(b"a NOOP " + b"x" * 300_000 + b"\r\nb NOOP\r\nc NOOP\r\n")
    assert s.lines() == ["* BAD Command line too long", "a BAD [TOOBIG] Command line too long",
                         "b OK NOOP completed", "c OK NOOP completed"]
    s.send(b"d NOOP " + b"x" * 600_000 + b" {3+}\r\nabc\r\ne NOOP\r\n")
    assert s.lines() == ["* BAD Command line too long", "d BAD [TOOBIG] Command line too long",
                         "e OK NOOP completed"]  # its literal was skipped as part of it


def test_commands_before_login_do_not_extend_the_time_to_log_in():
    s = Session(login_timeout_s=120.0)
    s.lines()
    for _ in range(2):
        s.clock.advance(50)
        assert s.cmd("n NOOP") == ["n OK NOOP completed"]
    s.clock.advance(19)  # 119 s after the greeting
    assert s.lines() == [] and not s.transport.disconnecting
    s.clock.advance(2)
    assert s.lines() == ["* BYE Autologout; idle for too long"]
    assert s.transport.disconnecting
    s = Session(login_timeout_s=120.0)
    s.lines()
    s.clock.advance(100)
    s.login()  # logged in within the time: the autologout timer takes over
    s.clock.advance(29 * 60)
    assert s.cmd("n NOOP") == ["n OK NOOP completed"] and not s.transport.disconnecting


@pytest.mark.parametrize("wire", [
    "&AGE-",  # "a", which must stand for itself
    "x&AOl-",  # non-zero spare bits
    "&AOk-&AOk-",  # two runs in a row: "éé" is &AOkA6Q-
    "&2D3-",  # a lone high surrogate
    "\ufffd",  # what the tokenizer makes of bytes that are not UTF-8
])
def test_only_the_one_modified_utf7_spelling_is_a_mailbox_name(wire):
    with pytest.raises(errors.InvalidRequest):
        parser.decode_mailbox(wire)


@pytest.mark.parametrize("name", ["Entw&APw-rfe &- Co", "&AOkA6Q-", "&2D3cAA-",
                                  "&-&AOk-", "&AOk-&-", "a&AOk-b&AOk-", "INBOX/&AOk-"])
def test_every_canonical_name_round_trips(name):
    assert parser.encode_mailbox(parser.decode_mailbox(name)) == name


@pytest.mark.parametrize("wire", [b"\xff\xfe", b"&AGE-", b"&AOk-&AOk-", b"{2+}\r\n\xc3("])
def test_create_of_a_name_that_is_not_modified_utf7_is_no(store, wire):  # noqa: F811
    s = Session(FakeBackend(store)).login()
    before = set(store.folders)
    s.send(b"a CREATE " + wire + b"\r\n")
    assert s.lines() == ["a NO [CANNOT] Mailbox name is not valid modified UTF-7"]
    assert set(store.folders) == before
    assert s.cmd("b CREATE &AOkA6Q-") == ["b OK CREATE completed"]
    assert "éé" in store.folders


@pytest.mark.parametrize("command", ["a UID FETCH 1:4294967296 FLAGS",
                                     "a UID FETCH 4294967296 FLAGS",
                                     "a UID SEARCH UID 4294967296:*",
                                     "a UID STORE 99999999999 +FLAGS (x)",
                                     "a UID EXPUNGE 4294967296"])
def test_uids_beyond_32_bits_are_bad(store, command):  # noqa: F811
    """nz-number is 32-bit (RFC 3501 §9), as Dovecot answers: ``1:4294967296`` was
    taken, and answered as if it were ``1:*``."""
    s = Session(FakeBackend(store)).selected()
    assert s.cmd(command) == [
        f"a BAD Sequence numbers and UIDs are at most {parser.MAX_NZ_NUMBER}"]
    reply = s.cmd("b UID FETCH 1:4294967295 FLAGS")
    assert len(reply) == 4 and reply[-1] == "b OK FETCH completed"
