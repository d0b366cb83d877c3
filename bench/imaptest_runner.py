#!/usr/bin/env python3
"""Run Dovecot imaptest's scripted IMAP conformance tests against a server.

The scripts and their .mbox fixtures are NOT in this repository (reference data from
dovecot/imaptest ``src/tests/``); put them in a folder and pass ``--tests-dir``. Each test
runs on a fresh account: a new Dovecot user (``--start-dovecot``), a new inbox created
over the HTTP API (``--start-agentpost``), or the one account given (``--host/--user``).

    .venv/bin/python bench/imaptest_runner.py --start-dovecot --tests-dir /tmp/imaptest/tests
    .venv/bin/python bench/imaptest_runner.py --start-agentpost --tests-dir /tmp/imaptest/tests
    .venv/bin/python bench/imaptest_runner.py --start-agentpost --only fetch-body -v

Prints PASS/FAIL/SKIP per test and, for failures, the command, what was expected and what
came; then imaptest's summary lines (test groups failed/skipped, commands failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path

from imaptestlib.execute import Account, Result, Runner
from imaptestlib.script import ScriptError, parse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DovecotAccounts:
    """A private Dovecot (bench/imapload/servers.py) with users t1..t400, one per test."""

    def __init__(self, tz: str) -> None:
        from imapload.servers import Dovecot

        class _Dovecot(Dovecot):
            def _write_config(self):  # type: ignore[no-untyped-def]
                conf = super()._write_config()
                users = "".join(f"t{i}:{{PLAIN}}pass::::::\n" for i in range(1, 401))
                (self.root / "users").write_text(users)
                # LAYOUT=fs: CREATE a/b makes a real parent "a", as RFC 3501 6.3.3 asks
                # (Maildir++ leaves it \NonExistent, which listext does not expect).
                text = conf.read_text().replace("mail_location = maildir:~/Maildir\n",
                                                "mail_location = maildir:~/Maildir:LAYOUT=fs\n")
                conf.write_text(text)
                return conf

        self.server = _Dovecot(free_port())
        self.tz = tz
        self.n = 0

    def start(self) -> None:
        # search-intdate assumes the server's local time zone is EET/EEST (imaptest's
        # own comment); Dovecot takes it from TZ. Only the Dovecot child sees it.
        saved = os.environ.get("TZ")
        os.environ["TZ"] = self.tz
        try:
            self.server.start()
        finally:
            if saved is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = saved

    def account(self, name: str) -> Account:
        self.n += 1
        return Account("127.0.0.1", self.server.port, f"t{self.n}", "pass")

    def stop(self) -> None:
        self.server.stop()


class AgentPostAccounts:
    """bench/imap_bench.py's harness: throw-away cluster + ``agentpost serve``; one new
    inbox per test, created over the HTTP API; IMAP LOGIN is its address and the API key."""

    def __init__(self, keep_log: str | None) -> None:
        bench = Path(__file__).resolve().parent
        sys.path.append(str(bench.parent))  # after PYTHONPATH, so a snapshot may come first
        from imap_bench import IMAPHarness

        self.h = IMAPHarness("imaptest-", "imaptest")
        self.h.keep_log = keep_log
        self.n = 0

    def start(self) -> None:
        self.h.start_postgres(True)
        self.h.start_imap_server(pool_size=None, log_level="warn", imap_max_per_ip=500,
                                 imap_max_total=1000, max_append=64 << 20)

    def account(self, name: str) -> Account:
        self.n += 1
        inbox = asyncio.run(self.h.create_inbox(f"imaptest{self.n}"))
        return Account("127.0.0.1", self.h.imap_port, inbox["email"], self.h.key)

    def stop(self) -> None:
        self.h.cleanup()


class FixedAccount:
    def __init__(self, a: argparse.Namespace) -> None:
        self.acct = Account(a.host, a.port, a.user, a.password)

    def start(self) -> None:
        pass

    def account(self, name: str) -> Account:
        return Account(self.acct.host, self.acct.port, self.acct.user, self.acct.password)

    def stop(self) -> None:
        pass


def print_result(r: Result, verbose: bool) -> None:
    extra = f" ({r.reason})" if r.reason else ""
    nf = f", {r.fail_count} failed" if r.status == "FAIL" else ""
    print(f"{r.status:4} {r.name}{extra}  [{r.groups} commands{nf}]", flush=True)
    if r.status != "FAIL":
        return
    for f in r.failures if verbose else r.failures[:3]:
        print(f"     command {f.group} (line {f.line}): {f.command[:200]!s}")
        for ln in f.message.splitlines():
            print(f"       {ln[:400]}")
    if not verbose and len(r.failures) > 3:
        print(f"     ... {len(r.failures) - 3} more failures (-v shows all)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tests-dir", default="/tmp/imaptest/tests", type=Path)  # noqa: S108 - a local checkout
    p.add_argument("--only", action="append", default=[], help="run only this test (repeatable)")
    srv = p.add_mutually_exclusive_group(required=True)
    srv.add_argument("--start-dovecot", action="store_true")
    srv.add_argument("--start-agentpost", action="store_true")
    srv.add_argument("--host")
    p.add_argument("--port", type=int, default=143)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--mailbox", default="INBOX", help="imaptest's box= (default INBOX)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
    p.add_argument("--default-messages", default="all",
                   help="messages appended when a test has no 'messages:' header (all or N)")
    p.add_argument("--json", type=Path, help="write the results as JSON to this file")
    p.add_argument("--server-log", help="keep AgentPost's log here")
    p.add_argument("--plain-modseq", action="store_true",
                   help="$modseqN as plain variables, without imaptest's ordering rule")
    p.add_argument("--dovecot-tz", default="Europe/Helsinki",
                   help="TZ for --start-dovecot (search-intdate assumes EET/EEST)")
    p.add_argument("-v", "--verbose", action="store_true", help="all failures, transcripts")
    a = p.parse_args()

    default_mbox = a.tests_dir / "default.mbox"
    names = sorted(x.name for x in a.tests_dir.iterdir()
                   if x.is_file() and not x.name.startswith(".") and not x.name.endswith(".mbox"))
    if a.only:
        wanted = {n for o in a.only for n in o.split(",")}
        unknown = wanted - set(names)
        if unknown:
            p.error(f"no such test: {', '.join(sorted(unknown))}")
        names = [n for n in names if n in wanted]
    default_messages = None if a.default_messages == "all" else int(a.default_messages)
    if a.plain_modseq:
        from imaptestlib.match import Vars
        Vars.ordered_modseq = False

    server = DovecotAccounts(a.dovecot_tz) if a.start_dovecot else \
        AgentPostAccounts(a.server_log) if a.start_agentpost else FixedAccount(a)
    results: list[Result] = []
    try:
        server.start()
        for name in names:
            try:
                test = parse(a.tests_dir / name, default_mbox)
            except (ScriptError, ValueError) as exc:
                r = Result(name, "FAIL", f"script error: {exc}")
                r.fail_count = 1
            else:
                acct = server.account(name)
                acct.mailbox = a.mailbox
                runner = Runner(test, acct, a.timeout, default_messages)
                r = runner.run()
                if a.verbose and r.status == "FAIL":
                    for c in runner.conns:
                        print(f"  -- transcript, connection {c.cid} (last 40 lines)")
                        for ln in c.transcript[-40:]:
                            print("     " + ln[:300])
                if not test.own_mbox and r.status == "FAIL":
                    r.reason = (r.reason + "; " if r.reason else "") + "ran with default.mbox"
            results.append(r)
            print_result(r, a.verbose)
    finally:
        server.stop()

    failed = [r for r in results if r.status == "FAIL"]
    skipped = [r for r in results if r.status == "SKIP"]
    base = [r for r in results if not r.extension]
    ext = [r for r in results if r.extension]
    print(f"\n{len(results)} test groups: {len(failed)} failed, {len(skipped)} skipped due to "
          f"missing capabilities")
    print(f"base protocol: {sum(r.fail_count for r in base)}/{sum(r.groups for r in base)} "
          f"individual commands failed")
    print(f"extensions: {sum(r.fail_count for r in ext)}/{sum(r.groups for r in ext)} "
          f"individual commands failed")
    if failed:
        print("failed: " + " ".join(r.name for r in failed))
    if a.json:
        a.json.write_text(json.dumps([{
            "name": r.name, "status": r.status, "reason": r.reason, "commands": r.groups,
            "failed_commands": r.fail_count,
            "failures": [f.__dict__ for f in r.failures]} for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
