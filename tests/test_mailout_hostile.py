"""Hostile-tenant review of the mail-out code (issue 11): each test is an attack that
worked before its fix (see /work/shared/notes/hostile-review.md)."""

from __future__ import annotations

import imaplib
import smtplib
import ssl
from urllib.parse import urlsplit

import psycopg2
import pytest
import pytest_twisted
import treq
from twisted.internet.threads import deferToThread

from agentpost.core.domains import normalize_name
from agentpost.core.suppressions import normalize_address
from agentpost.core.uploads import check_filename
from agentpost.mail.compose import MAX_CUSTOM_HEADERS, check_headers
from agentpost.model.errors import InvalidRequest
from agentpost.outbound.smarthost import plausible
from tests import test_domain_verify as verify_tests
from tests import test_send_api as send_tests
from tests.conftest import _DEV_TLS, make_config, start_server
from tests.helpers import query
from tests.test_send_api import _raw, _send_path, _setup

# The send tests' server (log transport, 64 KiB messages) and its outbox.
sub = send_tests.sub
outbox = send_tests.outbox
# The domain tests' server (test DNS zone, master key).
zone = verify_tests.zone
key_file = verify_tests.key_file
dom_server = verify_tests.dom_server

# ---------------------------------------------------------------------------- reading by replying


async def _inbound_raw(server, inbox, raw: bytes):
    [stored] = await server.deliver(raw, [inbox["email"]])
    return stored


_PLAIN = (b"From: Alice <alice@example.com>\r\nTo: {to}\r\nSubject: Secret plans\r\n"
          b"Date: Sun, 29 Nov 2026 07:00:00 +0000\r\nMessage-ID: <orig@example.com>\r\n"
          b"\r\nThe secret is zebra-4211.\r\n")


@pytest_twisted.ensureDeferred
async def test_reply_and_forward_need_messages_read(sub):
    """A key with messages:send but not messages:read could forward any message of the
    inbox to itself (or reply with quote, or read the Sent copy in the answer) and so
    read mail it may not read. Now reply, reply-all and forward need messages:read."""
    owner, sender, _, both = await _setup(sub)
    orig = await _inbound_raw(sub, sender, _PLAIN.replace(b"{to}", sender["email"].encode()))
    made = await sub.api.post("/api/v1/api-keys", {"name": "sendonly",
                                                   "scopes": ["messages:send"]}, key=owner)
    assert made.status == 201, made
    send_only = made.json["key"]
    for path, body in (("forward", {"to": "thief@remote.example"}),
                       ("reply", {"quote": True, "to": "thief@remote.example"}),
                       ("reply-all", {})):
        resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/{path}", body,
                                  key=send_only)
        assert resp.status == 403, resp
        assert resp.json["error"]["missing_scope"] == "messages:read"
        assert "zebra-4211" not in resp.body.decode() and "Secret" not in resp.body.decode()
    resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/forward",
                              {"to": "dave@remote.example"}, key=both)
    assert resp.status == 201, resp


# ---------------------------------------------------------------------------- hostile originals


@pytest_twisted.ensureDeferred
async def test_replying_to_a_message_with_a_hostile_message_id_works(sub):
    """A stranger's Message-ID that is not a valid <id> (8-bit, as parse.py keeps it) made every
    reply to it fail (the composer refused the In-Reply-To it had copied): a stranger
    could make their mail unanswerable through the API. Now an unusable id is left out
    (References keeps only valid ids), and the reply is sent."""
    owner, sender, _, key = await _setup(sub)
    raw = (b"From: Mallory <mallory@example.com>\r\nTo: " + sender["email"].encode()
           + b"\r\nSubject: hi\r\nDate: Sun, 29 Nov 2026 07:00:00 +0000\r\n"
           + "Message-ID: <caf\u00e9@example.com>\r\n".encode()
           + "References: <ok@example.com> <r\u00e9f@x.example>\r\n\r\nbody\r\n".encode())
    orig = await _inbound_raw(sub, sender, raw)
    resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/reply",
                              {"text_body": "Answer"}, key=key)
    assert resp.status == 201, resp
    msg = await _raw(sub, resp.json["id"], key)
    assert msg["In-Reply-To"] is None
    assert " " not in (msg["References"] or "").strip().replace("> <", "><")
    # drafts answering the same message work too
    draft = await sub.api.post(f"/api/v1/inboxes/{sender['id']}/drafts",
                               {"in_reply_to": orig.message_id, "text_body": "later"},
                               key=owner)
    assert draft.status == 201, draft


