"""twistd plugin: `twistd -n agentpost --config /etc/agentpost/agentpost.toml`."""

from twisted.application.service import ServiceMaker

agentpost = ServiceMaker(
    "AgentPost",
    "agentpost.tap",
    "Mail server for AI agents: SMTP, IMAP and the HTTP API in one reactor.",
    "agentpost",
)
