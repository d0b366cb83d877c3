"""The event stream at ``GET /ws``: autobahn WebSockets fed by a per-process hub."""