# ---------------------------------------------------------------------------- sizes


def test_custom_headers_are_capped():
    """Thousands of X-* headers (each up to 998 bytes) fit a JSON body and every one was
    written into the message; now at most MAX_CUSTOM_HEADERS, names case-insensitively
    unique."""
    many = {f"X-H{i}": "v" for i in range(MAX_CUSTOM_HEADERS + 1)}
    with pytest.raises(InvalidRequest):
        check_headers(many)
    with pytest.raises(InvalidRequest):
        check_headers({"X-Tag": "a", "x-tag": "b"})
    assert len(check_headers(dict(list(many.items())[:MAX_CUSTOM_HEADERS]))) == \
        MAX_CUSTOM_HEADERS


@pytest_twisted.ensureDeferred
async def test_thousands_of_custom_headers_are_400(sub):
    _, sender, _, key = await _setup(sub)
    resp = await sub.api.post(_send_path(sender), {
        "to": "bob@remote.example", "text_body": "x",
        "headers": {f"X-H{i}": "v" * 100 for i in range(500)}}, key=key)
    assert resp.status == 400 and resp.json["error"]["field"] == "headers", resp


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["co.uk", "CO.UK.", "com.au", "github.io", "foo.localhost",
                                  "x.invalid", "printer.local", "abc.onion", "1.in-addr.arpa"])
def test_public_suffixes_and_special_use_names_are_not_domains(name):
    """A tenant could register ``co.uk`` (every address under it would be "theirs" on
    the shared MX) or a special-use name (``*.localhost``, ``.local``, ``.invalid``,
    ``.onion``, ``.arpa``). Now refused."""
    with pytest.raises(InvalidRequest):
        normalize_name(name)


def test_ordinary_domains_still_pass():
    assert normalize_name("Example.CO.UK.") == "example.co.uk"
    assert normalize_name("agents.test") == "agents.test"


def test_suppression_addresses_ignore_a_trailing_dot():
    """``Bob@Example.COM.`` and ``bob@example.com`` are one mailbox (a trailing dot is
    the root); they were two suppression entries. Plus-addresses stay distinct (a
    different local part is a different mailbox as far as we can know)."""
    assert normalize_address("Bob@Example.COM.") == normalize_address("bob@example.com")
    assert normalize_address("bob+x@example.com") != normalize_address("bob@example.com")


# ---------------------------------------------------------------------------- smarthost


@pytest.mark.parametrize("address", ["a@b.example\r\nRCPT TO:<x@y.example", "a>@b.example",
                                     "a@b.example\x00", "<a@b.example", "a@b\nDATA"])
def test_envelope_addresses_with_line_breaks_never_reach_the_smarthost(address):
    """(Held already: a regression guard.) An envelope address with CR/LF would add a
    command of its own on the smarthost connection; the transport refuses it."""
    assert not plausible(address)


def test_envelope_addresses_that_are_fine():
    assert plausible("a@b.example")
    assert plausible("", allow_empty=True)  # the null reverse-path of a DSN
    assert plausible("usér@b.example")


@pytest_twisted.ensureDeferred
async def test_replying_to_a_message_with_a_huge_subject_works(sub):
    """A stranger's Subject longer than one header line (folded, 3000 characters) made
    every reply and forward to it a 400 ("subject is too long"); now the Re:/Fwd:
    subject is cut to what one line holds."""
    _, sender, _, key = await _setup(sub)
    long_subject = " ".join(["word"] * 600)  # folded by the sender
    raw = (b"From: Mallory <mallory@example.com>\r\nTo: " + sender["email"].encode()
           + b"\r\nSubject: " + long_subject.encode()
           + b"\r\nDate: Sun, 29 Nov 2026 07:00:00 +0000\r\n"
           b"Message-ID: <long@example.com>\r\n\r\nbody\r\n")
    orig = await _inbound_raw(sub, sender, raw)
    for path, body in (("reply", {"text_body": "ok"}),
                       ("forward", {"to": "dave@remote.example"})):
        resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/{path}", body,
                                  key=key)
        assert resp.status == 201, resp
        assert resp.json["subject"].split(": ", 1)[0] in ("Re", "Fwd")
        assert len(resp.json["subject"]) <= 998


