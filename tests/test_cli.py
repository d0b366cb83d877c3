"""The `agentpost` command and the twistd plugin, run as real processes."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from agentpost.config import ConfigError, load_config, render_sample
from agentpost.config.units import parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None, timeout=60):
    full_env = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run([sys.executable, "-m", "agentpost.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_check_config_names_the_offending_key(tmp_path):
    """Exit 2 and the key's dotted name, for typos, bad units and wrong types."""
    cases = {
        "[http]\nprot = 8080\n": "http.prot",
        "[database]\nconnect_timeout = 5\n": "database.connect_timeout",
        "[http]\nmax_body = \"10 parsecs\"\n": "http.max_body",
        "[http]\nport = \"eighty\"\n": "http.port",
        "[nonsense]\n": "nonsense",
        "this is not toml": "config",
    }
    for text, key in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        result = run("--config", str(path), "check-config")
        assert result.returncode == 2, (text, result)
        assert key in result.stderr, (text, result.stderr)


def test_check_config_accepts_the_sample_and_env_override(tmp_path):
    """The generated sample is valid; AGENTPOST_DATABASE_URL fills the secret."""
    path = tmp_path / "sample.toml"
    path.write_text(render_sample())
    missing = run("--config", str(path), "check-config")
    assert missing.returncode == 2 and "database.url" in missing.stderr
    ok = run("--config", str(path), "check-config",
             env={"AGENTPOST_DATABASE_URL": "postgresql:///x"})
    assert ok.returncode == 0, ok.stderr
    assert load_config(path, environ={"AGENTPOST_DATABASE_URL": "x"}).database.url == "x"


def test_units_are_mandatory():
    """Durations and sizes parse only with units."""
    assert parse_duration("90d") == 90 * 86400
    assert parse_duration("250ms") == 0.25
    assert parse_size("10MiB") == 10 * 1024 * 1024
    for bad in ("90", "5 minutes", ""):
        try:
            parse_duration(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    try:
        load_config(None, environ={"AGENTPOST_CONFIG": "/nonexistent.toml"})
    except ConfigError as exc:
        assert exc.key == "config"


def test_bootstrap_and_admin_key(db_dsn):
    """bootstrap --json prints ids and a working key; admin-key create prints an admin key."""
    env = {"AGENTPOST_DATABASE_URL": db_dsn}
    result = run("bootstrap", "--org", "Acme", "--json", env=env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["org_id"].startswith("org_") and out["environment_id"].startswith("env_")
    assert out["api_key"].startswith("ap_sk_")
    admin = run("admin-key", "create", "--json", env=env)
    assert admin.returncode == 0, admin.stderr
    assert json.loads(admin.stdout)["admin_key"].startswith("ap_admin_")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_twistd_plugin_serves_the_api(db_dsn, tmp_path):
    """`twistd -n agentpost --config FILE` serves the same API, and stops on SIGTERM."""
    port = _free_port()
    config = tmp_path / "agentpost.toml"
    config.write_text(f'[database]\nurl = "{db_dsn}"\n[http]\nport = {port}\n')
    twistd = Path(sys.executable).parent / "twistd"
    proc = subprocess.Popen([str(twistd), "-n", "--pidfile=", "agentpost", "--config",
                             str(config)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    body = json.loads(r.read())
                    break
            except OSError:
                time.sleep(0.2)
        assert body == {"status": "ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/openapi.json") as r:
            assert json.loads(r.read())["openapi"] == "3.1.0"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # twistd re-raises the terminating signal after a clean shutdown, so the exit
    # status is "killed by SIGTERM", which systemd counts as a clean stop.
    assert proc.returncode in (0, -15), out
    assert "Server Shut Down" in out
    assert "Traceback" not in out


def test_twistd_plugin_rejects_a_bad_config(tmp_path):
    """A configuration error stops twistd with exit status 2 (systemd will not restart-loop)."""
    config = tmp_path / "bad.toml"
    config.write_text("[http]\nprot = 1\n")
    twistd = Path(sys.executable).parent / "twistd"
    result = subprocess.run([str(twistd), "-n", "--pidfile=", "agentpost", "--config",
                             str(config)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result
    assert "http.prot" in result.stderr + result.stdout


def test_shipped_sample_config_is_current():
    """etc/agentpost.toml.sample is exactly what the declarations generate (no drift)."""
    shipped = (ROOT / "etc" / "agentpost.toml.sample").read_text()
    assert shipped == render_sample(), "run: agentpost sample-config > etc/agentpost.toml.sample"


def test_serve_refuses_an_unmigrated_database_and_exits(empty_dsn, tmp_path):
    """Start-up failures end the process with status 1 and a reason (never a hang)."""
    config = tmp_path / "agentpost.toml"
    config.write_text(f'[database]\nurl = "{empty_dsn}"\n[http]\nport = {_free_port()}\n'
                      f'[smtp]\nmx_enabled = false\n[storage]\npath = "{tmp_path}"\n')
    result = run("--config", str(config), "serve", timeout=60)
    assert result.returncode == 1
    assert "run `agentpost migrate` first" in result.stderr


def test_socket_activation_serves_on_inherited_descriptors(db_dsn, tmp_path):
    """With http.endpoint = systemd:…, the server listens on a socket passed in by its
    parent the way systemd passes it (LISTEN_FDS/LISTEN_FDNAMES, fd 3)."""
    import socket as socketlib

    listener = socketlib.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = tmp_path / "agentpost.toml"
    config.write_text(
        f'[database]\nurl = "{db_dsn}"\n[http]\nendpoint = "systemd:domain=INET:name=http"\n'
        f'[smtp]\nmx_enabled = false\n[imap]\nenabled = false\n'
        f'[storage]\npath = "{tmp_path / "blobs"}"\n')
    launcher = (
        "import os, sys\n"
        f"os.dup2({listener.fileno()}, 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='http', LISTEN_PID=str(os.getpid()))\n"
        f"os.execv(sys.executable, [sys.executable, '-m', 'agentpost.cli', '--config', "
        f"'{config}', 'serve'])\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=ROOT, pass_fds=[
        listener.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listener.close()
    try:
        deadline, body = time.monotonic() + 30, None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert body == {"status": "ok"}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out
