"""SEARCHRES (RFC 5182) on the real store over real sockets: SEARCH RETURN (SAVE) fills
``$``, which FETCH, STORE, COPY, MOVE, UID EXPUNGE and SEARCH accept (UID forms too) as
the saved messages; expunged ones drop out; SELECT and UNSELECT empty it; MIN/MAX save
only what they return; a failed SEARCH (SAVE) empties it."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.imap_client import Client, new_inbox, session
from tests.mailfactory import make_message


async def _five(server, name: str) -> tuple[dict, str]:
    """An inbox holding UIDs 1..5; subjects even/odd by UID."""
    inbox, key = await new_inbox(server, name)
    for n in range(1, 6):
        kind = "even" if n % 2 == 0 else "odd"
        await server.deliver(make_message(to=inbox["email"], subject=f"{kind} {n}",
                                          msgid=f"<s{n}@x>"), [inbox["email"]])
    return inbox, key


async def _selected(server, name: str,
                    steps: list[tuple[str | None, bytes]]) -> dict[str, bytes]:
    """On an inbox as :func:`_five` makes, with INBOX selected: the transcript of each
    ``(name, command)`` step by its name (a step named None is only run)."""
    inbox, key = await _five(server, name)

    def run(c: Client) -> dict[str, bytes]:
        c.transcript(b"SELECT INBOX")
        out = {}
        for step, command in steps:
            response = c.transcript(command)
            if step is not None:
                out[step] = response
        return out

    return await session(server.imap_port, inbox["email"], key, run)


def _uids(response: bytes) -> list[int]:
    return [int(u) for u in re.findall(rb"\* \d+ FETCH \(UID (\d+)", response)]


def _ok(response: bytes) -> bool:
    return re.search(rb"^t\d+ OK", response.splitlines()[-1]) is not None


@pytest_twisted.ensureDeferred
async def test_saved_result_survives_an_expunge_by_another_session(server):
    """SAVE alone answers no ESEARCH; FETCH $ names the saved messages by UID, so after
    another session expunged one (and we were told) the rest still match; ``$``
    before any SAVE is empty, not an error."""
    inbox, key = await _five(server, "sr-expunge")

    def sessions():
        a = Client(server.imap_port, inbox["email"], key)
        b = Client(server.imap_port, inbox["email"], key)
        a.transcript(b"SELECT INBOX")
        b.transcript(b"SELECT INBOX")
        out = {"before": a.transcript(b"FETCH $ (UID)"),
               "save": a.transcript(b"SEARCH RETURN (SAVE) SUBJECT odd")}
        b.transcript(b"UID STORE 3 +FLAGS.SILENT (\\Deleted)")
        b.transcript(b"EXPUNGE")
        out["noop"] = a.transcript(b"NOOP")
        out["fetch"] = a.transcript(b"FETCH $ (UID)")
        out["uid-fetch"] = a.transcript(b"UID FETCH $ (FLAGS)")
        out["search"] = a.transcript(b"UID SEARCH $ NOT SUBJECT 5")
        out["search-uid"] = a.transcript(b"SEARCH UID $")
        a.logout()
        b.logout()
        return out

    out = await deferToThread(sessions)
    assert _ok(out["before"]) and b"* " not in out["before"]
    assert _ok(out["save"]) and b"ESEARCH" not in out["save"] and b"* SEARCH" not in out["save"]
    assert b"* 3 EXPUNGE" in out["noop"]
    assert _uids(out["fetch"]) == [1, 5] and b"* 4 FETCH (UID 5)" in out["fetch"]
    assert re.findall(rb"UID (\d+)", out["uid-fetch"]) == [b"1", b"5"]
    assert b"* SEARCH 1\r\n" in out["search"]
    assert b"* SEARCH 1 4\r\n" in out["search-uid"]  # sequence numbers of UIDs 1 and 5


@pytest_twisted.ensureDeferred
async def test_dollar_in_uid_store_copy_move_and_expunge(server):
    """``$`` is the saved set in UID STORE, UID COPY, UID MOVE and UID EXPUNGE; moved
    messages drop out of it."""

    out = await _selected(server, "sr-commands", [
        (None, b"CREATE Archive"),
        ("save", b"UID SEARCH RETURN (SAVE ALL) SUBJECT even"),
        ("store", b"UID STORE $ +FLAGS (\\Flagged)"),
        ("copy", b"UID COPY $ Archive"),
        ("move", b"UID MOVE $ Archive"),
        ("after", b"FETCH $ (UID)"),
        ("save2", b"SEARCH RETURN (SAVE) SUBJECT 5"),
        ("delete", b"STORE $ +FLAGS.SILENT (\\Deleted)"),
        ("expunge", b"UID EXPUNGE $"),
        ("left", b"UID SEARCH ALL"),
        (None, b"SELECT Archive"),
        ("archive", b"UID FETCH 1:* (FLAGS)")])
    assert re.search(rb"\* ESEARCH \(TAG \"t\d+\"\) UID ALL 2,4", out["save"]), out["save"]
    assert re.findall(rb"FETCH \(UID (\d+) FLAGS \(\\Flagged", out["store"]) == [b"2", b"4"], \
        out["store"]
    assert re.search(rb"OK \[COPYUID \d+ 2,4 1:2\]", out["copy"]), out["copy"]
    assert re.search(rb"\[COPYUID \d+ 2,4 3:4\]", out["move"]) and _ok(out["move"])
    assert _ok(out["after"]) and b"* " not in out["after"]
    assert re.search(rb"\* \d+ EXPUNGE", out["expunge"]), out["expunge"]
    assert b"* SEARCH 1 3\r\n" in out["left"]
    assert len(re.findall(rb"\* \d+ FETCH", out["archive"])) == 4


@pytest_twisted.ensureDeferred
async def test_min_max_save_only_what_they_return_and_select_resets(server):
    """RFC 5182 §2.4: SAVE with MIN and/or MAX keeps those; with COUNT or ALL, every
    match. SELECT, EXAMINE and UNSELECT empty ``$``."""

    out = await _selected(server, "sr-minmax", [
        ("min", b"SEARCH RETURN (SAVE MIN) ALL"), ("min$", b"UID FETCH $ (UID)"),
        ("minmax", b"UID SEARCH RETURN (MAX SAVE MIN) 2:4"), ("minmax$", b"UID FETCH $ (UID)"),
        ("count", b"SEARCH RETURN (SAVE COUNT MIN) SUBJECT odd"),
        ("count$", b"UID FETCH $ (UID)"),
        (None, b"EXAMINE INBOX"),
        ("examine", b"UID FETCH $ (UID)"),
        (None, b"SEARCH RETURN (SAVE) ALL"),
        (None, b"UNSELECT"),
        (None, b"SELECT INBOX"),
        ("unselect", b"UID FETCH $ (UID)")])
    assert re.search(rb"ESEARCH \(TAG \"t\d+\"\) MIN 1\r\n", out["min"])
    assert _uids(out["min$"]) == [1]
    assert re.search(rb"UID MIN 2 MAX 4", out["minmax"]), out["minmax"]
    assert _uids(out["minmax$"]) == [2, 4]
    assert re.search(rb"MIN 1 COUNT 3", out["count"]), out["count"]
    assert _uids(out["count$"]) == [1, 3, 5]
    assert b"FETCH (" not in out["examine"] and _ok(out["examine"])
    assert b"FETCH (" not in out["unselect"] and _ok(out["unselect"])


@pytest_twisted.ensureDeferred
async def test_dollar_errors_and_a_failed_save(server):
    """``$`` combines with nothing (BAD), is BAD where RFC 5182 does not allow it, and
    a SEARCH (SAVE) that fails leaves it empty (RFC 5182 §2.1)."""

    out = await _selected(server, "sr-errors", [
        (None, b"SEARCH RETURN (SAVE) ALL"),
        ("full", b"UID FETCH $ (UID)"),
        ("comma", b"FETCH 1,$ (UID)"),
        ("range", b"FETCH $:3 (UID)"),
        ("kept", b"UID FETCH $ (UID)"),
        ("failed", b"SEARCH RETURN (SAVE) NOSUCHKEY"),
        ("emptied", b"UID FETCH $ (UID)"),
        ("unknown-option", b"SEARCH RETURN (SAVE FOO) ALL")])
    assert _uids(out["full"]) == [1, 2, 3, 4, 5]
    for name in ("comma", "range", "failed", "unknown-option"):
        assert re.search(rb"^t\d+ BAD ", out[name].splitlines()[-1]), out[name]
    assert _uids(out["kept"]) == [1, 2, 3, 4, 5]  # a BAD FETCH does not touch "$"
    assert _uids(out["emptied"]) == [] and _ok(out["emptied"])
