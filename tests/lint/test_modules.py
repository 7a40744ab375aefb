"""Every module documents exactly the options it accepts, and ansible-doc renders it."""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness.tools import ROOT, venv_bin

MODULES = sorted((ROOT / "plugins" / "modules").glob("*.py"))


def documentation(module: Path, env: dict[str, str]) -> dict[str, Any]:
    """The module's documentation as ansible-doc renders it, doc fragments merged in."""
    name = f"comfybake.core.{module.stem}"
    done = subprocess.run(
        [venv_bin("ansible-doc"), "--json", name], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout)[name])


def compare(documented: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    assert sorted(documented) == sorted(spec), f"{where}: documented {sorted(documented)} != spec {sorted(spec)}"
    for name, settings in spec.items():
        doc = documented[name]
        assert doc.get("description"), f"{where}.{name} has no description"
        assert doc.get("type", "str") == settings.get("type", "str"), f"{where}.{name}: type differs"
        for key in ("default", "choices", "required", "elements"):
            if key in settings:
                assert doc.get(key, False if key == "required" else None) == settings[key], f"{where}.{name}: {key}"
        if "options" in settings:
            compare(doc.get("suboptions", {}), settings["options"], f"{where}.{name}")


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_documentation_matches_the_argument_spec(module: Path, ansible_env: dict[str, str]) -> None:
    """Each option the module accepts is documented with its type and settings, and nothing else is."""
    code = importlib.import_module(f"ansible_collections.comfybake.core.plugins.modules.{module.stem}")
    rendered = documentation(module, ansible_env)
    assert rendered["examples"] and rendered["return"]
    compare(rendered["doc"]["options"], code.ARGUMENT_SPEC, module.stem)


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_ansible_doc_renders(module: Path, ansible_env: dict[str, str]) -> None:
    done = subprocess.run(
        [venv_bin("ansible-doc"), "-M", str(module.parent), module.stem],
        cwd=ROOT, env=ansible_env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "EXAMPLES" in done.stdout and "RETURN VALUES" in done.stdout


def test_the_fetch_options_fragment_is_rendered_from_the_table() -> None:
    """The models module's options are documented from the one settings table (scripts/render-docs.py)."""
    done = subprocess.run(
        [venv_bin("python"), "scripts/render-docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
