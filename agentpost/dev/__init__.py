"""Developer conveniences: a throw-away PostgreSQL cluster and local TLS files for ``make run``."""
