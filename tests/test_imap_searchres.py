"""SEARCHRES (RFC 5182) on the real store over real sockets: SEARCH RETURN (SAVE) fills
``$``, which FETCH, STORE, COPY, MOVE, UID EXPUNGE and SEARCH accept (UID forms too) as
the saved messages; expunged ones drop out; SELECT and UNSELECT empty it; MIN/MAX save
only what they return; a failed SEARCH (SAVE) empties it."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.imapwire import Wire
from tests.mailfactory import make_message
from tests.test_imap_e2e import _inbox


async def _five(server, name: str) -> tuple[dict, str]:
    """An inbox holding UIDs 1..5; subjects even/odd by UID."""
    inbox, key = await _inbox(server, name)
    for n in range(1, 6):
        kind = "even" if n % 2 == 0 else "odd"
        await server.deliver(make_message(to=inbox["email"], subject=f"{kind} {n}",
                                          msgid=f"<s{n}@x>"), [inbox["email"]])
    return inbox, key


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
        a = Wire(server.imap_port, inbox["email"], key)
        b = Wire(server.imap_port, inbox["email"], key)
        a.run(b"SELECT INBOX")
        b.run(b"SELECT INBOX")
        out = {"before": a.run(b"FETCH $ (UID)"),
               "save": a.run(b"SEARCH RETURN (SAVE) SUBJECT odd")}
        b.run(b"UID STORE 3 +FLAGS.SILENT (\\Deleted)")
        b.run(b"EXPUNGE")
        out["noop"] = a.run(b"NOOP")
        out["fetch"] = a.run(b"FETCH $ (UID)")
        out["uid-fetch"] = a.run(b"UID FETCH $ (FLAGS)")
        out["search"] = a.run(b"UID SEARCH $ NOT SUBJECT 5")
        out["search-uid"] = a.run(b"SEARCH UID $")
        a.close()
        b.close()
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
    inbox, key = await _five(server, "sr-commands")

    def session():
        w = Wire(server.imap_port, inbox["email"], key)
        w.run(b"CREATE Archive")
        w.run(b"SELECT INBOX")
        out = {"save": w.run(b"UID SEARCH RETURN (SAVE ALL) SUBJECT even"),
               "store": w.run(b"UID STORE $ +FLAGS (\\Flagged)"),
               "copy": w.run(b"UID COPY $ Archive"),
               "move": w.run(b"UID MOVE $ Archive"),
               "after": w.run(b"FETCH $ (UID)"),
               "save2": w.run(b"SEARCH RETURN (SAVE) SUBJECT 5"),
               "delete": w.run(b"STORE $ +FLAGS.SILENT (\\Deleted)"),
               "expunge": w.run(b"UID EXPUNGE $"),
               "left": w.run(b"UID SEARCH ALL")}
        w.run(b"SELECT Archive")
        out["archive"] = w.run(b"UID FETCH 1:* (FLAGS)")
        w.close()
        return out

    out = await deferToThread(session)
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
    inbox, key = await _five(server, "sr-minmax")

    def session():
        w = Wire(server.imap_port, inbox["email"], key)
        w.run(b"SELECT INBOX")
        out = {"min": (w.run(b"SEARCH RETURN (SAVE MIN) ALL"), w.run(b"UID FETCH $ (UID)")),
               "minmax": (w.run(b"UID SEARCH RETURN (MAX SAVE MIN) 2:4"),
                          w.run(b"UID FETCH $ (UID)")),
               "count": (w.run(b"SEARCH RETURN (SAVE COUNT MIN) SUBJECT odd"),
                         w.run(b"UID FETCH $ (UID)"))}
        w.run(b"EXAMINE INBOX")
        out["examine"] = w.run(b"UID FETCH $ (UID)")
        w.run(b"SEARCH RETURN (SAVE) ALL")
        w.run(b"UNSELECT")
        w.run(b"SELECT INBOX")
        out["unselect"] = w.run(b"UID FETCH $ (UID)")
        w.close()
        return out

    out = await deferToThread(session)
    assert re.search(rb"ESEARCH \(TAG \"t\d+\"\) MIN 1\r\n", out["min"][0])
    assert _uids(out["min"][1]) == [1]
    assert re.search(rb"UID MIN 2 MAX 4", out["minmax"][0]), out["minmax"][0]
    assert _uids(out["minmax"][1]) == [2, 4]
    assert re.search(rb"MIN 1 COUNT 3", out["count"][0]), out["count"][0]
    assert _uids(out["count"][1]) == [1, 3, 5]
    assert b"FETCH (" not in out["examine"] and _ok(out["examine"])
    assert b"FETCH (" not in out["unselect"] and _ok(out["unselect"])


@pytest_twisted.ensureDeferred
async def test_dollar_errors_and_a_failed_save(server):
    """``$`` combines with nothing (BAD), is BAD where RFC 5182 does not allow it, and
    a SEARCH (SAVE) that fails leaves it empty (RFC 5182 §2.1)."""
    inbox, key = await _five(server, "sr-errors")

    def session():
        w = Wire(server.imap_port, inbox["email"], key)
        w.run(b"SELECT INBOX")
        w.run(b"SEARCH RETURN (SAVE) ALL")
        out = {"full": w.run(b"UID FETCH $ (UID)"),
               "comma": w.run(b"FETCH 1,$ (UID)"),
               "range": w.run(b"FETCH $:3 (UID)"),
               "kept": w.run(b"UID FETCH $ (UID)"),
               "failed": w.run(b"SEARCH RETURN (SAVE) NOSUCHKEY"),
               "emptied": w.run(b"UID FETCH $ (UID)"),
               "unknown-option": w.run(b"SEARCH RETURN (SAVE FOO) ALL")}
        w.close()
        return out

    out = await deferToThread(session)
    assert _uids(out["full"]) == [1, 2, 3, 4, 5]
    for name in ("comma", "range", "failed", "unknown-option"):
        assert re.search(rb"^t\d+ BAD ", out[name].splitlines()[-1]), out[name]
    assert _uids(out["kept"]) == [1, 2, 3, 4, 5]  # a BAD FETCH does not touch "$"
    assert _uids(out["emptied"]) == [] and _ok(out["emptied"])
