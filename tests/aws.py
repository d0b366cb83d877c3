"""A local AWS stand-in for tests: moto in server mode on 127.0.0.1, one per session.

Load it as a pytest plugin (``pytest_plugins = ["tests.aws"]`` in tests/conftest.py) to
get the fixtures; the helpers can be imported directly.

Why a subprocess rather than moto's in-process decorators: the app talks to it over real
HTTP exactly as it would to AWS, with endpoints passed explicitly (nothing in os.environ
changes), and the reactor stays free while moto works. Its output goes to a log file
(an undrained PIPE hangs moto after a few hundred requests); the port is read from that
log because the server is started on port 0.

boto3 is imported lazily so that loading this plugin costs nothing for other tests.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

AWS_REGION = "us-east-1"
AWS_ACCESS_KEY_ID = "testing"
AWS_SECRET_ACCESS_KEY = "testing"
TEST_BUCKET = "agentpost-test-blobs"
START_BUDGET_S = 10.0

_RUNNING_ON = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")


def boto3_client(service: str, endpoint_url: str, **config: Any) -> Any:
    """A boto3 client for the local endpoint: dummy credentials, fixed region, SigV4,
    path-style addressing (``bucket.127.0.0.1`` would not resolve). Blocking: call it
    from a fixture, or from a thread inside reactor-driven tests."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=AWS_ACCESS_KEY_ID, aws_secret_access_key=AWS_SECRET_ACCESS_KEY,
        region_name=AWS_REGION)
    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                 retries={"mode": "standard", "total_max_attempts": 1}, **config)
    return session.client(service, endpoint_url=endpoint_url, config=cfg)


class MotoServer:
    """A running ``python -m moto.server`` subprocess."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path
        self.endpoint_url = f"http://127.0.0.1:{port}"

    def reset(self) -> None:
        """Forget all state of all services (about 20 ms)."""
        url = f"{self.endpoint_url}/moto-api/reset"
        req = urllib.request.Request(url, method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()

    def client(self, service: str, **config: Any) -> Any:
        """A boto3 client for ``service`` pointed at this server."""
        return boto3_client(service, self.endpoint_url, **config)

    def log_tail(self, limit: int = 4000) -> str:
        """The end of moto's log, for failure messages."""
        try:
            return self.log_path.read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate by PID (SIGTERM, then SIGKILL after 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _wait_ready(url: str, deadline: float) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"moto did not answer /moto-api/ at {url}: {last}")


def start_moto(workdir: Path, budget_s: float = START_BUDGET_S) -> MotoServer:
    """Spawn moto on 127.0.0.1 port 0, learn its port from the log, wait until it answers."""
    log_path = workdir / "moto.log"
    deadline = time.monotonic() + budget_s
    with open(log_path, "wb") as log:
        process = subprocess.Popen(  # fixed argv, our own interpreter
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    port: int | None = None
    try:
        while time.monotonic() < deadline:
            match = _RUNNING_ON.search(log_path.read_bytes())
            if match:
                port = int(match.group(1))
                break
            if process.poll() is not None:
                break
            time.sleep(0.02)
        if port is None:
            raise RuntimeError(
                f"moto did not announce its port (exit code {process.poll()}):\n"
                + log_path.read_bytes()[-4000:].decode("utf-8", "replace"))
        server = MotoServer(process, port, log_path)
        _wait_ready(server.endpoint_url, deadline)
        return server
    except BaseException:
        process.kill()
        process.wait(timeout=5)
        raise


@dataclass
class S3Bucket:
    """An empty bucket on a freshly reset moto, plus the facts a store needs to reach it."""

    name: str
    endpoint_url: str
    region: str
    access_key: str
    secret_key: str
    client: Any  # a blocking boto3 S3 client, for assertions (use it from a thread)

    def store_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``S3BlobStore`` pointing at this bucket."""
        return {"endpoint_url": self.endpoint_url, "region": self.region,
                "access_key": self.access_key, "secret_key": self.secret_key}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server for the whole session, killed at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="agentpost-moto-"))
    server = start_moto(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def _moto_s3_client(moto_server: MotoServer) -> Any:
    # Building a client reads botocore's models: do it once per session.
    return moto_server.client("s3")


@pytest.fixture
def s3_bucket(moto_server: MotoServer, _moto_s3_client: Any) -> S3Bucket:
    """Reset moto (all services) and create one empty bucket.

    Blocking calls are fine here: fixtures run before the test's reactor work, and moto
    is another process, so nothing it needs is served by this reactor.
    """
    moto_server.reset()
    _moto_s3_client.create_bucket(Bucket=TEST_BUCKET)
    return S3Bucket(TEST_BUCKET, moto_server.endpoint_url, AWS_REGION, AWS_ACCESS_KEY_ID,
                    AWS_SECRET_ACCESS_KEY, _moto_s3_client)


def sesv2_client(endpoint_url: str) -> Any:
    """A blocking boto3 SESv2 client for test set-up and assertions (no retries)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=AWS_ACCESS_KEY_ID, aws_secret_access_key=AWS_SECRET_ACCESS_KEY,
        region_name=AWS_REGION)
    return session.client("sesv2", endpoint_url=endpoint_url,
                          config=Config(retries={"mode": "standard",
                                                 "total_max_attempts": 1}))


