"""Tenant-scoped operations. Every public method takes the acting context first."""
