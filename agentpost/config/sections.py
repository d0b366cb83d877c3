"""One class per configuration section.

Each field carries its kind (for unit parsing) and a one-line doc, so the loader can
validate a file and the sample config can be generated from the same declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, doc: str, kind: str = "plain", secret: bool = False) -> Any:
    """Declare a config option; ``kind`` is plain, duration (seconds) or size (bytes)."""
    if isinstance(default, list):
        return field(
            default_factory=lambda: list(default),
            metadata={"doc": doc, "kind": kind, "secret": secret},
        )
    return field(default=default, metadata={"doc": doc, "kind": kind, "secret": secret})


@dataclass
class ServerSection:
    """Identity of this installation."""

    hostname: str = opt("localhost", "Fully qualified host name used in greetings and headers.")
    environment: str = opt(
        "production", "'production' or 'development'; development relaxes TLS requirements."
    )
    workers: int = opt(
        1, "Processes serving this node (0: one per CPU). They share ports with SO_REUSEPORT "
        "and coordinate only through PostgreSQL."
    )
    key_cache_ttl: float = opt(
        "60s", "Each process keeps API-key lookups in memory for at most this long. Every "
        "revocation or change of a key or its holder empties the cache of every process at "
        "once (PostgreSQL LISTEN/NOTIFY), and while that link is down every request reads "
        "the database; 0 turns the cache off.", "duration"
    )
    gc_freeze: bool = opt(
        True, "Once serving, move the objects start-up made (modules, routes, config: "
        "~100,000) out of Python's cyclic garbage collector's sight (gc.freeze), so a full "
        "collection does not walk them again with every connection waiting (58-99 ms "
        "pauses before)."
    )
    gc_young_threshold: int = opt(
        10_000, "Once serving, Python's young-generation collection runs after this many "
        "net container allocations (CPython's own default: 700, which a busy API crosses "
        "many times a second for objects reference counting frees anyway). 0 leaves "
        "CPython's setting."
    )


@dataclass
class DatabaseSection:
    """PostgreSQL connection; every process of a deployment points at the same database."""

    url: str = opt(
        "",
        "libpq URL or keyword DSN. Overridden by AGENTPOST_DATABASE_URL.",
        secret=True,
    )
    pool_size: int = opt(10, "Connections this process keeps to PostgreSQL.")
    connect_timeout: float = opt(
        "5s", "Give up on opening a connection after this long.", "duration"
    )
    statement_timeout: float = opt(
        "30s", "PostgreSQL cancels any single statement running longer than this; the "
        "request then fails as temporarily unavailable (HTTP 503, SMTP 451 4.3.0, IMAP NO "
        "[UNAVAILABLE]) and is not retried.", "duration"
    )
    retries: int = opt(3, "Retries of a transaction after a serialization failure or lost link.")
    prepare_threshold: int = opt(
        3, "A statement this process has run this many times is prepared on the server "
        "(PREPARE/EXECUTE), so PostgreSQL plans it once per connection instead of every "
        "time. 0 turns it off: required behind a pooler that moves a client between "
        "server sessions (PgBouncer in transaction or statement mode).")


@dataclass
class TLSSection:
    """Certificate and key shared by every listener that speaks TLS."""

    cert: str = opt("", "PEM certificate chain file (leaf first).")
    key: str = opt("", "PEM private key file.", secret=True)
    min_version: str = opt(
        "TLSv1.2", "Oldest protocol any listener accepts: TLSv1.2 or TLSv1.3.")
    ciphers: str = opt(
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
        "OpenSSL cipher list for TLS 1.2 on every listener (TLS 1.3 suites are all AEAD "
        "and fixed). Default: Mozilla's 'intermediate' AEAD+ECDHE suites, no CBC.")


@dataclass
class HTTPSection:
    """The JSON API, the admin API and (later) the console."""

    enabled: bool = opt(True, "Serve the HTTP API.")
    bind: str = opt("127.0.0.1", "Address to listen on.")
    port: int = opt(8080, "TCP port.")
    tls: bool = opt(
        False, "Terminate TLS here (HTTPS) with [tls]; leave false behind a TLS reverse proxy."
    )
    max_body: int = opt("1MiB", "Largest request body accepted.", "size")
    max_send_body: int = opt(
        "14MiB", "Largest body of the send routes (send, reply, reply-all, forward, draft "
        "create and update), which may carry attachments inline as base64 (4/3 of their "
        "size); refused from Content-Length before it is read. Uploading first (POST "
        "/attachments) avoids it. Never below max_body.", "size")
    trusted_proxies: list = opt(  # noqa: RUF009 - opt() builds a default_factory field
        [], "Proxy addresses whose X-Forwarded-For is believed for the client address."
    )
    public_url: str = opt("", "Base URL clients use, for links in responses.")
    endpoint: str = opt(
        "", "Twisted endpoint to listen on instead of bind/port, e.g. "
        "systemd:domain=INET:name=http for socket activation."
    )
    access_log: bool = opt(
        False, "Log every HTTP request to the service log (the audit trail has them anyway)."
    )
    header_timeout: float = opt(
        "30s", "A request's line and headers must arrive within this long of its first "
        "byte, and its body must keep up body_min_rate over each such window; otherwise "
        "408 and the connection closes (the idle timer alone let a client trickling a "
        "byte a minute hold a connection for weeks). 0 turns both checks off.", "duration")
    body_min_rate: int = opt(
        500, "Slowest request body accepted, in bytes per second (see header_timeout).")
    max_connections_per_ip: int = opt(
        256, "Concurrent connections from one client address (an IPv6 /64 counts as one "
        "address; a trusted proxy is capped only by max_connections); more get a JSON 503.")
    max_connections: int = opt(10000, "Concurrent HTTP connections in all.")


@dataclass
class RateLimitSection:
    """Per-credential token bucket applied to every API request."""

    enabled: bool = opt(True, "Apply rate limiting.")
    rate: float = opt(50.0, "Sustained requests per second per API key.")
    burst: int = opt(200, "Requests a key may make at once before being slowed.")


@dataclass
class MailSection:
    """Hosted mail domains."""

    shared_domain: str = opt(
        "agentpost.local",
        "Domain every organization can create inboxes on without verifying its own.",
    )
    inbox_quota: int = opt(
        "0B", "Storage per inbox (e.g. \"2GiB\"); 0B: unlimited. A full inbox refuses mail "
        "at RCPT (552 5.2.2) and APPEND/COPY (NO [OVERQUOTA]).", "size")
    reserved_local_parts: list = opt(  # noqa: RUF009 - opt() builds a default_factory field
        ["postmaster", "hostmaster", "webmaster", "www", "abuse", "noc", "security", "admin",
         "administrator", "root", "mailer-daemon", "nobody", "ssladmin", "ssl-admin",
         "sysadmin"],
        "Usernames no organization may create on a shared domain (case-insensitive, also "
        "with a +tag): RFC 2142 and CA domain-validation names. Mail to them on a shared "
        "domain goes to operator_inbox.")
    operator_inbox: str = opt(
        "", "Address of an existing inbox that receives mail for <postmaster> (RFC 5321 "
        "requires it), postmaster@ hosted domains without their own, and the reserved "
        "names on shared domains. Empty: those addresses are refused (550 5.1.1).")
    max_recipients: int = opt(
        50, "Recipients (To, Cc and Bcc together) of one message sent through the API "
        "(POST .../messages, reply, forward, drafts); at least 1. SMTP submission has "
        "smtp.max_recipients.")
    max_upload_size: int = opt(
        "10MiB", "Largest attachment uploaded ahead of a send (POST /attachments, then PUT "
        "to the signed URL). The whole message must still fit smtp.max_message_size.",
        "size")
    route_cache_ttl: float = opt(
        "60s", "Each process keeps the MX's routes to existing inboxes in memory for at "
        "most this long, saving RCPT a database read. Any change to an inbox's address, a "
        "domain or a receive filter empties the cache of every process at once "
        "(PostgreSQL LISTEN/NOTIFY); an API call that changes a filter rule or deletes an "
        "inbox answers once that notice is back. While the link is down, and with an "
        "inbox_quota, RCPT reads the database. Unknown addresses are never cached. 0 turns "
        "it off.",
        "duration")


@dataclass
class StorageSection:
    """Where message bytes and attachments live (records are always in PostgreSQL)."""

    backend: str = opt("local", "'local' (a directory; the embedded default) or 's3'.")
    path: str = opt("/var/lib/agentpost/blobs", "Directory of the local store.")
    bucket: str = opt("", "S3/R2 bucket.")
    endpoint_url: str = opt("", "S3-compatible endpoint (empty: AWS's default for the region).")
    region: str = opt("us-east-1", "S3 region.")
    access_key_id: str = opt("", "S3 access key id (empty: the usual AWS credential chain).")
    secret_access_key: str = opt(
        "", "S3 secret. Overridden by AGENTPOST_S3_SECRET_ACCESS_KEY.", secret=True
    )
    sse: str = opt("AES256", "Server-side encryption requested on every put: AES256 or aws:kms.")
    kms_key_id: str = opt("", "KMS key for aws:kms.")
    prefix: str = opt("", "Key prefix inside the bucket.")
    presign_ttl: float = opt("5m", "Lifetime of attachment download URLs.", "duration")
    inline_message_max: int = opt(
        "256KiB", "Messages up to this size are kept in PostgreSQL with their records, "
        "committed in the delivering transaction (no store write or fsync before it); "
        "larger ones and every attachment go to the store. Reading one back whole costs "
        "PostgreSQL more than a local store's file (bench/imap_read_bench.py). 0: every "
        "message goes to the store; at most 1MiB.", "size")


@dataclass
class SMTPSection:
    """The SMTP listeners: the MX, and submission (587 STARTTLS, 465 implicit TLS)."""

    mx_enabled: bool = opt(True, "Serve the inbound MX listener.")
    mx_bind: str = opt("0.0.0.0", "Address of the MX listener.")  # noqa: S104 - an MX is public
    mx_port: int = opt(25, "Port of the MX listener.")
    mx_endpoint: str = opt(
        "", "Twisted endpoint instead of mx_bind/mx_port, e.g. "
        "systemd:domain=INET:name=smtp-mx for socket activation."
    )
    submission_enabled: bool = opt(
        True, "Serve SMTP submission (AUTH with an inbox address and an API key holding "
        "messages:send, only inside TLS; needs [tls]).")
    submission_bind: str = opt("0.0.0.0", "Address of both submission listeners.")  # noqa: S104
    submission_port: int = opt(
        587, "Port of the STARTTLS submission listener (-1: off; 0: any free port).")
    submissions_port: int = opt(
        465, "Port of the implicit-TLS submission listener, RFC 8314 (-1: off; 0: any free "
        "port).")
    max_message_size: int = opt("10MiB", "Largest message accepted.", "size")
    max_recipients: int = opt(100, "Recipients per message.")
    max_errors: int = opt(10, "Protocol errors before a session is closed.")
    max_connections_per_ip: int = opt(
        20, "Concurrent sessions from one client address (an IPv6 /64 counts as one).")
    max_connections: int = opt(1000, "Concurrent sessions in all.")
    command_timeout: float = opt(
        "5m", "Time for each whole command line from our previous reply (RFC 5321: at least "
        "5m); bytes trickling in do not extend it.", "duration")
    session_deadline: float = opt(
        "10m", "Longest an SMTP session may last, however active (0s: no limit). A delivery "
        "in progress is finished and answered first.", "duration")
    data_deadline: float = opt(
        "5m", "Longest the body of one message (DATA, or all its BDAT chunks) may take to "
        "arrive (0s: no limit).", "duration")
    min_data_rate: int = opt(
        "500B", "Bytes per second a message body must average after min_data_rate_grace, "
        "as Postfix's smtpd_min_data_rate (0B: no minimum).", "size")
    min_data_rate_grace: float = opt(
        "1m", "Time a message body may take before min_data_rate applies.", "duration")
    group_commit: bool = opt(
        True, "MX deliveries arriving together share one database transaction (one COMMIT "
        "and fsync); each is still answered 250 only after that COMMIT, and one that "
        "fails does not fail the others (a savepoint each).")
    group_commit_max: int = opt(16, "Most deliveries in one shared transaction.")
    group_commit_delay: float = opt(
        "0ms", "How long a delivery that could start its transaction at once waits for "
        "others to share it (0ms: none; deliveries arriving while the shared transactions "
        "run are batched anyway).", "duration")
    group_commit_parallel: int = opt(
        2, "Shared delivery transactions running at once (deliveries to one inbox queue "
        "on its folder's UID counter, so more mostly adds lock waits).")


@dataclass
class IMAPSection:
    """The IMAP listeners: STARTTLS (143) and implicit TLS (993)."""

    enabled: bool = opt(True, "Serve IMAP.")
    bind: str = opt("0.0.0.0", "Address of both IMAP listeners.")  # noqa: S104 - public
    port: int = opt(143, "Port of the STARTTLS listener (LOGINDISABLED until STARTTLS).")
    tls_port: int = opt(993, "Port of the implicit-TLS listener (needs [tls]).")
    allow_plaintext_login: bool = opt(
        False, "Allow LOGIN without TLS, to clients on loopback only (development)."
    )
    max_append_size: int = opt("64MiB", "Largest message accepted by APPEND.", "size")
    max_connections_per_ip: int = opt(
        50, "Concurrent IMAP sessions from one address (an IPv6 /64 counts as one).")
    max_connections: int = opt(5000, "Concurrent IMAP sessions in all.")


@dataclass
class AuditSection:
    """The audit trail of API access."""

    flush_interval: float = opt(
        "200ms", "How often buffered audit rows of read-only requests are written.", "duration"
    )
    max_buffer: int = opt(
        1000, "Write buffered audit rows at once when this many are waiting."
    )


@dataclass
class RetentionSection:
    """How long records are kept; the audit trail by organization tier."""

    interval: float = opt("1h", "How often the retention sweep runs.", "duration")
    batch_size: int = opt(5000, "Rows deleted per transaction (keeps locks short).")
    audit_free: float = opt("7d", "Audit rows of free-tier organizations.", "duration")
    audit_developer: float = opt("30d", "Audit rows of developer-tier organizations.", "duration")
    audit_startup: float = opt("90d", "Audit rows of startup-tier organizations.", "duration")
    audit_business: float = opt("365d", "Audit rows of business-tier organizations.", "duration")
    audit_enterprise: float = opt(
        "730d", "Audit rows of enterprise-tier organizations.", "duration"
    )
    audit_unscoped: float = opt(
        "30d", "Audit rows tied to no organization (bad keys, admin API).", "duration"
    )
    delivery_events: float = opt("90d", "Delivery events (sent, bounced, ...).", "duration")
    outbound_queue: float = opt(
        "180d", "Finished outbound queue rows, with each recipient's last state (what "
        "the API shows of a sent message's delivery), counted from their last change.",
        "duration")
    events: float = opt(
        "30d", "The event log (GET /events, WebSocket resume) and webhook delivery history.",
        "duration")


@dataclass
class OutboundSection:
    """The outbound queue: how mail leaves, and how long it may keep trying."""

    transport: str = opt(
        "log", "How mail leaves: 'log' (development: logs it, and writes .eml files to "
        "log_dir when set), 'ses' (Amazon SES v2 SendEmail, raw; the ses_* keys) or "
        "'smtp' (a smarthost over STARTTLS or implicit TLS, with AUTH; the smtp_* keys).")
    log_dir: str = opt("", "Directory for the log transport's .eml files (empty: none).")
    max_lifetime: float = opt(
        "4d", "How long a message keeps being retried before it bounces.", "duration")
    lease: float = opt(
        "5m", "How long a worker holds a message it is handing off; a process that dies "
        "mid-hand-off delays it this long.", "duration")
    poll_interval: float = opt(
        "5s", "How often each process looks for due retries (new mail wakes it at once).",
        "duration")
    concurrency: int = opt(8, "Hand-offs one process runs at once.")
    scheduled_send_interval: float = opt(
        "15s", "How often each process looks for drafts whose scheduled send_at has come "
        "(a draft leaves at most this late).", "duration")
    max_schedule_ahead: float = opt(
        "30d", "Furthest in the future a draft's send_at may be.", "duration")
    handoff_timeout: float = opt(
        "2m", "Longest one hand-off to the transport may take; then its recipients are "
        "deferred and retried later. At most half of lease (a longer value is cut to "
        "that), so a hand-off always ends while its lease protects it.", "duration")
    ses_region: str = opt("us-east-1", "AWS region of the SES account (ses transport).")
    ses_endpoint: str = opt(
        "", "SES API endpoint URL (empty: AWS's standard endpoint for ses_region). Must be "
        "https (certificates are always verified); AWS_ENDPOINT_URL* variables are ignored.")
    ses_allow_insecure_endpoint: bool = opt(
        False, "Allow a plain-http ses_endpoint (a local test stand-in such as moto). "
        "Refused when server.environment = 'production'.")
    ses_configuration_set: str = opt(
        "", "SES configuration set named on every send (event publishing, IP pool); "
        "empty: none.")
    ses_max_send_rate: float = opt(
        14.0, "Recipients per second this process sends through SES (a token bucket; sends "
        "wait, never fail, when it is empty). Set it to the account's maximum send rate "
        "divided by the number of processes: SES's sandbox allows 1/s, a new production "
        "account usually 14/s.")
    ses_access_key_id: str = opt(
        "", "IAM access key id for SES (empty: boto3's standard credential chain: "
        "environment, shared files, instance or task role).")
    ses_secret_access_key: str = opt(
        "", "IAM secret for SES. Overridden by AGENTPOST_SES_SECRET_ACCESS_KEY.",
        secret=True)
    ses_connect_timeout: float = opt(
        "5s", "Give up connecting to SES after this long (the message is retried later).",
        "duration")
    ses_read_timeout: float = opt(
        "30s", "Give up waiting for SES's answer after this long (retried later; if SES "
        "had accepted it, the message goes out twice).", "duration")
    smtp_host: str = opt("", "Smarthost name (smtp transport); also the name its "
                         "certificate must carry.")
    smtp_port: int = opt(
        587, "Smarthost port: 587 (submission with STARTTLS) or 465 with smtp_tls = "
        "'implicit'.")
    smtp_tls: str = opt(
        "required", "'required' (STARTTLS or nothing is sent), 'implicit' (TLS from the "
        "first byte, RFC 8314, usually port 465), 'opportunistic' (STARTTLS when offered) "
        "or 'none' (never; loopback tests). Only 'required' and 'implicit' are accepted "
        "when server.environment = 'production'.")
    smtp_tls_verify: bool = opt(
        True, "Verify the smarthost's certificate and name (false only outside production).")
    smtp_ca_file: str = opt(
        "", "PEM file of the CAs trusted for the smarthost (empty: the system's trust store).")
    smtp_username: str = opt("", "AUTH user name (empty: no AUTH). Sent only inside TLS.")
    smtp_password: str = opt(
        "", "AUTH password. Overridden by AGENTPOST_SMTP_PASSWORD.", secret=True)
    smtp_password_file: str = opt(
        "", "File holding the AUTH password (first line), instead of smtp_password.")
    smtp_helo: str = opt("", "Name given in EHLO (empty: server.hostname).")
    smtp_pool_size: int = opt(
        4, "Connections this process keeps to the smarthost (hand-offs beyond it wait).")
    smtp_idle_timeout: float = opt(
        "30s", "Close a pooled smarthost connection unused this long.", "duration")
    smtp_deadline: float = opt(
        "100s", "Longest one hand-off to the smarthost may take, connecting included; then "
        "its recipients are deferred (keep it below handoff_timeout).", "duration")
    sns_path: str = opt(
        "/webhooks/ses", "Path under /api/v1 where SES delivery feedback arrives from SNS "
        "(subscribe it as an HTTPS endpoint of the topics in sns_topic_arns).")
    sns_topic_arns: list = opt(  # noqa: RUF009 - opt() builds a default_factory field
        [], "SNS topics whose messages are accepted (exact ARNs); empty: every SNS message "
        "is refused.")
    sns_cert_host_pattern: str = opt(
        r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$", "Regular expression the host of "
        "a SigningCertURL or SubscribeURL must match (fetched over https only).")
    sns_ca_file: str = opt(
        "", "PEM file of the CAs trusted when fetching SNS certificates and confirming "
        "subscriptions (empty: the system's trust store).")
    sns_allow_private_addresses: bool = opt(
        False, "Let SNS fetches connect to loopback and private addresses (tests with a "
        "local certificate host only). Refused when server.environment = 'production'.")
    sns_max_age: float = opt(
        "1h", "Refuse SNS messages whose Timestamp is older than this (replays).",
        "duration")
    sns_fetch_timeout: float = opt(
        "10s", "Give up fetching a signing certificate or a SubscribeURL after this long.",
        "duration")


@dataclass
class SecretsSection:
    """The master key that seals secrets stored in the database (AES-256-GCM)."""

    key_file: str = opt(
        "", "File holding the base64 32-byte master key(s), one per line, the current one "
        "first (older lines still open what they sealed). Seals our own DKIM private keys, "
        "so check-config requires it in production when a smarthost relays our mail (SES "
        "signs for itself; the log transport sends nothing). `make run` generates "
        "var/secrets.key. Back it up apart from the database: without it sealed keys are "
        "lost.")


@dataclass
class DomainsSection:
    """Organizations' own domains: the DNS records they publish and how they are checked."""

    dkim_algorithm: str = opt(
        "rsa", "Our own DKIM keys (transports other than 'ses'): 'rsa' (2048-bit) or "
        "'ed25519' (RFC 8463; not every receiver verifies it yet).")
    spf_include: str = opt(
        "", "SPF mechanism of the host our mail leaves from, e.g. 'include:spf.relay.example' "
        "for a smarthost; empty: 'a:' of server.hostname ('include:amazonses.com' with SES).")
    dmarc_rua: str = opt(
        "", "Aggregate-report address in the suggested DMARC record (a mailto: URI); "
        "empty: mailto:postmaster@ the domain.")
    verify_interval: float = opt(
        "1m", "How often each process looks for domains due a verification check (a new "
        "domain is checked every minute, older ones ever less often).", "duration")
    dns_servers: list = opt(  # noqa: RUF009 - opt() builds a default_factory field
        [], "DNS servers ('host' or 'host:port') for verification look-ups; empty: the "
        "system's (/etc/resolv.conf).")
    dns_timeout: float = opt("5s", "Give up on one DNS look-up after this long.", "duration")
    claim_after: float = opt(
        "7d", "A registration that has not verified for this long and has no inboxes may be "
        "taken over by another organization registering the same name (so a name cannot be "
        "squatted by registering it first); 0s: never.", "duration")


