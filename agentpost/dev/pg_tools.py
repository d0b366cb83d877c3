"""Binaries, ports, quoting and files for the throw-away PostgreSQL cluster.

Split from :mod:`agentpost.dev.embedded_pg` (which drives one cluster): these are the
pure helpers it needs -- finding the distribution's server binaries, picking a free
loopback port, quoting for DSNs and postgresql.conf, atomic writes, and telling a live
postmaster from a stale pid file -- kept apart so the cluster class reads as its life
cycle only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "postgres"

#: What a non-root user has to run when the server binaries are missing.
INSTALL_COMMAND = "sudo apt-get install postgresql"

_DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
_CONF_FILE = "agentpost.conf"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_FILE}'"
_POINTER_VERSION = 1
_START_TIMEOUT_S = 90
_STOP_TIMEOUT_S = 60
_COMMAND_TIMEOUT_S = 180
_START_ATTEMPTS = 3
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, with the NUL);
# leave some margin for the ".s.PGSQL.<port>" file name PostgreSQL appends.
_SOCKET_PATH_MAX = 100
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class EmbeddedPostgresError(RuntimeError):
    """The dev cluster could not be created, started, stopped or inspected."""


class PostgresNotInstalled(EmbeddedPostgresError):
    """No PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``) were found."""


# --------------------------------------------------------------------------- binaries


def _has_server_tools(bindir: Path) -> bool:
    """True if *bindir* holds everything needed to create and run a cluster.

    ``pg_config`` is also shipped by the client-only ``libpq-dev`` package, where
    ``--bindir`` points at ``/usr/bin`` without any server programs, so its answer
    must be checked rather than trusted.
    """
    return all(
        (bindir / tool).is_file() and os.access(bindir / tool, os.X_OK)
        for tool in ("initdb", "pg_ctl", "postgres")
    )


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin`` so that 15 beats 9.6."""
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return (-1,)


def find_bindir() -> Path:
    """Locate the PostgreSQL server binaries.

    ``pg_config --bindir`` is asked first because it names the installation the
    system considers current (and works on non-Debian layouts); the highest
    versioned Debian/Ubuntu folder is the fallback because on those systems the
    server programs are deliberately kept off ``PATH``.
    """
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            result = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            result = None
        if result is not None and result.returncode == 0 and result.stdout.strip():
            candidate = Path(result.stdout.strip())
            if _has_server_tools(candidate):
                return candidate
    for candidate in sorted(_DEBIAN_PG_ROOT.glob("*/bin"), key=_version_key, reverse=True):
        if _has_server_tools(candidate):
            return candidate
    hint = f"Install them with: {INSTALL_COMMAND}"
    if os.geteuid() == 0:
        hint += " (as root, `make postgres-bin` installs them for you)"
    raise PostgresNotInstalled(f"PostgreSQL server binaries (initdb, pg_ctl) not found. {hint}")


_MAJOR_CACHE: dict[Path, str] = {}


