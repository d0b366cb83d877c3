"""The TLS policy every listener shares: Mozilla "intermediate", TLS 1.2 at least.

Real clients (Python's ssl) against the real service: the SMTP MX after STARTTLS, IMAPS
and HTTPS. A client that offers only CBC-mode suites, or only TLS 1.1, gets no session.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from agentpost.config import ConfigError
from agentpost.config.loader import parse_config
from agentpost.config.sections import TLSSection
from agentpost.tls import INTERMEDIATE_CIPHERS, TLSPolicy
from tests.conftest import _DEV_TLS, make_config, start_server

CBC_ONLY = "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"


def _client(ciphers: str | None = None, *, max_version: Any = None,
            min_version: Any = None) -> ssl.SSLContext:
    """A client context verifying against the dev CA, restricted as asked.

    ``@SECLEVEL=0`` lets OpenSSL 3 *offer* TLS 1.1, so a refusal comes from the server.
    """
    ctx = ssl.create_default_context(cafile=_DEV_TLS["ca"])
    ctx.check_hostname = False
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if min_version is not None:
        ctx.minimum_version = min_version
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def _smtp_starttls(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """EHLO, STARTTLS, handshake; (version, cipher) or ssl.SSLError."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220 ")
        with ctx.wrap_socket(sock) as tls:
            tls.sendall(b"EHLO client.test\r\n")
            assert tls.recv(100).startswith(b"250")
            return tls.version(), tls.cipher()[0]


def _implicit(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """Handshake on a TLS-from-the-first-byte port; (version, cipher) or ssl.SSLError."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            ctx.wrap_socket(sock) as tls:
        return tls.version(), tls.cipher()[0]


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ssl.SSLError as exc:
        return f"refused: {exc.reason}"


@pytest_twisted.async_yield_fixture
async def tls_server(db_dsn: str, openapi_checker: Any) -> Any:
    """The real service with TLS on the MX (STARTTLS), IMAPS and HTTPS."""
    running = await start_server(make_config(db_dsn, http={"tls": True}), openapi_checker)
    yield running
    await running.service.stopService()


def _listeners(server: Any) -> list[tuple[str, Any, int]]:
    return [("smtp-starttls", _smtp_starttls, server.mx_port),
            ("imaps", _implicit, server.imaps_port),
            ("https", _implicit, server.service.ports["http"].getHost().port)]


@pytest_twisted.ensureDeferred
async def test_cbc_only_tls12_client_is_refused_on_every_listener(tls_server):
    """CBC-SHA suites are no longer offered: the handshake fails on SMTP, IMAPS, HTTPS."""
    ctx = _client(CBC_ONLY, max_version=ssl.TLSVersion.TLSv1_2)
    for name, fn, port in _listeners(tls_server):
        outcome = await deferToThread(_outcome, fn, port, ctx)
        assert isinstance(outcome, str) and outcome.startswith("refused"), (name, outcome)


@pytest_twisted.ensureDeferred
async def test_tls11_client_is_refused_on_every_listener(tls_server):
    """A client speaking at most TLS 1.1 is refused by the server (protocol_version alert)."""
    ctx = _client("DEFAULT:@SECLEVEL=0", min_version=ssl.TLSVersion.TLSv1_1,
                  max_version=ssl.TLSVersion.TLSv1_1)
    for name, fn, port in _listeners(tls_server):
        outcome = await deferToThread(_outcome, fn, port, ctx)
        assert isinstance(outcome, str) and outcome.startswith("refused"), (name, outcome)


@pytest_twisted.ensureDeferred
async def test_modern_clients_get_tls13_or_an_aead_tls12_suite(tls_server):
    """A default client gets TLS 1.3; a TLS 1.2-only client gets an ECDHE AEAD suite."""
    modern = _client()
    tls12 = _client(max_version=ssl.TLSVersion.TLSv1_2)
    for name, fn, port in _listeners(tls_server):
        assert (await deferToThread(_outcome, fn, port, modern))[0] == "TLSv1.3", name
        version, cipher = await deferToThread(_outcome, fn, port, tls12)
        assert version == "TLSv1.2", name
        assert cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA20" in cipher), \
            (name, cipher)


@pytest_twisted.ensureDeferred
async def test_min_version_tls13_refuses_tls12_clients(db_dsn, openapi_checker):
    """[tls] min_version = "TLSv1.3" applies to the MX and IMAPS alike."""
    config = make_config(db_dsn, tls={"min_version": "TLSv1.3"})
    running = await start_server(config, openapi_checker)
    try:
        tls12 = _client(max_version=ssl.TLSVersion.TLSv1_2)
        for fn, port in ((_smtp_starttls, running.mx_port), (_implicit, running.imaps_port)):
            outcome = await deferToThread(_outcome, fn, port, tls12)
            assert isinstance(outcome, str) and outcome.startswith("refused"), outcome
            assert (await deferToThread(_outcome, fn, port, _client()))[0] == "TLSv1.3"
    finally:
        await running.service.stopService()


def test_policy_config_is_validated_at_load_time():
    """An unknown version or a cipher list OpenSSL cannot use names the key at start-up."""
    with pytest.raises(ConfigError) as info:
        parse_config({"tls": {"min_version": "TLSv1.1"}}, environ={})
    assert info.value.key == "tls.min_version"
    for bad in ("NOT-A-CIPHER", "TLS_AES_128_GCM_SHA256", "ECDHE-ÄES"):
        with pytest.raises(ConfigError) as info:
            parse_config({"tls": {"ciphers": bad}}, environ={})
        assert info.value.key == "tls.ciphers"
    parse_config({"tls": {"ciphers": "ECDHE+AESGCM", "min_version": "TLSv1.3"}}, environ={})


def test_default_policy_is_mozilla_intermediate_without_cbc():
    """The config default and the library default are the same list, all AEAD."""
    assert TLSSection().ciphers == INTERMEDIATE_CIPHERS == TLSPolicy().ciphers
    for suite in INTERMEDIATE_CIPHERS.split(":"):
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite)
