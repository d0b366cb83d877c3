"""A second, real ``agentpost serve`` OS process on the test's database and blob store.

Cross-process behaviour (LISTEN/NOTIFY fan-out to IDLE, revocations ending sessions in
another process) is only proven by a separate interpreter, not by a second service in
this reactor.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import _DEV_TLS
from tests.test_cli import _free_port
from tests.test_workers import ROOT, _kill_leftovers, _wait


class SecondProcess:
    """Started on construction; ``ready()`` waits for its IMAP port, ``stop()`` ends it
    and returns what it printed."""

    def __init__(self, tmp_path: Path, db_dsn: str, server: Any, *, tls: bool = False,
                 mx: bool = False, extra: str = "") -> None:
        """``mx``: also listen for SMTP on ``self.mx_port`` (loopback); ``extra``: more
        TOML sections appended to the configuration (sections not written here)."""
        self.imap_port, http_port = _free_port(), _free_port()
        self.http_port = http_port
        self.mx_port = _free_port() if mx else None
        self.tls_port = _free_port() if tls else None
        tls_conf = (f'[tls]\ncert = "{_DEV_TLS["cert"]}"\nkey = "{_DEV_TLS["key"]}"\n'
                    if tls else "")
        imap_tls = f"tls_port = {self.tls_port}\n" if tls else ""
        self.config = tmp_path / "second.toml"
        self.config.write_text(
            f'[database]\nurl = "{db_dsn}"\n[http]\nport = {http_port}\n'
            + (f'[smtp]\nmx_bind = "127.0.0.1"\nmx_port = {self.mx_port}\n' if mx
               else '[smtp]\nmx_enabled = false\n') +
            f'[storage]\npath = "{server.service.config.storage.path}"\n'
            '[mail]\nshared_domain = "agents.test"\n' + tls_conf +
            f'[imap]\nbind = "127.0.0.1"\nport = {self.imap_port}\n' + imap_tls +
            'allow_plaintext_login = true\n' + extra)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentpost.cli", "--config", str(self.config), "serve"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ready(self) -> bool:
        """Block (in a test thread) until the IMAP and HTTP ports accept, at most 30 s
        (IMAP listens first; a test that talks HTTP must not race the second port)."""
        def accepting() -> bool:
            try:
                for port in (self.imap_port, self.http_port,
                             *([self.mx_port] if self.mx_port else [])):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        return _wait(accepting, timeout=30)

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        _kill_leftovers(self.config)
        return out