@pytest.mark.parametrize("name", ["invoice\u202efdp.exe", "a\u2066b.txt", "tab\there.txt",
                                  "esc\x1b[31m.txt", "del\x7f.txt", "c1\x85.txt"])
def test_filenames_with_bidi_overrides_or_control_characters_are_refused(name):
    """``invoice<RLO>fdp.exe`` shows as ``invoiceexe.pdf`` in the recipient's mail
    client; control characters (ESC, DEL, C1) reach terminals and logs. Only CR, LF and
    NUL were refused."""
    with pytest.raises(InvalidRequest):
        check_filename(name)
    assert check_filename("résumé (final).pdf") == "résumé (final).pdf"


# ---------------------------------------------------------------------------- environments


@pytest_twisted.ensureDeferred
async def test_an_upload_of_one_environment_cannot_be_attached_from_another(sub):
    """Uploads had no environment: a key confined to environment B could attach (and so
    read, in its own Sent copy) a file a key confined to environment A had uploaded.
    Now another environment's upload is 404; the uploader and org-wide keys may use it."""
    owner, home, _, _ = await _setup(sub)
    env = (await sub.api.post("/api/v1/environments", {"name": "Side"}, key=owner)).json
    side = (await sub.api.post("/api/v1/inboxes", {"username": "side-h",
                                                    "environment_id": env["id"]},
                               key=owner)).json
    default_env = home["environment_id"]

    async def key_for(env_id):
        made = await sub.api.post("/api/v1/api-keys", {
            "scopes": ["messages:send", "messages:read"], "environment_ids": [env_id]},
            key=owner)
        assert made.status == 201, made
        return made.json["key"]

    key_a, key_b = await key_for(default_env), await key_for(env["id"])
    ticket = (await sub.api.post("/api/v1/attachments", {
        "filename": "secret.txt", "mime_type": "text/plain", "size": 6}, key=key_a)).json
    parts = urlsplit(ticket["upload_url"])
    put = await treq.request("PUT", sub.base_url + parts.path + "?" + parts.query,
                             data=b"secret", persistent=False)
    assert put.code == 200
    await treq.content(put)
    body = {"to": "x@remote.example", "attachments": [{"key": ticket["key"]}]}
    stolen = await sub.api.post(_send_path(side), body, key=key_b)
    assert stolen.status == 404, stolen
    assert (await sub.api.post(_send_path(home), body, key=key_a)).status == 201
    assert (await sub.api.post(_send_path(side), body, key=owner)).status == 201


# ---------------------------------------------------------------------------- adopted drafts


