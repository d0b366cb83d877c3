"""The test harness: a real, ephemeral PostgreSQL cluster and real servers on sockets.

One cluster per test session (fsync off: it is thrown away). A migrated template
database is built once; each test gets its own database cloned from it with
``CREATE DATABASE … TEMPLATE``, which costs tens of milliseconds.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from agentpost.config.loader import parse_config
from agentpost.dev.embedded_pg import EmbeddedPostgres
from agentpost.storage.database import Txn
from agentpost.storage.migrations import migrate
from tests.helpers import ApiClient, OpenAPIChecker

pytest_plugins = ["tests.aws", "tests.webhook_receiver"]

TEMPLATE = "agentpost_template"
_counter = itertools.count(1)
# Every blob store of the run lives under one folder, removed when the run ends (each
# test's server used to leave its own folder behind in /tmp: thousands per run).
_BLOB_ROOT = Path(tempfile.mkdtemp(prefix="agentpost-test-blobs-"))


@pytest.fixture(scope="session", autouse=True)
def _remove_blob_root() -> Any:
    yield
    shutil.rmtree(_BLOB_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def pg() -> Any:
    """An ephemeral cluster for the whole run, stopped and removed at the end."""
    var_dir = Path(tempfile.mkdtemp(prefix="agentpost-test-"))
    cluster = EmbeddedPostgres(var_dir, fsync=False, name=f"test{os.getpid()}")
    cluster.start()
    try:
        conn = psycopg2.connect(cluster.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            cur.execute(f"CREATE DATABASE {TEMPLATE}")
        conn.close()
        migrate(cluster.dsn(TEMPLATE))
        yield cluster
    finally:
        cluster.stop()
        cluster.destroy()
        shutil.rmtree(var_dir, ignore_errors=True)


def _admin_conn(pg: Any) -> Any:
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    return conn


@pytest.fixture
def db_dsn(pg: Any) -> Any:
    """A fresh, migrated database for one test."""
    name = f"t_{os.getpid()}_{next(_counter)}"
    conn = _admin_conn(pg)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    conn.close()
    yield pg.dsn(name)
    if not pg.is_running():
        pg.start()
    conn = _admin_conn(pg)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


@pytest.fixture
def pg_conn(db_dsn: Any) -> Any:
    """A plain (blocking) psycopg2 connection to the test's database."""
    connection = psycopg2.connect(db_dsn)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def empty_dsn(pg: Any) -> Any:
    """An empty database (no migrations), for migration tests."""
    name = f"e_{os.getpid()}_{next(_counter)}"
    conn = _admin_conn(pg)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    yield pg.dsn(name)
    conn = _admin_conn(pg)
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


_DEV_TLS: dict[str, str] = {}


@pytest.fixture(scope="session", autouse=True)
def dev_tls() -> Any:
    """One development CA and server certificate for the whole run (TLS on every listener)."""
    from agentpost.dev.tls import ensure_dev_tls

    folder = Path(tempfile.mkdtemp(prefix="agentpost-tls-"))
    tls = ensure_dev_tls(folder / "tls", hostnames=("localhost",))
    _DEV_TLS.update(cert=str(tls.cert), key=str(tls.key), ca=str(tls.ca_cert))
    from agentpost.auth.sealing import generate_key_file

    generate_key_file(folder / "secrets.key")  # the master key DKIM keys are sealed with
    _DEV_TLS["secrets_key"] = str(folder / "secrets.key")
    yield tls
    shutil.rmtree(folder, ignore_errors=True)


_PREPARE_THRESHOLD = int(os.environ.get("AGENTPOST_TEST_PREPARE_THRESHOLD", "1"))


