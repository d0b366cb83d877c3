"""The composition root: the only place that constructs components and wires them."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort

from agentpost import systemd
from agentpost.auth.cred import build_portal
from agentpost.auth.key_cache import KeyCache
from agentpost.auth.ratelimit import TokenBuckets
from agentpost.auth.sessions import LiveCredentials
from agentpost.config import Config
from agentpost.core.api_keys import APIKeys
from agentpost.core.audit import AuditTrail
from agentpost.core.audit_log import AuditLog
from agentpost.core.blobrefs import BlobCollector
from agentpost.core.domains import Domains
from agentpost.core.draft_sending import DraftSending
from agentpost.core.drafts import Drafts
from agentpost.core.environments import Environments
from agentpost.core.events import Events
from agentpost.core.filters import FilterRules
from agentpost.core.group_commit import GroupCommit
from agentpost.core.idempotency import Idempotency
from agentpost.core.imap_logins import IMAPLogins
from agentpost.core.inboxes import Inboxes
from agentpost.core.ingest import Ingest
from agentpost.core.login_guard import LoginGuard, LoginLimits
from agentpost.core.members import Members
from agentpost.core.messages import Messages
from agentpost.core.organizations import Organizations
from agentpost.core.reserved import ReservedNames
from agentpost.core.route_cache import RouteCache
from agentpost.core.routing import Router
from agentpost.core.sending import MessageLimits, Sending
from agentpost.core.submission import Submission
from agentpost.core.suppressions import Deliveries, Suppressions
from agentpost.core.uploads import Uploads
from agentpost.core.webhooks import Webhooks
from agentpost.http import views
from agentpost.http.admin import add_admin_routes
from agentpost.http.api import add_api_routes
from agentpost.http.app import build_app
from agentpost.http.domains import add_domain_routes
from agentpost.http.drafts import add_drafts_routes
from agentpost.http.events import add_event_routes
from agentpost.http.feedback import mount_sns_webhook
from agentpost.http.framework import RouteTable
from agentpost.http.key_failures import FailedKeyThrottle
from agentpost.http.mail import add_mail_routes
from agentpost.http.send import add_send_routes
from agentpost.http.site import make_site
from agentpost.http.suppressions import add_suppression_routes
from agentpost.http.uploads import add_upload_endpoint, add_upload_routes, allow_upload_bodies
from agentpost.http.webhooks import add_webhook_routes
from agentpost.jobs.domain_verify import DomainVerifyJob, build_domains
from agentpost.jobs.rerender import RenderRefresh
from agentpost.jobs.retention import RetentionSweep
from agentpost.jobs.scheduled_send import ScheduledSend
from agentpost.jobs.usage_fold import UsageFold
from agentpost.listening import listen_tcp, port_number
from agentpost.outbound.feedback import FeedbackReceiver
from agentpost.outbound.setup import OutboundService
from agentpost.storage.blobs import BlobStore, LocalBlobStore, S3BlobStore
from agentpost.storage.blobs.inline import InlineBlobs
from agentpost.storage.database import Database
from agentpost.storage.keys import KEY_CHANNEL
from agentpost.storage.mail import MAIL_CHANNEL
from agentpost.storage.notify import Notifier, NotifyLink
from agentpost.webhooks.ssrf import SSRFGuard
from agentpost.webhooks.worker import DeliveriesWakeup, WebhookWorker
from agentpost.ws.hub import EventHub
from agentpost.ws.protocol import StreamSettings
from agentpost.ws.resource import build_ws_resource, mount_websocket

log = logging.getLogger(__name__)


@dataclass
class Core:
    """Every core component, built once."""

    db: Database
    audit: AuditTrail
    organizations: Organizations
    environments: Environments
    inboxes: Inboxes
    api_keys: APIKeys
    members: Members
    audit_log: AuditLog
    retention: RetentionSweep
    rerender: RenderRefresh
    usage_fold: UsageFold  # inbox usage deltas -> inboxes.used_bytes (issue 12)
    outbound: OutboundService  # the queue worker (mail out)
    blobs: BlobStore
    ingest: Ingest
    router: Router
    messages: Messages
    filters: FilterRules
    notifier: Notifier
    notify_link: NotifyLink  # the process's one LISTEN connection, shared by all
    live_credentials: LiveCredentials  # ends long-lived sessions whose key died
    key_cache: KeyCache  # API-key lookups, emptied by NOTIFY on any key change
    route_cache: RouteCache  # the MX's routes to inboxes, emptied by NOTIFY likewise
    imap_logins: IMAPLogins
    login_guard: LoginGuard  # failed-login allowances of every password door
    suppressions: Suppressions  # per-organization suppression list (the API side)
    deliveries: Deliveries  # per-recipient delivery state of sent messages
    feedback: FeedbackReceiver  # SES feedback through SNS (verified, then applied)
    domains: Domains  # organizations' own domains (DKIM, DNS records, verification)
    domain_verify: DomainVerifyJob  # the verification timer
    uploads: Uploads  # attachments uploaded ahead of a send
    idempotency: Idempotency  # Idempotency-Key answers of the send API (and drafts)
    sending: Sending  # the send API: compose, check, submit
    drafts: Drafts  # the IMAP Drafts folder as structured drafts
    draft_sending: DraftSending  # drafts sent now or at send_at, through sending
    scheduled_send: ScheduledSend  # the timer that sends drafts when send_at comes
    events: Events  # the event log (GET /events; the WebSocket stream reads it too)
    webhooks: Webhooks  # webhook endpoints (the API side)
    webhook_worker: WebhookWorker  # delivers the webhook queue


def build_blob_store(config: Config, reactor: Any) -> BlobStore:
    """The configured blob store: a local directory, or S3/R2 with server-side encryption."""
    cfg = config.storage
    if cfg.backend == "s3":
        return S3BlobStore(
            cfg.bucket, region=cfg.region, endpoint_url=cfg.endpoint_url or None,
            access_key=cfg.access_key_id or None, secret_key=cfg.secret_access_key or None,
            sse=cfg.sse, kms_key_id=cfg.kms_key_id or None, prefix=cfg.prefix,
            reactor=reactor)
    return LocalBlobStore(Path(cfg.path), reactor=reactor)


def build_core(config: Config, reactor: Any, clock: Any = None) -> Core:
    """Construct the storage wrapper and the tenant-scoped operations."""
    clock = clock or reactor
    db = Database(
        config.database.url, clock=clock, reactor=reactor,
        pool_size=config.database.pool_size,
        connect_timeout_s=config.database.connect_timeout,
        statement_timeout_s=config.database.statement_timeout,
        retries=config.database.retries,
        prepare_threshold=config.database.prepare_threshold,
    )
    audit = AuditTrail(db, clock, config.audit.flush_interval, config.audit.max_buffer)
    blobs = InlineBlobs(build_blob_store(config, reactor), db,
                        config.storage.inline_message_max, reactor)
    collector = BlobCollector(db, blobs)
    group_commit = (GroupCommit(db, clock, max_batch=config.smtp.group_commit_max,
                                delay_s=config.smtp.group_commit_delay,
                                parallel=config.smtp.group_commit_parallel)
                    if config.smtp.group_commit else None)
    ingest = Ingest(db, blobs, reactor, config.mail.inbox_quota, group_commit)
    # One LISTEN connection for every channel of this process: PostgreSQL signals each
    # listening backend at every COMMIT that NOTIFYs, so each extra one costs CPU.
    link = NotifyLink(config.database.url, reactor=reactor, clock=clock)
    notifier = Notifier(config.database.url, MAIL_CHANNEL, reactor=reactor, clock=clock,
                        link=link)
    live_credentials = LiveCredentials(
        db, clock, Notifier(config.database.url, KEY_CHANNEL, reactor=reactor, clock=clock,
                            link=link))
    reserved = ReservedNames(config.mail.reserved_local_parts)
    key_cache = KeyCache(config.database.url, reactor=reactor, clock=clock, now=db.now,
                         ttl_s=config.server.key_cache_ttl, link=link)
    portal = build_portal(db, key_cache)
    route_cache = RouteCache(config.database.url, reactor=reactor, clock=clock,
                             ttl_s=config.mail.route_cache_ttl, link=link)
    router = Router(db, clock, config.mail.inbox_quota, reserved=reserved,
                    operator_inbox=config.mail.operator_inbox, cache=route_cache)
    login_cfg = config.login
    login_guard = LoginGuard(db, clock, audit, LoginLimits(
        source_failures_per_minute=login_cfg.source_failures_per_minute,
        pair_failures_per_minute=login_cfg.pair_failures_per_minute,
        account_failures_per_minute=login_cfg.account_failures_per_minute,
        account_delay_s=login_cfg.account_delay))
    outbound = OutboundService(config, db, blobs, collector, ingest, clock, reactor,
                               router=router, link=link)
    uploads = Uploads(db, blobs, collector, clock, config.mail.max_upload_size)
    idempotency = Idempotency(db, clock)
    sending = Sending(
        db, Submission(db, ingest, reactor, outbound.policy, config.server.hostname,
                       limits=outbound.limits),
        blobs, uploads, reactor, config.server.hostname,
        MessageLimits(max_recipients=max(1, config.mail.max_recipients),
                      max_message_size_bytes=config.smtp.max_message_size),
        views.message)
    domains, domain_verify = build_domains(config, db, audit, reactor, clock)
    drafts = Drafts(db, blobs, collector, ingest, reactor, hostname=config.server.hostname,
                    clock=clock, max_schedule_ahead_s=config.outbound.max_schedule_ahead,
                    uploads=uploads, max_message_bytes=config.smtp.max_message_size)
    draft_sending = DraftSending(db, drafts, sending, clock, lease_s=config.outbound.lease,
                                 idempotency=idempotency)
    hooks_cfg = config.webhooks
    guard = SSRFGuard(allow_http=config.server.environment == "development",
                      allow_networks=hooks_cfg.allow_networks)
    webhook_worker = WebhookWorker(
        db, guard, domains.sealer, reactor=reactor, clock=clock,
        concurrency=hooks_cfg.concurrency, lease_s=hooks_cfg.lease,
        poll_s=hooks_cfg.poll_interval,
        wakeup=DeliveriesWakeup(config.database.url, reactor=reactor, clock=clock,
                                link=link))
    return Core(
        db=db, audit=audit,
        organizations=Organizations(db, audit),
        environments=Environments(db, audit),
        inboxes=Inboxes(db, audit, config.mail.shared_domain, collector, reserved,
                        routes=route_cache),
        api_keys=APIKeys(db, audit, key_cache),
        members=Members(db, audit, key_cache),
        audit_log=AuditLog(db),
        retention=RetentionSweep(db, clock, config.retention,
                                 also=(uploads.sweep, idempotency.sweep)),
        rerender=RenderRefresh(db, blobs, clock, reactor),
        usage_fold=UsageFold(db, clock),
        outbound=outbound,
        blobs=blobs,
        ingest=ingest,
        router=router,
        messages=Messages(db, audit, blobs, collector, int(config.storage.presign_ttl)),
        filters=FilterRules(db, audit, routes=route_cache),
        notifier=notifier, notify_link=link,
        live_credentials=live_credentials,
        key_cache=key_cache, route_cache=route_cache,
        imap_logins=IMAPLogins(portal, db, blobs, ingest, collector, audit, clock, notifier,
                               guard=login_guard),
        login_guard=login_guard,
        suppressions=Suppressions(db, audit), deliveries=Deliveries(db),
        feedback=FeedbackReceiver.from_config(config.outbound, db, reactor=reactor,
                                              clock=clock),
        domains=domains, domain_verify=domain_verify,
        uploads=uploads, idempotency=idempotency, sending=sending,
        drafts=drafts, draft_sending=draft_sending,
        events=Events(db),
        webhooks=Webhooks(db, audit, guard, domains.sealer, wake=webhook_worker.kick),
        webhook_worker=webhook_worker,
        scheduled_send=ScheduledSend(db, draft_sending, clock,
                                     interval_s=config.outbound.scheduled_send_interval,
                                     lease_s=config.outbound.lease),
    )


class AgentPostService(service.Service):
    """Starts the core, then the listeners; stops them in reverse, flushing the audit trail."""

    name = "agentpost"

    def __init__(self, config: Config, reactor: Any, *, reuse_port: bool = False) -> None:
        self.config = config
        self.reactor = reactor
        self.reuse_port = reuse_port
        self.core = build_core(config, reactor)
        self.ws_hub = EventHub(self.core.db, config.database.url, reactor=reactor,
                               clock=reactor,  # the /ws fan-out (issue 13)
                               link=self.core.notify_link)
        self.ports: dict[str, IListeningPort] = {}
        self.route_tables: dict[str, RouteTable] = {}
        self.smtp_factories: dict[str, Any] = {}
        self._started: defer.Deferred[None] | None = None
        self._tls: Any = None

    def http_resource(self) -> Any:
        """The Klein resource for /api/v1 and /admin/v1."""
        core, cfg = self.core, self.config
        buckets = (TokenBuckets(self.reactor, cfg.rate_limit.rate, cfg.rate_limit.burst)
                   if cfg.rate_limit.enabled else None)
        portal = build_portal(core.db, core.key_cache)
        trusted = frozenset(cfg.http.trusted_proxies)
        key_failures = FailedKeyThrottle(core.login_guard, self.reactor)
        api = RouteTable("/api/v1", portal, core.audit, buckets, cfg.http.max_body, trusted,
                         key_failures)
        admin = RouteTable("/admin/v1", portal, core.audit, buckets, cfg.http.max_body, trusted,
                           key_failures)
        add_api_routes(api, environments=core.environments, inboxes=core.inboxes,
                       api_keys=core.api_keys, members=core.members, audit_log=core.audit_log)
        add_mail_routes(api, core.messages, core.filters)
        add_suppression_routes(api, core.suppressions, core.deliveries)
        add_event_routes(api, core.events)
        add_webhook_routes(api, core.webhooks)
        add_domain_routes(api, core.domains)
        send_body = max(cfg.http.max_send_body, cfg.http.max_body)  # inline attachments
        add_send_routes(api, core.sending, core.idempotency, max_body=send_body)
        add_upload_routes(api, core.uploads, cfg.http.public_url)
        add_drafts_routes(api, core.drafts, core.draft_sending, max_body=send_body,
                          idempotency=core.idempotency)
        add_admin_routes(admin, core.organizations)
        self.route_tables = {"api": api, "admin": admin}
        app = build_app(api, admin, self._ready)
        mount_sns_webhook(app, "/api/v1" + cfg.outbound.sns_path, core.feedback)
        add_upload_endpoint(app, core.uploads)  # signed PUTs: no API key, not JSON
        ws = cfg.websocket
        mount_websocket(app, build_ws_resource(
            portal=portal, live_credentials=core.live_credentials, hub=self.ws_hub,
            db=core.db, clock=self.reactor, key_failures=key_failures, trusted_proxies=trusted,
            settings=StreamSettings(ws.max_connections_per_key, ws.send_buffer_cap,
                                    ws.ping_interval)))
        return app.resource()

    async def _ready(self) -> bool:
        return await self.core.db.ping()

    def startService(self) -> None:
        """Start asynchronously; a failure to listen stops the reactor with a message."""
        super().startService()
        self._handle_sighup()
        self._started = defer.Deferred.fromCoroutine(self._start())
        self._started.addErrback(self._fatal)

    async def _start(self) -> None:
        from agentpost.storage.migrations import check_schema

        check_schema(self.config.database.url)
        await self.core.inboxes.ensure_shared_domain()
        self.core.audit.start()
        self.core.retention.start()
        self.core.domain_verify.start()
        self.core.scheduled_send.start()
        self.core.rerender.start()
        self.core.usage_fold.start()
        await self.core.notifier.start()
        await self.core.live_credentials.start()
        await self.ws_hub.start()
        await self.core.key_cache.start()
        await self.core.route_cache.start()
        await self.core.outbound.start()
        await self.core.webhook_worker.start()
        await self.core.uploads.prime()  # upload PUTs signed by any process
        if self.config.smtp.mx_enabled:
            self.ports["smtp_mx"] = await self._listen_mx()
        if self.config.smtp.submission_enabled:
            await self._listen_submission()
        if self.config.imap.enabled:
            await self._listen_imap()
        cfg = self.config.http
        if cfg.enabled:
            site = make_site(self.http_resource(), access_log=cfg.access_log,
                             max_body_bytes=cfg.max_body, header_timeout_s=cfg.header_timeout,
                             body_min_rate=cfg.body_min_rate,
                             max_connections_per_ip=cfg.max_connections_per_ip,
                             max_connections=cfg.max_connections,
                             trusted_proxies=frozenset(cfg.trusted_proxies))
            allow_upload_bodies(site, self.config.mail.max_upload_size, self.core.uploads,
                                self.route_tables["api"])  # and the send routes' limit
            self.ports["http"] = await listen_tcp(
                self.reactor, site, cfg.bind, cfg.port,
                tls_options=self.tls_options() if cfg.tls else None,
                reuse_port=self.reuse_port, endpoint=cfg.endpoint)
            log.info("HTTP API listening on %s:%d", cfg.bind, port_number(self.ports["http"]))
        systemd.ready("serving: " + ", ".join(
            f"{name} on port {port_number(port)}" for name, port in self.ports.items()))

    def tls_options(self) -> Any:
        """Server TLS settings shared by every listener (reloaded on SIGHUP), or None."""
        if not (self.config.tls.cert and self.config.tls.key):
            return None
        if self._tls is None:
            from agentpost.tls import ReloadableServerTLS, TLSPolicy

            cfg = self.config.tls
            self._tls = ReloadableServerTLS(cfg.cert, cfg.key,
                                            TLSPolicy(cfg.ciphers, cfg.min_version))
        return self._tls

    def _handle_sighup(self) -> None:
        """`systemctl reload` (ExecReload sends SIGHUP): reload TLS in the reactor thread."""

        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, on_sighup)

    def reload(self) -> None:
        """Re-read the TLS certificate and key; open connections keep the old ones."""
        systemd.reloading("reloading the TLS certificate and key")
        if self.parent is not None:
            try:
                self.parent.getServiceNamed("workers").signal_all(signal.SIGHUP)
            except KeyError:
                pass
        try:
            if self._tls is not None:
                self._tls.reload()
                log.info("reloaded TLS certificate %s and key %s",
                         self.config.tls.cert, self.config.tls.key)
        except Exception as exc:
            log.error("TLS reload failed, still using the previous certificate: %s", exc)
            systemd.ready(f"serving; TLS reload failed, previous certificate kept: {exc}")
        else:
            systemd.ready("serving; TLS certificate reloaded")

    def _smtp_limits(self) -> Any:
        from agentpost.smtp import SMTPLimits

        cfg = self.config.smtp
        return SMTPLimits(max_message_size_bytes=cfg.max_message_size,
                          max_recipients=cfg.max_recipients, max_errors=cfg.max_errors,
                          command_timeout_s=cfg.command_timeout,
                          session_deadline_s=cfg.session_deadline,
                          data_deadline_s=cfg.data_deadline,
                          min_data_rate_bytes_per_s=cfg.min_data_rate,
                          min_data_rate_grace_s=cfg.min_data_rate_grace)

    async def _listen_mx(self) -> IListeningPort:
        from agentpost.smtp import SMTPFactory
        from agentpost.smtp.delivery import InboundDelivery
        from agentpost.smtp.policy import MX

        cfg = self.config.smtp
        factory = SMTPFactory(
            InboundDelivery(self.core.router, self.core.ingest),
            hostname=self.config.server.hostname, clock=self.reactor,
            limits=self._smtp_limits(), tls_options=self.tls_options(), policy=MX,
            max_connections_per_ip=cfg.max_connections_per_ip,
            max_connections=cfg.max_connections,
        )
        self.smtp_factories["mx"] = factory
        port = await listen_tcp(self.reactor, factory, cfg.mx_bind, cfg.mx_port,
                                reuse_port=self.reuse_port, endpoint=cfg.mx_endpoint)
        log.info("SMTP MX listening on %s:%d", cfg.mx_bind, port_number(port))
        if not self.config.mail.operator_inbox:
            log.warning("[mail] operator_inbox is not set: mail to <postmaster> is refused, "
                        "although RFC 5321 section 4.5.1 requires accepting it")
        return port

    async def _listen_submission(self) -> None:
        """SMTP submission: 587 (STARTTLS) and 465 (implicit TLS), the MX's protocol
        under the SUBMISSION policy. Without [tls] there is no submission at all: AUTH
        is never offered in cleartext."""
        from agentpost.auth.cred import build_portal
        from agentpost.core.mailbox_logins import MailboxLogins
        from agentpost.core.submission import Submission
        from agentpost.smtp import SMTPFactory
        from agentpost.smtp.policy import SUBMISSION
        from agentpost.smtp.submission import SubmissionDelivery

        cfg, core = self.config.smtp, self.core
        tls = self.tls_options()
        if tls is None:
            log.warning("[smtp] submission_enabled but no [tls] certificate: submission "
                        "is not served (AUTH is only ever offered inside TLS)")
            return
        agent = SubmissionDelivery(
            MailboxLogins(build_portal(core.db, core.key_cache), core.db, core.audit,
                          core.login_guard),
            Submission(core.db, core.ingest, self.reactor, core.outbound.policy,
                       self.config.server.hostname, limits=core.outbound.limits),
            core.live_credentials)

        def factory(implicit: bool) -> Any:
            return SMTPFactory(
                agent, hostname=self.config.server.hostname, clock=self.reactor,
                limits=self._smtp_limits(), tls_options=tls, policy=SUBMISSION,
                implicit_tls=tls if implicit else None,
                max_connections_per_ip=cfg.max_connections_per_ip,
                max_connections=cfg.max_connections)

        for name, port, implicit in (("smtp_submission", cfg.submission_port, False),
                                     ("smtp_submissions", cfg.submissions_port, True)):
            if port < 0:  # -1: this one is off (0 is an ephemeral port, as everywhere)
                continue
            listening_factory = factory(implicit)
            self.smtp_factories[name.removeprefix("smtp_")] = listening_factory
            self.ports[name] = await listen_tcp(
                self.reactor, listening_factory, cfg.submission_bind, port,
                tls_options=tls if implicit else None, reuse_port=self.reuse_port)
            log.info("SMTP submission listening on %s:%d (%s)", cfg.submission_bind,
                     port_number(self.ports[name]), "TLS" if implicit else "STARTTLS")

    async def _listen_imap(self) -> None:
        from agentpost.imap.listener import IMAPFactory

        cfg = self.config.imap
        tls = self.tls_options()

        def factory(implicit: bool) -> IMAPFactory:
            return IMAPFactory(
                self.core.imap_logins, hostname=self.config.server.hostname,
                clock=self.reactor, tls_options=tls,
                implicit_tls=tls if implicit else None,
                allow_plaintext_login=cfg.allow_plaintext_login,
                max_append_bytes=cfg.max_append_size,
                max_connections_per_ip=cfg.max_connections_per_ip,
                max_connections=cfg.max_connections,
                credentials=self.core.live_credentials)

        # listen_tcp wraps the 993 factory in TLS; the factory's implicit_tls only tells
        # its sessions they are already encrypted.
        self.ports["imap"] = await listen_tcp(self.reactor, factory(False), cfg.bind, cfg.port,
                                              reuse_port=self.reuse_port)
        if tls is not None:
            self.ports["imaps"] = await listen_tcp(self.reactor, factory(True), cfg.bind,
                                                   cfg.tls_port, tls_options=tls,
                                                   reuse_port=self.reuse_port)
        log.info("IMAP listening on %s:%d (STARTTLS) and %s", cfg.bind,
                 port_number(self.ports["imap"]),
                 f"{port_number(self.ports['imaps'])} (TLS)" if "imaps" in self.ports
                 else "no implicit-TLS port (no [tls] configured)")

    def _fatal(self, failure: Any) -> None:
        log.error("AgentPost failed to start: %s", failure.getErrorMessage())
        systemd.status(f"failed to start: {failure.getErrorMessage()}")
        self.start_error = failure
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening, flush the audit buffer, close the database."""
        systemd.stopping("stopping")
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for port in self.ports.values():
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        self.ports.clear()
        self.core.notify_link.close()  # first: the stops below then send no UNLISTEN
        self.core.notifier.stop()
        self.core.live_credentials.stop()
        self.ws_hub.stop()
        self.core.key_cache.stop()
        self.core.route_cache.stop()
        await self.core.outbound.stop()
        await self.core.webhook_worker.stop()
        await self.core.rerender.stop()
        await self.core.usage_fold.stop()
        await self.core.retention.stop()
        await self.core.domain_verify.stop()
        await self.core.scheduled_send.stop()
        await self.core.audit.stop()
        await self.core.db.close()


