"""The `agentpost` command.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage (systemd's
RestartPreventExitStatus=2 keeps a misconfigured service from restart-looping).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agentpost import __version__
from agentpost.config import ConfigError, load_config, render_sample


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentpost", description="AgentPost: real mailboxes for AI agents.")
    parser.add_argument("--version", action="version", version=f"agentpost {__version__}")
    parser.add_argument("--config", "-c", help="TOML config file (default: $AGENTPOST_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run every listener in the foreground")
    sub.add_parser("migrate", help="apply pending database migrations (idempotent)")
    sub.add_parser("check-config", help="validate the configuration and exit (2 if invalid)")
    sub.add_parser("sample-config", help="print a documented sample configuration")
    boot = sub.add_parser("bootstrap",
                          help="create an organization, its default environment and an owner key")
    boot.add_argument("--org", required=True, help="organization name")
    boot.add_argument("--tier", default="free",
                      choices=["free", "developer", "startup", "business", "enterprise"])
    boot.add_argument("--json", action="store_true", help="print JSON instead of text")
    admin = sub.add_parser("admin-key", help="manage installation admin keys")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    create = admin_sub.add_parser("create", help="create an admin key and print it once")
    create.add_argument("--name", default="admin")
    create.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "sample-config":
        sys.stdout.write(render_sample())
        return 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"agentpost: configuration error: {exc}\n")
        return 2
    if args.command == "check-config":
        if not config.database.url:
            sys.stderr.write("agentpost: configuration error: database.url: not set "
                             "(or set AGENTPOST_DATABASE_URL)\n")
            return 2
        from agentpost.auth.sealing import secrets_problem

        problem = secrets_problem(config.secrets.key_file,
                                  production=config.server.environment == "production",
                                  # our own DKIM keys sign what a smarthost relays
                                  needed=config.outbound.transport not in ("ses", "log"))
        if problem:
            sys.stderr.write(f"agentpost: configuration error: {problem}\n")
            return 2
        if config.smtp.mx_enabled and not config.mail.operator_inbox:
            sys.stderr.write("agentpost: warning: mail.operator_inbox is not set, so mail to "
                             "<postmaster> is refused (RFC 5321 section 4.5.1 requires "
                             "accepting it)\n")
        sys.stdout.write(f"configuration OK ({config.source})\n")
        return 0
    if not config.database.url:
        sys.stderr.write("agentpost: configuration error: database.url: not set "
                         "(or set AGENTPOST_DATABASE_URL)\n")
        return 2
    if args.command == "migrate":
        return _migrate(config)
    if args.command == "serve":
        from agentpost.logs import configure_logging
        from agentpost.tap import run_service

        configure_logging(config.logging.level)
        return run_service(config)
    if args.command == "bootstrap":
        return _run_async(_bootstrap, config, args)
    if args.command == "admin-key":
        return _run_async(_admin_key, config, args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _migrate(config: Any) -> int:
    import psycopg2

    from agentpost.storage.migrations import MigrationError, migrate

    try:
        applied = migrate(config.database.url)
    except MigrationError as exc:
        sys.stderr.write(f"agentpost: {exc}\n")
        return 1
    except psycopg2.Error as exc:
        sys.stderr.write(f"agentpost: database error: {str(exc).strip()}\n")
        return 1
    if applied:
        sys.stdout.write(f"applied migrations: {', '.join(f'{v:04d}' for v in applied)}\n")
    else:
        sys.stdout.write("database schema is up to date\n")
    return 0


def _run_async(fn: Any, config: Any, args: Any) -> int:
    from twisted.internet import defer, task

    from agentpost.storage.migrations import MigrationError, check_schema

    try:
        check_schema(config.database.url)
    except MigrationError as exc:
        sys.stderr.write(f"agentpost: {exc}\n")
        return 1
    result = {"code": 1}

    def run(reactor: Any) -> defer.Deferred[None]:
        from agentpost.app import build_core

        core = build_core(config, reactor)

        async def go() -> None:
            try:
                result["code"] = await fn(core, args)
            finally:
                await core.db.close()

        return defer.Deferred.fromCoroutine(go())

    try:
        task.react(run)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return int(exc.code)
    return result["code"]


async def _bootstrap(core: Any, args: Any) -> int:
    await core.inboxes.ensure_shared_domain()
    org, minted = await core.organizations.bootstrap(args.org, args.tier)
    if args.json:
        sys.stdout.write(json.dumps({"org_id": org["id"],
                                     "environment_id": org["default_environment_id"],
                                     "api_key": minted.plaintext}) + "\n")
    else:
        sys.stdout.write(
            f"organization  {org['id']} ({org['name']})\n"
            f"environment   {org['default_environment_id']} (default)\n"
            f"owner API key {minted.plaintext}\n"
            "Store the key now: it is not shown again.\n")
    return 0


async def _admin_key(core: Any, args: Any) -> int:
    minted = await core.organizations.create_admin_key(args.name)
    if args.json:
        sys.stdout.write(json.dumps({"id": minted.row["id"], "admin_key": minted.plaintext})
                         + "\n")
    else:
        sys.stdout.write(f"admin key {minted.row['id']}: {minted.plaintext}\n"
                         "Store it now: it is not shown again.\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