@pytest.mark.parametrize("to", ["victim@example.com.", "nodomain", "a@-bad-.example"])
@pytest_twisted.ensureDeferred
async def test_an_imap_draft_with_addresses_the_api_refuses_is_not_sent(server, db_dsn, to):
    """A draft an IMAP client APPENDs is adopted with the addresses as parsed, and
    sending it skipped every address check the API makes: a trailing-dot address
    dodged the suppression list, a domain-less or malformed one was queued. Now a
    draft's addresses are checked when it is composed (400 naming the field)."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "adopt"}, key=key)).json
    made = await server.api.post("/api/v1/suppressions", {"email": "victim@example.com"},
                                 key=key)
    assert made.status == 201, made
    raw = (f"From: {inbox['email']}\r\nTo: {to}\r\nSubject: hi\r\n"
           "Date: Sun, 29 Nov 2026 07:00:00 +0000\r\n\r\nbody\r\n").encode()

    def append():
        imap = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=20)
        imap.starttls(ssl_context=ssl.create_default_context(cafile=_DEV_TLS["ca"]))
        imap.login(inbox["email"], key)
        try:
            typ, data = imap.append("Drafts", "(\\Draft)", None, raw)
            assert typ == "OK", data
        finally:
            imap.logout()

    await deferToThread(append)
    [draft] = (await server.api.get(f"/api/v1/inboxes/{inbox['id']}/drafts",
                                    key=key)).json["data"]
    resp = await server.api.post(f"/api/v1/drafts/{draft['id']}/send", {}, key=key)
    assert resp.status in (400, 422), resp
    assert query(db_dsn, "SELECT count(*) FROM outbound_queue q JOIN messages m "
                 "ON m.id = q.message_id WHERE m.inbox_id = %s", (inbox["id"],)) == [(0,)]


@pytest_twisted.ensureDeferred
async def test_smtp_submission_to_a_trailing_dot_address_is_suppressed(db_dsn, openapi_checker,
                                                                       tmp_path):
    """``RCPT TO:<victim@example.com.>`` over submission was compared with the list as
    ``victim@example.com.`` and so dodged the entry for ``victim@example.com`` (DNS
    resolves the dotted name to the same mail server)."""
    config = make_config(db_dsn, outbound={"log_dir": str(tmp_path / "out")})
    server = await start_server(config, openapi_checker)
    try:
        _, owner = await server.new_org()
        inbox = (await server.api.post("/api/v1/inboxes", {"username": "dotty"},
                                       key=owner)).json
        assert (await server.api.post("/api/v1/suppressions", {"email": "victim@example.com"},
                                      key=owner)).status == 201

        def session():
            smtp = smtplib.SMTP("127.0.0.1", server.submission_port, timeout=30)
            try:
                smtp.ehlo()
                smtp.starttls(context=ssl.create_default_context(cafile=_DEV_TLS["ca"]))
                smtp.ehlo()
                smtp.login(inbox["email"], owner)
                smtp.docmd("MAIL", f"FROM:<{inbox['email']}>")
                return smtp.docmd("RCPT", "TO:<victim@example.com.>")
            finally:
                smtp.close()

        code, _ = await deferToThread(session)
        assert code >= 500, code
    finally:
        await server.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_name_under_an_earlier_shared_domain_is_the_installations(dom_server):
    """Only today's shared domain's subdomains were refused; a name under a shared
    domain the installation used before (still in shared_domains, its inboxes still
    there) could be registered by any tenant. Now 409 like today's."""
    dsn = dom_server.service.config.database.url
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO shared_domains (name, created_at) VALUES "
                    "('old-shared.example', now()) ON CONFLICT DO NOTHING")
    conn.close()
    _, key = await dom_server.new_org()
    for name in ("old-shared.example", "team.old-shared.example"):
        made = await dom_server.api.post("/api/v1/domains", {"name": name}, key=key)
        assert made.status == 409, made
    ok = await dom_server.api.post("/api/v1/domains", {"name": "notold-shared.example"},
                                   key=key)
    assert ok.status == 201, ok


# ---------------------------------------------------------------------------- drafts


def _in_an_hour() -> str:
    import time
    from datetime import UTC, datetime

    return datetime.fromtimestamp(time.time() + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest_twisted.ensureDeferred
async def test_keys_without_messages_read_do_not_read_drafts_through_answers(server):
    """GET /drafts/{id} needs messages:read, but scheduling (POST .../send with
    send_at), cancelling and sending (messages:send) and PATCH (messages:write) answered
    with the whole draft or its Sent copy: a send-only or write-only key read any
    draft of the organization. Now their answers leave the content out."""
    _, owner = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "drafty"},
                                   key=owner)).json

    async def key_with(*scopes):
        return (await server.api.post("/api/v1/api-keys", {"scopes": list(scopes)},
                                      key=owner)).json["key"]

    send_only, write_only = await key_with("messages:send"), await key_with("messages:write")

    async def draft():
        made = await server.api.post(f"/api/v1/inboxes/{inbox['id']}/drafts", {
            "to": "bob@remote.example", "subject": "Merger SECRET",
            "text_body": "The SECRET price"}, key=owner)
        assert made.status == 201, made
        return made.json

    first = await draft()
    calls = [(send_only, "POST", f"/api/v1/drafts/{first['id']}/send",
              {"send_at": _in_an_hour()}),
             (send_only, "POST", f"/api/v1/drafts/{first['id']}/cancel", {}),
             (write_only, "PATCH", f"/api/v1/drafts/{first['id']}", {"labels": ["x"]}),
             (send_only, "POST", f"/api/v1/drafts/{(await draft())['id']}/send", {})]
    for key, method, path, body in calls:
        resp = await server.api.request(method, path, key=key, json_body=body)
        assert resp.status == 200, resp
        assert "SECRET" not in resp.body.decode() and "remote.example" not in \
            resp.body.decode(), (path, resp.json)
    # A key that may read still sees everything.
    resp = await server.api.get(f"/api/v1/drafts/{first['id']}", key=owner)
    assert resp.json["subject"] == "Merger SECRET"


