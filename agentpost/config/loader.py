"""Load and validate configuration.

Unknown keys are errors (a typo must not silently fall back to a default), every
duration and size needs its unit, and secrets may come from the environment so that
they never have to live in a file under version control.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agentpost.config.dropins import DropinError, merge_tomls
from agentpost.config.sections import (
    SECTIONS,
    AuditSection,
    DatabaseSection,
    DomainsSection,
    HTTPSection,
    IMAPSection,
    LoggingSection,
    LoginSection,
    MailSection,
    OutboundSection,
    RateLimitSection,
    RetentionSection,
    SecretsSection,
    SendLimitsSection,
    ServerSection,
    SMTPSection,
    StorageSection,
    TLSSection,
    WebhooksSection,
    WebSocketSection,
)
from agentpost.config.units import format_duration, format_size, parse_duration, parse_size

ENV_OVERRIDES = {
    "AGENTPOST_DATABASE_URL": ("database", "url"),
    "AGENTPOST_TLS_KEY": ("tls", "key"),
    "AGENTPOST_HOSTNAME": ("server", "hostname"),
    "AGENTPOST_S3_SECRET_ACCESS_KEY": ("storage", "secret_access_key"),
    "AGENTPOST_SES_SECRET_ACCESS_KEY": ("outbound", "ses_secret_access_key"),
    "AGENTPOST_SMTP_PASSWORD": ("outbound", "smtp_password"),
}


class ConfigError(Exception):
    """A configuration problem, always naming the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass
