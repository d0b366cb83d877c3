"""INTERNALDATE keeps the zone an APPEND gave it (issue 10), as Dovecot does: FETCH
INTERNALDATE answers with the same date-time, SEARCH BEFORE/ON/SINCE compare the date
as that zone shows it (RFC 3501 §6.4.4), COPY and MOVE keep it, MULTIAPPEND stores it;
mail delivered over SMTP has no given zone and shows +0000; the API's received_at stays
the UTC instant. imaplib (and the raw client for MULTIAPPEND) over real sockets."""

from __future__ import annotations

import re

import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.imap.parser import ParseError, parse_datetime
from agentpost.imap.wire import internaldate
from tests.imap_client import Client, Lit, session
from tests.mailfactory import make_message
from tests.test_imap_e2e import _inbox, _starttls
from tests.test_mx import _send

#: Near midnight, so the zone's date and the UTC date differ.
_EAST = "03-Dec-2026 00:30:00 +0200"   # 02-Dec 22:30 UTC; the zone's date is 03-Dec
_WEST = "02-Dec-2026 23:30:00 -0800"   # 03-Dec 07:30 UTC; the zone's date is 02-Dec
_HALF = "01-Jan-2027 00:15:00 +0530"   # 31-Dec-2026 18:45 UTC; the zone's date is 01-Jan
_DATES = (_EAST, _WEST, _HALF)


def _msg(n: int) -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: z{n}\r\n"
            f"Message-ID: <z{n}@example.com>\r\n\r\nbody {n}\r\n").encode()


def _dates(imap, which: str = "1:*") -> list[str]:
    typ, data = imap.fetch(which, "(INTERNALDATE)")
    assert typ == "OK", data
    return [re.search(rb'INTERNALDATE "([^"]+)"', d).group(1).decode() for d in data]


def _search(imap, criteria: str) -> str:
    typ, data = imap.search(None, criteria)
    assert typ == "OK", data
    return data[0].decode()


def test_the_date_time_keeps_its_zone_and_renders_in_it():
    for text in (*_DATES, "17-Jul-1996 02:44:25 +0000", "01-Feb-2020 10:00:00 -0030"):
        assert internaldate(parse_datetime(text)) == f'"{text}"'
    try:
        parse_datetime("01-Feb-2020 10:00:00 +2400")  # a zone of a day is no zone
    except ParseError:
        pass
    else:
        raise AssertionError("a +2400 zone was accepted")


@pytest_twisted.ensureDeferred
async def test_append_fetch_search_copy_move_keep_the_zone(server):
    inbox, key = await _inbox(server, "zones")

    def run():
        imap = _starttls(server.imap_port, inbox["email"], key)
        for box in ("Zones", "Copied", "Moved"):
            assert imap.create(box)[0] == "OK"
        for n, when in enumerate(_DATES, 1):
            typ, data = imap.append("Zones", None, f'"{when}"', _msg(n))
            assert typ == "OK", data
        imap.select("Zones")
        out = {"fetch": _dates(imap)}
        for q in ("ON 03-Dec-2026", "ON 02-Dec-2026", "ON 31-Dec-2026", "ON 01-Jan-2027",
                  "BEFORE 03-Dec-2026", "BEFORE 02-Dec-2026", "SINCE 03-Dec-2026",
                  "SINCE 02-Dec-2026", "SINCE 01-Jan-2027", "NOT ON 03-Dec-2026"):
            out[q] = _search(imap, q)
        assert imap.copy("1:3", "Copied")[0] == "OK"
        typ, data = imap.uid("MOVE", "1", "Moved")
        assert typ == "OK", data
        imap.select("Copied")
        out["copied"] = _dates(imap)
        out["copied ON 02-Dec-2026"] = _search(imap, "ON 02-Dec-2026")
        imap.select("Moved")
        out["moved"] = _dates(imap)
        out["moved ON 03-Dec-2026"] = _search(imap, "ON 03-Dec-2026")
        imap.logout()
        return out

    out = await deferToThread(run)
    assert out["fetch"] == list(_DATES)
    # by the zone's date; by the UTC date ON 03-Dec would be 2 and ON 02-Dec 1
    assert out["ON 03-Dec-2026"] == "1"
    assert out["ON 02-Dec-2026"] == "2"
    assert out["ON 31-Dec-2026"] == ""
    assert out["ON 01-Jan-2027"] == "3"
    assert out["BEFORE 03-Dec-2026"] == "2"
    assert out["BEFORE 02-Dec-2026"] == ""
    assert out["SINCE 03-Dec-2026"] == "1 3"
    assert out["SINCE 02-Dec-2026"] == "1 2 3"
    assert out["SINCE 01-Jan-2027"] == "3"
    assert out["NOT ON 03-Dec-2026"] == "2 3"
    assert out["copied"] == list(_DATES)
    assert out["copied ON 02-Dec-2026"] == "2"
    assert out["moved"] == [_EAST]
    assert out["moved ON 03-Dec-2026"] == "1"

    # the API keeps the UTC instant
    listed = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages",
                                   key=key)).json["data"]
    stamps = {m["subject"]: m["received_at"] for m in listed}
    assert stamps["z2"].startswith("2026-12-03T07:30:00") and stamps["z2"].endswith("Z")
    assert stamps["z3"].startswith("2026-12-31T18:45:00")


