"""Periodic work on the injected clock; safe to run in every process at once."""
