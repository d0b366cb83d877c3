"""The server starts on a fresh database and answers an authenticated request."""

import pytest_twisted


@pytest_twisted.ensureDeferred
async def test_create_and_list_inbox(server):
    """An owner key creates an inbox and sees it listed."""
    _, key = await server.new_org()
    created = await server.api.post("/api/v1/inboxes", {"username": "scout"}, key=key)
    assert created.status == 201, created
    assert created.json["email"] == "scout@agents.test"
    listed = await server.api.get("/api/v1/inboxes", key=key)
    assert [i["id"] for i in listed.json["data"]] == [created.json["id"]]