def sent_mail(server: MotoServer) -> dict[str, dict[str, Any]]:
    """What moto's SES "sent" as raw messages, by SES MessageId: ``source``,
    ``destinations`` (deduplicated: moto appends the To/Cc header addresses to the
    explicit list) and ``raw`` (bytes; moto keeps the message as a UTF-8 str)."""
    import json

    with urllib.request.urlopen(f"{server.endpoint_url}/moto-api/data.json",
                                timeout=10) as resp:
        data = json.loads(resp.read())
    out: dict[str, dict[str, Any]] = {}
    for entry in data.get("ses", {}).get("RawMessage", []):
        out[entry["id"]] = {"source": entry["source"],
                            "destinations": list(dict.fromkeys(entry["destinations"])),
                            "raw": entry["raw_data"].encode("utf-8")}
    return out


@dataclass
class SESAccount:
    """A freshly reset moto SES with verified sending domains."""

    endpoint_url: str
    region: str
    domains: tuple[str, ...]
    client: Any  # blocking boto3 SESv2 client, for set-up and assertions
    server: MotoServer

    def sent(self) -> dict[str, dict[str, Any]]:
        """See :func:`sent_mail`."""
        return sent_mail(self.server)


SES_DOMAINS = ("agents.test",)


@pytest.fixture(scope="session")
def _moto_ses_client(moto_server: MotoServer) -> Any:
    return sesv2_client(moto_server.endpoint_url)


@pytest.fixture
def ses_account(moto_server: MotoServer, _moto_ses_client: Any) -> SESAccount:
    """Reset moto (all services) and create the domain identities of SES_DOMAINS (moto
    verifies them at once), so any address at those domains may send."""
    moto_server.reset()
    for domain in SES_DOMAINS:
        _moto_ses_client.create_email_identity(EmailIdentity=domain)
    return SESAccount(moto_server.endpoint_url, AWS_REGION, SES_DOMAINS, _moto_ses_client,
                      moto_server)


@pytest.fixture
def ses_faults(ses_account: SESAccount) -> Iterator[Any]:
    """A fault proxy (tests/aws_faults.py) in front of the reset, identity-seeded moto
    SES; point the app at its ``endpoint_url``."""
    from tests.aws_faults import FaultProxy

    proxy = FaultProxy(ses_account.endpoint_url)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port with nothing listening (bound, then released), for outage tests."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


def ses_outbound(endpoint: str, **extra: Any) -> dict[str, Any]:
    """The ``[outbound]`` section of a server sending through the SES stand-in at
    ``endpoint`` (plain HTTP on loopback, the stand-in's credentials, a poll interval
    long enough that only wake-ups drive the queue), plus ``extra``."""
    return {"transport": "ses", "ses_endpoint": endpoint, "ses_allow_insecure_endpoint": True,
            "ses_region": AWS_REGION, "ses_access_key_id": AWS_ACCESS_KEY_ID,
            "ses_secret_access_key": AWS_SECRET_ACCESS_KEY, "poll_interval": "1h", **extra}
