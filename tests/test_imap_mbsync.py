"""A real IMAP client from the distribution against the real server: ``mbsync`` (isync)
synchronises an inbox with a local Maildir, both ways.

- pull: mail delivered over SMTP, ingested directly and APPENDed to Sent lands in the
  Maildir with the stored bytes, flags and INTERNALDATE (as the file's mtime);
- push: new local files, also in folders only the Maildir has (``Projects`` and
  ``Projects/2026``, which mbsync CREATEs), arrive in the right server folder with their
  bytes, flags and arrival date;
- flags and deletions both ways (Maildir ``S``/``F``/``T`` and removed files; API read
  state, IMAP STORE and API deletion), then a sync that finds nothing left to do.

Once over STARTTLS (LOGIN) and once over implicit TLS (AUTHENTICATE PLAIN when Cyrus SASL
has the plugin, else LOGIN); the certificate is checked against the dev CA only.

"Byte for byte" allows exactly what mbsync itself does to every message it copies: the
line endings (CRLF on the wire, LF in a Maildir) and one ``X-TUID`` header appended to
the header block (its marker to find a copy again after an interrupted sync).

Written for isync 1.4 (Debian 12 ships 1.4.4): ``SSLType`` (1.5 renamed it ``TLSType``),
``Far``/``Near``. ``make test`` installs isync when run as root (Makefile, postgres-bin);
without root and without mbsync these tests are skipped, saying how to install it.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import ssl
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import _DEV_TLS
from tests.mailfactory import make_message
from tests.test_mx import _send

MBSYNC_TIMEOUT = 60
#: The arrival date given to locally written files (mbsync APPENDs it with CopyArrivalDate).
LOCAL_DATE = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp()


def _mbsync_binary() -> str:
    path = shutil.which("mbsync")
    if path:
        return path
    if os.geteuid() == 0:
        pytest.fail("mbsync is missing although running as root: `make test` installs it "
                    "(Makefile, target postgres-bin), or run: apt-get install isync")
    pytest.skip("mbsync is not installed (Debian/Ubuntu package isync); "
                "install it with: sudo apt-get install isync")


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Local(NamedTuple):
    """A message file in the Maildir."""

    path: Path
    flags: str
    data: bytes
    mtime: float


class Remote(NamedTuple):
    """A message in a server folder, as imaplib sees it."""

    uid: int
    flags: set[str]
    date: float
    data: bytes


def _message_id(data: bytes) -> str:
    found = re.search(rb"^Message-ID: (<[^>]+>)", data, re.M | re.I)
    assert found, data[:500]
    return found.group(1).decode()


class Mbsync:
    """One mbsync configuration: far side the test server, near side a Maildir in tmp."""

    def __init__(self, tmp: Path, port: int, tls: str, user: str, password: str) -> None:
        self.binary = _mbsync_binary()
        self.home = tmp / "home"
        self.home.mkdir()
        self.inbox = tmp / "maildir-inbox"
        self.root = tmp / "maildir"
        self.root.mkdir()  # mbsync creates the folders, not the store itself
        self.config = tmp / "mbsyncrc"
        # isync 1.4 checks the host name against DNS names only (the dev certificate's
        # 127.0.0.1 is an IP SAN), so connect as "localhost".
        auth = "AuthMechs LOGIN\n" if tls == "STARTTLS" else ""
        self.config.write_text(
            "IMAPAccount agentpost\n"
            "Host localhost\n"
            f"Port {port}\n"
            f"User {_quoted(user)}\n"
            f"Pass {_quoted(password)}\n"
            f"SSLType {tls}\n"
            f"CertificateFile {_quoted(_DEV_TLS['ca'])}\n"
            "SystemCertificates no\n"
            f"{auth}"
            "Timeout 30\n"
            "\n"
            "IMAPStore agentpost-far\n"
            "Account agentpost\n"
            "\n"
            "MaildirStore agentpost-near\n"
            f"Path {_quoted(str(self.root) + '/')}\n"
            f"Inbox {_quoted(str(self.inbox))}\n"
            "SubFolders Verbatim\n"
            "\n"
            "Channel agentpost\n"
            "Far :agentpost-far:\n"
            "Near :agentpost-near:\n"
            "Patterns *\n"
            "Sync All\n"
            "Create Both\n"
            "Expunge Both\n"
            "CopyArrivalDate yes\n"
            "SyncState *\n")

    def run(self, *extra: str) -> subprocess.CompletedProcess:
        """One full sync (blocking: call it in a thread)."""
        # mbsync sleeps a second ("Maildir notice: sleeping due to race condition") when a
        # cur/ or new/ folder changed within the current second, as they all just did here.
        # Date them back, as if the local changes had been made a little earlier.
        past = time.time() - 5
        for tree in (self.inbox, self.root):
            for sub in (*tree.glob("**/cur"), *tree.glob("**/new")):
                os.utime(sub, (past, past))
        env = {**os.environ, "HOME": str(self.home)}
        args = [self.binary, "-c", str(self.config), *extra, "-a"]
        try:
            return subprocess.run(args, capture_output=True, timeout=MBSYNC_TIMEOUT, env=env,
                                  check=False)
        except subprocess.TimeoutExpired as exc:  # killed; keep what it said so far
            return subprocess.CompletedProcess(
                args, f"timeout ({MBSYNC_TIMEOUT}s)", exc.stdout or b"",
                (exc.stderr or b"") + b"\n[killed: timed out]")

    async def sync(self) -> None:
        """Sync in a worker thread (the reactor keeps serving). ``-Dn`` (verbose, plus the
        IMAP exchange without payloads or the password) only shows when it goes wrong:
        a failure, or any warning (mbsync warns on stderr about odd server answers)."""
        done = await deferToThread(self.run, "-Dn")
        assert done.returncode == 0 and not done.stderr.strip(), (
            f"mbsync exited {done.returncode}\n--- stdout\n"
            f"{done.stdout.decode(errors='replace')}\n--- stderr\n"
            f"{done.stderr.decode(errors='replace')}")

    def folder(self, name: str) -> Path:
        return self.inbox if name == "INBOX" else self.root / name

    def messages(self, name: str) -> dict[str, Local]:
        """A local folder's messages by Message-ID."""
        found = {}
        for sub in ("new", "cur"):
            for path in (self.folder(name) / sub).glob("*"):
                flags = path.name.split(":2,", 1)[1] if ":2," in path.name else ""
                data = path.read_bytes()
                found[_message_id(data)] = Local(path, flags, data, path.stat().st_mtime)
        return found

    def put(self, name: str, data: bytes, unique: str, flags: str = "") -> Path:
        """Write a message into a local folder the way a Maildir MUA does."""
        folder = self.folder(name)
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        tmp = folder / "tmp" / unique
        tmp.write_bytes(data)
        os.utime(tmp, (LOCAL_DATE, LOCAL_DATE))
        final = folder / "cur" / f"{unique}:2,{flags}" if flags else folder / "new" / unique
        tmp.rename(final)
        return final


