"""agentpost.mail.compose: structured fields to RFC 5322 bytes, checked and parsed back."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest

from agentpost.mail.compose import (
    Address,
    AttachmentPart,
    Composition,
    check_headers,
    compose,
    parse_address_list,
    prefixed_subject,
    quote_text,
    reply_references,
)
from agentpost.model.errors import InvalidRequest

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
ME = Address("agent@agents.test", "Agent Smith")


def _parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def _build(**kw) -> bytes:
    return compose(Composition(**kw), from_addr=ME, hostname="mx.test", now=NOW)


def test_text_only_message_has_crlf_headers_message_id_and_date():
    raw = _build(to=[Address("bob@example.com")], subject="Hello", text_body="Hi Bob\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = _parse(raw)
    assert msg["From"] == "Agent Smith <agent@agents.test>"
    assert msg["To"] == "bob@example.com"
    assert msg["Date"] == "Tue, 01 Dec 2026 09:30:00 +0000"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@agents.test>")
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content().replace("\r\n", "\n") == "Hi Bob\n"


def test_text_and_html_are_alternatives_and_attachments_make_it_mixed():
    raw = _build(to=[Address("bob@example.com")], text_body="plain", html_body="<b>rich</b>",
                 attachments=[AttachmentPart("report.pdf", "application/pdf", b"%PDF-1")])
    msg = _parse(raw)
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("html",))
    assert body is not None and body.get_content().strip() == "<b>rich</b>"
    assert msg.get_body(("plain",)).get_content().strip() == "plain"
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "report.pdf" and att.get_content() == b"%PDF-1"
    assert raw.count(b"MIME-Version") == 1


def test_inline_image_joins_the_html_part_as_related():
    raw = _build(to=[Address("bob@example.com")], text_body="t",
                 html_body='<img src="cid:logo">',
                 attachments=[AttachmentPart("logo.png", "image/png", b"\x89PNG", "logo", True)])
    msg = _parse(raw)
    related = [p for p in msg.walk() if p.get_content_type() == "multipart/related"]
    assert related
    image = next(p for p in msg.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo>"


def test_non_ascii_subject_and_names_use_encoded_words_and_parse_back():
    raw = _build(to=parse_address_list(["Jörg Müller <j@example.com>"]),
                 cc=[Address("b@bücher.example", "Zoë, the \"boss\"")],
                 subject="Grüße aus Köln ☕", text_body="Grüße\n")
    head = raw.split(b"\r\n\r\n")[0]
    assert head.isascii()  # RFC 2047, no SMTPUTF8 needed
    assert b"=?utf-8?" in head
    msg = _parse(raw)
    assert msg["Subject"] == "Grüße aus Köln ☕"
    assert msg["To"].addresses[0].display_name == "Jörg Müller"
    cc = msg["Cc"].addresses[0]
    assert cc.display_name == 'Zoë, the "boss"' and cc.addr_spec == "b@xn--bcher-kva.example"
    assert msg.get_content().replace("\r\n", "\n") == "Grüße\n"


def test_a_non_ascii_local_part_switches_to_smtputf8_headers():
    raw = _build(to=parse_address_list("José <josé@example.com>"), subject="ñ", text_body="x")
    assert "josé@example.com".encode() in raw
    head = raw.split(b"\r\n\r\n")[0]
    assert b"=?utf-8?" not in head  # RFC 6532: the header section is UTF-8 as it is
    parsed = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert parsed["To"].addresses[0].addr_spec == "josé@example.com"
    assert parsed["Subject"] == "ñ"


def test_bcc_is_kept_in_the_sent_copy_for_the_worker_to_strip():
    raw = _build(to=[Address("a@example.com")], bcc=[Address("secret@example.com")],
                 text_body="x")
    assert b"\r\nBcc: secret@example.com\r\n" in raw


def test_reply_headers_and_custom_headers_are_written():
    raw = _build(to=[Address("a@example.com")], text_body="x", in_reply_to="<p@x>",
                 references=["<r@x>", "<p@x>"],
                 headers={"X-Campaign": "42", "List-Unsubscribe": "<mailto:u@agents.test>"})
    msg = _parse(raw)
    assert msg["In-Reply-To"] == "<p@x>" and msg["References"] == "<r@x> <p@x>"
    assert msg["X-Campaign"] == "42"
    assert msg["List-Unsubscribe"] == "<mailto:u@agents.test>"


@pytest.mark.parametrize("value", [
    "bob@example.com\r\nBcc: evil@example.com",
    {"email": "bob@example.com", "name": "Bob\nBcc: evil@example.com"},
    {"email": "bob@exa\x00mple.com"},
    "not-an-address",
    "bob@localhost",
    "bob@@example.com",
    {"email": "bob@example.com", "nickname": "x"},
    42,
])
def test_address_lists_refuse_injection_and_invalid_addresses(value):
    with pytest.raises(InvalidRequest) as caught:
        parse_address_list(value, "to")
    assert caught.value.details["field"] == "to"


def test_address_lists_take_strings_objects_and_comma_lists():
    got = parse_address_list(["a@x.example, B <b@x.example>", {"email": "c@X.Example"}])
    assert got == [Address("a@x.example"), Address("b@x.example", "B"),
                   Address("c@x.example")]
    assert Composition(to=got, cc=[Address("A@x.example")]).recipients() == [
        "a@x.example", "b@x.example", "c@x.example"]


@pytest.mark.parametrize("headers", [
    {"From": "x@example.com"}, {"To": "x"}, {"Bcc": "x"}, {"Message-ID": "<x@y>"},
    {"Content-Type": "text/html"}, {"DKIM-Signature": "x"}, {"Received": "x"},
    {"X-Ok": "a\r\nBcc: evil@example.com"}, {"X-Bad Name": "x"},
])
def test_custom_headers_are_allow_listed_and_free_of_line_breaks(headers):
    with pytest.raises(InvalidRequest):
        check_headers(headers)


def test_subject_with_a_line_break_is_refused():
    with pytest.raises(InvalidRequest) as caught:
        _build(to=[Address("a@example.com")], subject="Hi\r\nBcc: evil@example.com")
    assert caught.value.details["field"] == "subject"


def test_prefixes_are_added_once():
    assert prefixed_subject("Hello", "Re") == "Re: Hello"
    assert prefixed_subject("Re: Hello", "Re") == "Re: Hello"
    assert prefixed_subject("RE: re: Fwd: Hello", "Re") == "Re: Hello"
    assert prefixed_subject("Re: Hello", "Fwd") == "Fwd: Hello"
    assert prefixed_subject("", "Re") == "Re:"
    assert prefixed_subject("Reminder", "Re") == "Re: Reminder"


def test_references_append_the_parent_and_keep_the_root_when_long():
    assert reply_references("<p@x>", ["<r@x>"]) == ["<r@x>", "<p@x>"]
    assert reply_references("<p@x>", ["<r@x>", "<p@x>"]) == ["<r@x>", "<p@x>"]
    many = [f"<{i:040d}@example.com>" for i in range(40)]
    out = reply_references("<p@x>", many)
    assert out[0] == many[0] and out[-1] == "<p@x>" and len(" ".join(out)) <= 900


def test_quote_text_prefixes_every_line():
    assert quote_text("a\n\nb", "On x, y wrote:") == "On x, y wrote:\n> a\n>\n> b"


# --------------------------------------------------------------------------- reply rules
# (agentpost.core.sending's pure helpers: who a reply goes to)

def _stored(direction="inbound", **kw):
    row = {"direction": direction, "from_address": {"email": "alice@example.com",
                                                    "name": "Alice"},
           "reply_to": [], "to_addresses": [{"email": "me@agents.test", "name": None},
                                            {"email": "bob@example.com", "name": "Bob"}],
           "cc_addresses": [{"email": "Alice@Example.com", "name": None},
                            {"email": "carol@example.com", "name": "Carol\r\nBcc: x"}]}
    row.update(kw)
    return row


def test_reply_goes_to_reply_to_or_from_and_reply_all_adds_the_rest_once():
    from agentpost.core.sending import reply_recipients

    to, cc = reply_recipients(_stored(), "ME@agents.test", "reply")
    assert [a.email for a in to] == ["alice@example.com"] and cc == []
    to, cc = reply_recipients(_stored(), "me@agents.test", "reply_all")
    assert [a.email for a in cc] == ["bob@example.com", "carol@example.com"]
    assert cc[1].name == "Carol Bcc: x"  # a stored name cannot break our header
    to, _ = reply_recipients(_stored(reply_to=[{"email": "list@example.com"}]),
                             "me@agents.test", "reply")
    assert [a.email for a in to] == ["list@example.com"]


def test_replying_to_our_own_sent_message_goes_to_its_recipients():
    from agentpost.core.sending import reply_recipients

    sent = _stored("outbound", from_address={"email": "me@agents.test"},
                   to_addresses=[{"email": "bob@example.com"}])
    to, _ = reply_recipients(sent, "me@agents.test", "reply")
    assert [a.email for a in to] == ["bob@example.com"]


def test_a_stored_address_that_fails_our_checks_is_left_out():
    from agentpost.core.sending import reply_recipients

    odd = _stored(from_address={"email": "weird@@example.com"},
                  reply_to=[{"email": "x@localhost"}])
    to, _ = reply_recipients(odd, "me@agents.test", "reply")
    assert to == []


def test_ses_control_headers_are_refused():
    """X-SES-* would steer the relay (configuration set, identity ARNs): not a caller's."""
    for name in ("X-SES-CONFIGURATION-SET", "x-ses-source-arn", "X-Ses-Message-Tags"):
        with pytest.raises(InvalidRequest):
            check_headers({name: "x"})
    assert check_headers({"X-Campaign": "spring"}) == {"X-Campaign": "spring"}
