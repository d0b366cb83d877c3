"""Malformed input is always stored (byte-exact) or cleanly refused; faults are temporary."""

import io

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpost.mail.parse import parse_message
from agentpost.model.errors import StorageFailure, TemporaryFailure
from tests.mailfactory import make_message

_header_names = st.sampled_from(["From", "To", "Cc", "Subject", "Date", "Message-ID",
                                 "References", "In-Reply-To", "Content-Type",
                                 "Content-Transfer-Encoding", "Content-Disposition",
                                 "MIME-Version", "X-Weird"])
_junk = st.binary(max_size=200)
_texty = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)


@st.composite
def mime_messages(draw):
    """Messages that are wrong in the ways real mail is wrong."""
    headers = draw(st.lists(st.tuples(_header_names, st.one_of(
        _texty.map(lambda t: t.encode("utf-8", "surrogatepass")), _junk,
        st.sampled_from([b"multipart/mixed; boundary=", b'multipart/mixed; boundary="b"',
                         b"text/plain; charset=x-unknown", b"base64", b"quoted-printable",
                         b"=?utf-8?b?!!!?=", b"=?bogus?q?x?=", b"<unterminated",
                         b"attachment; filename*=utf-8''%ff%fe"]))), max_size=12))
    lines = [name.encode() + b": " + value.replace(b"\r", b"").replace(b"\n", b" ")
             for name, value in headers]
    body = draw(st.one_of(_junk, st.sampled_from([
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n",  # never closed
        b"--b\r\n\r\n--b--\r\n",
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\n!!!not base64!!!\r\n--b--\r\n",
        b"=\xff=\r\n" * 10,
    ])))
    sep = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    return sep.join(lines) + sep + sep + body


@settings(max_examples=300, deadline=None)
@given(mime_messages())
def test_parser_never_raises(raw):
    """Whatever the bytes, parsing yields a result (fields may be empty)."""
    parsed = parse_message(raw)
    assert isinstance(parsed.subject, str)
    assert "\x00" not in (parsed.text_body or "") + parsed.subject


@pytest_twisted.ensureDeferred
async def test_generated_corpus_is_stored_byte_exact(server):
    """A generated malformed corpus goes through the real ingest path and the API."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "fuzz"}, key=key)).json
    corpus = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mime_messages())
    def collect(raw):
        corpus.append(raw)

    collect()
    for raw in corpus:
        [stored] = await server.deliver(raw, [inbox["email"]])
        got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
        assert got.status == 200 and got.body == raw
        meta = await server.api.get(f"/api/v1/messages/{stored.message_id}", key=key)
        assert meta.status == 200, meta


@pytest_twisted.ensureDeferred
async def test_blob_store_failure_is_temporary_and_stores_nothing(server, tmp_path, db_dsn):
    """A failing blob store raises StorageFailure (SMTP 451) and leaves no rows behind."""
    from twisted.internet import reactor

    from agentpost.core.ingest import Ingest
    from agentpost.storage.blobs import LocalBlobStore

    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "brokenstore"},
                                   key=key)).json
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store wants a directory")
    broken = Ingest(server.core.db, LocalBlobStore(blocker / "blobs", reactor=reactor), reactor)
    target = await server.core.router.resolve(inbox["email"], "a@example.com")
    with pytest.raises(StorageFailure):
        await broken.store([target], io.BytesIO(make_message()), envelope_from="a@example.com")
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    assert listed.json["data"] == []


@pytest_twisted.ensureDeferred
async def test_database_down_during_ingest_is_temporary(server, pg):
    """With PostgreSQL stopped, ingest raises TemporaryFailure; after recovery it succeeds."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "dbdown"}, key=key)).json
    target = await server.core.router.resolve(inbox["email"], "a@example.com")
    raw = make_message(subject="retry me")
    pg.stop()
    try:
        with pytest.raises(TemporaryFailure):
            await server.core.ingest.store([target], io.BytesIO(raw),
                                           envelope_from="a@example.com")
    finally:
        pg.start()
    [stored] = await server.core.ingest.store([target], io.BytesIO(raw),
                                              envelope_from="a@example.com")
    listed = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages", key=key)
    assert [m["id"] for m in listed.json["data"]] == [stored.message_id]


@pytest_twisted.ensureDeferred
async def test_nul_bytes_in_headers_are_stored(server):
    """NUL bytes (which PostgreSQL text cannot hold) never stop a delivery."""
    _, key = await server.new_org()
    inbox = (await server.api.post("/api/v1/inboxes", {"username": "nul"}, key=key)).json
    raw = (b"From: a\x00b <a@example.com>\r\nSubject: nul\x00here\r\nTo: " +
           inbox["email"].encode() + b"\r\n\r\nbody\x00\r\n")
    [stored] = await server.deliver(raw, [inbox["email"]])
    got = await server.api.get(f"/api/v1/messages/{stored.message_id}/raw", key=key)
    assert got.body == raw
