"""The HTTP adapter: /api/v1 (organization keys) and /admin/v1 (admin keys) on Klein."""
