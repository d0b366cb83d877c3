"""AES-256-GCM sealing of stored secrets (agentpost.auth.sealing): a round trip, and
every way a sealed value must refuse to open -- altered bytes, another place (associated
data), another master key -- plus the key file and the production check."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from agentpost.auth.sealing import (
    KEY_BYTES,
    Sealer,
    SealingError,
    context,
    generate_key_file,
    load_sealer,
    parse_key_file,
    secrets_problem,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def test_round_trip_and_fresh_nonces():
    sealer = Sealer([KEY])
    ad = context("dkim", "org_a", "dom_1")
    one, two = sealer.seal(b"secret pem", ad), sealer.seal(b"secret pem", ad)
    assert one != two  # a new nonce every time
    assert b"secret" not in one
    assert sealer.open(one, ad) == sealer.open(two, ad) == b"secret pem"
    assert sealer.open(sealer.seal(b"", ad), ad) == b""


def test_any_altered_byte_is_refused():
    sealer = Sealer([KEY])
    ad = context("dkim", "org_a", "dom_1")
    sealed = sealer.seal(b"-----BEGIN PRIVATE KEY-----", ad)
    for index in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        with pytest.raises(SealingError):
            sealer.open(bytes(tampered), ad)
    for cut in (sealed[:-1], sealed[:10], b"", sealed + b"x"):
        with pytest.raises(SealingError):
            sealer.open(cut, ad)


def test_wrong_associated_data_is_refused():
    """A row copied to another tenant or another domain does not open."""
    sealer = Sealer([KEY])
    sealed = sealer.seal(b"key", context("dkim", "org_a", "dom_1"))
    for ad in (context("dkim", "org_b", "dom_1"), context("dkim", "org_a", "dom_2"),
               context("oidc", "org_a", "dom_1"), context("dkim", "org_ad", "om_1"),
               b""):
        with pytest.raises(SealingError):
            sealer.open(sealed, ad)


def test_context_is_unambiguous():
    assert context("ab", "c") != context("a", "bc")
    assert context("a", "") != context("a")


def test_another_master_key_cannot_open_and_rotation_keeps_old_values():
    ad = context("x")
    old = Sealer([KEY]).seal(b"v", ad)
    with pytest.raises(SealingError, match="unknown master key"):
        Sealer([OTHER]).open(old, ad)
    rotated = Sealer([OTHER, KEY])  # new key first, the old one still opens
    assert rotated.open(old, ad) == b"v"
    assert rotated.current_key_id != Sealer([KEY]).current_key_id
    assert Sealer([OTHER]).open(rotated.seal(b"w", ad), ad) == b"w"


def test_key_file_generation_and_parsing(tmp_path):
    path = tmp_path / "var" / "secrets.key"
    assert generate_key_file(path) is True
    assert generate_key_file(path) is False  # never overwritten
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sealer = load_sealer(path)
    assert sealer.open(sealer.seal(b"z", b"ad"), b"ad") == b"z"
    line = base64.b64encode(KEY).decode()
    assert parse_key_file(f"# comment\n\n{line}\n") == [KEY]
    for bad in ("", "# only a comment\n", "not base64!\n",
                base64.b64encode(b"short").decode()):
        with pytest.raises(SealingError):
            parse_key_file(bad)
    with pytest.raises(SealingError):
        Sealer([b"x" * (KEY_BYTES - 1)])
    with pytest.raises(SealingError):
        load_sealer(tmp_path / "missing.key")


def test_production_check(tmp_path):
    assert secrets_problem("", production=True, needed=True) is not None
    assert secrets_problem("", production=True, needed=False) is None
    assert secrets_problem("", production=False, needed=True) is None
    assert "secrets.key_file" in secrets_problem(str(tmp_path / "nope"), production=False,
                                                 needed=False)
    good = tmp_path / "k"
    generate_key_file(good)
    assert secrets_problem(str(good), production=True, needed=True) is None


def test_check_config_refuses_a_production_smarthost_without_a_master_key(tmp_path):
    """Our own DKIM keys sign what a smarthost relays: production needs the key file."""
    import subprocess
    import sys

    key = tmp_path / "secrets.key"
    generate_key_file(key)
    base = ('[server]\nenvironment = "production"\n[database]\nurl = "postgresql:///x"\n'
            '[outbound]\ntransport = "smtp"\nsmtp_host = "relay.example.net"\n')

    def check(text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "agentpost.toml"
        path.write_text(text)
        return subprocess.run([sys.executable, "-m", "agentpost.cli", "--config", str(path),
                               "check-config"], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin"})

    refused = check(base)
    assert refused.returncode == 2 and "secrets.key_file" in refused.stderr, refused
    ok = check(base + f'[secrets]\nkey_file = "{key}"\n')
    assert ok.returncode == 0, ok.stderr
    bad = check(base + f'[secrets]\nkey_file = "{tmp_path / "missing"}"\n')
    assert bad.returncode == 2 and "secrets.key_file" in bad.stderr