@dataclass
class SendLimitsSection:
    """Send limits per organization and per inbox, shared by every process (0: no limit)."""

    org_rate: float = opt(
        0.0, "Messages per second an organization may send, sustained (0: no limit). "
        "Beyond it a send is refused with 429 / 451 4.7.0 and a Retry-After.")
    org_burst: int = opt(
        0, "Messages an organization may send at once before org_rate applies (the "
        "bucket's size; needed when org_rate is set). A message with more recipients "
        "than this waits for a full bucket and leaves it in debt: the next send waits "
        "until every recipient is paid for.")
    inbox_rate: float = opt(0.0, "Messages per second one inbox may send (0: no limit).")
    inbox_burst: int = opt(0, "Messages one inbox may send at once (with inbox_rate).")
    daily_quota: int = opt(
        0, "Messages an organization may send per UTC day (0: no limit); then 429 "
        "daily_quota_exceeded / 451 4.7.0 until midnight UTC.")
    inbox_daily_quota: int = opt(0, "Messages one inbox may send per UTC day (0: no limit).")


@dataclass
class LoginSection:
    """Failed-login allowances of every credential door, shared by all processes."""

    source_failures_per_minute: int = opt(
        30, "Failures one client address (IPv6: its /64) may make before it is refused.")
    pair_failures_per_minute: int = opt(
        10, "Failures one address may make against one account before it is refused.")
    account_failures_per_minute: int = opt(
        60, "Failures against one account from anywhere before its logins are slowed.")
    account_delay: float = opt(
        "1s", "How long a login to an account under attack waits before its check.",
        "duration")


