"""The in-root half of `make deb-test`: run the installed service the way its unit does.

Run as root inside the throw-away Debian root (chroot, private network namespace) with
the package's own interpreter: ``/opt/venvs/agentpost/bin/python deb_test_roundtrip.py``.
Without systemd, it reads agentpost.service and plays systemd's part: the
ExecStartPre= and ExecStart= lines run as User= with the unit's ambient capability,
no-new-privileges, umask, working directory and environment, and a datagram socket
stands in for $NOTIFY_SOCKET. Then: SMTP (with STARTTLS) -> API round trip, a reload
(SIGHUP) if the server handles it, a clean stop, and the same service under twistd.
Prints one line per check; exits non-zero on the first failure.
"""

from __future__ import annotations

import email.policy
import glob
import json
import os
import shlex
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path

UNIT = Path("/lib/systemd/system/agentpost.service")
SITE = Path("/opt/venvs/agentpost/lib/python3.11/site-packages")
WORK = Path("/run/agentpost-deb-test")
NOTIFY = WORK / "notify"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

started = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


def fail(message: str) -> None:
    say(f"FAIL: {message}")
    raise SystemExit(1)


def run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, text=True, capture_output=True, check=False,  # noqa: S603
                          **kwargs)


def parse_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit file, each key to its values in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def capabilities(unit: dict[str, list[str]]) -> list[str]:
    caps = " ".join(unit.get("AmbientCapabilities", [])).split()
    return [c.lower().removeprefix("cap_") for c in caps]


def as_service_user(unit: dict[str, list[str]], argv: list[str], env: dict[str, str],
                    **kwargs: object) -> list[str]:
    """``argv`` wrapped the way systemd would start it for this unit."""
    caps = ",".join(["-all", *(f"+{c}" for c in capabilities(unit))])
    user = unit["User"][0]
    group = unit.get("Group", [user])[0]
    environment = [f"{k}={v}" for k, v in env.items()]
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}",
            "--no-new-privs", "--", "env", "-i", *environment, *argv]


def service_env(unit: dict[str, list[str]]) -> dict[str, str]:
    env = {"PATH": PATH, "LANG": "C.UTF-8"}
    for item in unit.get("Environment", []):
        for assignment in shlex.split(item):
            key, value = assignment.split("=", 1)
            env[key] = value
    for item in unit.get("EnvironmentFile", []):
        path = item.lstrip("-")
        if Path(path).is_file():
            for line in Path(path).read_text().splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    key, value = line.split("=", 1)
                    env[key.strip()] = value.strip().strip('"')
    return env


def exec_line(value: str) -> list[str]:
    """An Exec*= value as argv (the -, @, +, ! prefixes are not used by our unit)."""
    argv = shlex.split(value)
    if argv[0][:1] in "-@+!:":
        fail(f"unexpected Exec prefix in {value!r}")
    return argv


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_toml(data: dict[str, dict[str, object]]) -> str:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def uses(source_fragment: str) -> bool:
    """Whether the installed agentpost package uses it (outside the modules defining it)."""
    defining = {SITE / "agentpost/systemd.py", SITE / "agentpost/config/dropins.py"}
    for path in (SITE / "agentpost").rglob("*.py"):
        if path in defining:
            continue
        if source_fragment in path.read_text(encoding="utf-8"):
            return True
    return False


