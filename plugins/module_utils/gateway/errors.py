"""The gateway's one error type."""

from __future__ import annotations


class GatewayError(Exception):
    """A gateway setting, credential or configuration that cannot be used; the message names the
    value at fault and says what to do."""
