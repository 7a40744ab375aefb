"""The gateway: the authenticated TLS entry to every instance and environment (docs/gateway.md)."""
