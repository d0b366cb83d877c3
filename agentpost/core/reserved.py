"""Local parts that belong to whoever runs a domain, never to a tenant of a shared one.

Why: certificate authorities validate control of a domain by mailing ``admin@``,
``administrator@``, ``webmaster@``, ``hostmaster@`` or ``postmaster@`` it (CA/Browser
Forum Baseline Requirements §3.2.2.4.4), and abuse reports go to ``abuse@`` (RFC 2142).
On a shared domain any organization could otherwise create those inboxes and obtain a
certificate for, or the complaints about, the whole domain.

The check compares the way routing compares addresses: case-insensitively, and on the
part before a ``+`` subaddress as well, so ``Admin+certs`` is as reserved as
``admin``. Dots are *not* removed: routing does not treat ``post.master`` as
``postmaster``, so neither does this.
"""

from __future__ import annotations

from collections.abc import Iterable

#: RFC 2142 names for the services a mail host runs (SMTP, DNS, HTTP) and for network
#: operations, the CA/B Forum validation names, and the traditional system accounts.
DEFAULT_RESERVED_LOCAL_PARTS: tuple[str, ...] = (
    "postmaster", "hostmaster", "webmaster", "www", "abuse", "noc", "security",
    "admin", "administrator", "root", "mailer-daemon", "nobody",
    "ssladmin", "ssl-admin", "sysadmin",
)

POSTMASTER = "postmaster"


def base_local_part(local: str) -> str:
    """The local part as routing compares it: lowercased, without a ``+tag``."""
    return local.lower().split("+", 1)[0]


class ReservedNames:
    """The configured reserved local parts (see the module docstring for why)."""

    def __init__(self, names: Iterable[str] = DEFAULT_RESERVED_LOCAL_PARTS) -> None:
        self._names = frozenset(base_local_part(n.strip()) for n in names if n.strip())

    def __contains__(self, local: object) -> bool:
        return isinstance(local, str) and base_local_part(local) in self._names


def is_postmaster(local: str) -> bool:
    """``postmaster`` in any case (RFC 5321 §4.5.1), with or without a ``+tag``."""
    return base_local_part(local) == POSTMASTER
