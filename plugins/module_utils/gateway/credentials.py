"""Users and API keys of the gateway (placeholder: the full module lands with the command line)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Principal:
    name: str
    kind: str
    hash: str
    scope: list[str] = field(default_factory=list)
    source: str = "cli"
    created: str = ""


def covers(principal: Principal, kind: str, name: str, environment: str) -> bool:
    """Whether `principal` may use the route of instance or environment `name`."""
    scope = set(principal.scope)
    if "*" in scope or f"environment:{environment}" in scope:
        return True
    return kind == "instance" and f"instance:{name}" in scope
