"""A runner for imaptest's scripted tests (Dovecot's ``src/tests/`` format), written for
AgentPost from the format's documented behaviour; see bench/imaptest_runner.py."""
