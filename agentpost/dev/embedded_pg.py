"""A throw-away PostgreSQL cluster for ``make run``, the test suite and benchmarks.

Why this exists: AgentPost's storage layer needs a real PostgreSQL (LISTEN/NOTIFY,
``FOR UPDATE SKIP LOCKED``, advisory locks), and asking every developer and CI run to
provision one by hand is slow and error prone.  Instead we drive the distribution's own
server binaries (``initdb``/``pg_ctl``) against a private data directory, reachable over
a unix socket and a free loopback port, with ``trust`` authentication.

``trust`` on loopback means *any local user can connect as superuser*: this is a
development tool and must never be pointed at data you care about.

PostgreSQL refuses to run as root, and CI runs as root.  In that case every server
command runs as the ``postgres`` system user through ``runuser``, and because that user
must be able to traverse every parent of its data directory (a checkout under
``/root``, mode 0700, is unreachable), the cluster then lives in a folder it owns under
``/var/tmp`` named after the checkout; only a small JSON pointer stays in ``var_dir``.

Command line::

    python -m agentpost.dev.embedded_pg {start,stop,status,dsn,url,destroy} --var-dir DIR \\
        [--name NAME] [--no-fsync] [--dbname DB]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PostgresNotInstalled",
    "find_bindir",
    "main",
]

#: The system account the server runs as when we are root (PostgreSQL refuses root).
from agentpost.dev.pg_tools import (  # noqa: F401 (re-exported names)
    _COMMAND_TIMEOUT_S,
    _CONF_FILE,
    _DEBIAN_PG_ROOT,
    _INCLUDE_LINE,
    _NAME_RE,
    _POINTER_VERSION,
    _SOCKET_PATH_MAX,
    _START_ATTEMPTS,
    _START_TIMEOUT_S,
    _STOP_TIMEOUT_S,
    _VERSION_RE,
    INSTALL_COMMAND,
    SERVICE_USER,
    EmbeddedPostgresError,
    PostgresNotInstalled,
    _atomic_write,
    _bindir_major,
    _conf_quote,
    _dsn_quote,
    _has_server_tools,
    _Layout,
    _looks_like_postmaster,
    _pick_free_port,
    _port_is_free,
    _system_tool,
    _version_key,
    ensure_service_user,
    find_bindir,
    private_dir,
    service_ids,
)

# --------------------------------------------------------------------------- the cluster


class EmbeddedPostgres:
    """One private PostgreSQL cluster, created on first start and reused afterwards.

    Every public method is idempotent and safe to call from several processes at
    once (e.g. parallel test workers): state-changing steps run under an exclusive
    ``flock`` on ``var_dir/<name>.lock``.

    Usable as a context manager (``with EmbeddedPostgres(...) as pg:``) which starts
    the cluster on entry and stops it on exit, so a failed or interrupted test run
    does not leave a server behind.
    """

    def __init__(self, var_dir: Path, *, fsync: bool = True, name: str = "pg") -> None:
        """Describe a cluster; nothing is created or started until :meth:`start`.

        *var_dir* is the project's state folder (``./var``); the cluster is keyed by
        its resolved path plus *name*, so two checkouts never share a cluster.
        *fsync* is on by default because for ``make run`` durability is the product;
        turn it off only for disposable test clusters, where it saves real time.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid cluster name {name!r}: use 1-32 of [A-Za-z0-9_.-]")
        self._var_dir = Path(var_dir).resolve()
        self._name = name
        self._fsync = fsync
        self._as_root = os.geteuid() == 0
        self._pointer_path = self._var_dir / f"{name}.json"
        self._lock_path = self._var_dir / f"{name}.lock"
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._bindir: Path | None = None
        self._layout = self._compute_layout()

    def __repr__(self) -> str:
        return (
            f"EmbeddedPostgres(var_dir={str(self._var_dir)!r}, name={self._name!r}, "
            f"fsync={self._fsync})"
        )

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- public API

    @property
    def port(self) -> int:
        """The loopback TCP port, chosen once and remembered in the pointer file.

        A stable port lets developers keep a ``psql`` command or a GUI connection
        around across restarts.  It only changes if something else has taken it
        by the time the cluster starts again.  Reading it before the first start
        chooses the port (and records it) without creating the cluster.
        """
        pointer = self._read_pointer()
        if pointer is not None:
            return int(pointer["port"])
        with self._locked():
            pointer = self._read_pointer()
            if pointer is not None:
                return int(pointer["port"])
            port = _pick_free_port()
            self._write_pointer(port)
            return port

    @property
    def socket_dir(self) -> str:
        """Directory holding the server's unix socket (the preferred, fastest way in)."""
        return str(self._layout.socket_dir)

    @property
    def superuser(self) -> str:
        """The cluster's superuser: ``postgres`` when root, else the current user.

        Matching the OS user means plain ``psql -h <socket_dir>`` works without ``-U``.
        """
        if self._as_root:
            return SERVICE_USER
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return getpass.getuser()

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (for debugging; do not edit files in it)."""
        return self._layout.data_dir

    @property
    def log_file(self) -> Path:
        """The server log, next to the data directory; look here when start-up fails."""
        return self._layout.log_file

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq keyword DSN over the unix socket (psycopg2/txpostgres ``connect(dsn)``)."""
        return " ".join(
            f"{key}={_dsn_quote(value)}"
            for key, value in (
                ("host", self.socket_dir),
                ("port", str(self.port)),
                ("user", self.superuser),
                ("dbname", dbname),
            )
        )

    def url(self, dbname: str = "postgres") -> str:
        """The same connection as a ``postgresql://`` URL, socket directory percent-encoded."""
        quote = urllib.parse.quote
        return (
            f"postgresql://{quote(self.superuser, safe='')}@{quote(self.socket_dir, safe='')}"
            f":{self.port}/{quote(dbname, safe='')}"
        )

    def is_running(self) -> bool:
        """True if this cluster's postmaster is up (a stale ``postmaster.pid`` counts as down)."""
        if not self._initialised():
            return False
        return self._server_state(self._bindir_for_cluster()) == "running"

    def start(self) -> None:
        """Create the cluster if needed and start it; a no-op if it is already running.

        Blocks until the server accepts connections (``pg_ctl start -w``).  Settings
        (port, *fsync*) are applied at server start, so a server that is already
        running keeps the ones it was started with.
        """
        with self._locked():
            if self._as_root and self._initialised() and not self._pointer_path.exists():
                # As root the cluster lives outside var_dir, under a name derived from
                # the checkout's path. Its pointer gone means var_dir was deleted (a new
                # clone in the same place): the old cluster, with the old demo
                # organization whose key nobody has any more, goes with it.
                self.destroy()
            bindir = self._bindir_for_cluster()
            self._prepare_dirs()
            if not self._initialised():
                self._initdb(bindir)
            state = self._server_state(bindir)
            if state == "running":
                self._sync_pointer_with_server()
                return
            self._clear_stale_files(pidfile=state == "stale")
            self._start_server(bindir)

    def stop(self) -> None:
        """Stop the server with a fast shutdown (rolls back open transactions); a no-op if down."""
        with self._locked():
            if not self._initialised():
                return
            bindir = self._bindir_for_cluster()
            state = self._server_state(bindir)
            if state == "stale":
                self._clear_stale_files(pidfile=True)
                return
            if state != "running":
                return
            result = self._pg_ctl(bindir, "stop", "-m", "fast", "-w", "-t", str(_STOP_TIMEOUT_S))
            if result.returncode == 0 or self._server_state(bindir) != "running":
                return
            # A fast shutdown can hang behind a stuck backend; this is a throw-away
            # cluster, so crash-recovery on next start is an acceptable price.
            immediate = self._pg_ctl(
                bindir, "stop", "-m", "immediate", "-w", "-t", str(_STOP_TIMEOUT_S)
            )
            if immediate.returncode != 0 and self._server_state(bindir) == "running":
                raise EmbeddedPostgresError(
                    f"pg_ctl stop failed: {result.stderr.strip()} / {immediate.stderr.strip()}"
                )

    def destroy(self) -> None:
        """Stop the cluster and delete all of its files, including the pointer.

        Needed by ``make distclean``: as root the data lives outside ``var_dir`` and
        would otherwise survive, to be silently reused by the next ``make run``.
        """
        if not self._var_dir.exists() and not self._layout.base_dir.exists():
            return
        with self._locked():
            if self._initialised():
                try:
                    self.stop()
                except PostgresNotInstalled:
                    pass  # without server binaries nothing can be running; just delete
            for path in {self._layout.base_dir, self._layout.socket_dir}:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
            with contextlib.suppress(FileNotFoundError):
                self._pointer_path.unlink()

    # ----------------------------------------------------------------- layout & pointer

    def _compute_layout(self) -> _Layout:
        key = hashlib.sha256(f"{self._var_dir}\0{self._name}".encode()).hexdigest()[:12]
        if self._as_root:
            tmp_root = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path("/tmp")
            base = tmp_root / f"agentpost-pg-{key}-{self._name}"
            socket_dir = base / "run"
        else:
            base = self._var_dir / self._name
            socket_dir = base / "run"
            if len(str(socket_dir)) + len("/.s.PGSQL.65535") > _SOCKET_PATH_MAX:
                # A deep checkout would overflow sun_path; use a short private folder.
                socket_dir = Path("/tmp") / f"agentpost-pg-{os.geteuid()}-{key}-{self._name}"
        return _Layout(
            base_dir=base,
            data_dir=base / "data",
            socket_dir=socket_dir,
            log_file=base / "server.log",
        )

    def _read_pointer(self) -> dict[str, Any] | None:
        try:
            pointer = json.loads(self._pointer_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        port = pointer.get("port") if isinstance(pointer, dict) else None
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            return None
        return pointer

    def _write_pointer(self, port: int) -> None:
        """Record where the cluster lives so tools and humans can find it, and the port survives."""
        pointer = {
            "version": _POINTER_VERSION,
            "data_dir": str(self._layout.data_dir),
            "socket_dir": str(self._layout.socket_dir),
            "port": port,
            "superuser": self.superuser,
            "log_file": str(self._layout.log_file),
        }
        if self._read_pointer() == pointer:
            return
        self._var_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._pointer_path, json.dumps(pointer, indent=2) + "\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise state changes across processes; re-entrant within one instance."""
        if self._lock_depth == 0:
            self._var_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # ----------------------------------------------------------------- filesystem

    def _prepare_dirs(self) -> None:
        layout = self._layout
        if self._as_root:
            ensure_service_user()
            owner = service_ids()
            # 0711: the server's user owns it; others (a privilege-dropped app) may
            # reach the socket by name but cannot list or read anything.
            private_dir(layout.base_dir, 0o711, owner)
            private_dir(layout.socket_dir, 0o711, owner)
        else:
            layout.base_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(layout.base_dir, 0o700)
            if layout.socket_dir.parent == layout.base_dir:
                layout.socket_dir.mkdir(exist_ok=True, mode=0o700)
            else:
                private_dir(layout.socket_dir, 0o700, None)
        self._var_dir.mkdir(parents=True, exist_ok=True)

    def _initialised(self) -> bool:
        return (self._layout.data_dir / "PG_VERSION").is_file()

    def _chown_for_server(self, path: Path) -> None:
        if self._as_root:
            os.chown(path, *service_ids())

    def _clear_stale_files(self, *, pidfile: bool) -> None:
        """Remove leftovers of a crashed server that would block the next start.

        Only called while holding the lock and after ``pg_ctl status`` said the
        server is down, and the socket folder is private to this cluster, so nothing
        live can be removed.
        """
        if pidfile:
            with contextlib.suppress(FileNotFoundError):
                (self._layout.data_dir / "postmaster.pid").unlink()
        if self._layout.socket_dir.is_dir():
            for leftover in self._layout.socket_dir.glob(".s.PGSQL.*"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    # ----------------------------------------------------------------- server commands

    def _run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout_s: float = _COMMAND_TIMEOUT_S,
        new_session: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a server program, as the ``postgres`` user when we are root.

        ``cwd='/'`` because the server user may not be allowed into our working
        directory (it complains if so), and ``PG*`` variables are dropped so a
        developer's ``PGPORT``/``PGDATA`` cannot redirect the commands.
        """
        command = [os.fspath(arg) for arg in argv]
        if self._as_root:
            command = [_system_tool("runuser"), "-u", SERVICE_USER, "--", *command]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        try:
            return subprocess.run(
                command,
                cwd="/",
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                start_new_session=new_session,
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(
                f"{command[0]} timed out after {timeout_s}s: {command}"
            ) from exc
        except OSError as exc:
            raise EmbeddedPostgresError(f"cannot run {command[0]}: {exc}") from exc

    def _pg_ctl(
        self, bindir: Path, *args: str, new_session: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return self._run(
            [bindir / "pg_ctl", *args, "-s", "-D", self._layout.data_dir],
            new_session=new_session,
        )

    def _bindir_for_cluster(self) -> Path:
        """Binaries matching an existing cluster's major version (data files are per-version)."""
        if self._bindir is not None:
            return self._bindir
        bindir = find_bindir()
        version_file = self._layout.data_dir / "PG_VERSION"
        if version_file.is_file():
            wanted = version_file.read_text(encoding="ascii").strip()
            if _bindir_major(bindir) != wanted:
                alternative = _DEBIAN_PG_ROOT / wanted / "bin"
                if not _has_server_tools(alternative):
                    raise EmbeddedPostgresError(
                        f"the cluster in {self._layout.data_dir} was made by PostgreSQL "
                        f"{wanted}, but the installed server is {_bindir_major(bindir)} "
                        f"({bindir}). Throw the old cluster away (`python -m "
                        f"agentpost.dev.embedded_pg destroy --var-dir {self._var_dir}` or "
                        "`make distclean`) or install the matching server package."
                    )
                bindir = alternative
        self._bindir = bindir
        return bindir

    def _initdb(self, bindir: Path) -> None:
        """Create the cluster in a scratch folder and rename it into place.

        The rename makes creation atomic: an interrupted ``initdb`` can never leave a
        half-made data directory that later looks like a real cluster.
        """
        data_dir = self._layout.data_dir
        if data_dir.exists():
            if any(data_dir.iterdir()):
                raise EmbeddedPostgresError(
                    f"{data_dir} exists but is not a PostgreSQL cluster (no PG_VERSION); "
                    "remove it and retry"
                )
            data_dir.rmdir()
        scratch = self._layout.base_dir / "data.initdb"
        shutil.rmtree(scratch, ignore_errors=True)
        failures = []
        # C.UTF-8 gives UTF-8 text with byte-order collation, stable across glibc
        # upgrades; plain C is the fallback on systems lacking that locale.
        for locale in ("C.UTF-8", "C"):
            args: list[str | os.PathLike[str]] = [
                bindir / "initdb",
                "-D",
                scratch,
                "--auth=trust",
                f"--username={self.superuser}",
                "--encoding=UTF8",
                f"--locale={locale}",
            ]
            if not self._fsync:
                args.append("--no-sync")
            result = self._run(args)
            if result.returncode == 0:
                break
            failures.append(f"--locale={locale}: {(result.stderr or result.stdout).strip()}")
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            raise EmbeddedPostgresError("initdb failed:\n" + "\n".join(failures))
        with open(scratch / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"\n# Settings managed by agentpost.dev.embedded_pg\n{_INCLUDE_LINE}\n")
        os.replace(scratch, data_dir)

    def _write_conf(self, port: int) -> None:
        """(Re)write our settings file before every start, so port and fsync follow the caller."""
        durable = "on" if self._fsync else "off"
        lines = [
            "# Written by agentpost.dev.embedded_pg before every start; edits are overwritten.",
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            f"unix_socket_directories = {_conf_quote(str(self._layout.socket_dir))}",
            "max_connections = 200",
            "shared_buffers = '128MB'",
            f"fsync = {durable}",
            f"synchronous_commit = {durable}",
            f"full_page_writes = {durable}",
        ]
        conf = self._layout.data_dir / _CONF_FILE
        content = "\n".join(lines) + "\n"
        try:
            if conf.read_text(encoding="utf-8") == content:
                return
        except OSError:
            pass
        _atomic_write(conf, content, mode=0o600)
        self._chown_for_server(conf)
        postgresql_conf = self._layout.data_dir / "postgresql.conf"
        if _INCLUDE_LINE not in postgresql_conf.read_text(encoding="utf-8"):
            with open(postgresql_conf, "a", encoding="utf-8") as handle:
                handle.write(f"\n{_INCLUDE_LINE}\n")

    def _pidfile(self) -> tuple[int, int | None] | None:
        """``(pid, port)`` from ``postmaster.pid``, or ``None`` if absent or unreadable."""
        try:
            lines = (
                (self._layout.data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
            )
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        port: int | None = None
        if len(lines) > 3 and lines[3].strip().isdigit():
            port = int(lines[3])
        return pid, port

    def _server_state(self, bindir: Path) -> str:
        """``running``, ``stopped`` or ``stale`` (the pid file names some other program now)."""
        result = self._pg_ctl(bindir, "status")
        if result.returncode in (3, 4):  # 3: not running, 4: no accessible data directory
            return "stopped"
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"pg_ctl status failed ({result.returncode}): {result.stderr.strip()}"
            )
        info = self._pidfile()
        if info is None:
            return "stopped"
        if _looks_like_postmaster(info[0]) is False:
            return "stale"
        return "running"

    def _sync_pointer_with_server(self) -> None:
        """Make the pointer show the port the running server really uses."""
        info = self._pidfile()
        if info is not None and info[1] is not None:
            self._write_pointer(info[1])

    def _log_size(self) -> int:
        try:
            return self._layout.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self._layout.log_file, "rb") as handle:
                handle.seek(offset)
                return handle.read()[-8000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _start_server(self, bindir: Path) -> None:
        """``pg_ctl start -w``, moving to a new port if ours was taken meanwhile."""
        port = self.port
        for attempt in range(1, _START_ATTEMPTS + 1):
            if not _port_is_free(port):
                port = _pick_free_port()
            self._write_conf(port)
            self._write_pointer(port)
            offset = self._log_size()
            # A new session keeps Ctrl-C in the caller's terminal away from the server.
            result = self._pg_ctl(
                bindir,
                "start",
                "-w",
                "-t",
                str(_START_TIMEOUT_S),
                "-l",
                str(self._layout.log_file),
                new_session=True,
            )
            if result.returncode == 0:
                return
            log = self._log_since(offset)
            if attempt < _START_ATTEMPTS and ("could not bind" in log or "already in use" in log):
                port = _pick_free_port()  # lost the race for the port; try another
                continue
            output = (result.stderr or result.stdout).strip()
            raise EmbeddedPostgresError(
                f"pg_ctl start failed (exit {result.returncode}): {output}\n"
                f"--- {self._layout.log_file} ---\n{log.strip()}"
            )


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m agentpost.dev.embedded_pg",
        description="Manage AgentPost's throw-away development PostgreSQL cluster.",
    )
    parser.add_argument(
        "command",
        choices=("start", "stop", "status", "dsn", "url", "destroy"),
        help="status exits 0 when running, 1 otherwise; destroy stops and deletes the cluster",
    )
    parser.add_argument(
        "--var-dir", required=True, type=Path, help="state folder (the pointer file lives here)"
    )
    parser.add_argument(
        "--name", default="pg", help="cluster name, for several clusters per var dir"
    )
    parser.add_argument("--no-fsync", action="store_true", help="faster, non-durable (tests only)")
    parser.add_argument("--dbname", default="postgres", help="database named by dsn/url")
    args = parser.parse_args(argv)

    try:
        cluster = EmbeddedPostgres(args.var_dir, fsync=not args.no_fsync, name=args.name)
        if args.command == "start":
            started = time.monotonic()
            cluster.start()
            print(
                f"PostgreSQL running ({time.monotonic() - started:.1f}s): {cluster.dsn()}",
                file=sys.stderr,
            )
        elif args.command == "stop":
            cluster.stop()
        elif args.command == "destroy":
            cluster.destroy()
        elif args.command == "status":
            running = cluster.is_running()
            print(f"running: {cluster.dsn()}" if running else "stopped")
            return 0 if running else 1
        elif args.command == "dsn":
            print(cluster.dsn(args.dbname))
        elif args.command == "url":
            print(cluster.url(args.dbname))
    except (EmbeddedPostgresError, ValueError, OSError) as exc:
        print(f"embedded_pg: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
