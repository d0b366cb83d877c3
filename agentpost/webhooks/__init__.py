"""Webhook delivery: signing, the SSRF guard and the queue worker (issue 13)."""