def _set_flags(path: Path, flags: str) -> Path:
    """Rename a Maildir file to carry ``flags`` (moving it to cur/), as a MUA does."""
    base = path.name.split(":2,", 1)[0]
    target = path.parent.parent / "cur" / f"{base}:2,{''.join(sorted(flags))}"
    path.rename(target)
    return target


def _untagged(data: bytes, newline: bytes = b"\n") -> bytes:
    """``data`` without the one ``X-TUID`` header mbsync appends to the header block."""
    head, blank, body = data.partition(newline * 2)
    *lines, tuid = head.split(newline)
    assert re.fullmatch(rb"X-TUID: [A-Za-z0-9+/]{12}", tuid), head[-300:]
    return newline.join(lines) + blank + body


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def _imap(port: int, user: str, key: str) -> imaplib.IMAP4_SSL:
    context = ssl.create_default_context(cafile=_DEV_TLS["ca"])
    imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=20)
    imap.login(user, key)
    return imap


def _remote(port: int, user: str, key: str, name: str) -> dict[str, Remote]:
    """A server folder's messages by Message-ID (EXAMINE: reading changes nothing)."""
    imap = _imap(port, user, key)
    try:
        typ, data = imap.select(f'"{name}"', readonly=True)
        assert typ == "OK", (name, data)
        found = {}
        if data != [b"0"]:
            typ, data = imap.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
            assert typ == "OK", data
            for item in data:
                if isinstance(item, tuple):
                    meta = item[0]
                    uid = int(re.search(rb"UID (\d+)", meta).group(1))
                    flags = set(re.search(rb"FLAGS \(([^)]*)\)", meta).group(1)
                                .decode().split())
                    date = datetime.strptime(
                        re.search(rb'INTERNALDATE "([^"]+)"', meta).group(1).decode(),
                        "%d-%b-%Y %H:%M:%S %z").timestamp()
                    found[_message_id(item[1])] = Remote(uid, flags, date, item[1])
        return found
    finally:
        imap.logout()