def worker_count(config: Config) -> int:
    """Processes this node runs in all (server.workers; 0 means one per CPU)."""
    return config.server.workers or os.cpu_count() or 1


def make_service(config: Config, reactor: Any,
                 argv: list[str] | None = None) -> service.MultiService:
    """The root service `twistd agentpost` and `agentpost serve` both run.

    With more than one worker, every process (this one and the copies it keeps
    running) binds its ports with SO_REUSEPORT; ``argv`` is how to start a copy.
    """
    from agentpost.stopping import StopOnSignals
    from agentpost.workers import (
        PARENT_ENV,
        HeapTuning,
        ParentWatch,
        WorkerPool,
        die_with_parent,
        is_worker,
    )

    root = service.MultiService()
    StopOnSignals(reactor).setServiceParent(root)
    if is_worker():
        die_with_parent()
        ParentWatch(reactor, int(os.environ[PARENT_ENV])).setServiceParent(root)
    workers = worker_count(config)
    main = AgentPostService(config, reactor, reuse_port=workers > 1)
    main.setServiceParent(root)
    HeapTuning(main, freeze=config.server.gc_freeze,  # gc.freeze() once started
               young_threshold=config.server.gc_young_threshold).setServiceParent(root)
    if workers > 1 and not is_worker() and argv:
        WorkerPool(reactor, workers - 1, argv).setServiceParent(root)
    return root