@dataclass
class WebhooksSection:
    """Webhook delivery: which addresses endpoints may resolve to, and how hard we push."""

    allow_networks: list = opt(  # noqa: RUF009 - opt() builds a default_factory field
        [], "Networks (CIDR) that webhook URLs may reach although they are loopback, "
        "private, link-local or otherwise internal, e.g. [\"127.0.0.0/8\"] for a receiver "
        "on this machine. Empty: only public addresses.")
    concurrency: int = opt(16, "Deliveries one process runs at once.")
    lease: float = opt(
        "2m", "How long a process holds a delivery it is attempting; a process that dies "
        "mid-attempt delays that delivery this long.", "duration")
    poll_interval: float = opt(
        "5s", "How often each process looks for due retries (new events wake it at once).",
        "duration")


@dataclass
class WebSocketSection:
    """The event stream at GET /ws: sockets per key, slow readers, keep-alive pings."""

    max_connections_per_key: int = opt(
        20, "Open WebSockets one API key may hold in one process; more are refused in the "
        "handshake (HTTP 429).")
    send_buffer_cap: int = opt(
        "1MiB", "Bytes a WebSocket may have waiting to be sent; a client reading slower "
        "than its events arrive is disconnected (close code 4008) rather than buffered.",
        "size")
    ping_interval: float = opt(
        "30s", "How often an idle WebSocket is pinged; one that does not answer within the "
        "same time is closed. 0s: no pings.", "duration")


@dataclass
class LoggingSection:
    """Where the service logs."""

    level: str = opt("info", "debug, info, warn or error.")


SECTIONS: dict[str, type] = {
    "server": ServerSection,
    "database": DatabaseSection,
    "tls": TLSSection,
    "http": HTTPSection,
    "rate_limit": RateLimitSection,
    "mail": MailSection,
    "storage": StorageSection,
    "smtp": SMTPSection,
    "imap": IMAPSection,
    "audit": AuditSection,
    "retention": RetentionSection,
    "outbound": OutboundSection,
    "send_limits": SendLimitsSection,
    "login": LoginSection,
    "secrets": SecretsSection,
    "domains": DomainsSection,
    "webhooks": WebhooksSection,
    "websocket": WebSocketSection,
    "logging": LoggingSection,
}
