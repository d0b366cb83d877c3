"""LIST ... RETURN (STATUS (...)) (RFC 5819) reads the counters of every listed folder
in one statement, and gives each folder what STATUS gives it; a subscribed name that is
no folder gets no STATUS line."""

from __future__ import annotations

import re

import pytest_twisted

from tests.imap_client import Client, message, new_login, session

_ITEMS = "MESSAGES UNSEEN UIDNEXT UIDVALIDITY RECENT SIZE DELETED HIGHESTMODSEQ"
_BATCH = "FROM folders f LEFT JOIN folder_recent r"  # storage.imap_status


def _status_lines(lines: list[bytes]) -> dict[bytes, bytes]:
    out = {}
    for line in lines:
        m = re.match(rb'\* STATUS ("[^"]*"|\S+) \((.*)\)$', line)
        if m:
            out[m.group(1).strip(b'"')] = m.group(2)
    return out


@pytest_twisted.ensureDeferred
async def test_list_status_matches_status_in_one_statement(server, sent):
    user, key = await new_login(server, "list-status")
    for n in range(4):
        await server.deliver(message(n, f"s{n}", size=100 * n), [user])

    def run(c: Client) -> tuple[list[bytes], list[str], dict[bytes, bytes]]:
        c.tagged("c", "CREATE Work/Sub")
        c.tagged("u", "SUBSCRIBE Gone")
        c.tagged("s", "SELECT INBOX")
        c.tagged("f", "STORE 1:2 +FLAGS (\\Seen)")
        c.tagged("d", "STORE 3 +FLAGS (\\Deleted)")
        c.tagged("cp", "COPY 1:3 Work/Sub")
        c.tagged("x", "UNSELECT")
        sent.clear()
        listed = c.tagged("l", f'LIST (SUBSCRIBED) "" "*" RETURN (STATUS ({_ITEMS}))')
        trace = list(sent)
        one_by_one = {}
        for name in (b"INBOX", b"Sent", b"Trash", b"Work/Sub"):
            one_by_one.update(_status_lines(c.tagged("st", f'STATUS "{name.decode()}" '
                                                           f"({_ITEMS})")))
        listed += c.tagged("l2", f'LIST "" "*" RETURN (STATUS ({_ITEMS}))')
        return listed, trace, one_by_one

    listed, trace, one_by_one = await session(server.imap_port, user, key, run)
    assert listed[-1].startswith(b"l2 OK"), listed
    statuses = _status_lines(listed)
    assert b"Gone" not in statuses  # \NonExistent: a name, not a folder
    assert any(b"Gone" in line and b"\\NonExistent" in line for line in listed), listed
    for name, items in one_by_one.items():
        assert statuses[name] == items, (name, statuses[name], items)
    assert b"MESSAGES 4 UNSEEN 2" in statuses[b"INBOX"] and b"DELETED 1" in statuses[b"INBOX"]
    assert b"MESSAGES 3 " in statuses[b"Work/Sub"]
    assert len([m for m in trace if _BATCH in m]) == 1, trace
    assert not any("FROM messages WHERE org_id = %s AND folder_id = %s" in m
                   for m in trace), trace
