"""The MX's DeliveryAgent: the SMTP protocol layer's only way into the core."""

from __future__ import annotations

from typing import IO

from agentpost.core.context import RequestContext
from agentpost.core.ingest import Ingest, Target
from agentpost.core.routing import Router
from agentpost.model.ids import new_id
from agentpost.smtp.interfaces import Envelope, SessionInfo


class InboundDelivery:
    """Routes RCPT TO through the Router and stores messages through the one ingest path."""

    def __init__(self, router: Router, ingest: Ingest) -> None:
        self._router = router
        self._ingest = ingest

    def check_sender(self, session: SessionInfo, mail_from: str) -> None:
        """Any sender may try; receive filters are applied per recipient. (A plain
        function: a coroutine with nothing to await cost a Deferred per MAIL.)"""

    async def check_recipient(self, session: SessionInfo, mail_from: str, rcpt: str) -> Target:
        """An inbox target, or a domain error the SMTP reply table translates."""
        return await self._router.resolve(rcpt, mail_from)

    async def deliver(self, session: SessionInfo, envelope: Envelope, message: IO[bytes],
                      size: int) -> None:
        """Store once per distinct recipient inbox; return only after commit (possibly a
        COMMIT shared with other deliveries: [smtp] group_commit). Each copy
        is audited as ``smtp.deliver`` (actor: the envelope sender; address: the peer)
        in the receiving organization, in the delivery's transaction."""
        targets: list[Target] = []
        for target in envelope.recipients:
            if target not in targets:
                targets.append(target)
        origin = RequestContext(new_id("req"), session.peer_host or None, "smtp.deliver",
                                details={"listener": session.listener,
                                         "helo": (session.helo or "")[:255],
                                         "tls": session.tls_version})
        await self._ingest.store(targets, message, envelope_from=envelope.mail_from or None,
                                 origin=origin, group=True)
