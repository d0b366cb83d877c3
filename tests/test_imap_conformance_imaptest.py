"""IMAP behaviour found wrong by running Dovecot's imaptest scripts (and Dovecot beside
us as a reference) against AgentPost, over real sockets on the real store.

LIST with a pattern ending in "%" returns the levels of hierarchy it matches, \\Noselect
when they are no mailbox (RFC 3501 §6.3.8): a parent DELETEd while its children stay
must still be reached by "%" browsing; it used to vanish from LIST, hiding its children.

SEARCH HEADER and SEARCH TEXT compare against the header as text: a folded field
unfolded (RFC 5322 §2.2.3), each field its ``Name: value`` (RFC 3501 §6.4.4 TEXT:
"contain the specified string in the header or body"). They used to read the stored
value with its line breaks, and TEXT the jsonb serialisation of the header list, whose
quoting (``\\"``, ``\\\\``, ``\\r\\n``, ``", "``) a search string either never matched
or matched by accident."""

from __future__ import annotations

import pytest_twisted

from tests.imap_client import Client, new_inbox, session

_FOLDED = (b"From: \"Bob B\" <bob@example.org>\r\n"
           b"Subject: first\r\n"
           b"X-Path: C:\\dir\\file\r\n"
           b"X-Long: this header is folded\r\n"
           b"  across two lines\r\n"
           b"\r\n"
           b"plain body\r\n")
_PLAIN = (b"From: other@example.org\r\n"
          b"Subject: a \"quoted\" subject\r\n"
          b"X-Long: short\r\n"
          b"\r\n"
          b"nothing here\r\n")


async def _searches(server, name: str, commands: list[str]) -> list[bytes]:
    """The ``* SEARCH`` line of each command, on a mailbox holding the two messages."""
    inbox, key = await new_inbox(server, name)

    def work(c: Client) -> list[bytes]:
        c.append("INBOX", _FOLDED)
        c.append("INBOX", _PLAIN)
        c.ok("SELECT INBOX")
        out = []
        for command in commands:
            lines = c.ok(command)
            out.append(next(ln for ln in lines if ln.startswith(b"* SEARCH")))
        return out

    return await session(server.imap_port, inbox["email"], key, work)


@pytest_twisted.ensureDeferred
async def test_search_header_matches_across_the_fold_of_a_folded_field(server):
    got = await _searches(server, "hdrfold", [
        'SEARCH HEADER X-Long "folded  across"',  # the unfolded value: CRLF removed
        'SEARCH HEADER X-Long "folded across"',   # no whitespace is collapsed
        'SEARCH HEADER X-Long "two lines"',
        'SEARCH HEADER X-Path "C:\\\\dir"'])
    assert got == [b"* SEARCH 1", b"* SEARCH", b"* SEARCH 1", b"* SEARCH 1"], got


@pytest_twisted.ensureDeferred
async def test_search_text_reads_the_header_as_name_colon_value_lines(server):
    got = await _searches(server, "textlines", [
        'SEARCH TEXT "X-Long: this"',           # a field's name and value together
        'SEARCH TEXT "folded  across"',         # across a fold
        'SEARCH TEXT "C:\\\\dir"',              # a backslash, not the jsonb's doubled one
        'SEARCH TEXT "a \\"quoted\\" subject"',  # quotes, not the jsonb's escaped ones
        'SEARCH TEXT "\\", \\""',               # the jsonb's separator is no header text
        'SEARCH TEXT "nothing here"'])          # the body side is unchanged
    assert got == [b"* SEARCH 1", b"* SEARCH 1", b"* SEARCH 1", b"* SEARCH 2",
                   b"* SEARCH", b"* SEARCH 2"], got


@pytest_twisted.ensureDeferred
async def test_list_percent_returns_a_deleted_parent_noselect_so_its_children_are_reached(
        server):
    inbox, key = await new_inbox(server, "pctlevels")

    def work(c: Client) -> dict[str, list[bytes]]:
        c.ok("CREATE Top/Mid/Leaf")
        c.ok("CREATE Top/Side")
        c.ok("DELETE Top")       # RFC 3501 §6.3.4: the children stay
        c.ok("DELETE Top/Mid")
        return {"top": c.ok('LIST "" %'), "mid": c.ok('LIST "" Top/%'),
                "star": c.ok('LIST "" Top*'),
                "status": c.ok('LIST "" T% RETURN (STATUS (MESSAGES))')}

    got = await session(server.imap_port, inbox["email"], key, work)
    assert b'* LIST (\\HasChildren \\Noselect) "/" "Top"' in got["top"], got["top"]
    assert got["mid"] == [b'* LIST (\\HasChildren \\Noselect) "/" "Top/Mid"',
                          b'* LIST (\\HasNoChildren) "/" "Top/Side"'], got["mid"]
    # "*" owes no hierarchy level (only a trailing "%" does): the mailboxes alone
    assert got["star"] == [b'* LIST (\\HasNoChildren) "/" "Top/Mid/Leaf"',
                           b'* LIST (\\HasNoChildren) "/" "Top/Side"'], got["star"]
    # a level with no mailbox has no STATUS
    assert [ln for ln in got["status"] if b"Top" in ln] == [
        b'* LIST (\\HasChildren \\Noselect) "/" "Top"'], got["status"]
