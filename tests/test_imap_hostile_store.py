"""A hostile tenant at the IMAP door, on the real store (PostgreSQL, real sockets).

- CREATE had no cap: one session could add folders (rows, and lines of every LIST of
  the inbox) without end; subscriptions already had one.
- CLOSE after DELETE of the selected folder answered NO and stayed selected.
- A stored NUL went out in ``{n}`` literals (BODY[], ENVELOPE), where RFC 3501 allows
  every octet but NUL.
- A mailbox name in bytes that are not UTF-8 created a folder named with U+FFFD (so
  ``\\xff\\xfe`` and ``\\xfe\\xff`` were one folder), and ``&AGE-`` one named "a".
"""

from __future__ import annotations

import re

import pytest_twisted

from agentpost.imap.commands.fetch import STREAM_CHUNK_BYTES
from agentpost.imap.server import STREAM_THRESHOLD_BYTES
from agentpost.storage.imap import MAX_FOLDERS_PER_INBOX
from tests.imap_client import Client, new_login, session


def _pipelined(client: Client, commands: list[bytes]) -> list[bytes]:
    """Send every command at once (tags p0, p1, ...); the tagged answers, in order."""
    client.send(b"".join(b"p%d %s\r\n" % (i, c) for i, c in enumerate(commands)))
    return [client.response(f"p{i}")[-1] for i in range(len(commands))]


@pytest_twisted.ensureDeferred
async def test_an_inbox_holds_a_bounded_number_of_folders(server):
    user, key = await new_login(server, "folders")

    def work(imap: Client) -> tuple[int, list[bytes], list[bytes], int]:
        system = len(imap.ok('LIST "" *'))
        answers = _pipelined(imap, [b"CREATE f%d" % i for i in range(MAX_FOLDERS_PER_INBOX)])
        refused = [a for a in answers if b" OK " not in a]
        more = imap.cmd("CREATE one-more") + imap.cmd("CREATE deep/er/still")
        listed = len(imap.ok('LIST "" *'))
        return system, refused, more, listed

    system, refused, more, listed = await session(server.imap_port, user, key, work)
    # The system folders count: the last ones of the batch are refused, nothing else is.
    assert len(refused) == system, refused[:3]
    assert all(b"NO [CANNOT] An inbox holds at most" in a for a in refused)
    assert [line.split(b" ", 2)[1] for line in more] == [b"NO", b"NO"], more
    assert listed == MAX_FOLDERS_PER_INBOX

    def after_delete(imap: Client) -> list[bytes]:
        imap.ok("DELETE f0")
        return imap.cmd("CREATE one-more")

    assert (await session(server.imap_port, user, key, after_delete))[-1].split(b" ")[1] == b"OK"


@pytest_twisted.ensureDeferred
async def test_mailbox_names_that_are_not_modified_utf7_create_nothing(server):
    user, key = await new_login(server, "names")

    def work(imap: Client) -> tuple[list[list[bytes]], list[bytes]]:
        answers = [imap.cmd(b"CREATE " + name)
                   for name in (b"\xff\xfe", b"\xfe\xff", b"&AGE-", b"&AOk-&AOk-")]
        imap.ok("CREATE &AOkA6Q-")
        answers.append(imap.cmd(b"SELECT &AOk-&AOk-"))
        return answers, imap.ok('LIST "" *')

    answers, listed = await session(server.imap_port, user, key, work)
    for answer in answers:
        assert answer[-1].endswith(b" NO [CANNOT] Mailbox name is not valid modified UTF-7"), \
            answer
    names = [line.rsplit(b" ", 1)[1] for line in listed]
    assert b'"&AOkA6Q-"' in names
    assert not any(b"&,,3" in n or n == b'"a"' for n in names), names


@pytest_twisted.ensureDeferred
async def test_close_after_deleting_the_selected_folder_leaves_it(server):
    """CLOSE has no NO (RFC 3501 §6.4.2); it answered ``NO [NONEXISTENT]`` and kept the
    session selected on a folder that was gone."""
    user, key = await new_login(server, "ghost")

    def work(imap: Client) -> tuple[list[bytes], list[bytes], list[bytes]]:
        imap.ok("CREATE Sub")
        imap.ok("SELECT Sub")
        imap.tagged("ap", "APPEND Sub (\\Deleted) {11+}\r\nSubject: x\r\n")
        imap.ok("DELETE Sub")
        return imap.cmd("CLOSE"), imap.cmd("FETCH 1 FLAGS"), imap.cmd("EXAMINE INBOX")

    closed, fetched, examined = await session(server.imap_port, user, key, work)
    assert closed[-1].endswith(b" OK CLOSE completed"), closed
    assert fetched[-1].endswith(b" BAD No mailbox selected"), fetched
    assert examined[-1].split(b" ")[1] == b"OK", examined


def _literals(line: bytes) -> list[bytes]:
    """The octets of every ``{n}`` literal (not literal8) in a response line."""
    out, pos = [], 0
    while (m := re.compile(rb"(?<!~)\{(\d+)\}\r\n").search(line, pos)) is not None:
        out.append(line[m.end():m.end() + int(m.group(1))])
        pos = m.end() + int(m.group(1))
    return out


@pytest_twisted.ensureDeferred
async def test_no_nul_octet_is_sent_in_a_literal(server):
    """A literal is CHAR8, NUL excluded (RFC 3501 §9): a stored NUL goes out as 0x80 in
    body sections (as Dovecot), as U+FFFD in ENVELOPE and BODYSTRUCTURE text (mime_tree,
    also as Dovecot; the wire's "?" stays a last guard), and as it is
    only in BINARY's literal8. Sizes stay those of the stored message."""
    user, key = await new_login(server, "nul")
    small = (b"Subject: a\x00b\r\nFrom: \x00<a\x00@b.example>\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: text/plain; name=\"n\x00.txt\"\r\n"
             b"Content-Transfer-Encoding: binary\r\n\r\nx\x00y\r\n")
    big = small + b"z" * (STREAM_THRESHOLD_BYTES + 2 * STREAM_CHUNK_BYTES) + b"\x00\r\n"

    def work(imap: Client) -> list[list[bytes]]:
        imap.append("INBOX", small)
        imap.append("INBOX", big)
        imap.ok("SELECT INBOX")
        return [imap.ok(f"FETCH {n} (RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[] "
                        "BODY.PEEK[HEADER] BODY.PEEK[1]<1.10> BINARY.PEEK[1])")
                for n in (1, 2)]

    fetched = await session(server.imap_port, user, key, work)
    for raw, lines in zip((small, big), fetched, strict=True):
        line = b"".join(lines)
        assert b"RFC822.SIZE %d " % len(raw) in line
        literals = _literals(line)
        assert literals and not any(b"\x00" in lit for lit in literals)
        assert raw.replace(b"\x00", b"\x80") in literals  # BODY[], its octets otherwise kept
        # ENVELOPE, BODYSTRUCTURE: U+FFFD, as Dovecot renders a NUL there
        assert b"a\xef\xbf\xbdb" in line and b"n\xef\xbf\xbd.txt" in line
        assert b"BINARY[1] ~{" in line and raw.split(b"\r\n\r\n", 1)[1] in line
