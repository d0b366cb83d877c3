"""A value that ends in a line feed is not a valid name anywhere: Python's ``$`` also
matches before a final "\\n", so every validator anchors with ``\\Z``. Otherwise a
label "urgent\\n" would split an IMAP FLAGS line and a username "bob\\n" would put a line
break into an address."""

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.mailfactory import make_message
from tests.test_imap_e2e import _inbox, _starttls


@pytest_twisted.ensureDeferred
async def test_api_names_ending_in_a_newline_are_refused(server):
    inbox, key = await _inbox(server, "newline")
    assert (await server.api.post("/api/v1/inboxes", {"username": "bob\n"},
                                  key=key)).status == 400
    assert (await server.api.post("/api/v1/environments", {"name": "E", "slug": "e\n"},
                                  key=key)).status == 400
    [stored] = await server.deliver(make_message(to=inbox["email"]), [inbox["email"]])
    answer = await server.api.post(f"/api/v1/messages/{stored.message_id}/labels",
                                   {"labels": ["urgent\n"]}, key=key)
    assert answer.status == 400 and answer.json["error"]["type"] == "invalid_request"


@pytest_twisted.ensureDeferred
async def test_an_imap_folder_name_ending_in_a_newline_is_refused(server):
    inbox, key = await _inbox(server, "newline-imap")
    await server.deliver(make_message(to=inbox["email"]), [inbox["email"]])

    def session():
        imap = _starttls(server.imap_port, inbox["email"], key)
        created = imap._simple_command("CREATE", "{2+}\r\nx\n")  # a literal "x\n"
        folders = imap.list()
        imap.logout()
        return created, folders

    created, folders = await deferToThread(session)
    assert created[0] == "NO"
    assert not any(b"x\n" in line or line.endswith(b'"x') for line in folders[1])


def test_ids_with_a_trailing_newline_are_not_ids():
    from agentpost.model.ids import is_id

    assert is_id("msg_01ARZ3NDEKTSV4RRFFQ69G5FAV", "msg")
    assert not is_id("msg_01ARZ3NDEKTSV4RRFFQ69G5FAV\n", "msg")