class Config:
    """The whole validated configuration."""

    server: ServerSection = field(default_factory=ServerSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    tls: TLSSection = field(default_factory=TLSSection)
    http: HTTPSection = field(default_factory=HTTPSection)
    rate_limit: RateLimitSection = field(default_factory=RateLimitSection)
    mail: MailSection = field(default_factory=MailSection)
    storage: StorageSection = field(default_factory=StorageSection)
    smtp: SMTPSection = field(default_factory=SMTPSection)
    imap: IMAPSection = field(default_factory=IMAPSection)
    audit: AuditSection = field(default_factory=AuditSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    outbound: OutboundSection = field(default_factory=OutboundSection)
    send_limits: SendLimitsSection = field(default_factory=SendLimitsSection)
    login: LoginSection = field(default_factory=LoginSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    secrets: SecretsSection = field(default_factory=SecretsSection)
    domains: DomainsSection = field(default_factory=DomainsSection)
    webhooks: WebhooksSection = field(default_factory=WebhooksSection)
    websocket: WebSocketSection = field(default_factory=WebSocketSection)
    source: str = "<defaults>"


_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "float": (int, float), "bool": bool, "list": list,
}


def _convert(key: str, spec: dataclasses.Field[Any], value: Any) -> Any:
    kind = spec.metadata.get("kind", "plain")
    try:
        if kind == "duration":
            return parse_duration(value)
        if kind == "size":
            return parse_size(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    expected = spec.type if isinstance(spec.type, str) else spec.type.__name__
    wanted = _TYPES.get(expected)
    if wanted is not None:
        is_bool = isinstance(value, bool)
        ok = isinstance(value, wanted) and not (expected in ("int", "float") and is_bool)
        if not ok:
            raise ConfigError(key, f"expected {expected}, got {type(value).__name__}")
    return float(value) if expected == "float" else value


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}", "unknown key")
        kwargs[key] = _convert(f"{name}.{key}", fields[key], value)
    section = cls(**kwargs)
    # Defaults declared with units are strings too; convert the ones not given.
    for f in fields.values():
        if f.name not in kwargs and f.metadata.get("kind") in ("duration", "size"):
            setattr(section, f.name, _convert(f"{name}.{f.name}", f, getattr(section, f.name)))
    return section


def parse_config(data: dict[str, Any], source: str = "<memory>",
                 environ: dict[str, str] | None = None) -> Config:
    """Validate a parsed TOML document (plus environment overrides) into a Config."""
    environ = dict(os.environ if environ is None else environ)
    merged: dict[str, dict[str, Any]] = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(name, "unknown section")
        if not isinstance(values, dict):
            raise ConfigError(name, "must be a table, such as [" + name + "]")
        merged[name] = dict(values)
    for var, (section, key) in ENV_OVERRIDES.items():
        if environ.get(var):
            merged.setdefault(section, {})[key] = environ[var]
    sections = {
        name: _build_section(name, cls, merged.get(name, {})) for name, cls in SECTIONS.items()
    }
    config = Config(**sections, source=source)
    _check(config)
    return config


#: The largest storage.inline_message_max accepted.
INLINE_MESSAGE_CEILING = 1024 * 1024


def _check(config: Config) -> None:
    if config.server.environment not in ("production", "development"):
        raise ConfigError("server.environment", "must be 'production' or 'development'")
    if config.server.workers < 0 or config.server.workers > 64:
        raise ConfigError("server.workers", "must be between 0 (one per CPU) and 64")
    if (config.http.endpoint or config.smtp.mx_endpoint) and config.server.workers != 1:
        raise ConfigError("server.workers", "must be 1 with listener endpoints (socket "
                          "activation): worker copies bind their own ports")
    if config.server.gc_young_threshold < 0:
        raise ConfigError("server.gc_young_threshold", "must be 0 (CPython's) or more")
    if config.database.pool_size < 1:
        raise ConfigError("database.pool_size", "must be at least 1")
    if not 0 <= config.storage.inline_message_max <= INLINE_MESSAGE_CEILING:
        # Each kept message goes to PostgreSQL as one literal in one statement (its
        # size for UTF-8 mail, twice that as hex otherwise: storage.long_text): past a
        # mebibyte that costs the database, and the statement's memory, more than the
        # store costs.
        raise ConfigError("storage.inline_message_max", "must be between 0 (every message "
                          "in the store) and 1MiB")
    if config.database.prepare_threshold < 0:
        raise ConfigError("database.prepare_threshold", "must be 0 (off) or more")
    if not 0 <= config.http.port < 65536:
        raise ConfigError("http.port", "must be between 0 (any free port) and 65535")
    if config.http.tls and not (config.tls.cert and config.tls.key):
        raise ConfigError("http.tls", "needs tls.cert and tls.key")
    for key in ("cert", "key"):
        path = getattr(config.tls, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"tls.{key}", f"file {path!r} does not exist")
    _check_tls_policy(config)
    _check_operator_names(config)
    if config.rate_limit.rate <= 0 or config.rate_limit.burst < 1:
        raise ConfigError("rate_limit.rate", "rate must be positive and burst at least 1")
    if config.logging.level not in ("debug", "info", "warn", "error"):
        raise ConfigError("logging.level", "must be debug, info, warn or error")
    if config.storage.backend not in ("local", "s3"):
        raise ConfigError("storage.backend", "must be 'local' or 's3'")
    if config.storage.backend == "s3" and not config.storage.bucket:
        raise ConfigError("storage.bucket", "is required when storage.backend = 's3'")
    if config.storage.sse not in ("AES256", "aws:kms"):
        raise ConfigError("storage.sse", "must be 'AES256' or 'aws:kms'")
    if not 0 <= config.smtp.mx_port < 65536:
        raise ConfigError("smtp.mx_port", "must be between 0 and 65535")
    for name in ("submission_port", "submissions_port"):
        if not -1 <= getattr(config.smtp, name) < 65536:
            raise ConfigError(f"smtp.{name}", "must be -1 (off) or between 0 and 65535")
    if config.smtp.max_message_size < 1024:
        raise ConfigError("smtp.max_message_size", "must be at least 1KiB")
    if "@" in config.mail.shared_domain or not config.mail.shared_domain:
        raise ConfigError("mail.shared_domain", "must be a domain name")
    _check_outbound(config)
    _check_send_limits(config)
    _check_domains(config)
    _check_webhooks(config)
    _check_websocket(config)


def _check_websocket(config: Config) -> None:
    ws = config.websocket
    if ws.max_connections_per_key < 1:
        raise ConfigError("websocket.max_connections_per_key", "must be at least 1")
    if ws.send_buffer_cap < 64 * 1024:
        raise ConfigError("websocket.send_buffer_cap", "must be at least 64KiB")
    if ws.ping_interval < 0:
        raise ConfigError("websocket.ping_interval", "must not be negative")


def _check_webhooks(config: Config) -> None:
    hooks = config.webhooks
    for net in hooks.allow_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except (TypeError, ValueError):
            raise ConfigError("webhooks.allow_networks",
                              f"{net!r} is not a network such as 127.0.0.0/8") from None
    if not 1 <= hooks.concurrency <= 256:
        raise ConfigError("webhooks.concurrency", "must be between 1 and 256")
    if hooks.lease < 45 or hooks.poll_interval <= 0:
        raise ConfigError("webhooks.lease", "must be at least 45s (longer than the 30 s "
                          "delivery timeout), and poll_interval positive")


def _check_domains(config: Config) -> None:
    dom = config.domains
    if dom.dkim_algorithm not in ("rsa", "ed25519"):
        raise ConfigError("domains.dkim_algorithm", "must be 'rsa' or 'ed25519'")
    if dom.verify_interval < 1 or dom.dns_timeout <= 0:
        raise ConfigError("domains.verify_interval", "must be at least 1s (and "
                          "dns_timeout positive)")
    if not all(isinstance(s, str) and s.strip() for s in dom.dns_servers):
        raise ConfigError("domains.dns_servers", "must be a list of 'host' or 'host:port'")


def _check_send_limits(config: Config) -> None:
    """No negative limits; a rate needs a bucket to hold its burst."""
    limits = config.send_limits
    for scope in ("org", "inbox"):
        rate, burst = getattr(limits, f"{scope}_rate"), getattr(limits, f"{scope}_burst")
        if rate < 0 or burst < 0:
            raise ConfigError(f"send_limits.{scope}_rate", "rate and burst must not be "
                              "negative (0: no limit)")
        if rate > 0 and burst < 1:
            raise ConfigError(f"send_limits.{scope}_burst", f"must be at least 1 when "
                              f"{scope}_rate is set")
    if limits.daily_quota < 0 or limits.inbox_daily_quota < 0:
        raise ConfigError("send_limits.daily_quota", "must not be negative (0: no limit)")


def _check_sns(config: Config) -> None:
    """The SNS feedback endpoint's settings: a sane path, a compilable host pattern,
    a readable CA file, and no loopback fetches in production."""
    out = config.outbound
    if not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", out.sns_path):
        raise ConfigError("outbound.sns_path", "must be a path such as /webhooks/ses")
    try:
        re.compile(out.sns_cert_host_pattern)
    except re.error as exc:
        raise ConfigError("outbound.sns_cert_host_pattern", f"not a regex: {exc}") from None
    if not all(isinstance(a, str) and a.startswith("arn:") for a in out.sns_topic_arns):
        raise ConfigError("outbound.sns_topic_arns", "must be a list of SNS topic ARNs")
    if out.sns_ca_file and not os.path.isfile(out.sns_ca_file):
        raise ConfigError("outbound.sns_ca_file", "no such file")
    if out.sns_max_age <= 0 or out.sns_fetch_timeout <= 0:
        raise ConfigError("outbound.sns_max_age", "durations must be positive")
    if out.sns_allow_private_addresses and config.server.environment == "production":
        raise ConfigError("outbound.sns_allow_private_addresses",
                          "is for tests only; refused in production")


def _check_outbound(config: Config) -> None:
    out = config.outbound
    _check_sns(config)
    if out.transport not in ("log", "ses", "smtp"):
        raise ConfigError("outbound.transport", "must be 'log', 'ses' or 'smtp'")
    if out.max_lifetime < 60 or out.lease < 10 or out.poll_interval <= 0:
        raise ConfigError("outbound.max_lifetime", "lifetime >= 1m, lease >= 10s and a "
                          "positive poll_interval are needed")
    if not 1 <= out.concurrency <= 256:
        raise ConfigError("outbound.concurrency", "must be between 1 and 256")
    if out.handoff_timeout <= 0:
        raise ConfigError("outbound.handoff_timeout", "must be positive")
    _check_ses(config)
    _check_smtp(config)


def _check_ses(config: Config) -> None:
    """The SES endpoint is https unless a non-production configuration says otherwise."""
    out = config.outbound
    if out.ses_allow_insecure_endpoint and config.server.environment == "production":
        raise ConfigError("outbound.ses_allow_insecure_endpoint",
                          "must be false when server.environment = 'production'")
    if out.ses_endpoint:
        parts = urlsplit(out.ses_endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError("outbound.ses_endpoint", "must be an https:// URL")
        if parts.scheme == "http" and not out.ses_allow_insecure_endpoint:
            raise ConfigError("outbound.ses_endpoint", "must be https (a plain-http test "
                              "endpoint needs ses_allow_insecure_endpoint = true)")
    region = re.fullmatch(r"[a-z]{2}(-[a-z0-9]+)+-\d+", out.ses_region)
    if out.transport == "ses" and region is None:
        raise ConfigError("outbound.ses_region", "must be an AWS region such as us-east-1")
    if out.ses_max_send_rate <= 0:
        raise ConfigError("outbound.ses_max_send_rate", "must be positive")
    if out.ses_connect_timeout <= 0 or out.ses_read_timeout <= 0:
        raise ConfigError("outbound.ses_read_timeout", "timeouts must be positive")
    if bool(out.ses_access_key_id) != bool(out.ses_secret_access_key):
        raise ConfigError("outbound.ses_secret_access_key", "give both ses_access_key_id "
                          "and ses_secret_access_key, or neither (boto3's credential chain)")


def _check_smtp(config: Config) -> None:
    """The smarthost: a name, verified STARTTLS in production, one source of password."""
    out = config.outbound
    if out.smtp_tls not in ("required", "opportunistic", "implicit", "none"):
        raise ConfigError("outbound.smtp_tls", "must be 'required', 'opportunistic', "
                          "'implicit' or 'none'")
    if config.server.environment == "production" and (
            out.smtp_tls not in ("required", "implicit") or not out.smtp_tls_verify):
        raise ConfigError("outbound.smtp_tls", "must be 'required' or 'implicit' with "
                          "smtp_tls_verify = true when server.environment = 'production'")
    if out.transport == "smtp" and not out.smtp_host:
        raise ConfigError("outbound.smtp_host", "is required when outbound.transport = 'smtp'")
    if not 0 < out.smtp_port < 65536:
        raise ConfigError("outbound.smtp_port", "must be between 1 and 65535")
    for key in ("smtp_ca_file", "smtp_password_file"):
        path = getattr(out, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"outbound.{key}", f"file {path!r} does not exist")
    if out.smtp_password and out.smtp_password_file:
        raise ConfigError("outbound.smtp_password_file", "give smtp_password or "
                          "smtp_password_file, not both")
    if out.smtp_username and not (out.smtp_password or out.smtp_password_file):
        raise ConfigError("outbound.smtp_password", "smtp_username needs a password")
    if not 1 <= out.smtp_pool_size <= 64:
        raise ConfigError("outbound.smtp_pool_size", "must be between 1 and 64")
    if out.smtp_idle_timeout <= 0 or out.smtp_deadline < 1:
        raise ConfigError("outbound.smtp_deadline", "must be at least 1s (and "
                          "smtp_idle_timeout positive)")
    if out.transport == "smtp" and out.smtp_deadline >= out.handoff_timeout:
        raise ConfigError("outbound.smtp_deadline", "must be shorter than "
                          "outbound.handoff_timeout (the worker stops waiting then)")


def _check_tls_policy(config: Config) -> None:
    """A cipher list OpenSSL cannot use must stop start-up, not fail every handshake."""
    from agentpost.tls import MIN_VERSIONS, TLSPolicy

    if config.tls.min_version not in MIN_VERSIONS:
        raise ConfigError("tls.min_version", f"must be one of {', '.join(MIN_VERSIONS)}")
    try:
        TLSPolicy(config.tls.ciphers, config.tls.min_version).check()
    except ValueError as exc:
        raise ConfigError("tls.ciphers", str(exc)) from None


def _check_operator_names(config: Config) -> None:
    """Reserved names are strings; the operator inbox is an address."""
    if not all(isinstance(n, str) and n.strip() for n in config.mail.reserved_local_parts):
        raise ConfigError("mail.reserved_local_parts", "must be a list of non-empty strings")
    operator = config.mail.operator_inbox
    if operator and (operator.count("@") != 1 or operator.startswith("@")
                     or operator.endswith("@")):
        raise ConfigError("mail.operator_inbox", "must be an address such as ops@example.com")


def load_config(path: str | os.PathLike[str] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Read ``path`` (or ``$AGENTPOST_CONFIG``) and the ``conf.d/*.toml`` drop-ins beside it
    (see agentpost.config.dropins); with neither, defaults plus environment."""
    env = dict(os.environ if environ is None else environ)
    path = path or env.get("AGENTPOST_CONFIG")
    if not path:
        return parse_config({}, "<defaults>", env)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    origins: dict[str, str] = {}
    try:
        data = merge_tomls(data, Path(path).parent / "conf.d", origins)
    except DropinError as exc:
        raise ConfigError(exc.key, exc.problem) from None
    try:
        return parse_config(data, str(path), env)
    except ConfigError as exc:
        if exc.key in origins:
            raise ConfigError(exc.key, f"{exc.problem} (in {origins[exc.key]})") from None
        raise


def _toml_value(value: Any, kind: str) -> str:
    if kind == "duration":
        return f'"{format_duration(value) if not isinstance(value, str) else value}"'
    if kind == "size":
        return f'"{format_size(value) if not isinstance(value, str) else value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, "plain") for v in value) + "]"
    return str(value)


def render_sample() -> str:
    """The documented sample configuration, generated from the section declarations."""
    lines = [
        "# AgentPost configuration (TOML). Generated by `agentpost sample-config`.",
        "# Unknown keys are errors. Durations need a unit (ms, s, m, h, d, w);",
        "# sizes need one too (B, KB, MB, GB, KiB, MiB, GiB).",
        "# Environment overrides: " + ", ".join(sorted(ENV_OVERRIDES)) + ".",
        "",
    ]
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        doc = (cls.__doc__ or "").strip()
        if doc:
            lines.append(f"# {doc}")
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()  # type: ignore[operator]
            lines.append(f"# {f.metadata.get('doc', '')}")
            line = f"{f.name} = {_toml_value(default, f.metadata.get('kind', 'plain'))}"
            if f.metadata.get("secret") or default in ("", []):
                line = "# " + line
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "AuditSection",
    "Config",
    "ConfigError",
    "DatabaseSection",
    "HTTPSection",
    "IMAPSection",
    "LoggingSection",
    "LoginSection",
    "MailSection",
    "OutboundSection",
    "RateLimitSection",
    "RetentionSection",
    "SMTPSection",
    "ServerSection",
    "StorageSection",
    "TLSSection",
    "load_config",
    "parse_config",
    "render_sample",
]
