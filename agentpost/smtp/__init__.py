"""SMTP: our own RFC 5321 server on Twisted's transport (see DESIGN.md §7 for why).

- :mod:`agentpost.smtp.interfaces` — what the protocol needs from the rest of the system.
- :mod:`agentpost.smtp.parser` — the wire syntax, as pure functions.
- :mod:`agentpost.smtp.replies` — reply rendering and the one domain-error table.
- :mod:`agentpost.smtp.session` — limits, states and the transaction a session carries.
- :mod:`agentpost.smtp.deadlines` — when a (slow) client must have done what.
- :mod:`agentpost.smtp.server` — the per-connection state machine (I/O, flow, timers).
- :mod:`agentpost.smtp.commands` — what each verb does (mixed into the server).
- :mod:`agentpost.smtp.listener` — the factory (connection caps) and ``listen_smtp``.
- :mod:`agentpost.smtp.policy` — what differs between the MX and submission (one place).
- :mod:`agentpost.smtp.delivery` / :mod:`agentpost.smtp.submission` — the two delivery agents.

Wiring (in the composition root)::

    factory = SMTPFactory(agent, hostname="mx.example.com", clock=reactor,
                          tls_options=server_tls_options(cert, key))
    port = await listen_smtp(reactor, factory, "0.0.0.0", 25)
"""

from agentpost.smtp.interfaces import DeliveryAgent, Envelope, SessionInfo
from agentpost.smtp.listener import SMTPFactory, listen_smtp
from agentpost.smtp.replies import Reply, reply_for_error
from agentpost.smtp.server import SMTPLimits, SMTPServerProtocol, State

__all__ = [
    "DeliveryAgent",
    "Envelope",
    "Reply",
    "SMTPFactory",
    "SMTPLimits",
    "SMTPServerProtocol",
    "SessionInfo",
    "State",
    "listen_smtp",
    "reply_for_error",
]