@pytest_twisted.ensureDeferred
async def test_multiappend_keeps_each_zone(server):
    inbox, key = await _inbox(server, "zonesmulti")

    def run(c: Client):
        ok = c.tagged("a", f'APPEND INBOX "{_EAST}" ', Lit(_msg(1)),
                      f' "{_WEST}" ', Lit(_msg(2), sync=False), " ", Lit(_msg(3)))
        c.tagged("s", "SELECT INBOX")
        return ok, c.tagged("f", "FETCH 1:3 (INTERNALDATE)"), c.tagged("o", "SEARCH ON 02-Dec-2026")

    ok, fetched, found = await session(server.imap_port, inbox["email"], key, run)
    assert ok[-1].startswith(b"a OK [APPENDUID "), ok
    assert f'INTERNALDATE "{_EAST}"'.encode() in fetched[0]
    assert f'INTERNALDATE "{_WEST}"'.encode() in fetched[1]
    assert fetched[2].endswith(b' +0000")')  # no date given: now, in UTC
    assert found[0] == b"* SEARCH 2"


@pytest_twisted.ensureDeferred
async def test_smtp_mail_shows_utc(server):
    inbox, key = await _inbox(server, "zonesmtp")
    raw = make_message(to=inbox["email"], subject="by smtp", msgid="<zs@x>")
    assert (await deferToThread(_send, server.mx_port, "a@example.com", [inbox["email"]],
                                raw, starttls=False)) == ("ok", {})

    def run():
        imap = _starttls(server.imap_port, inbox["email"], key)
        imap.select("INBOX", readonly=True)
        dates = _dates(imap)
        imap.logout()
        return dates

    [when] = await deferToThread(run)
    assert when.endswith(" +0000"), when


@pytest_twisted.ensureDeferred
async def test_zones_and_instants_the_store_cannot_keep_are_bad_not_a_crash(server):
    inbox, key = await _inbox(server, "zonesbad")

    def run(c: Client):
        out = [c.tagged(f"b{n}", f'APPEND INBOX "{when}" ', Lit(_msg(n)))
               for n, when in enumerate(("01-Jan-2020 00:00:00 +9999",
                                         "31-Dec-9999 23:59:59 -0100",
                                         "01-Jan-0001 00:00:00 +0100"), 1)]
        out.append(c.tagged("n", "NOOP"))
        return out

    *bad, noop = await session(server.imap_port, inbox["email"], key, run)
    for n, lines in enumerate(bad, 1):
        assert lines[-1].startswith(b"b%d BAD" % n), lines
    assert noop[-1].startswith(b"n OK"), noop
