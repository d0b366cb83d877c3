"""The IMAP connection states (RFC 3501 §3), apart from the server so that command
modules can name them without importing the connection core."""

from __future__ import annotations

import enum


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"
