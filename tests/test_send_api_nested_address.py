"""An address nested past the address parser's depth (comments ~500 deep) is a 400
with a JSON error of a stable ``type``, never a 500: the parser's RecursionError is the
caller's bad input (found by the SMTP door's review, where the same parser gave 451)."""

from __future__ import annotations

import pytest
import pytest_twisted

from agentpost.mail.compose import parse_address_list
from agentpost.model.errors import InvalidRequest
from tests.test_send_api import _send_path, _setup, outbox, sub  # noqa: F401 - fixtures

# Under the 998-character cap on a header text (compose.MAX_HEADER_TEXT).
_DEEP = ["(" * 980 + "a@example.org", "(" * 990, "a@example.org (" + "(" * 975 + ")"]


@pytest.mark.parametrize("value", _DEEP)
def test_a_deeply_nested_address_is_invalid_input(value):
    with pytest.raises(InvalidRequest):
        parse_address_list(value, "to")


@pytest_twisted.ensureDeferred
async def test_the_send_api_answers_400_for_it(sub):  # noqa: F811 - the fixture
    _, sender, _, key = await _setup(sub)
    for field in ("to", "cc", "reply_to"):
        answer = await sub.api.post(_send_path(sender), {
            "to": "bob@remote.example", field: _DEEP[0], "subject": "x",
            "text_body": "x"}, key=key)
        assert answer.status == 400, (field, answer.status, answer.json)
        assert answer.json["error"]["type"] == "invalid_request", answer.json
