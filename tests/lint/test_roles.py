"""Role conventions enforced in CI: argument specs match defaults, templates parse."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import yaml
from ansible_collections.comfybake.core.plugins.module_utils.fetch import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if (p / "tasks" / "main.yml").exists())


def load(path: Path) -> dict[str, object]:
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    return data or {}


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_argument_spec_matches_defaults(role: Path) -> None:
    defaults = load(role / "defaults" / "main.yml")
    spec = load(role / "meta" / "argument_specs.yml")
    options = spec["argument_specs"]["main"]["options"]  # type: ignore[index]
    assert sorted(defaults) == sorted(options), "defaults/main.yml and meta/argument_specs.yml disagree"
    for name, option in options.items():
        assert option.get("description"), f"{name} has no description"
        assert option.get("type"), f"{name} has no type"
        if defaults[name] is not None:
            assert option.get("default") == defaults[name], f"{name}: spec default {option.get('default')!r}"
        else:
            assert "default" not in option, f"{name} defaults to null but the spec gives a default"


def test_every_template_parses() -> None:
    templates = [*ROOT.glob("roles/*/templates/**/*.j2"), *ROOT.glob("playbooks/templates/**/*.j2")]
    if not templates:
        pytest.skip("no templates yet")
    env = jinja2.Environment(extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"])  # noqa: S701 - parse only
    for template in templates:
        env.parse(template.read_text())


def test_the_models_role_defaults_are_the_engines() -> None:
    """Each setting the models role exposes (comfyui_models_<setting>) defaults to the engine's default."""
    defaults = load(ROOT / "roles" / "comfyui_models" / "defaults" / "main.yml")
    exposed = {name: defaults[f"comfyui_models_{name}"] for name in SETTINGS if f"comfyui_models_{name}" in defaults}
    assert {"parallel", "connections", "verify", "mirrors", "allow_http", "retries"} <= set(exposed)
    for name, value in exposed.items():
        expected = "" if SETTINGS[name].secret else SETTINGS[name].default  # an empty token means "none given"
        assert value == expected, f"comfyui_models_{name} defaults to {value!r}, the engine to {expected!r}"
