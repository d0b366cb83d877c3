"""A FETCH that asks for messages another session expunged answers what it can and
ends in NO [EXPUNGEISSUED] (RFC 5530), never a silent OK that leaves the client's
view short; the expunge itself is told at the next command that may tell it."""

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.mailfactory import make_message
from tests.test_imap_e2e import _inbox, _starttls


@pytest_twisted.ensureDeferred
async def test_fetch_of_a_message_expunged_elsewhere_says_expungeissued(server):
    inbox, key = await _inbox(server, "expunge-issued")
    for n in range(3):
        await server.deliver(make_message(to=inbox["email"], subject=f"m{n}",
                                          msgid=f"<e{n}@x>"), [inbox["email"]])

    def sessions():
        reader = _starttls(server.imap_port, inbox["email"], key)
        writer = _starttls(server.imap_port, inbox["email"], key)
        reader.select("INBOX")
        writer.select("INBOX")
        writer.store("2", "+FLAGS", "(\\Deleted)")
        writer.expunge()
        writer.logout()
        typ, data = reader.fetch("1:3", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        fetched = reader.untagged_responses.pop("FETCH", [])
        answer = (typ, data, fetched, reader.untagged_responses.pop("EXPUNGE", None))
        after = reader.noop()
        expunged = reader.untagged_responses.pop("EXPUNGE", None)
        again = reader.fetch("1:2", "(UID)")
        reader.logout()
        return answer, after, expunged, again

    (typ, data, fetched, early), after, expunged, again = await deferToThread(sessions)
    assert typ == "NO" and data == [b"[EXPUNGEISSUED] Some of the requested messages "
                                    b"no longer exist"]
    headers = [part[1] for part in fetched if isinstance(part, tuple)]
    assert headers == [b"Subject: m0\r\n\r\n", b"Subject: m2\r\n\r\n"]
    assert early is None  # not during FETCH (RFC 3501 §7.4.1)
    assert after[0] == "OK" and expunged == [b"2"]
    assert again == ("OK", [b"1 (UID 1)", b"2 (UID 3)"])