def make_config(dsn: str, **overrides: dict[str, Any]) -> Any:
    """A test configuration: ephemeral port, the given database, sections overridable."""
    data: dict[str, dict[str, Any]] = {
        "tls": {"cert": _DEV_TLS["cert"], "key": _DEV_TLS["key"]} if _DEV_TLS else {},
        "server": {"hostname": "mx.test", "environment": "development"},
        # Threshold 1: every statement takes the prepared path (storage.prepared) from its
        # first use, the strictest setting; AGENTPOST_TEST_PREPARE_THRESHOLD=0 runs the
        # suite with plain statements.
        "database": {"url": dsn, "pool_size": 5, "connect_timeout": "2s", "retries": 2,
                     "prepare_threshold": _PREPARE_THRESHOLD},
        "http": {"port": 0},
        "rate_limit": {"rate": 1000.0, "burst": 5000},
        "audit": {"flush_interval": "50ms"},
        "mail": {"shared_domain": "agents.test"},
        "storage": {"backend": "local", "path": tempfile.mkdtemp(prefix="blobs-", dir=_BLOB_ROOT)},
        "smtp": {"mx_bind": "127.0.0.1", "mx_port": 0, "submission_bind": "127.0.0.1",
                 "submission_port": 0, "submissions_port": 0},
        "imap": {"bind": "127.0.0.1", "port": 0, "tls_port": 0},
        "secrets": {"key_file": _DEV_TLS["secrets_key"]} if _DEV_TLS else {},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data, "<test>", environ={})


class RunningServer:
    """An AgentPost service started in this process's reactor."""

    def __init__(self, service: Any, checker: OpenAPIChecker) -> None:
        self.service = service
        self.core = service.core
        port = service.ports["http"].getHost().port
        self.base_url = f"http://127.0.0.1:{port}"
        mx = service.ports.get("smtp_mx")
        self.mx_port = mx.getHost().port if mx is not None else None
        self.submission_port, self.submissions_port = (
            service.ports[name].getHost().port if name in service.ports else None
            for name in ("smtp_submission", "smtp_submissions"))
        self.imap_port = service.ports["imap"].getHost().port if "imap" in service.ports \
            else None
        self.imaps_port = service.ports["imaps"].getHost().port if "imaps" in service.ports \
            else None
        self.api = ApiClient(self.base_url, checker)

    async def new_org(self, name: str = "Org") -> tuple[dict[str, Any], str]:
        """An organization and its owner key, made the way `agentpost bootstrap` makes them."""
        org, minted = await self.core.organizations.bootstrap(name)
        return org, minted.plaintext

    async def deliver(self, raw: bytes, to: list[str], mail_from: str = "alice@example.com"):
        """Route and ingest like the MX does after DATA (the SMTP tests cover the wire)."""
        import io

        targets = [await self.core.router.resolve(rcpt, mail_from) for rcpt in to]
        return await self.core.ingest.store(targets, io.BytesIO(raw), envelope_from=mail_from)

    async def admin_key(self) -> str:
        """A fresh installation admin key."""
        return (await self.core.organizations.create_admin_key("test")).plaintext


@pytest.fixture(scope="session")
def openapi_checker() -> OpenAPIChecker:
    """Validates every response the tests receive against the published document."""
    return OpenAPIChecker()


async def start_server(config: Any, checker: OpenAPIChecker) -> RunningServer:
    """Start the real service (same composition root as production) on port 0."""
    from twisted.internet import reactor

    from agentpost.app import AgentPostService

    service = AgentPostService(config, reactor)
    service.startService()
    await service._started
    if getattr(service, "start_error", None) is not None:
        service.start_error.raiseException()
    return RunningServer(service, checker)


@pytest_twisted.async_yield_fixture
async def server(db_dsn: str, openapi_checker: OpenAPIChecker) -> Any:
    """A running server on a fresh database."""
    running = await start_server(make_config(db_dsn), openapi_checker)
    yield running
    await running.service.stopService()


@pytest_twisted.async_yield_fixture
async def small_quota(db_dsn: str, openapi_checker: OpenAPIChecker) -> Any:
    """A running server whose inboxes hold 64 KiB (``mail.inbox_quota``)."""
    running = await start_server(make_config(db_dsn, mail={"inbox_quota": "64KiB"}),
                                 openapi_checker)
    yield running
    await running.service.stopService()


class SentSQL(str):
    """One message of the ``sent`` fixture; ``txn`` names the transaction that sent it,
    so a test can keep its command's own round trips apart from a server timer's."""

    txn: int


@pytest.fixture
def sent(monkeypatch):
    """Every SQL message any transaction or read sends, as sent (round-trip counts)."""
    messages: list[str] = []
    original = Txn._send

    async def spy(self, sql, params):
        message = SentSQL(sql)
        message.txn = id(self)
        messages.append(message)
        return await original(self, sql, params)

    monkeypatch.setattr(Txn, "_send", spy)
    return messages
