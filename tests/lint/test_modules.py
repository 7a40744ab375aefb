"""Every module documents exactly the options it accepts, and ansible-doc renders it."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.tools import ROOT, venv_bin

MODULES = sorted((ROOT / "plugins" / "modules").glob("*.py"))


def spec_literals(path: Path) -> dict[str, dict[str, Any]]:
    """The module's *_SPEC dicts, with each option's literal settings (type, default, choices, ...)."""
    tree = ast.parse(path.read_text())
    specs: dict[str, dict[str, Any]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Dict):
            name = node.targets[0].id
            if not name.endswith("_SPEC"):
                continue
            options: dict[str, Any] = {}
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                assert isinstance(key, ast.Constant) and isinstance(value, ast.Dict)
                settings = {}
                for skey, svalue in zip(value.keys, value.values, strict=True):
                    assert isinstance(skey, ast.Constant)
                    try:
                        settings[skey.value] = ast.literal_eval(svalue)
                    except ValueError:
                        settings[skey.value] = None  # a name (env_fallback, a nested spec)
                options[key.value] = settings
            specs[name] = options
    return specs


def compare(documented: dict[str, Any], spec: dict[str, Any], where: str) -> None:
    assert sorted(documented) == sorted(spec), f"{where}: documented {sorted(documented)} != spec {sorted(spec)}"
    for name, settings in spec.items():
        doc = documented[name]
        assert doc.get("description"), f"{where}.{name} has no description"
        assert doc.get("type", "str") == settings.get("type", "str"), f"{where}.{name}: type differs"
        for key in ("default", "choices", "required", "elements", "no_log"):
            if key in settings and settings[key] is not None and key != "no_log":
                assert doc.get(key, False if key == "required" else None) == settings[key], f"{where}.{name}: {key}"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_documentation_matches_the_argument_spec(module: Path) -> None:
    text = module.read_text()
    namespace: dict[str, Any] = {}
    for block in ("DOCUMENTATION", "EXAMPLES", "RETURN"):
        start = text.index(f'{block} = r"""') + len(f'{block} = r"""')
        namespace[block] = yaml.safe_load(text[start : text.index('"""', start)])
    assert isinstance(namespace["EXAMPLES"], list) and namespace["RETURN"]
    specs = spec_literals(module)
    options = namespace["DOCUMENTATION"]["options"]
    compare(options, specs["ARGUMENT_SPEC"], module.stem)
    nested = [k for k in specs if k != "ARGUMENT_SPEC"]  # the suboptions spec (ENTRY_SPEC)
    for name, settings in options.items():
        if "suboptions" in settings:
            assert len(nested) == 1, f"{module.stem}: one suboptions spec expected, found {nested}"
            compare(settings["suboptions"], specs[nested[0]], f"{module.stem}.{name}")


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_ansible_doc_renders(module: Path, ansible_env: dict[str, str]) -> None:
    done = subprocess.run(
        [venv_bin("ansible-doc"), "-M", str(module.parent), module.stem],
        cwd=ROOT, env=ansible_env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "EXAMPLES" in done.stdout and "RETURN VALUES" in done.stdout
