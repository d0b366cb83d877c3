#!/usr/bin/env python3
"""AgentPost's MX next to Postfix, side by side on this machine, driven by ``smtp-source``.

What it does, start to finish:

1. starts AgentPost exactly as ``bench/smtp_bench.py`` does (a throw-away embedded
   PostgreSQL with fsync on, ``agentpost serve`` on free loopback ports) and creates 20
   recipient inboxes;
2. starts its OWN Postfix instance (Debian's ``postfix`` package) from a generated
   ``config_directory`` and ``queue_directory`` in a temp folder: listening on
   127.0.0.1 only, on a free port, delivering the same 20 addresses to Maildirs under
   the temp folder (``virtual`` delivery, fsync as Postfix does by default). A system
   Postfix (port 25, /etc/postfix, /var/spool/postfix) is neither used nor touched;
3. for each piece of work (4 KiB and 100 KiB; 1 and 20 sessions; one inbox and 20),
   runs ``smtp-source`` against AgentPost, then against Postfix (the order alternates
   from one piece of work to the next), and counts what was stored on each side: rows
   in AgentPost's ``messages`` table, files in Postfix's Maildirs (after its queue has
   drained);
4. prints msgs/s (accepted, i.e. ``smtp-source`` wall time), the ratio AgentPost/Postfix
   and server CPU per message: AgentPost's process plus its PostgreSQL backends, and
   Postfix's master with all its daemons (``/proc`` stat deltas, including children
   that exited), Postfix's measured until its Maildir delivery has finished;
5. stops both and deletes the temp folders, also on Ctrl-C.

Without Postfix installed (``apt-get install postfix``) the Postfix side is skipped
with a message and only AgentPost is measured. Timing never makes it fail: the exit
status is 1 only for a setup failure or when stored counts differ from sent messages.

Usage: ``.venv/bin/python bench/compare_smtp.py [--quick] [--rounds N] [--workers N]
[--json]``; needs root for Postfix (its daemons change to the ``postfix`` user). With
``--rounds N`` each piece of work runs N times and its median ratio is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import psycopg2  # noqa: E402
from api_bench import (  # noqa: E402 - after the sys.path fix; it puts the repo on it
    SetupError,
    free_port,
    log,
    machine_info,
    process_cpu,
    stop_server,
    tree_cpu,
)
from smtp_bench import KIB, SHARED_DOMAIN, Harness  # noqa: E402

from agentpost.dev.embedded_pg import EmbeddedPostgresError  # noqa: E402
from agentpost.storage.migrations import MigrationError  # noqa: E402

SENDER = "sender@sender.bench.example"
INBOXES = 20
POSTFIX_SBIN = "/usr/lib/postfix/sbin"


@dataclass(frozen=True)
class Work:
    size: int
    sessions: int
    inboxes: int
    messages: int

    @property
    def label(self) -> str:
        size = f"{self.size // KIB} KiB"
        inbox = "one inbox" if self.inboxes == 1 else f"{self.inboxes} inboxes"
        return f"{size}, {self.sessions} session{'s' if self.sessions > 1 else ''}, {inbox}"


def plan(quick: bool) -> list[Work]:
    """The pieces of work, with message counts that keep a full run near 3-4 minutes."""
    scale = 4 if quick else 1
    return [
        Work(4 * KIB, 20, 1, 3000 // scale),
        Work(4 * KIB, 20, INBOXES, 3000 // scale),
        Work(4 * KIB, 1, 1, 800 // scale),
        Work(100 * KIB, 20, 1, 1600 // scale),
        Work(100 * KIB, 20, INBOXES, 1600 // scale),
        Work(100 * KIB, 1, 1, 400 // scale),
    ]


# --------------------------------------------------------------------------- smtp-source


def run_smtp_source(port: int, work: Work, recipients: list[str], timeout: float) -> float:
    """Send ``work.messages`` with smtp-source; returns the wall time in seconds.

    One inbox: one smtp-source with ``-s sessions``. N inboxes: N smtp-source processes,
    one per recipient, sharing the sessions and messages between them (its ``-t`` takes
    one recipient). ``-d`` keeps each session open for the next message, as a busy
    sending MTA would."""
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    rcpts = recipients[:work.inboxes]
    per_sessions = max(1, work.sessions // len(rcpts))
    commands = []
    for i, rcpt in enumerate(rcpts):
        count = work.messages // len(rcpts) + (1 if i < work.messages % len(rcpts) else 0)
        commands.append([exe, "-d", "-s", str(per_sessions), "-l", str(work.size),
                         "-m", str(count), "-f", SENDER, "-t", rcpt,
                         "-M", "client.bench.example", f"127.0.0.1:{port}"])
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for c in commands]
    problems = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            problems.append("timed out")
        if proc.returncode:
            problems.append(out.decode("utf-8", "replace").strip()[-300:])
    elapsed = time.perf_counter() - t0
    if problems:
        raise SetupError(f"smtp-source failed: {problems[0]}")
    return elapsed


# --------------------------------------------------------------------------- Postfix


MASTER_CF = """\
# Written by bench/compare_smtp.py: no chroot, loopback only.
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix: its own config, queue and data folders and port, in ``base``."""

    def __init__(self, base: Path, recipients: list[str]) -> None:
        self.base = base
        self.conf = base / "etc"
        self.queue = base / "spool"
        self.data = base / "data"
        self.mail = base / "mail"
        self.port = free_port()
        self.recipients = recipients
        self.master_pid: int | None = None

    @staticmethod
    def available() -> str | None:
        """None if Postfix can be run here, else why not."""
        if not Path(POSTFIX_SBIN, "master").exists() or shutil.which("postfix") is None:
            return ("Postfix is not installed "
                    "(DEBIAN_FRONTEND=noninteractive apt-get install -y postfix)")
        if shutil.which("smtp-source") is None:
            return "smtp-source is missing (it comes with the postfix package)"
        if os.geteuid() != 0:
            return "running Postfix needs root (its daemons change to the postfix user)"
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            return "there is no postfix user"
        return None

    def maildir(self, rcpt: str) -> Path:
        return self.mail / (rcpt.split("@", 1)[0] + "/")

    def write_config(self) -> None:
        pf = pwd.getpwnam("postfix")
        for path in (self.conf, self.queue, self.data, self.mail):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)  # noqa: S103 - the postfix user must reach its queue
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.chown(self.mail, pf.pw_uid, pf.pw_gid)
        mailboxes = ", ".join(f"{r}={r.split('@', 1)[0]}/" for r in self.recipients)
        main = [
            "# Written by bench/compare_smtp.py: a private instance, removed afterwards.",
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            # Postfix's own commands log through postlogd, not running before "start".
            "maillog_file = /dev/stdout",
            "myhostname = postfix.bench.localhost",
            "mydomain = bench.localhost",
            "myorigin = $myhostname",
            "mydestination =",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "relayhost =",
            "biff = no",
            "smtpd_banner = $myhostname ESMTP",
            "smtpd_client_connection_count_limit = 0",
            "smtpd_client_connection_rate_limit = 0",
            "default_process_limit = 200",
            f"virtual_mailbox_domains = {SHARED_DOMAIN}",
            f"virtual_mailbox_base = {self.mail}",
            f"virtual_mailbox_maps = inline:{{ {mailboxes} }}",
            f"virtual_uid_maps = static:{pf.pw_uid}",
            f"virtual_gid_maps = static:{pf.pw_gid}",
            "virtual_minimum_uid = 1",
            "message_size_limit = 20971520",
            "smtputf8_enable = no",
            "alias_maps =",
            "alias_database =",
            "",
        ]
        (self.conf / "main.cf").write_text("\n".join(main))
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))

    def start(self) -> None:
        self.write_config()
        log(f"starting a private Postfix on 127.0.0.1:{self.port} (config {self.conf})")
        subprocess.run(["postfix", "-c", str(self.conf), "check"], check=False,
                       capture_output=True, timeout=60)
        done = subprocess.run(["postfix", "-c", str(self.conf), "start"],
                              capture_output=True, timeout=60)
        if done.returncode:
            raise SetupError("postfix start failed: "
                             + (done.stdout + done.stderr).decode("utf-8", "replace")[-500:])
        pid_file = self.queue / "pid" / "master.pid"
        for _ in range(100):
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pid_file.read_text().split()[0])
                break
            time.sleep(0.1)
        if self.master_pid is None:
            raise SetupError("Postfix master did not write its pid file")
        for _ in range(100):
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), 1):
                return
            time.sleep(0.1)
        raise SetupError(f"Postfix does not listen on port {self.port}")

    def stored(self) -> int:
        total = 0
        for rcpt in self.recipients:
            for sub in ("new", "cur"):
                with contextlib.suppress(OSError):
                    total += len(os.listdir(self.maildir(rcpt) / sub))
        return total

    def queued(self) -> int:
        total = 0
        for sub in ("incoming", "active", "deferred", "maildrop"):
            for _root, _dirs, files in os.walk(self.queue / sub):
                total += len(files)
        return total

    def wait_delivered(self, expected: int, timeout: float) -> int:
        """Stored count once it reaches ``expected`` or the queue is empty (or time is up)."""
        deadline = time.monotonic() + timeout
        while True:
            stored = self.stored()
            if stored >= expected or time.monotonic() > deadline:
                return stored
            if self.queued() == 0:
                time.sleep(0.3)
                return self.stored()
            time.sleep(0.05)

    def cpu(self) -> float:
        return tree_cpu(self.master_pid)

    def stop(self) -> None:
        if self.master_pid is None:
            return
        with contextlib.suppress(Exception):
            subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True,
                           timeout=60)
        for _ in range(100):
            try:
                os.kill(self.master_pid, 0)
            except OSError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(OSError):
                os.kill(self.master_pid, signal.SIGKILL)
        self.master_pid = None


# --------------------------------------------------------------------------- the run


class Compare:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.h = Harness("agentpost-compare-", "compare")
        self.tmp = Path(tempfile.mkdtemp(prefix="agentpost-postfix-"))
        self.recipients: list[str] = []
        self.postfix: PostfixInstance | None = None
        self.postfix_skipped: str | None = None

    def setup(self) -> None:
        self.h.start_postgres(True)
        self.h.workers = self.args.workers
        self.h.start_server(pool_size=None, log_level="warn", starttls=False)
        for i in range(INBOXES):
            inbox = asyncio.run(self.h.create_inbox(f"bench-rcpt-{i:03d}"))
            self.recipients.append(inbox["email"])
        self.postfix_skipped = None if self.args.no_postfix else PostfixInstance.available()
        if self.args.no_postfix:
            self.postfix_skipped = "--no-postfix"
        if self.postfix_skipped is None:
            self.postfix = PostfixInstance(self.tmp, self.recipients)
            self.postfix.start()
        else:
            log(f"SKIPPING Postfix: {self.postfix_skipped}")

    def agentpost_cpu(self) -> float:
        server_cpu = tree_cpu if self.h.workers > 1 else process_cpu
        return server_cpu(self.h.server_pid) + tree_cpu(self.h.pg_pid())

    def measure_agentpost(self, work: Work) -> dict[str, Any]:
        before, cpu0 = self.h.count(), self.agentpost_cpu()
        elapsed = run_smtp_source(self.h.mx_port, work, self.recipients, self.args.timeout)
        cpu = self.agentpost_cpu() - cpu0
        stored = self.h.count() - before
        self.h.check_server(work.label)
        return {"msgs_per_s": work.messages / elapsed, "stored": stored,
                "cpu_ms_per_msg": cpu * 1000.0 / work.messages, "seconds": elapsed}

    def measure_postfix(self, work: Work) -> dict[str, Any]:
        assert self.postfix is not None
        before, cpu0 = self.postfix.stored(), self.postfix.cpu()
        elapsed = run_smtp_source(self.postfix.port, work, self.recipients, self.args.timeout)
        stored = self.postfix.wait_delivered(before + work.messages, self.args.timeout) - before
        cpu = self.postfix.cpu() - cpu0
        return {"msgs_per_s": work.messages / elapsed, "stored": stored,
                "cpu_ms_per_msg": cpu * 1000.0 / work.messages, "seconds": elapsed}

    def warm(self) -> None:
        small = Work(4 * KIB, 2, 1, 20)
        self.measure_agentpost(small)
        if self.postfix is not None:
            self.measure_postfix(small)

    def run(self) -> list[dict[str, Any]]:
        """Every piece of work once per round; who goes first alternates from one piece
        to the next and from one round to the next, so drift hits both sides alike."""
        self.warm()
        rows = []
        works = [w for w in plan(self.args.quick)
                 if self.args.sessions is None or w.sessions == self.args.sessions]
        for rnd in range(self.args.rounds):
            for n, work in enumerate(works):
                rows.append(self.run_work(work, rnd, (n + rnd) % 2 == 0))
        return rows

    def run_work(self, work: Work, rnd: int, agentpost_first: bool) -> dict[str, Any]:
        log(f"{work.label}: {work.messages} messages (round {rnd + 1})")
        sides = ["agentpost", "postfix"] if agentpost_first else ["postfix", "agentpost"]
        row: dict[str, Any] = {"work": work.label, "messages": work.messages,
                               "round": rnd + 1}
        for side in sides:
            if side == "postfix" and self.postfix is None:
                continue
            time.sleep(1.0)
            result = (self.measure_agentpost(work) if side == "agentpost"
                      else self.measure_postfix(work))
            row[side] = result
            log(f"  {side}: {result['msgs_per_s']:.1f} msgs/s, stored "
                f"{result['stored']}/{work.messages}, "
                f"{result['cpu_ms_per_msg']:.2f} ms CPU/msg")
        return row

    def cleanup(self) -> None:
        if self.postfix is not None:
            self.postfix.stop()
        with contextlib.suppress(Exception):
            stop_server(self.h.server)
        self.h.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)


def print_table(rows: list[dict[str, Any]], skipped: str | None) -> None:
    print()
    for row in rows:
        for side in ("agentpost", "postfix"):
            got = row.get(side)
            if got and got["stored"] != row["messages"]:
                print(f"WARNING: {side} stored {got['stored']} of {row['messages']} "
                      f"accepted messages ({row['work']})")
    if skipped:
        print(f"Postfix skipped: {skipped}")
    print("| work | AgentPost msgs/s | Postfix msgs/s | ratio | AgentPost CPU ms/msg "
          "(app + PostgreSQL) | Postfix CPU ms/msg | stored (AgentPost / Postfix) |")
    print("|---|---|---|---|---|---|---|")
    rounds = max((row.get("round", 1) for row in rows), default=1)
    for row in rows:
        ap: dict[str, Any] = row["agentpost"]
        pf: dict[str, Any] | None = row.get("postfix")
        n = row["messages"]
        if pf is None:
            ratio = pf_rate = pf_cpu = pf_stored = "-"
        else:
            ratio = f"{ap['msgs_per_s'] / pf['msgs_per_s']:.2f}x"
            pf_rate, pf_cpu = f"{pf['msgs_per_s']:.0f}", f"{pf['cpu_ms_per_msg']:.1f}"
            pf_stored = f"{pf['stored']}/{n}"
        work = row["work"] if rounds == 1 else f"{row['work']} (round {row['round']})"
        print(f"| {work} | {ap['msgs_per_s']:.0f} | {pf_rate} | {ratio} | "
              f"{ap['cpu_ms_per_msg']:.1f} | {pf_cpu} | {ap['stored']}/{n} / {pf_stored} |")
    if rounds > 1:
        print_medians(rows, rounds)


def print_medians(rows: list[dict[str, Any]], rounds: int) -> None:
    """Each piece of work's median over the rounds: a single pair can land on a slow
    second of either server (Postfix's own rate moves by up to 2x between runs on a
    shared 2-core machine), the median of paired ratios much less so."""
    print(f"\nMedians over {rounds} rounds (ratios are paired: each round's two runs "
          "back to back):")
    print("| work | AgentPost msgs/s | Postfix msgs/s | ratio (median) | ratios per round "
          "| AgentPost CPU ms/msg | Postfix CPU ms/msg |")
    print("|---|---|---|---|---|---|---|")
    for label in dict.fromkeys(row["work"] for row in rows):
        mine = [row for row in rows if row["work"] == label]
        ap_rate = statistics.median(row["agentpost"]["msgs_per_s"] for row in mine)
        ap_cpu = statistics.median(row["agentpost"]["cpu_ms_per_msg"] for row in mine)
        paired = [row for row in mine if row.get("postfix")]
        if not paired:
            print(f"| {label} | {ap_rate:.0f} | - | - | - | {ap_cpu:.1f} | - |")
            continue
        ratios = [row["agentpost"]["msgs_per_s"] / row["postfix"]["msgs_per_s"]
                  for row in paired]
        pf_rate = statistics.median(row["postfix"]["msgs_per_s"] for row in paired)
        pf_cpu = statistics.median(row["postfix"]["cpu_ms_per_msg"] for row in paired)
        each = ", ".join(f"{r:.2f}x" for r in ratios)
        print(f"| {label} | {ap_rate:.0f} | {pf_rate:.0f} | "
              f"{statistics.median(ratios):.2f}x | {each} | {ap_cpu:.1f} | {pf_cpu:.1f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the messages (about a minute)")
    parser.add_argument("--no-postfix", action="store_true", help="measure AgentPost only")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds allowed for one smtp-source run")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="run every piece of work N times (who goes first alternates) "
                             "and also print each one's median ratio; default 1")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--sessions", type=int, default=None, metavar="N",
                        help="only the pieces of work with N sessions (1 or 20)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="AgentPost's server.workers (processes sharing the MX port; "
                             "its CPU is then the whole process tree's); default 1")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rounds < 1:
        log("--rounds must be 1 or more")
        return 2
    if shutil.which("smtp-source") is None:
        log("smtp-source is not installed (it comes with Debian's postfix package): "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y postfix")
        return 1
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    machine = machine_info()
    bench = Compare(args)
    try:
        bench.setup()
        rows = bench.run()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except (SetupError, EmbeddedPostgresError, MigrationError, psycopg2.Error, OSError,
            subprocess.SubprocessError) as exc:
        log(f"failed: {type(exc).__name__}: {str(exc).strip()}")
        return 1
    finally:
        bench.cleanup()
    if args.json:
        print(json.dumps({"machine": machine, "postfix_skipped": bench.postfix_skipped,
                          "workers": args.workers, "rows": rows}, indent=2))
    else:
        print_table(rows, bench.postfix_skipped)
        print(f"\nAgentPost: server.workers = {args.workers}; load average at the end "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    lost = any(side and side["stored"] != row["messages"]
               for row in rows for side in (row.get("agentpost"), row.get("postfix")))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
