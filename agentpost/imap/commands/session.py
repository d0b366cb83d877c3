"""Session and authentication commands: CAPABILITY NOOP LOGOUT ID STARTTLS LOGIN
AUTHENTICATE ENABLE NAMESPACE COMPRESS.

What touches the connection itself (TLS, compression, reading a SASL continuation,
registering the credential) is a method of the session; these handlers decide when.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING

from agentpost.imap import rev2
from agentpost.imap.commands.common import arguments
from agentpost.imap.errors import Answered, bad, no
from agentpost.imap.parser import Atom, Command, ParseError, astring
from agentpost.imap.updates import enable_condstore
from agentpost.model import errors

if TYPE_CHECKING:
    from agentpost.imap.server import IMAP4ServerProtocol


async def capability(session: IMAP4ServerProtocol, command: Command) -> None:
    arguments(command, 0)
    session.send("* CAPABILITY " + " ".join(session.capabilities()))


async def noop(session: IMAP4ServerProtocol, command: Command) -> None:
    """Nothing; the dispatcher polls the selected mailbox (the table's ``polls``)."""
    return None


async def logout(session: IMAP4ServerProtocol, command: Command) -> None:
    """BYE now; the dispatcher sends the tagged OK and closes."""
    session.bye_sent = True
    session.send("* BYE Logging out")


async def id_(session: IMAP4ServerProtocol, command: Command) -> None:
    session.send('* ID ("name" "AgentPost")')


async def namespace(session: IMAP4ServerProtocol, command: Command) -> None:
    session.send('* NAMESPACE (("" "/")) NIL NIL')


async def starttls(session: IMAP4ServerProtocol, command: Command) -> None:
    arguments(command, 0)
    if session.tls_active:
        raise bad("TLS is already active")
    if session.tls_options is None:
        raise no("STARTTLS is not available here")
    session.send(f"{command.tag} OK Begin TLS negotiation now")
    session.start_tls()
    raise Answered()


async def compress(session: IMAP4ServerProtocol, command: Command) -> None:
    """COMPRESS DEFLATE (RFC 4978): raw DEFLATE both ways after the tagged OK."""
    mechanism = str(arguments(command, 1)[0]).upper()
    if mechanism != "DEFLATE":
        raise bad(f"Unknown compression mechanism {mechanism}")
    if session.compressing:
        raise no("DEFLATE is already active", "COMPRESSIONACTIVE")
    session.send(f"{command.tag} OK DEFLATE active")
    session.start_compression()
    raise Answered()


async def login(session: IMAP4ServerProtocol, command: Command) -> str:
    args = arguments(command, 2)
    if not session.login_allowed():
        raise no("Use STARTTLS before logging in", "PRIVACYREQUIRED")
    return await _authenticate(session, astring(args[0]), astring(args[1]), "LOGIN")


async def authenticate(session: IMAP4ServerProtocol, command: Command) -> str:
    """AUTHENTICATE PLAIN (RFC 4616), with SASL-IR (RFC 4959) or a continuation."""
    args = arguments(command, 1, 2)
    if not isinstance(args[0], Atom) or args[0].upper() != "PLAIN":
        raise no("Unsupported authentication mechanism", "CANNOT")
    if not session.login_allowed():
        raise no("Use STARTTLS before logging in", "PRIVACYREQUIRED")
    if len(args) == 2:
        response = astring(args[1])
    else:
        session.send("+ ")
        response = (await session.read_line()).decode("ascii", "replace")
    user, password = _plain_response(response.strip())
    return await _authenticate(session, user, password, "AUTHENTICATE")


def _plain_response(response: str) -> tuple[str, str]:
    """(user, password) of a PLAIN response; BAD/NO for a malformed or foreign one."""
    if response == "*":
        raise bad("Authentication cancelled")
    try:
        decoded = base64.b64decode("" if response == "=" else response, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad("Invalid base64 in SASL response") from exc
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        raise bad("Malformed PLAIN response")
    authz, user, password = (p.decode("utf-8", "replace") for p in parts)
    if authz and authz != user:
        raise no("Authorization identity must match", "AUTHORIZATIONFAILED")
    return user, password


async def _authenticate(session: IMAP4ServerProtocol, user: str, password: str,
                        how: str) -> str:
    try:
        account = await session.backend.authenticate(user, password, session.peer)
    except errors.Unauthenticated as exc:
        raise no("Authentication failed", "AUTHENTICATIONFAILED") from exc
    await session.logged_in(account)
    return f"[CAPABILITY {' '.join(session.capabilities())}] {how} completed"


async def enable(session: IMAP4ServerProtocol, command: Command) -> None:
    """ENABLE (RFC 5161): CONDSTORE, QRESYNC (which implies CONDSTORE) and IMAP4rev2
    (RFC 9051 Appendix A, when offered: :mod:`agentpost.imap.rev2`)."""
    if not command.args:
        raise ParseError("ENABLE needs capabilities")
    enabled = []
    condstore = False
    for cap in command.args:
        name = str(cap).upper()
        if name == "CONDSTORE":
            condstore = True
            enabled.append("CONDSTORE")
        elif name == "QRESYNC":
            condstore = session.qresync = True
            enabled.append("QRESYNC")
        elif name == "IMAP4REV2" and rev2.enable(session):
            enabled.append(rev2.IMAP4REV2)
    session.send("* ENABLED" + "".join(" " + c for c in enabled))
    if condstore:
        enable_condstore(session)