# ---------------------------------------------------------------------------- line separators


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c"])
@pytest_twisted.ensureDeferred
async def test_unicode_line_separators_in_header_texts_are_400_not_500(sub, sep):
    """Only CR, LF and NUL were refused in header texts, but the email package refuses
    every character str.splitlines() breaks at (U+2028, NEL, VT, FF, FS...): a subject
    or custom header holding one was an unhandled ValueError, a 500."""
    _, sender, _, key = await _setup(sub)
    for body, field in (({"subject": f"a{sep}Bcc: x@evil.example"}, "subject"),
                        ({"headers": {"X-Tag": f"a{sep}Bcc: x@evil.example"}}, "headers")):
        resp = await sub.api.post(_send_path(sender), {"to": "bob@remote.example", **body},
                                  key=key)
        assert resp.status == 400, resp
        assert resp.json["error"]["field"] == field


@pytest_twisted.ensureDeferred
async def test_replying_to_and_forwarding_a_stranger_s_odd_subject_and_filename_works(sub):
    """A stranger's encoded-word subject decoding to U+2028, and an attachment whose
    file name holds a vertical tab, made every reply / forward of that message a 500.
    Now the subject's separators become spaces and an unusable file name is replaced."""
    _, sender, _, key = await _setup(sub)
    raw = (b"From: Mallory <mallory@example.com>\r\nTo: " + sender["email"].encode()
           + b"\r\nSubject: =?utf-8?q?line=E2=80=A8Bcc:_x@evil.example?=\r\n"
           b"Date: Sun, 29 Nov 2026 07:00:00 +0000\r\nMessage-ID: <odd@example.com>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
           b"--b\r\nContent-Type: text/plain\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''a%0Bb%E2%80%A8c.txt\r\n\r\n"
           b"file\r\n--b--\r\n")
    orig = await _inbound_raw(sub, sender, raw)
    for path, body in (("reply", {"text_body": "ok"}),
                       ("forward", {"to": "dave@remote.example"})):
        resp = await sub.api.post(f"/api/v1/messages/{orig.message_id}/{path}", body,
                                  key=key)
        assert resp.status == 201, resp
        msg = await _raw(sub, resp.json["id"], key)
        assert msg["Bcc"] is None


# ---------------------------------------------------------------------------- IDNA


def test_a_deviation_character_does_not_send_to_another_domain():
    """Python's IDNA 2003 codec turns ``straße.de`` into ``strasse.de``, a different
    domain with a different owner, while registered domains use IDNA 2008 (UTS #46:
    ``xn--strae-oqa.de``): mail for one went to the other. Addresses and suppression
    entries now use IDNA 2008 too."""
    from agentpost.mail.compose import normalize_email

    assert normalize_email("x@straße.de", "to") == "x@xn--strae-oqa.de"
    assert normalize_address("X@Straße.de") == "x@xn--strae-oqa.de"
    assert normalize_email("x@\uff25xample.com", "to") == "x@example.com"
    assert normalize_address("x@\uff25xample.com") == "x@example.com"


@pytest_twisted.ensureDeferred
async def test_sending_to_a_deviation_domain_queues_the_idna2008_name(sub):
    _, sender, _, key = await _setup(sub)
    resp = await sub.api.post(_send_path(sender), {"to": "hans@straße.de", "text_body": "x"},
                              key=key)
    assert resp.status == 201, resp
    assert query(sub.service.config.database.url,
                 "SELECT r.address FROM outbound_queue q JOIN outbound_recipients r "
                 "ON r.queue_id = q.id WHERE q.message_id = %s",
                 (resp.json["id"],)) == [("hans@xn--strae-oqa.de",)]
