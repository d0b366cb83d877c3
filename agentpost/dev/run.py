"""`make run`: a complete local AgentPost from nothing, reusing state on later runs.

Starts (or reuses) an embedded PostgreSQL under ./var when no database is
configured, makes a dev CA and certificate, writes the config it serves with to
var/agentpost.toml, migrates, creates the demo organization once, prints its key
with examples, and serves until Ctrl-C, then stops the database it started.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from agentpost.dev.embedded_pg import EmbeddedPostgres, PostgresNotInstalled
from agentpost.dev.tls import ensure_dev_tls
from agentpost.storage.migrations import ensure_database

VAR = Path(os.environ.get("AGENTPOST_VAR_DIR", "var"))
DB_NAME = "agentpost"
HTTP_PORT = int(os.environ.get("AGENTPOST_HTTP_PORT", "8080"))
SMTP_MX_PORT = int(os.environ.get("AGENTPOST_SMTP_PORT", "2525"))
SUBMISSION_PORT = int(os.environ.get("AGENTPOST_SUBMISSION_PORT", "2587"))
SUBMISSIONS_PORT = int(os.environ.get("AGENTPOST_SUBMISSIONS_PORT", "2465"))
IMAP_PORT = int(os.environ.get("AGENTPOST_IMAP_PORT", "2143"))
IMAPS_PORT = int(os.environ.get("AGENTPOST_IMAPS_PORT", "2993"))
SHARED_DOMAIN = "agentpost.local"
#: The master key sealing DKIM private keys: made here on the first run (mode 0600),
#: never committed (var/ is ignored), kept across runs like the database.
SECRETS_KEY = VAR / "secrets.key"


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _write_config(path: Path, db_url: str, tls: Any) -> None:
    text = f"""# Written by `make run` on every start; edit etc/agentpost.toml.sample for your own.
[server]
hostname = "localhost"
environment = "development"

[database]
url = "{db_url}"

[tls]
cert = "{tls.cert.resolve()}"
key = "{tls.key.resolve()}"

[http]
bind = "127.0.0.1"
port = {HTTP_PORT}

[mail]
shared_domain = "{SHARED_DOMAIN}"
operator_inbox = "demo@{SHARED_DOMAIN}"

[storage]
backend = "local"
path = "{(VAR / 'blobs').resolve()}"

[smtp]
mx_bind = "127.0.0.1"
mx_port = {SMTP_MX_PORT}
submission_bind = "127.0.0.1"
submission_port = {SUBMISSION_PORT}
submissions_port = {SUBMISSIONS_PORT}

[outbound]
transport = "log"
log_dir = "{(VAR / 'outbound').resolve()}"

[imap]
bind = "127.0.0.1"
port = {IMAP_PORT}
tls_port = {IMAPS_PORT}

[secrets]
key_file = "{SECRETS_KEY.resolve()}"

