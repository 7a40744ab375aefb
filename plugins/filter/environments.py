"""Filter `environment_problems`: every problem of `comfyui_environments`, as the environment
engine finds it; its documentation is in `environment_problems.yml` beside this one.

The role's preflight runs it on the controller, so a typo fails before any file is written on
a host. It adds no rule of its own: each environment is read by the same engine function the
module `comfybake.core.environment` builds it with (`environment_spec`), then checked as the
build does before any git or network access (`validate` in check mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible_collections.comfybake.core.plugins.module_utils.environment.errors import EnvError
from ansible_collections.comfybake.core.plugins.module_utils.environment.spec import (
    environment_spec,
    validate,
    yaml_kind,
)


def environment_problems(
    environments: Any,
    torch_flavors: Mapping[str, Any] | None = None,
    default_torch_flavor: str = "",
    allowed_repos: list[str] | None = None,
    writable_paths: Mapping[str, Any] | None = None,
) -> list[str]:
    """One message per invalid environment (each names the environment, the key and the fix); [] when all are valid."""
    if not isinstance(environments, Mapping):
        return [f"comfyui_environments must map environment names to environments, got {yaml_kind(environments)}"]
    problems = []
    for name, written in environments.items():
        try:
            spec = environment_spec(
                str(name),
                written,
                torch_flavors=torch_flavors or {},
                default_torch_flavor=default_torch_flavor,
                allowed_repos=list(allowed_repos or []),
                writable_paths=dict(writable_paths or {}),
                root="",
                uv="",
            )
            validate(spec, check_mode=True)
        except EnvError as error:
            problems.append(str(error))
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"environment_problems": environment_problems}