class Notifications:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path, owner: str) -> None:
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chown(path, int(run("id", "-u", owner).stdout), int(run("id", "-g", owner).stdout))
        os.chmod(path, 0o600)
        self.seen: list[str] = []

    def wait_for(self, wanted: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(wanted in message.split("\n") for message in self.seen):
                return True
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return any(wanted in message.split("\n") for message in self.seen)

    def drain(self) -> list[str]:
        self.sock.settimeout(0.2)
        try:
            while True:
                self.seen.append(self.sock.recv(4096).decode())
        except TimeoutError:
            pass
        return self.seen


def http(method: str, url: str, key: str | None = None, body: object = None,
         raw: bool = False) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http://
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - http only
            payload = response.read()
            return response.status, payload if raw else json.loads(payload or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def wait_http(url: str, process: subprocess.Popen[str] | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            if http("GET", url, raw=True)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def start_postgresql() -> None:
    clusters = run("pg_lsclusters", "--no-header").stdout.split()
    if len(clusters) < 2:
        fail("no PostgreSQL cluster in the root")
    version, name = clusters[0], clusters[1]
    result = run("pg_ctlcluster", version, name, "start")
    if result.returncode != 0:
        fail(f"pg_ctlcluster start: {result.stderr}")
    say(f"PostgreSQL {version}/{name} started (Unix socket only)")
    # What README.Debian tells the administrator to do.
    for argv in (["createuser", "agentpost"], ["createdb", "--owner=agentpost", "agentpost"]):
        result = run("runuser", "-u", "postgres", "--", *argv)
        if result.returncode != 0 and "already exists" not in result.stderr:
            fail(f"{' '.join(argv)}: {result.stderr}")
    say("created the agentpost role and database (peer authentication)")


def stop_postgresql() -> None:
    for line in run("pg_lsclusters", "--no-header").stdout.splitlines():
        version, name = line.split()[:2]
        run("pg_ctlcluster", version, name, "stop", "-m", "fast")


def test_config(unit: dict[str, list[str]], env: dict[str, str]) -> dict[str, str]:
    """The environment the server runs with in this test, and how it was chosen."""
    main = Path(env["AGENTPOST_CONFIG"])
    probe = run(*as_service_user(unit, ["/usr/bin/agentpost", "check-config"], env))
    dropins = uses("merge_tomls")
    if dropins:
        if probe.returncode != 0:
            fail(f"check-config with the installed configuration: {probe.stderr.strip()}")
        say("installed configuration (main file + conf.d drop-ins) is valid: "
            + probe.stdout.strip())
        return env
    # The loader does not read conf.d yet: serve the same settings from one merged file.
    from agentpost.config.dropins import merge_tomls

    merged = merge_tomls(tomllib.loads(main.read_text()), main.parent / "conf.d")
    target = WORK / "agentpost.toml"
    target.write_text(write_toml(merged))
    os.chmod(target, 0o640)
    os.chown(target, 0, int(run("id", "-g", "agentpost").stdout))
    say(f"NOTE: the installed loader ignores conf.d; serving {main} + conf.d merged into {target}")
    return {**env, "AGENTPOST_CONFIG": str(target)}


def round_trip(http_base: str, mx_port: int, hostname: str, env: dict[str, str],
               unit: dict[str, list[str]], imap_port: int = 143) -> None:
    boot = run(*as_service_user(unit, ["/usr/bin/agentpost", "bootstrap", "--org", "DebTest",
                                       "--json"], env), cwd="/var/lib/agentpost")
    if boot.returncode != 0:
        fail(f"agentpost bootstrap: {boot.stderr}")
    key = json.loads(boot.stdout)["api_key"]
    say("agentpost bootstrap --json: organization and owner key created")
    status, inbox = http("POST", f"{http_base}/api/v1/inboxes", key, {"username": "deb-test"})
    if status not in (200, 201):
        fail(f"POST /api/v1/inboxes: {status} {inbox}")
    say(f"API: created inbox {inbox['email']}")

    message = EmailMessage()
    message["From"] = "sender@example.net"
    message["To"] = inbox["email"]
    message["Subject"] = "deb-test round trip \u2713"
    message["Message-ID"] = f"<deb-test-{os.getpid()}@example.net>"
    message.set_content("Sent over SMTP with STARTTLS to the packaged server.\n")
    # The message itself is small, so its bytes are kept in PostgreSQL; its attachment
    # goes to the blob store under /var/lib/agentpost (purge must keep both).
    message.add_attachment(b"deb-test attachment\n" * 64, maintype="application",
                           subtype="octet-stream", filename="kept.bin")
    raw = message.as_bytes(policy=email.policy.SMTP)  # CRLF line ends, as on the wire
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the install-time certificate is self-signed
    with smtplib.SMTP("127.0.0.1", mx_port, timeout=30) as smtp:
        code, banner = smtp.ehlo("client.example.net")
        if code != 250:
            fail(f"EHLO: {code} {banner!r}")
        smtp.starttls(context=context)
        peer = smtp.sock.getpeercert(binary_form=True)
        smtp.ehlo("client.example.net")
        refused = smtp.sendmail("sender@example.net", [inbox["email"]], raw)
        if refused:
            fail(f"SMTP refused {refused}")
    if not peer:
        fail("STARTTLS: the server presented no certificate")
    say(f"SMTP: delivered over STARTTLS to 127.0.0.1:{mx_port} ({hostname})")

    deadline = time.monotonic() + 20
    listed: object = None
    while time.monotonic() < deadline:
        status, listed = http("GET", f"{http_base}/api/v1/inboxes/{inbox['id']}/messages", key)
        if status == 200 and listed["data"]:
            break
        time.sleep(0.3)
    else:
        fail(f"the message never showed up in the API: {listed}")
    summary = listed["data"][0]
    if summary["subject"] != "deb-test round trip \u2713":
        fail(f"API shows subject {summary['subject']!r}")
    status, stored = http("GET", f"{http_base}/api/v1/messages/{summary['id']}/raw", key, raw=True)
    if status != 200 or message["Message-ID"].encode() not in stored or b"STARTTLS" not in stored:
        fail(f"GET raw: {status}")
    say(f"API: message {summary['id']} listed with its subject; raw bytes stored "
        f"({len(stored)} bytes)")
    import imaplib

    imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=30)
    if "LOGINDISABLED" not in imap.capabilities:
        fail("IMAP offers LOGIN before STARTTLS")
    imap.starttls(ssl_context=context)
    imap.login(inbox["email"], key)
    _, count = imap.select("INBOX")
    _, data = imap.uid("FETCH", "1", "(BODY.PEEK[])")
    imap.logout()
    if count != [b"1"] or data[0][1] != stored:
        fail(f"IMAP: INBOX has {count}, BODY[] differs from the API's raw bytes")
    say(f"IMAP: STARTTLS on port {imap_port}, logged in with the API key, BODY[] is "
        "byte-identical to the API's raw message")


def check_caches(unit: dict[str, list[str]], env: dict[str, str]) -> None:
    missing = [p for p in (SITE / "agentpost").rglob("*.py")
               if not (p.parent / "__pycache__" / f"{p.stem}.cpython-311.pyc").exists()]
    if missing:
        fail(f"no byte code for {len(missing)} modules, e.g. {missing[0]}")
    if not (SITE / "twisted/plugins/dropin.cache").is_file():
        fail("Twisted's plugin cache is missing")
    probe = run(*as_service_user(unit, ["test", "-w", str(SITE / "agentpost")], env))
    if probe.returncode == 0:
        fail("the venv is writable by the service user")
    say("venv read-only for the service user; byte code and plugin cache pre-generated")


def run_start_pre(unit: dict[str, list[str]], env: dict[str, str]) -> None:
    for pre in unit.get("ExecStartPre", []):
        result = run(*as_service_user(unit, exec_line(pre), env), cwd="/var/lib/agentpost")
        if result.returncode != 0:
            fail(f"ExecStartPre={pre}: exit {result.returncode}: {result.stderr.strip()}")
        last = (result.stdout.strip().splitlines() or [""])[-1]
        say(f"ExecStartPre={pre}: {last}")


def main() -> None:
    WORK.mkdir(mode=0o750, exist_ok=True)
    os.chown(WORK, 0, int(run("id", "-g", "agentpost").stdout))
    unit = parse_unit(UNIT)
    umask = int(unit.get("UMask", ["0022"])[0], 8)
    os.umask(umask)
    env = service_env(unit)
    start_postgresql()
    try:
        check_caches(unit, env)
        env = test_config(unit, env)
        notes = Notifications(NOTIFY, unit["User"][0])
        serve_env = {**env, "NOTIFY_SOCKET": str(NOTIFY)}
        run_start_pre(unit, env)
        from agentpost.config import load_config

        config = load_config(env["AGENTPOST_CONFIG"], environ=env)
        http_port, mx_port = config.http.port, config.smtp.mx_port
        hostname = config.server.hostname
        http_base = f"http://127.0.0.1:{http_port}"
        notifies = uses("agentpost.systemd") or uses("from agentpost import systemd")
        reloads = uses("SIGHUP")

        argv = as_service_user(unit, exec_line(unit["ExecStart"][0]), serve_env)
        say(f"ExecStart={unit['ExecStart'][0]} as {unit['User'][0]} with ambient "
            f"{','.join(capabilities(unit))}, umask {umask:04o}")
        log = open(WORK / "serve.log", "w")  # closed in the finally below
        server = subprocess.Popen(argv,  # noqa: S603 - the unit's own ExecStart line cwd=unit.get("WorkingDirectory", ["/"])[0],
                                  stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            if notifies:
                if not notes.wait_for("READY=1", 60):
                    fail(f"no READY=1 within 60s; got {notes.seen}")
                if not wait_http(f"{http_base}/healthz", server, 1):
                    fail("READY=1 came before the HTTP listener answered")
                say(f"READY=1 received, listeners already answering ({notes.seen[-1]!r})")
            elif not wait_http(f"{http_base}/healthz", server, 60):
                fail("the server did not come up; log:\n" + (WORK / "serve.log").read_text())
            else:
                say("WARNING: this build sends no sd_notify READY=1, but the unit is "
                    f"Type={unit.get('Type', ['simple'])[0]}: under systemd its start would "
                    "time out (apply the READY/RELOADING/STOPPING calls to agentpost/app.py)")
            say(f"serving: MX on port {mx_port} and IMAP on {config.imap.port} (bound "
                f"without root), HTTP on {http_port}")
            round_trip(http_base, mx_port, hostname, env, unit, config.imap.port)

            if reloads:
                before = len(notes.seen)
                server.send_signal(signal.SIGHUP)
                if notifies and not notes.wait_for("RELOADING=1", 10):
                    fail("SIGHUP: no RELOADING=1")
                time.sleep(0.5)
                if notifies and not any("READY=1" in m for m in notes.seen[before + 1:]) \
                        and not notes.wait_for("READY=1", 10):
                    fail("SIGHUP: no READY=1 after RELOADING=1")
                if server.poll() is not None or not wait_http(f"{http_base}/healthz", None, 5):
                    fail("the server did not survive SIGHUP")
                say("SIGHUP (ExecReload): RELOADING=1 then READY=1, still serving")
            else:
                say("NOTE: this build does not handle SIGHUP; reload not tested")

            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=40)
            if code != 0:
                fail(f"exit status {code} after SIGTERM; log:\n" + (WORK / "serve.log").read_text())
            if notifies and not notes.wait_for("STOPPING=1", 2):
                fail(f"no STOPPING=1 at shutdown; got {notes.drain()}")
            say("SIGTERM: clean exit 0" + (", STOPPING=1 sent" if notifies else ""))
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            log.close()

        # The twistd plugin from the installed package serves the same thing.
        twistd = as_service_user(unit, ["/opt/venvs/agentpost/bin/twistd", "-n", "--pidfile=",
                                        "agentpost", "--config", env["AGENTPOST_CONFIG"]], env)
        with open(WORK / "twistd.log", "w") as tlog:
            proc = subprocess.Popen(twistd,  # noqa: S603 - fixed argv
                                    cwd="/var/lib/agentpost", stdout=tlog,
                                    stderr=subprocess.STDOUT, text=True)
            try:
                if not wait_http(f"{http_base}/healthz", proc, 60):
                    fail("twistd -n agentpost did not serve; log:\n"
                         + (WORK / "twistd.log").read_text())
                with smtplib.SMTP("127.0.0.1", mx_port, timeout=10) as smtp:
                    smtp.ehlo("client.example.net")
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=40)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = (WORK / "twistd.log").read_text()
        if "Unable to write to plugin cache" in text or "plugin cache" in text.lower():
            fail("twistd tried to rewrite the plugin cache:\n" + text)
        say("twistd -n agentpost (as agentpost): same HTTP and SMTP listeners, "
            "plugin cache used read-only")
    finally:
        stop_postgresql()
    for stray in glob.glob(str(WORK / "*")):
        Path(stray).unlink()
    WORK.rmdir()
    say("round trip passed")


if __name__ == "__main__":
    main()
