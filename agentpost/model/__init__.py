"""Pure values shared by every layer: ids, the Principal, scopes, roles and errors."""
