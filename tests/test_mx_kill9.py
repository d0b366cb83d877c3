"""Nothing acknowledged is lost when the server is killed outright (SIGKILL) while
sessions are delivering: every message answered 250 is in PostgreSQL afterwards, with
its bytes -- in its blob row when it is small, in the store when it is not."""

import hashlib
import json
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from email.utils import make_msgid
from pathlib import Path

from tests.helpers import query
from tests.test_cli import ROOT, _free_port, run
from tests.test_workers import _kill_leftovers, _wait


def _message(to: str, n: int, big: bool) -> tuple[str, bytes]:
    msgid = make_msgid(f"k{n}", "kill.test")
    body = ("a line that makes the message long enough for the store\r\n" * 5000
            if big else "short\r\n")
    raw = (f"From: a@kill.test\r\nTo: {to}\r\nSubject: kill {n}\r\nMessage-ID: {msgid}\r\n"
           f"\r\n{body}").encode()
    return msgid, raw


def _sender(port: int, to: str, first: int, acked: dict[str, bytes],
            stop: threading.Event) -> None:
    n = first
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                while not stop.is_set():
                    n += 1
                    msgid, raw = _message(to, n, big=n % 5 == 0)
                    smtp.sendmail("a@kill.test", [to], raw)
                    acked[msgid] = raw  # only after the 250
        except (OSError, smtplib.SMTPException):
            if not stop.is_set():
                time.sleep(0.05)


def test_every_acknowledged_message_survives_sigkill(db_dsn, tmp_path):
    http_port, mx_port = _free_port(), _free_port()
    blobs = tmp_path / "blobs"
    config = tmp_path / "agentpost.toml"
    config.write_text(
        f'[database]\nurl = "{db_dsn}"\n[http]\nport = {http_port}\n'
        f'[smtp]\nmx_bind = "127.0.0.1"\nmx_port = {mx_port}\nsubmission_enabled = false\n'
        f'[imap]\nenabled = false\n[storage]\npath = "{blobs}"\n')
    boot = run("bootstrap", "--org", "Kill", "--json",
               env={"AGENTPOST_DATABASE_URL": db_dsn})
    assert boot.returncode == 0, boot.stderr
    key = json.loads(boot.stdout)["api_key"]
    proc = subprocess.Popen([sys.executable, "-m", "agentpost.cli", "--config", str(config),
                             "serve"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    acked: dict[str, bytes] = {}
    stop = threading.Event()
    try:
        def inbox():
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/api/v1/inboxes", method="POST",
                data=b'{"username": "kill"}', headers={
                    "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    return json.loads(resp.read())["email"]
            except OSError:
                return None

        to = _wait(inbox)
        assert to, "the server did not start"
        senders = [threading.Thread(target=_sender, args=(mx_port, to, i * 100_000, acked,
                                                          stop), daemon=True)
                   for i in range(4)]
        for thread in senders:
            thread.start()
        assert _wait(lambda: len(acked) >= 60, timeout=60), len(acked)
        proc.send_signal(signal.SIGKILL)  # mid-delivery: sessions are still sending
        proc.wait(timeout=10)
        stop.set()
        for thread in senders:
            thread.join(timeout=15)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
        _kill_leftovers(config)

    rows = query(db_dsn, "SELECT m.message_id_header, b.key, b.data FROM messages m "
                 "JOIN blobs b ON b.key = m.raw_blob_key WHERE m.message_id_header = ANY(%s)",
                 ([msgid.strip("<>") for msgid in acked],))
    stored = {f"<{msgid}>": (blob_key, data) for msgid, blob_key, data in rows}
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost"
    kinds = set()
    for msgid, raw in acked.items():
        blob_key, data = stored[msgid]
        if blob_key.startswith("db/"):
            kept = bytes(data)
            kinds.add("inline")
        else:
            kept = (blobs / blob_key).read_bytes()
            kinds.add("store")
        assert kept.endswith(raw) and blob_key.endswith(hashlib.sha256(kept).hexdigest())
    assert kinds == {"inline", "store"}
    assert Path(blobs).is_dir()
