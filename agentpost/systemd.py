"""Service-manager notifications (the sd_notify protocol) with the standard library only.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` naming an AF_UNIX
datagram socket; the service sends newline-separated ``KEY=VALUE`` assignments to it:

- ``READY=1`` once every listener is bound (systemd then considers the start done),
- ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a reload (SIGHUP) begins, then
  ``READY=1`` again when it is over,
- ``STOPPING=1`` when shutdown begins,
- ``STATUS=…`` a one-line human-readable status shown by ``systemctl status``.

Without ``$NOTIFY_SOCKET`` (a terminal, twistd by hand, the tests) every call is a
no-op returning False. A failure to send is logged, never raised: a notification must
not take the service down.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

__all__ = ["notify", "ready", "reloading", "status", "stopping"]


def _address(value: str) -> str | None:
    """The socket address to connect to, or None if it is not an AF_UNIX one."""
    if value.startswith("@"):  # Linux abstract namespace
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:CID:PORT", which a service on this host never gets


def _one_line(text: str) -> str:
    return " ".join(text.split())


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` assignments to the service manager in one datagram.

    Returns True when the datagram was sent, False when there is no manager to tell
    (``$NOTIFY_SOCKET`` unset or unusable) or sending failed.
    """
    if not assignments:
        return False
    target = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    address = _address(target) if target else None
    if address is None:
        if target:
            log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX address; not notifying", target)
        return False
    for line in assignments:
        if "=" not in line or "\n" in line:
            raise ValueError(f"not a single KEY=VALUE assignment: {line!r}")
    payload = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", target, exc)
        return False
    return True


def _with_status(lines: list[str], text: str | None) -> list[str]:
    if text:
        lines.append("STATUS=" + _one_line(text))
    return lines


def ready(text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Startup (or a reload) is complete: every listener is bound."""
    return notify(*_with_status(["READY=1"], text), environ=environ)


def reloading(text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """A reload has begun; call :func:`ready` when it is over (even if it failed).

    ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, microseconds) lets systemd >= 253 match the
    notification to the reload request; older versions ignore it.
    """
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = ["RELOADING=1", f"MONOTONIC_USEC={now_usec}"]
    return notify(*_with_status(lines, text), environ=environ)


def stopping(text: str | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Shutdown has begun."""
    return notify(*_with_status(["STOPPING=1"], text), environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """A one-line status for ``systemctl status`` (newlines are folded into spaces)."""
    return notify("STATUS=" + _one_line(text), environ=environ)
