"""Servers started for a run: a private Dovecot, or AgentPost through bench/imap_bench.py's
harness (throw-away PostgreSQL cluster + ``agentpost serve``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import log

BENCH = Path(__file__).resolve().parent.parent  # bench/, where imap_bench.py lives

DOVECOT_CONF = """\
# Written by bench/imap_mixed.py --start-dovecot: a private Dovecot, loopback only.
base_dir = {root}/run
state_dir = {root}/state
instance_name = bench-{port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {root}/dovecot.log
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_max_userip_connections = 1000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  process_min_avail = 2
}}
service imap {{
  process_limit = 1024
}}
service anvil {{
  chroot =
}}
protocol imap {{
  mail_max_userip_connections = 1000
}}
"""


class Dovecot:
    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="imap-mixed-dovecot-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        owner = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.getuid())
        for d in ("run", "state", "home"):
            (self.root / d).mkdir()
        # mkdtemp makes the folder 0700; Dovecot's unprivileged processes (dovecot,
        # dovenull, the mail user) must reach the users file and the Maildir under it.
        os.chmod(self.root, 0o755)  # noqa: S103 - a throw-away bench folder, nothing secret
        (self.root / "users").write_text("bench:{PLAIN}bench::::::\n")
        if os.geteuid() == 0:
            os.chown(self.root / "home", owner.pw_uid, owner.pw_gid)
        conf = self.root / "dovecot.conf"
        conf.write_text(DOVECOT_CONF.format(root=self.root, port=self.port, uid=owner.pw_uid,
                                            gid=owner.pw_gid))
        return conf

    def start(self) -> None:
        exe = shutil.which("dovecot")
        if exe is None and Path("/usr/sbin/dovecot").exists():
            exe = "/usr/sbin/dovecot"
        if exe is None:
            raise SystemExit("Dovecot is not installed: apt-get install -y dovecot-imapd "
                             "(skipping the Dovecot side).")
        conf = self._write_config()
        with open(self.root / "stdout.log", "wb") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen([exe, "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                log(f"Dovecot on 127.0.0.1:{self.port} (config and Maildir under {self.root})")
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"Dovecot did not start; see {self.root}/dovecot.log and stdout.log:\n"
                         + (self.root / "stdout.log").read_text()[-2000:])

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the Dovecot master, its processes and its reaped ones."""
        from api_bench import tree_cpu

        return {"server": tree_cpu(self.proc.pid if self.proc else None)}

    def stop(self, keep: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


class AgentPost:
    """bench/imap_bench.py's harness: throw-away cluster, ``agentpost serve``, one inbox."""

    def __init__(self, args: argparse.Namespace) -> None:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        # after PYTHONPATH: a snapshot of agentpost (PYTHONPATH=/tmp/ap-head) may come first
        sys.path.append(str(BENCH.parent))
        from imap_bench import IMAPHarness

        self.h = IMAPHarness("imap-mixed-", "imapmixed")
        self.h.keep_log = args.server_log
        self.args = args

    def start(self) -> tuple[int, str, str]:
        a = self.args
        self.h.start_postgres(not a.no_fsync)
        if a.pg_stats:
            self._enable_pg_stat_statements()
        self.h.start_imap_server(pool_size=a.pool_size, log_level="warn", imap_max_per_ip=2000,
                                 imap_max_total=5000, max_append=64 << 20)
        inbox = asyncio.run(self.h.create_inbox("mixed-bench"))
        log(f"agentpost serve pid {self.h.server_pid}, IMAP 127.0.0.1:{self.h.imap_port}, "
            f"user {inbox['email']}, folder {self.h.tmp}")
        return self.h.imap_port, inbox["email"], self.h.key

    def _enable_pg_stat_statements(self) -> None:
        import psycopg2

        with self.h.db.cursor() as cur:
            cur.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        self.h.db.close()
        self.h.cluster.stop()
        self.h.cluster.start()
        self.h.db = psycopg2.connect(self.h.dsn, connect_timeout=10)
        self.h.db.autocommit = True
        with self.h.db.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the server process and of PostgreSQL (postmaster,
        backends, reaped backends)."""
        from api_bench import process_cpu, tree_cpu

        return {"server": process_cpu(self.h.server_pid), "postgres": tree_cpu(self.h.pg_pid())}

    def pg_report(self, limit: int = 25) -> str:
        with self.h.db.cursor() as cur:
            cur.execute("SELECT calls, round(total_exec_time::numeric, 1), "
                        "round(mean_exec_time::numeric, 3), "
                        "left(regexp_replace(query, '\\s+', ' ', 'g'), 220) "
                        "FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT %s",
                        (limit,))
            rows = cur.fetchall()
            cur.execute("SELECT sum(calls), round(sum(total_exec_time)::numeric, 1) "
                        "FROM pg_stat_statements")
            calls, total = cur.fetchone()
            cur.execute("SELECT calls, round(total_exec_time::numeric, 1), "
                        "round(mean_exec_time::numeric, 3), "
                        "left(regexp_replace(query, '\\s+', ' ', 'g'), 220) "
                        "FROM pg_stat_statements ORDER BY calls DESC LIMIT 12")
            by_calls = cur.fetchall()
            # HOT updates keep every index untouched; a non-HOT one inserts into each
            cur.execute("SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, "
                        "n_dead_tup, autovacuum_count FROM pg_stat_user_tables "
                        "WHERE n_tup_upd + n_tup_ins + n_tup_del > 0 "
                        "ORDER BY n_tup_upd + n_tup_ins + n_tup_del DESC LIMIT 8")
            tables = cur.fetchall()
        lines = [f"{c:>8} {t:>10} ms {m:>8} ms/call  {q}" for c, t, m, q in rows]
        lines += ["-- tables: name, inserted, updated, HOT-updated, deleted, dead, autovacuums"]
        lines += ["   " + " ".join(str(v) for v in t) for t in tables]
        lines += [f"-- all statements: {calls} calls, {total} ms; most called:"]
        lines += [f"{c:>8} {t:>10} ms {m:>8} ms/call  {q}" for c, t, m, q in by_calls]
        return "\n".join(lines)

    def pg_reset(self) -> None:
        with self.h.db.cursor() as cur:
            cur.execute("SELECT pg_stat_statements_reset()")

    def analyze(self) -> None:
        """ANALYZE after seeding: a cold planner (no statistics on the fresh tables)
        picked plans ten times dearer for the per-command reads (fetch_rows 1.06 ms ->
        0.106 ms), which skewed every figure of the run."""
        with self.h.db.cursor() as cur:
            cur.execute("ANALYZE")

    def start_py_spy(self, prefix: str, run: int, seconds: float,
                     gil: bool = False) -> subprocess.Popen[bytes]:
        """py-spy record the server (raw collapsed stacks) to PREFIX-<run>.txt."""
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        exe = shutil.which("py-spy", path=path)
        if exe is None:
            raise SystemExit("--py-spy: py-spy is not installed (pip install py-spy in the venv)")
        return subprocess.Popen(
            [exe, "record", "-p", str(self.h.server_pid), "-r", "100", "-d",
             str(int(seconds)), "-f", "raw", "-o", f"{prefix}-{run}.txt", "--nonblocking",
             *(["--gil"] if gil else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.h.cleanup()