[webhooks]
# Development only: webhooks may reach receivers on this machine.
allow_networks = ["127.0.0.0/8", "::1/128"]
"""
    path.write_text(text)
    path.chmod(0o600)


async def _demo(core: Any) -> dict[str, str]:
    """Create the demo organization once; later runs read its key back from var/."""
    from agentpost.auth.cred import principal_from_key
    from agentpost.auth.secrets import digest
    from agentpost.core.context import RequestContext
    from agentpost.storage import keys as key_store

    demo_file = VAR / "demo.json"
    saved = json.loads(demo_file.read_text()) if demo_file.exists() else None
    await core.inboxes.ensure_shared_domain()
    if saved:
        row = await core.db.run_interaction(
            "dev.demo_key", key_store.authenticate_api_key, digest(saved["api_key"]))
        if row is not None:
            return saved
    org, minted = await core.organizations.bootstrap("Demo")
    result = {"org_id": org["id"], "environment_id": org["default_environment_id"],
              "api_key": minted.plaintext}
    ctx = RequestContext("req_dev", "127.0.0.1", "inboxes.create",
                         principal=principal_from_key(minted.row))
    inbox, _ = await core.inboxes.create(
        ctx, username="demo", domain=None, display_name="Demo inbox",
        environment_id=None, client_id="make-run-demo")
    result.update(inbox_id=inbox["id"], inbox_email=inbox["email"])
    fd = os.open(demo_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(result, handle, indent=2)
    os.chmod(demo_file, 0o600)
    return result


def database_location(cluster: EmbeddedPostgres | None) -> str:
    """Where the data is, for the banner: as root the cluster cannot live under ./var
    (the postgres user must reach it), so say exactly where it is instead."""
    if cluster is None:
        return "AGENTPOST_DATABASE_URL (an external PostgreSQL)"
    return f"{cluster.data_dir}  (server log {cluster.log_file})"


def _banner(demo: dict[str, str], config_path: Path, tls: Any, database: str) -> None:
    key = demo["api_key"]
    base = f"http://127.0.0.1:{HTTP_PORT}"
    _say("")
    _say("=" * 72)
    _say(" AgentPost is running (development mode)")
    _say("=" * 72)
    _say(f" Config:        {config_path}   (agentpost --config {config_path} ...)")
    _say(f" Database:      {database}")
    _say(f" Dev CA:        {tls.ca_cert}")
    _say(f" Demo org:      {demo['org_id']}  (environment {demo['environment_id']})")
    if demo.get("inbox_email"):
        _say(f" Demo inbox:    {demo['inbox_email']}  ({demo.get('inbox_id', '')})")
    _say(f" Demo API key:  {key}")
    _say("                (development only; kept in var/demo.json, mode 0600)")
    _say("")
    _say(" Try:")
    _say(f"   export AGENTPOST_KEY={key}")
    _say(f'   curl -s {base}/api/v1/inboxes -H "Authorization: Bearer $AGENTPOST_KEY"')
    _say(f'   curl -s -X POST {base}/api/v1/inboxes -H "Authorization: Bearer $AGENTPOST_KEY" \\')
    _say("        -H 'Content-Type: application/json' -d '{\"username\": \"my-agent\"}'")
    _say(f"   curl -s {base}/api/v1/openapi.json | python3 -m json.tool | less")
    if demo.get("inbox_email"):
        _say("")
        _say(f" Deliver a test message to {demo['inbox_email']} over SMTP (MX, port "
             f"{SMTP_MX_PORT}, STARTTLS offered):")
        _say("   python3 -c \"import smtplib; s = smtplib.SMTP('127.0.0.1', "
             f"{SMTP_MX_PORT}); s.sendmail('you@example.com', ['{demo['inbox_email']}'], "
             "b'Subject: Hello\\\\r\\\\n\\\\r\\\\nHi from smtplib.\\\\r\\\\n'); s.quit()\"")
        _say(f'   curl -s {base}/api/v1/inboxes/{demo["inbox_id"]}/messages '
             '-H "Authorization: Bearer $AGENTPOST_KEY"')
        _say("")
        _say(f" Send as {demo['inbox_email']} over SMTP submission (port {SUBMISSION_PORT} "
             f"STARTTLS, {SUBMISSIONS_PORT} TLS; username = the inbox address, password =")
        _say(" the API key; mail to other hosts lands as .eml files in "
             f"{(VAR / 'outbound').resolve()}):")
        _say(f"   swaks --server 127.0.0.1:{SUBMISSION_PORT} --tls --tls-ca-path "
             f"{tls.ca_cert} --auth PLAIN \\")
        _say(f"        --auth-user {demo['inbox_email']} --auth-password \"$AGENTPOST_KEY\" "
             f"--from {demo['inbox_email']} --to someone@example.com")
        _say("")
        _say(" IMAP client settings (Thunderbird, imaplib, any agent):")
        _say(f"   server 127.0.0.1, port {IMAP_PORT} with STARTTLS or {IMAPS_PORT} with TLS,")
        _say(f"   username {demo['inbox_email']}, password = the demo API key;")
        _say(f"   trust the dev CA {tls.ca_cert}.")
        _say(f"   python3 -c \"import imaplib, ssl; c = ssl.create_default_context("
             f"cafile='{tls.ca_cert}'); m = imaplib.IMAP4_SSL('127.0.0.1', {IMAPS_PORT}, "
             f"ssl_context=c); m.login('{demo['inbox_email']}', '$AGENTPOST_KEY'); "
             "print(m.select('INBOX')); m.logout()\"")
    _say("")
    _say(" Ctrl-C stops AgentPost and the database it started.")
    _say("=" * 72)


def main() -> int:
    """Set everything up, then serve in the foreground."""
    VAR.mkdir(mode=0o700, exist_ok=True)
    cluster: EmbeddedPostgres | None = None
    db_url = os.environ.get("AGENTPOST_DATABASE_URL", "")
    try:
        if not db_url:
            cluster = EmbeddedPostgres(VAR, fsync=True, name="pg")
            _say(f"Starting the embedded PostgreSQL (data in {cluster.data_dir}) ...")
            cluster.start()
            ensure_database(cluster.dsn(), DB_NAME)
            db_url = cluster.dsn(DB_NAME)
        tls = ensure_dev_tls(VAR / "tls", hostnames=("localhost",))
        from agentpost.auth.sealing import generate_key_file

        if generate_key_file(SECRETS_KEY):
            _say(f"Generated the development master key {SECRETS_KEY} (seals DKIM keys).")
        config_path = VAR / "agentpost.toml"
        _write_config(config_path, db_url, tls)

        from agentpost.config import load_config
        from agentpost.storage.migrations import migrate

        config = load_config(config_path, environ={})
        applied = migrate(db_url)
        _say(f"Migrations applied: {applied}" if applied else "Database schema is up to date.")
        return _serve(config, config_path, tls, database_location(cluster))
    except PostgresNotInstalled as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    finally:
        if cluster is not None:
            _say("Stopping the embedded PostgreSQL ...")
            cluster.stop()


def _serve(config: Any, config_path: Path, tls: Any, database: str) -> int:
    from twisted.internet import defer, reactor

    from agentpost.app import make_service
    from agentpost.logs import configure_logging
    from agentpost.stopping import install_stop_handlers

    configure_logging(config.logging.level)
    root = make_service(config, reactor)
    svc = root.getServiceNamed("agentpost")

    async def startup() -> None:
        _banner(await _demo(svc.core), config_path, tls, database)
        root.startService()

    def failed(failure: Any) -> None:
        sys.stderr.write(f"make run: start-up failed: {failure.getErrorMessage()}\n")
        svc.start_error = failure
        reactor.stop()

    reactor.callWhenRunning(
        lambda: defer.Deferred.fromCoroutine(startup()).addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    install_stop_handlers(reactor)
    # IReactorCore.run() leaves out the installSignalHandlers every reactor's run() takes.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    return 1 if getattr(svc, "start_error", None) is not None else 0


if __name__ == "__main__":
    sys.exit(main())
