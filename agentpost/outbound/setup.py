"""Building the outbound side from configuration (kept out of the composition root)."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Protocol, runtime_checkable

from twisted.internet.interfaces import IReactorTime

from agentpost.config import Config
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.ingest import Ingest
from agentpost.core.routing import Router
from agentpost.core.send_limits import SendLimits
from agentpost.outbound.bounces import InboxBounceSink
from agentpost.outbound.dkim_signing import DkimSigner, database_keys
from agentpost.outbound.local import LocalFirstTransport
from agentpost.outbound.queue import RetryPolicy
from agentpost.outbound.transports import LogTransport, Transport
from agentpost.outbound.worker import OutboundWorker
from agentpost.storage.blobs import BlobStore
from agentpost.storage.database import Database
from agentpost.storage.notify import Notifier, NotifyLink
from agentpost.storage.outbound import OUTBOUND_CHANNEL

log = logging.getLogger(__name__)


@runtime_checkable
class _Lifecycle(Protocol):
    """A transport with resources of its own (the ses transport's thread pool)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def build_transport(config: Config, clock: IReactorTime, reactor: Any,
                    db: Database | None = None) -> Transport:
    """The configured transport (check_config has vetted the name). With ``db`` and a
    ``secrets.key_file``, the smtp transport DKIM-signs with the organizations' keys."""
    if config.outbound.transport == "ses":
        from agentpost.outbound.ses import SESTransport  # boto3 only when configured

        return SESTransport.from_config(config.outbound, clock=clock, reactor=reactor)
    if config.outbound.transport == "smtp":
        from agentpost.outbound.smarthost import SmarthostTransport

        return SmarthostTransport.from_config(
            config.outbound, hostname=config.server.hostname, clock=clock, reactor=reactor,
            signer=_dkim_signer(config, db, clock, reactor))
    return LogTransport(config.outbound.log_dir or None)


def _dkim_signer(config: Config, db: Database | None, clock: IReactorTime,
                 reactor: Any) -> DkimSigner | None:
    """Signing needs the database (the keys) and the master key that opens them."""
    if db is None or not config.secrets.key_file:
        log.warning("outbound: no secrets.key_file, so mail through the smarthost is not "
                    "DKIM-signed")
        return None
    from agentpost.auth.sealing import load_sealer

    return DkimSigner(database_keys(db, load_sealer(config.secrets.key_file)), clock,
                      reactor)


class OutboundService:
    """The queue worker of this process and the LISTEN that wakes it."""

    def __init__(self, config: Config, db: Database, blobs: BlobStore,
                 collector: BlobCollector, ingest: Ingest, clock: IReactorTime,
                 reactor: Any, router: Router | None = None,
                 link: NotifyLink | None = None) -> None:
        """With ``router``, recipients hosted here are delivered through ingest
        (agentpost.outbound.local) and only the others reach the configured transport.
        ``link``: the process's shared LISTEN connection (None: one of its own)."""
        out = config.outbound
        self.policy = RetryPolicy(lifetime_s=out.max_lifetime,
                                  custom_mail_from=out.transport != "ses")
        #: Send rate limits and daily quotas, charged by every door that queues mail.
        self.limits = SendLimits.from_config(config.send_limits, db, clock)
        self.transport = build_transport(config, clock, reactor, db)
        handoff_s = min(out.handoff_timeout, out.lease / 2)
        # The remote part of a hand-off ends a little before the worker's deadline, so
        # the outcomes of hosted recipients already delivered are recorded, not deferred
        # (and delivered again).
        handoff: Transport = (self.transport if router is None
                              else LocalFirstTransport(router, ingest, self.transport,
                                                       hostname=config.server.hostname,
                                                       clock=clock,
                                                       remote_deadline_s=0.9 * handoff_s))
        self.worker = OutboundWorker(
            db, blobs, collector, handoff, clock,
            worker_id=f"{socket.gethostname()}:{os.getpid()}",
            hostname=config.server.hostname, bounce_sink=InboxBounceSink(db, ingest),
            policy=self.policy, concurrency=out.concurrency, lease_s=out.lease,
            poll_s=out.poll_interval,
            handoff_timeout_s=handoff_s)
        self._wakeups = Notifier(config.database.url, OUTBOUND_CHANNEL, reactor=reactor,
                                 clock=clock, link=link)
        self._unwatch = self._wakeups.watch("", self.worker.wake)

    async def start(self) -> None:
        """Listen for enqueues in any process, then drain what is due."""
        if isinstance(self.transport, _Lifecycle):
            self.transport.start()
        await self._wakeups.start()
        self.worker.start()

    async def stop(self) -> None:
        """Stop listening and let a hand-off in progress record its outcome."""
        self._unwatch()
        self._wakeups.stop()
        await self.worker.stop()
        if isinstance(self.transport, _Lifecycle):
            self.transport.stop()