def _folders(port: int, user: str, key: str) -> set[str]:
    imap = _imap(port, user, key)
    try:
        typ, data = imap.list()
        assert typ == "OK", data
        return {line.decode().rsplit(' "/" ', 1)[1].strip('"') for line in data}
    finally:
        imap.logout()


def _imap_command(port: int, user: str, key: str, folder: str, *command: str) -> None:
    imap = _imap(port, user, key)
    try:
        imap.select(f'"{folder}"')
        typ, data = imap.uid(*command)
        assert typ == "OK", data
    finally:
        imap.logout()


def _append(port: int, user: str, key: str, folder: str, raw: bytes, flags: str) -> None:
    imap = _imap(port, user, key)
    try:
        typ, data = imap.append(folder, flags, None, raw)
        assert typ == "OK", data
    finally:
        imap.logout()


@pytest.mark.parametrize("tls", ["STARTTLS", "IMAPS"])
@pytest_twisted.ensureDeferred
async def test_mbsync_syncs_a_maildir_both_ways(server, tmp_path, tls):
    """Pull, push, flags and deletions both ways, folders created from the Maildir, and a
    last sync that changes nothing."""
    _, key = await server.new_org()
    resp = await server.api.post("/api/v1/inboxes", {"username": "mbsync"}, key=key)
    assert resp.status == 201, resp
    inbox = resp.json
    user = inbox["email"]
    mbsync = Mbsync(tmp_path, server.imap_port if tls == "STARTTLS" else server.imaps_port,
                    tls, user, key)

    async def api_messages() -> dict[str, dict]:
        resp = await server.api.get(f"/api/v1/inboxes/{inbox['id']}/messages?limit=100",
                                    key=key)
        assert resp.status == 200, resp
        return {f"<{row['message_id'].strip('<>')}>": row for row in resp.json["data"]}

    async def raw(row: dict) -> bytes:
        resp = await server.api.get(f"/api/v1/messages/{row['id']}/raw", key=key)
        assert resp.status == 200, resp
        return resp.body

    async def remote(name: str) -> dict[str, Remote]:
        return await deferToThread(_remote, server.imaps_port, user, key, name)

    # --- 1. pull: SMTP delivery, direct ingest, and an APPEND to Sent.
    smtp_raw = make_message(to=user, subject="Über SMTP", msgid="<smtp@x>",
                            body="Grüße über SMTP.\n",
                            extra_headers=[("X-Dup", "a"), ("X-Dup", "b")])
    assert (await deferToThread(_send, server.mx_port, "a@example.com", [user], smtp_raw,
                                starttls=False)) == ("ok", {})
    ingest_raw = make_message(to=user, subject="Ingested", msgid="<ingest@x>",
                              attachments=[("a.bin", "application/octet-stream",
                                            bytes(range(256)) * 2048)])  # 512 KiB
    await server.deliver(ingest_raw, [user])
    sent_raw = make_message(frm=user, to="bob@example.com", subject="Sent by me",
                            msgid="<sent@x>")
    await deferToThread(_append, server.imaps_port, user, key, "Sent", sent_raw, "(\\Seen)")

    await mbsync.sync()

    api = await api_messages()
    stored = {mid: await raw(row) for mid, row in api.items()}
    assert stored["<smtp@x>"].endswith(smtp_raw) and stored["<smtp@x>"] != smtp_raw  # trace
    assert stored["<ingest@x>"].endswith(ingest_raw) and stored["<sent@x>"] == sent_raw
    for name, expected in (("INBOX", {"<smtp@x>": "", "<ingest@x>": ""}),
                           ("Sent", {"<sent@x>": "S"})):
        local, far = mbsync.messages(name), await remote(name)
        assert {mid: m.flags for mid, m in local.items()} == expected, name
        for mid, message in local.items():
            assert _untagged(message.data) == _lf(stored[mid]), mid
            assert message.mtime == far[mid].date, mid  # CopyArrivalDate: INTERNALDATE
    for name in ("Drafts", "Trash", "Junk"):
        assert mbsync.messages(name) == {}, name

    # --- 2. push: local flags, a new file in INBOX, and new local folders.
    local = mbsync.messages("INBOX")
    _set_flags(local["<smtp@x>"].path, "S")
    _set_flags(local["<ingest@x>"].path, "F")
    local_raw = _lf(make_message(to=user, subject="Written locally", msgid="<local@x>",
                                 body="Line one.\nLine two.\n",
                                 attachments=[("b.bin", "application/octet-stream",
                                               bytes(range(255, -1, -1)) * 2048)]))
    mbsync.put("INBOX", local_raw, "1700000000.M1P1.testhost")
    project_raw = _lf(make_message(to=user, subject="Filed locally", msgid="<project@x>"))
    mbsync.put("Projects", project_raw, "1700000001.M2P1.testhost", flags="S")
    nested_raw = _lf(make_message(to=user, subject="Filed deeper", msgid="<nested@x>"))
    mbsync.put("Projects/2026", nested_raw, "1700000002.M3P1.testhost", flags="FS")

    await mbsync.sync()

    api = await api_messages()
    assert (api["<smtp@x>"]["read"], api["<smtp@x>"]["flagged"]) == (True, False)
    assert (api["<ingest@x>"]["read"], api["<ingest@x>"]["flagged"]) == (False, True)
    assert (api["<local@x>"]["read"], api["<local@x>"]["flagged"]) == (False, False)
    assert (api["<nested@x>"]["read"], api["<nested@x>"]["flagged"]) == (True, True)
    assert {"Projects", "Projects/2026"} <= await deferToThread(
        _folders, server.imaps_port, user, key)
    for name, mid, data, flags in (
            ("INBOX", "<local@x>", local_raw, set()),
            ("Projects", "<project@x>", project_raw, {"\\Seen"}),
            ("Projects/2026", "<nested@x>", nested_raw, {"\\Seen", "\\Flagged"})):
        far = await remote(name)
        assert _untagged(await raw(api[mid]), b"\r\n") == _crlf(data), mid
        assert _untagged(far[mid].data, b"\r\n") == _crlf(data), mid
        assert far[mid].flags & {"\\Seen", "\\Flagged"} == flags, (mid, far[mid].flags)
        assert far[mid].date == LOCAL_DATE, mid  # the file's mtime became INTERNALDATE
    far = await remote("INBOX")
    assert sorted(far) == ["<ingest@x>", "<local@x>", "<smtp@x>"]
    assert far["<smtp@x>"].flags & {"\\Seen", "\\Flagged"} == {"\\Seen"}
    assert far["<ingest@x>"].flags & {"\\Seen", "\\Flagged"} == {"\\Flagged"}
    local = mbsync.messages("INBOX")
    assert sorted(local) == sorted(far)
    assert re.search(rf",U={far['<local@x>'].uid}(:2,|$)",
                     local["<local@x>"].path.name)  # the APPENDUID, in the file name

    # --- 3. server side: read state (API), a flag (STORE), a deletion (API), new mail.
    resp = await server.api.patch(f"/api/v1/messages/{api['<ingest@x>']['id']}",
                                  {"read": True}, key=key)
    assert resp.status == 200, resp
    resp = await server.api.delete(f"/api/v1/messages/{api['<smtp@x>']['id']}", key=key)
    assert resp.status == 204, resp
    await deferToThread(_imap_command, server.imaps_port, user, key, "INBOX", "STORE",
                        str(far["<local@x>"].uid), "+FLAGS", "(\\Flagged)")
    late_raw = make_message(to=user, subject="Later", msgid="<late@x>")
    await server.deliver(late_raw, [user])

    await mbsync.sync()

    local = mbsync.messages("INBOX")
    assert {mid: m.flags for mid, m in local.items()} == {
        "<ingest@x>": "FS", "<local@x>": "F", "<late@x>": ""}
    late_stored = await raw((await api_messages())["<late@x>"])
    assert _untagged(local["<late@x>"].data) == _lf(late_stored)

    # --- 4. local deletions: a removed file and a trashed (T) one are expunged upstream.
    local["<local@x>"].path.unlink()
    _set_flags(local["<ingest@x>"].path, "FST")

    await mbsync.sync()

    assert sorted(await api_messages()) == ["<late@x>", "<nested@x>", "<project@x>",
                                            "<sent@x>"]
    assert {mid: m.data for mid, m in (await remote("INBOX")).items()} == {
        "<late@x>": late_stored}
    assert sorted(mbsync.messages("INBOX")) == ["<late@x>"]

    # --- 5. nothing changed since: another sync leaves both sides exactly as they are.
    names = ("INBOX", "Sent", "Projects", "Projects/2026", "Drafts", "Trash", "Junk")
    before = [(mbsync.messages(name), await remote(name)) for name in names]
    await mbsync.sync()
    assert [(mbsync.messages(name), await remote(name)) for name in names] == before