def _bindir_major(bindir: Path) -> str:
    """The major version of the binaries in *bindir*, spelled like ``PG_VERSION`` ("15", "9.6")."""
    if bindir not in _MAJOR_CACHE:
        result = subprocess.run(
            [str(bindir / "pg_ctl"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
        match = _VERSION_RE.search(result.stdout)
        if not match:
            raise EmbeddedPostgresError(
                f"cannot parse `pg_ctl --version` output: {result.stdout!r}"
            )
        major = int(match.group(1))
        _MAJOR_CACHE[bindir] = str(major) if major >= 10 else f"{major}.{match.group(2) or 0}"
    return _MAJOR_CACHE[bindir]


def _system_tool(name: str) -> str:
    """Find an admin tool even when ``/usr/sbin`` is not on ``PATH`` (common in CI images)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    found = shutil.which(name, path=search)
    if not found:
        raise EmbeddedPostgresError(
            f"`{name}` not found; it is needed to run PostgreSQL as the {SERVICE_USER!r} user "
            "when running as root (Debian/Ubuntu: apt-get install util-linux passwd)"
        )
    return found


# --------------------------------------------------------------------------- small helpers


def _port_is_free(port: int) -> bool:
    """Can PostgreSQL bind 127.0.0.1:*port* right now?

    SO_REUSEADDR is set because the postmaster sets it too: a port whose last user
    is in TIME_WAIT is usable by it, and we must not reject such a port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_free_port() -> int:
    """Let the kernel choose an unused loopback port.

    There is an unavoidable race until the server binds it; :meth:`_start_server` retries.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _dsn_quote(value: str) -> str:
    """Quote a libpq keyword/value DSN value only when needed, so ordinary DSNs stay readable."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conf_quote(value: str) -> str:
    """Quote a postgresql.conf string value."""
    return "'" + value.replace("'", "''") + "'"


def _atomic_write(path: Path, data: str, mode: int = 0o644) -> None:
    """Write *path* via a temp file and rename so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _looks_like_postmaster(pid: int) -> bool | None:
    """Is process *pid* a PostgreSQL server?  ``None`` when we cannot tell.

    ``pg_ctl status`` only checks that *some* process has the PID recorded in
    ``postmaster.pid``.  After a crash or a container restart that PID is often
    reused by an unrelated process of the same user, and then both ``pg_ctl`` and
    the postmaster itself refuse to start ("Is another postmaster running?").
    """
    proc = Path("/proc")
    if not (proc / "self").exists():
        return None
    try:
        exe = os.readlink(proc / str(pid) / "exe")
        return os.path.basename(exe).startswith("postgres")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        argv0 = (proc / str(pid) / "cmdline").read_bytes().split(b"\0", 1)[0]
    except FileNotFoundError:
        return False
    except OSError:
        return None
    return os.path.basename(argv0).startswith(b"postgres")


@dataclass(frozen=True)
class _Layout:
    """Where one cluster's files live; pure paths, computed without touching the disk."""

    base_dir: Path
    data_dir: Path
    socket_dir: Path
    log_file: Path


# --------------------------------------------------------------------------- running as root


def service_ids() -> tuple[int, int]:
    """uid and gid of the service user the server runs as under root."""
    entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def ensure_service_user() -> None:
    """Create the ``postgres`` system user where no server package's postinst did."""
    try:
        pwd.getpwnam(SERVICE_USER)
        return
    except KeyError:
        pass
    import grp

    try:
        grp.getgrnam(SERVICE_USER)
        group_args = ["-g", SERVICE_USER]
    except KeyError:
        group_args = ["--user-group"]
    result = subprocess.run(
        [
            _system_tool("useradd"),
            "--system",
            *group_args,
            "--home-dir",
            "/var/lib/postgresql",
            "--no-create-home",
            "--shell",  # never logged into: runuser -u execs the command directly
            "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false",
            "--comment",
            "PostgreSQL administrator",
            SERVICE_USER,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(SERVICE_USER)  # created concurrently by someone else
            return
        raise EmbeddedPostgresError(f"useradd {SERVICE_USER} failed: {result.stderr.strip()}")


def private_dir(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Create *path* (or accept an existing one) that only we, or the service user, own.

    Folders under world-writable ``/tmp``/``/var/tmp`` could be planted by another
    user (or be a symlink) to hijack the cluster, so ownership is verified.
    """
    try:
        path.mkdir(mode=mode)
        created = True
    except FileExistsError:
        created = False
    info = os.lstat(path)
    expected_uid = owner[0] if owner else os.geteuid()
    if not stat.S_ISDIR(info.st_mode):
        raise EmbeddedPostgresError(f"{path} exists but is not a directory")
    if created and owner is not None:
        os.chown(path, *owner)
    elif info.st_uid != expected_uid:
        raise EmbeddedPostgresError(
            f"{path} is owned by uid {info.st_uid}, not {expected_uid}; remove it and retry"
        )
    os.chmod(path, mode)
