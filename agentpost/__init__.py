"""AgentPost: real mailboxes for AI agents, served from one Twisted reactor."""

__version__ = "0.1.0"
