"""Who is asking, from where, and for which audited action."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentpost.model.principal import AdminPrincipal, Principal


@dataclass
class RequestContext:
    """Carried from the protocol adapter through the core to the audit trail.

    ``audited`` becomes true once a change and its audit row have committed together,
    so the adapter knows not to write a second row for the same request.
    """

    request_id: str
    remote_addr: str | None
    action: str
    principal: Principal | AdminPrincipal | None = None
    environment_id: str | None = None
    target_id: str | None = None
    audited: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def org_principal(self) -> Principal:
        """The organization principal; only routes behind org auth call this."""
        assert isinstance(self.principal, Principal)
        return self.principal
