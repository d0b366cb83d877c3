"""The DSN's parts keep their last line (the CRLF before a boundary belongs to the
delimiter, RFC 2046 section 5.1.1), and a UTF-8 recipient is typed ``utf-8`` in a
message/global-delivery-status part (RFC 6533)."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

from agentpost.outbound.dsn import FailedRecipient, build_dsn

_ORIGINAL = b"From: a@example.org\r\nTo: b@remote.example\r\nSubject: hi\r\n\r\nbody\r\n"
_WHEN = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _parts(raw: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [(part.get_content_type(), part.as_bytes()) for part in msg.get_payload()]


def _body(raw: bytes, boundary_part: str) -> bytes:
    """The bytes between a part's header and the next delimiter, as sent."""
    start = raw.index(b"Content-Type: " + boundary_part.encode())
    body_start = raw.index(b"\r\n\r\n", start) + 4
    return raw[body_start:raw.index(b"\r\n--=_dsn_", body_start)]


def test_each_part_keeps_its_last_line():
    raw = build_dsn(hostname="mx.example", sender="a@example.org", original=_ORIGINAL,
                    recipients=[FailedRecipient("b@remote.example", "5.1.1", 550,
                                                "no such user")],
                    arrival=_WHEN, now=_WHEN)
    status = _body(raw, "message/delivery-status")
    assert status.endswith(b"Diagnostic-Code: smtp; 550 no such user\r\n"), status
    headers = _body(raw, "text/rfc822-headers")
    assert headers.endswith(b"Subject: hi\r\n"), headers
    assert [t for t, _ in _parts(raw)] == ["text/plain", "message/delivery-status",
                                           "text/rfc822-headers"]


def test_a_utf8_recipient_is_typed_utf8_in_a_global_status_part():
    raw = build_dsn(hostname="mx.example", sender="a@example.org", original=_ORIGINAL,
                    recipients=[FailedRecipient("jörg@bücher.example", "5.1.1", 550, "x"),
                                FailedRecipient("b@remote.example", "4.4.7", None, None)],
                    arrival=_WHEN, now=_WHEN)
    status = _body(raw, "message/global-delivery-status").decode("utf-8")
    assert "Final-Recipient: utf-8; jörg@bücher.example\r\n" in status
    assert "Final-Recipient: rfc822; b@remote.example\r\n" in status
    assert b"message/delivery-status" not in raw
