"""Mail out: the one outbound queue in PostgreSQL, its workers and the transports."""
