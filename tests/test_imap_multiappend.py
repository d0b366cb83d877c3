"""MULTIAPPEND (RFC 3502) and CATENATE (RFC 4469) on the real store, over real sockets.

Raw IMAP transcripts over STARTTLS against a running server on a fresh database: the
literal framing (synchronizing and LITERAL+ literals, a refusal in the middle of a
command), the all-or-none store, APPENDUID with a UID set, and CATENATE messages built
from TEXT parts and byte-exact sections of stored messages.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from agentpost.imap import reader
from tests.conftest import make_config, start_server
from tests.imap_client import Client, Lit, new_login, session


def _msg(n: int, size: int = 0) -> bytes:
    body = b"body %d\r\n" % n + b"x" * size
    return (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: m%d\r\n"
            b"Message-ID: <m%d@example.com>\r\n\r\n" % (n, n)) + body


MULTIPART = (b"From: a@example.com\r\nSubject: source\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
             b"--XX\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n"
             b"--XX\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--XX--\r\n")


def _status(c: Client, mailbox: str = "INBOX") -> bytes:
    return c.tagged("st", f"STATUS {mailbox} (MESSAGES UIDNEXT)")[0]


def _uidvalidity(c: Client, mailbox: str = "INBOX") -> int:
    line = c.tagged("uv", f"STATUS {mailbox} (UIDVALIDITY)")[0]
    return int(line.rsplit(b" ", 1)[1].rstrip(b")"))


@pytest.fixture
def small_limits(monkeypatch):
    """A whole-command total that tests can reach without sending 256 MiB."""
    monkeypatch.setattr(reader.CommandReader, "max_append_total_bytes", 200_000)


@pytest_twisted.async_yield_fixture
async def small_server(db_dsn, openapi_checker):
    """A server with a 64 KiB APPENDLIMIT and a 1 MiB inbox quota."""
    running = await start_server(make_config(db_dsn, imap={"max_append_size": "64KiB"},
                                             mail={"inbox_quota": "1MiB"}), openapi_checker)
    yield running
    await running.service.stopService()


# --------------------------------------------------------------------------- MULTIAPPEND

@pytest_twisted.ensureDeferred
async def test_capabilities_advertise_multiappend_and_catenate(server):
    user, key = await new_login(server, "caps")

    def run(c: Client):
        return c.tagged("c", "CAPABILITY")[0]

    caps = (await session(server.imap_port, user, key, run)).split()
    assert b"MULTIAPPEND" in caps and b"CATENATE" in caps


@pytest_twisted.ensureDeferred
async def test_multiappend_stores_every_message_with_one_appenduid_set(server):
    user, key = await new_login(server, "multi")
    msgs = [_msg(1), _msg(2), _msg(3)]

    def run(c: Client):
        before = _status(c)
        uv = _uidvalidity(c)
        ok = c.tagged("a", "APPEND INBOX (\\Seen) ", Lit(msgs[0]),
                      ' "14-Jul-2020 02:44:25 +0200" ', Lit(msgs[1], sync=False),
                      " (\\Flagged $Work) ", Lit(msgs[2]))
        c.tagged("s", "SELECT INBOX")
        fetched = c.tagged("f", "UID FETCH 1:* (FLAGS INTERNALDATE BODY.PEEK[])")
        return before, uv, ok, fetched, _status(c)

    before, uv, ok, fetched, after = await session(server.imap_port, user, key, run)
    assert before.endswith(b"(MESSAGES 0 UIDNEXT 1)")
    assert ok == [b"a OK [APPENDUID %d 1:3] APPEND completed" % uv]
    assert after.endswith(b"(MESSAGES 3 UIDNEXT 4)")
    for line, raw in zip(fetched[:3], msgs, strict=True):
        assert line.endswith(raw + b")")
    assert b"\\Seen" in fetched[0] and b'"14-Jul-2020 02:44:25 +0200"' in fetched[1]
    assert b"\\Flagged" in fetched[2] and b"$Work" in fetched[2]


@pytest_twisted.ensureDeferred
async def test_multiappend_with_one_bad_message_stores_none(server):
    user, key = await new_login(server, "atomic")

    def run(c: Client):
        out = {"empty": c.tagged("a", "APPEND INBOX ", Lit(_msg(1)), " ", Lit(_msg(2)),
                                 " ", Lit(b"", sync=False)),
               "date": c.tagged("b", "APPEND INBOX ", Lit(_msg(1), sync=False),
                                ' "31-Feb-2020 99:00:00 +0000" ', Lit(_msg(2), sync=False)),
               "flag": c.tagged("c", "APPEND INBOX ", Lit(_msg(1), sync=False),
                                " (\\Seen \\Bogus) ", Lit(_msg(2), sync=False)),
               "trycreate": c.tagged("d", "APPEND Nope ", Lit(_msg(1), sync=False), " ",
                                     Lit(_msg(2), sync=False)),
               "status": _status(c)}
        out["good"] = c.tagged("e", "APPEND INBOX ", Lit(_msg(3)), " ", Lit(_msg(4)))
        return out

    out = await session(server.imap_port, user, key, run)
    assert out["empty"] == [b"a NO [CANNOT] An empty message cannot be appended"]
    assert out["date"][0].startswith(b"b BAD")
    assert out["flag"][0].startswith(b"c BAD")
    assert out["trycreate"] == [b"d NO [TRYCREATE] Mailbox does not exist"]
    # Nothing stored, and UIDNEXT untouched: the refused batch allocated no UID.
    assert out["status"].endswith(b"(MESSAGES 0 UIDNEXT 1)")
    assert out["good"][0].startswith(b"e OK [APPENDUID ") and b" 1:2]" in out["good"][0]


@pytest_twisted.ensureDeferred
async def test_multiappend_over_quota_or_appendlimit_stores_none(small_server):
    server = small_server
    user, key = await new_login(server, "quota")
    big = _msg(0, 60_000)

    def run(c: Client):
        out = {}
        # 20 messages of 60 KB: each fits the APPENDLIMIT, together not the quota.
        pieces: list[str | Lit] = []
        for _ in range(20):
            pieces += [" ", Lit(big, sync=False)]
        out["quota"] = c.tagged("a", "APPEND INBOX", *pieces)
        # The second message is over the APPENDLIMIT: refused at its literal.
        out["toobig"] = c.tagged("b", "APPEND INBOX ", Lit(_msg(1)), " ",
                                 Lit(_msg(2, 70_000), sync=False), " ", Lit(_msg(3),
                                                                            sync=False))
        out["toobig_sync"] = c.tagged("c", "APPEND INBOX ", Lit(_msg(1)), " ",
                                      Lit(_msg(2, 70_000)))
        out["status"] = _status(c)
        out["noop"] = c.tagged("n", "NOOP")
        return out

    out = await session(server.imap_port, user, key, run)
    assert out["quota"] == [b"a NO [OVERQUOTA] The mailbox is full."]
    assert out["toobig"] == [b"b NO [TOOBIG] Literal too large"]
    assert out["toobig_sync"] == [b"c NO [TOOBIG] Literal too large"]
    assert out["status"].endswith(b"(MESSAGES 0 UIDNEXT 1)")
    assert out["noop"] == [b"n OK NOOP completed"]


@pytest_twisted.ensureDeferred
async def test_multiappend_hostile_counts_and_totals_are_refused_and_read_past(
        small_server, small_limits):
    server = small_server
    user, key = await new_login(server, "hostile")

    def run(c: Client):
        out = {}
        many: list[str | Lit] = []
        for _ in range(reader.MAX_APPEND_LITERALS + 5):
            many += [" ", Lit(b"x", sync=False)]
        out["count"] = c.tagged("a", "APPEND INBOX", *many)
        out["after_count"] = c.tagged("b", "NOOP")
        total = [" ", Lit(_msg(1, 60_000), sync=False)] * 4
        out["total"] = c.tagged("c", "APPEND INBOX", *total)
        out["after_total"] = c.tagged("d", "NOOP")
        out["total_sync"] = c.tagged("e", "APPEND INBOX", *[" ", Lit(_msg(1, 60_000))] * 4)
        out["status"] = _status(c)
        return out

    out = await session(server.imap_port, user, key, run)
    limit = f"At most {reader.MAX_APPEND_LITERALS} literals in one APPEND".encode()
    assert out["count"] == [b"a NO [LIMIT] " + limit]
    assert out["after_count"] == [b"b OK NOOP completed"]
    assert out["total"] == [b"c NO [LIMIT] At most 200000 bytes in one APPEND"]
    assert out["after_total"] == [b"d OK NOOP completed"]
    assert out["total_sync"] == [b"e NO [LIMIT] At most 200000 bytes in one APPEND"]
    assert out["status"].endswith(b"(MESSAGES 0 UIDNEXT 1)")


# --------------------------------------------------------------------------- CATENATE

@pytest_twisted.ensureDeferred
async def test_catenate_builds_a_message_from_text_and_sections(server):
    user, key = await new_login(server, "cat")
    text = b"From: me@example.com\r\nSubject: forward\r\nMIME-Version: 1.0\r\n" \
           b"Content-Type: multipart/mixed; boundary=YY\r\n\r\n--YY\r\n"

    def run(c: Client):
        c.tagged("a", "APPEND INBOX ", Lit(MULTIPART))
        uv = _uidvalidity(c)
        out = {"uv": uv, "duv": _uidvalidity(c, "Drafts")}
        # Authenticated state: an absolute-path URL with UIDVALIDITY.
        out["cat"] = c.tagged(
            "b", "APPEND Drafts (\\Draft) CATENATE (TEXT ", Lit(text),
            f' URL "/INBOX;UIDVALIDITY={uv}/;UID=1/;SECTION=2.MIME"'
            f" URL /INBOX;UIDVALIDITY={uv}/;UID=1/;SECTION=2 TEXT ",
            Lit(b"\r\n--YY--\r\n", sync=False), ")")
        c.tagged("s", "SELECT INBOX")
        out["mime"] = c.tagged("f", "UID FETCH 1 (BODY.PEEK[2.MIME] BODY.PEEK[2])")
        # Selected state: a mailbox-relative URL, with PARTIAL, and a whole message.
        out["rel"] = c.tagged("g", "APPEND Drafts CATENATE (URL ", Lit(b";UID=1/;PARTIAL=0.4"),
                              " TEXT ", Lit(b"\r\n\r\n", sync=False),
                              ' URL "Drafts/;UID=1/;SECTION=HEADER.FIELDS%20(SUBJECT)")')
        out["whole"] = c.tagged("h", 'APPEND Drafts CATENATE (URL "/INBOX/;UID=1")')
        c.tagged("s2", "EXAMINE Drafts")
        out["drafts"] = c.tagged("i", "UID FETCH 1:* (FLAGS BODY.PEEK[])")
        return out

    out = await session(server.imap_port, user, key, run)
    start = MULTIPART.index(b"--XX\r\nContent-Type: application") + len(b"--XX\r\n")
    mime_end = MULTIPART.index(b"\r\n\r\n", start) + 4
    body_end = MULTIPART.index(b"\r\n--XX--")
    expected = text + MULTIPART[start:mime_end] + MULTIPART[mime_end:body_end] + \
        b"\r\n--YY--\r\n"
    assert out["cat"] == [b"b OK [APPENDUID %d 1] APPEND completed" % out["duv"]]
    assert MULTIPART[start:mime_end] in out["mime"][0]
    assert out["drafts"][0].endswith(b"{%d}\r\n" % len(expected) + expected + b")")
    assert b"\\Draft" in out["drafts"][0]
    assert out["rel"][0].startswith(b"g OK [APPENDUID ") and b" 2]" in out["rel"][0]
    second = b"From" + b"\r\n\r\n" + b"Subject: forward\r\n\r\n"
    assert out["drafts"][1].endswith(b"{%d}\r\n" % len(second) + second + b")")
    assert out["drafts"][2].endswith(b"{%d}\r\n" % len(MULTIPART) + MULTIPART + b")")


@pytest_twisted.ensureDeferred
async def test_catenate_bad_urls_are_badurl_and_store_nothing(server):
    user, key = await new_login(server, "badurl")
    other_user, other_key = await new_login(server, "victim")

    def victim(v: Client) -> None:
        v.tagged("a", "APPEND INBOX ", Lit(_msg(9)))  # the other tenant's UID 1

    def run(c: Client):
        c.tagged("a", "APPEND INBOX ", Lit(MULTIPART))
        uv = _uidvalidity(c)
        out = {}
        for name, url in [("uidvalidity", f"/INBOX;UIDVALIDITY={uv + 1}/;UID=1"),
                          ("uid", "/INBOX/;UID=7"),
                          ("section", "/INBOX/;UID=1/;SECTION=5"),
                          ("leaf_text", "/INBOX/;UID=1/;SECTION=1.TEXT"),
                          ("mailbox", "/Nope/;UID=1"),
                          ("absolute", f"imap://{other_user}@localhost/INBOX/;UID=1"),
                          ("relative", ";UID=1"),  # nothing selected
                          ("urlauth", "/INBOX/;UID=1;URLAUTH=anonymous")]:
            # A TEXT literal after the bad URL, sent LITERAL+: it must be read past.
            out[name] = c.tagged("b", f'APPEND INBOX CATENATE (URL "{url}" TEXT ',
                                 Lit(b"tail\r\n", sync=False), ") ", Lit(_msg(2), sync=False))
        out["noop"] = c.tagged("n", "NOOP")
        out["status"] = _status(c)
        return out

    await session(server.imap_port, other_user, other_key, victim)
    out = await session(server.imap_port, user, key, run)
    for name in ("uidvalidity", "uid", "section", "leaf_text", "mailbox", "absolute",
                 "relative", "urlauth"):
        [line] = out[name]
        assert line.startswith(b"b NO [BADURL /") or line.startswith(b"b NO [BADURL imap://") \
            or line.startswith(b"b NO [BADURL ;UID=1]"), (name, line)
    assert out["noop"] == [b"n OK NOOP completed"]
    assert out["status"].endswith(b"(MESSAGES 1 UIDNEXT 2)")


@pytest_twisted.ensureDeferred
async def test_catenate_over_the_appendlimit_is_toobig(small_server):
    server = small_server
    user, key = await new_login(server, "cattoobig")

    def run(c: Client):
        c.tagged("a", "APPEND INBOX ", Lit(_msg(1, 40_000)))
        url = ' URL "/INBOX/;UID=1"'
        out = {"toobig": c.tagged("b", f"APPEND INBOX CATENATE ({url}{url})"),
               "text": c.tagged("c", "APPEND INBOX CATENATE (TEXT ", Lit(b"x" * 40_000),
                                " TEXT ", Lit(b"y" * 40_000, sync=False), ")"),
               "empty": c.tagged("d", "APPEND INBOX CATENATE (TEXT ", Lit(b""), ")"),
               "syntax": c.tagged("e", "APPEND INBOX CATENATE (TEXT)"),
               "status": _status(c)}
        return out

    out = await session(server.imap_port, user, key, run)
    assert out["toobig"] == [b"b NO [TOOBIG] The message would be too large"]
    assert out["text"] == [b"c NO [TOOBIG] The message would be too large"]
    assert out["empty"] == [b"d NO [CANNOT] An empty message cannot be appended"]
    assert out["syntax"][0].startswith(b"e BAD")
    assert out["status"].endswith(b"(MESSAGES 1 UIDNEXT 2)")


@pytest_twisted.ensureDeferred
async def test_catenate_combined_with_multiappend(server):
    user, key = await new_login(server, "catmulti")

    def run(c: Client):
        c.tagged("a", "APPEND INBOX ", Lit(_msg(1)))
        c.tagged("s", "SELECT INBOX")
        ok = c.tagged("b", "APPEND INBOX (\\Seen) CATENATE (URL ;UID=1/;SECTION=HEADER TEXT ",
                      Lit(b"new body\r\n", sync=False), ") ", Lit(_msg(2)),
                      ' CATENATE (URL "/INBOX/;UID=1")')
        bad = c.tagged("c", "APPEND INBOX ", Lit(_msg(3), sync=False),
                       ' CATENATE (URL "/INBOX/;UID=99")')
        fetched = c.tagged("f", "UID FETCH 2:* (BODY.PEEK[])")
        return ok, bad, fetched

    ok, bad, fetched = await session(server.imap_port, user, key, run)
    assert ok[-1].startswith(b"b OK [APPENDUID ") and ok[-1].endswith(b" 2:4] APPEND completed")
    header = _msg(1)[:_msg(1).index(b"\r\n\r\n") + 4]
    bodies = [line for line in fetched if line.startswith(b"* ") and b"FETCH" in line]
    assert bodies[0].endswith(header + b"new body\r\n)")
    assert bodies[1].endswith(_msg(2) + b")") and bodies[2].endswith(_msg(1) + b")")
    assert bad == [b"c NO [BADURL /INBOX/;UID=99] Bad URL: no such message."]
    assert len(bodies) == 3  # the refused batch stored nothing


@pytest_twisted.ensureDeferred
async def test_catenate_urls_count_against_the_command_total(small_server, small_limits):
    """Each message under the APPENDLIMIT, but many URL copies of one stored message in
    one MULTIAPPEND would make us read and spool without bound: NO [LIMIT], nothing
    stored (the total is 200,000 bytes here, each copy 40,000)."""
    server = small_server
    user, key = await new_login(server, "catbudget")

    def run(c: Client):
        c.tagged("a", "APPEND INBOX ", Lit(_msg(1, 40_000)))
        copies = " ".join(['CATENATE (URL "/INBOX/;UID=1")'] * 6)
        return {"over": c.tagged("b", f"APPEND INBOX {copies}"),
                "under": c.tagged("c", "APPEND INBOX " + " ".join(
                    ['CATENATE (URL "/INBOX/;UID=1")'] * 3)),
                "status": _status(c)}

    out = await session(server.imap_port, user, key, run)
    assert out["over"][-1].startswith(b"b NO [LIMIT]"), out["over"]
    assert out["under"][-1].startswith(b"c OK [APPENDUID "), out["under"]
    assert out["status"].endswith(b"(MESSAGES 4 UIDNEXT 5)")
