"""Strict inputs: every inventory string that a template writes into a file is checked, in
full, by the preflight of its role before any file is written (a line break in one would add
lines such as `ExecStartPre=+...` to a unit); patterns meant as full matches match in full."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import pytest
import yaml
from ansible.errors import AnsibleFilterError
from ansible_collections.comfybake.core.plugins.filter.settings import setting_problems

ROOT = Path(__file__).resolve().parents[2]
IDENTIFIER = re.compile(r"\b_{0,2}[a-z][a-z0-9_]*\b")
# What a template may read without a preflight: Ansible's own values, and these, each with why.
MAGIC = {"ansible_managed", "ansible_facts", "inventory_hostname", "role_path", "loop", "_"}
ALLOWED = {
    # the release ids the environment module returns (hex digests it makes); instance_quote'd too
    "__comfyui_instances_releases": "made by the environment engine",
    # comfybake-models.service.j2 writes only its keys, the credential names hf_token and civitai_token
    "_comfyui_models_boot_tokens": "only its fixed keys are written",
}
# Templates rendered in a loop, with the variable they loop over (checked below in the tasks).
ITEMS = {
    "instance.env.j2": "_comfyui_instances_layout",
    "instance.conf.j2": "_comfyui_instances_layout",
    "extra_model_paths.yaml.j2": "comfyui_environments",
    "comfyui-manager.ini.j2": "comfyui_environments",
    "repository.sources.j2": "_nvidia_driver_repos",
}
# A preflight task validates what it names when it runs one of these.
VALIDATORS = ("setting_problems", "instance_layout", "environment_problems", "match_type='fullmatch'")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _options() -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for spec in ROOT.glob("roles/*/meta/argument_specs.yml"):
        options |= _load(spec)["argument_specs"]["main"]["options"]
    return options


def _role_vars() -> dict[str, str]:
    """Each role variable (vars/*.yml) to the text of its definition."""
    found: dict[str, str] = {}
    for path in ROOT.glob("roles/*/vars/*.yml"):
        for name, value in (_load(path) or {}).items():
            found[name] = found.get(name, "") + yaml.safe_dump(value)
    return found


def _names(text: str, known: set[str]) -> set[str]:
    return {name for name in IDENTIFIER.findall(text) if name in known}


def _validated(known: set[str], definitions: dict[str, str]) -> set[str]:
    """Every name that a validating preflight task reads, and what the role variables among them read."""
    names: set[str] = set()
    for path in ROOT.glob("roles/*/tasks/preflight.yml"):
        for task in _load(path) or []:
            text = yaml.safe_dump(task)
            if any(validator in text for validator in VALIDATORS):
                names |= _names(text, known)
    pending = list(names)
    while pending:
        for name in _names(definitions.get(pending.pop(), ""), known) - names:
            names.add(name)
            pending.append(name)
    return names


def _template_names(path: Path) -> set[str]:
    source = path.read_text()
    env = jinja2.Environment(extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"])  # noqa: S701 - parse only
    for name in re.findall(r"(?:\|\s*|\bis\s+(?:not\s+)?|\bmap\(\s*')([A-Za-z_][\w.]*)", source):
        env.filters.setdefault(name, str)
        env.tests.setdefault(name, bool)
    return set(jinja2.meta.find_undeclared_variables(env.parse(source)))


def _unchecked(path: Path) -> list[str]:
    """The inventory variables a template reads (through role variables too) that nothing checks."""
    options, definitions = _options(), _role_vars()
    known = set(options) | set(definitions) | {"_comfyui_instances_layout", *ALLOWED}
    validated = _validated(known, definitions)
    safe_types = {"bool", "int", "float"}
    unchecked, seen = [], set()
    pending = [ITEMS[path.name] if name == "item" else name for name in _template_names(path) - MAGIC]
    while pending:
        name = pending.pop()
        if name in seen or name in validated or name in ALLOWED:
            continue
        seen.add(name)
        option = options.get(name)
        if option is not None:
            if option.get("type") not in safe_types and "choices" not in option:
                unchecked.append(name)
        elif name in definitions:
            pending += sorted(_names(definitions[name], known | MAGIC) - MAGIC)
        else:
            unchecked.append(name)
    return sorted(unchecked)


TEMPLATES = sorted(ROOT.glob("roles/*/templates/*.j2"))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda path: f"{path.parts[-3]}/{path.name}")
def test_every_inventory_string_a_template_writes_is_checked_by_a_preflight(template: Path) -> None:
    assert _unchecked(template) == [], (
        f"{template.name} writes these settings, which no preflight checks (comfybake.core.setting_problems, "
        "the instance layout, the environment engine, a fullmatch regex, or a bool/int/choices argument spec)"
    )


def test_the_items_of_looped_templates_are_what_their_tasks_loop_over() -> None:
    tasks = "\n".join(path.read_text() for path in ROOT.glob("roles/*/tasks/*.yml"))
    for template, variable in ITEMS.items():
        found = re.search(rf"src: {re.escape(template)}\n(?:.*\n)*?\s*loop: (.*)", tasks)
        assert found and variable in found.group(1), template


@pytest.mark.parametrize(
    ("settings", "kind", "expected"),
    [
        ({"comfyui_model_store": "/srv/m\nExecStartPre=+touch pwned"}, "path", "comfyui_model_store '/srv/m\\nExec"),
        ({"comfyui_model_store": "/srv/models\n"}, "path", "'/srv/models\\n' must be an absolute path"),
        ({"comfyui_model_store": "/srv/a /"}, "path", "'/srv/a /' must be an absolute path"),
        ({"comfyui_config_root": "etc/comfybake"}, "path", "must be an absolute path"),
        ({"comfyui_user": "comfy\n"}, "account", "comfyui_user 'comfy\\n' must be a user or group name"),
        ({"comfyui_model_store_owner": "root\nGroup=root"}, "account", "must be a user or group name"),
        ({"comfyui_group": "-x"}, "account", "must be a user or group name"),
        ({"url": "https://example.com/\n"}, "url", "must be a URL"),
        ({"branch": "570\n"}, "digits", "branch '570\\n' must be digits only"),
        ({"folders": {"loras": ["loras\n/etc"]}}, "text", "folders['loras'][0] 'loras\\n/etc' must be text without"),
        ({"folders": {"lo\u2028ras": []}}, "text", "folders key 'lo\\u2028ras' must be text"),
        ({"description": "a\x85b"}, "text", "must be text without line breaks"),
    ],
)
def test_setting_problems_names_the_variable_and_refuses_every_line_break(
    settings: dict[str, Any], kind: str, expected: str
) -> None:
    problems = setting_problems(settings, kind)
    assert len(problems) == 1 and expected in problems[0], problems


def test_setting_problems_passes_plain_values() -> None:
    assert setting_problems({"a": "/srv/comfybake/models", "b": "/", "c": "/var/lib/x_y-1.2"}, "path") == []
    assert setting_problems({"a": "comfybake", "b": "root", "c": "_x", "d": "1000"}, "account") == []
    assert setting_problems({"a": "https://developer.download.nvidia.com/compute/cuda/repos/"}, "url") == []
    assert setting_problems({"a": ["x", 1, True, None, {"k": "v w"}]}) == []
    assert setting_problems({"a": "570"}, "digits") == []
    with pytest.raises(AnsibleFilterError, match="kind 'shell' is not one of"):
        setting_problems({}, "shell")


def test_no_preflight_matches_a_pattern_anchored_with_dollar() -> None:
    """Jinja's `match` test is re.match: '^[0-9]+$' accepts '570\\n'. Full checks use fullmatch."""
    anchored = re.compile(r"""(?:\bmatch\(\s*|['"]match['"],\s*)'[^']*\$'""")
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in [*ROOT.glob("roles/**/*.yml"), *ROOT.glob("playbooks/**/*.yml")]
        for line in path.read_text().splitlines()
        if anchored.search(line)
    ]
    assert found == []


def test_no_python_check_matches_a_pattern_anchored_with_dollar() -> None:
    """A pattern written `^...$` means the whole value; with .match or .search, `$` also matches
    before a final line break. Such a pattern ends with \\Z or is used with fullmatch."""
    compiled = re.compile(r"""(\w+)\s*=\s*re\.compile\(\s*r?["']\^[^"']*(?<!\\)\$["']""")
    inline = re.compile(r"""re\.(?:match|search)\(\s*r?["']\^[^"']*(?<!\\)\$["']""")
    found = []
    for path in [*ROOT.glob("plugins/**/*.py"), *ROOT.glob("src/**/*.py")]:
        text = path.read_text()
        found += [f"{path.relative_to(ROOT)}: {line}" for line in text.splitlines() if inline.search(line)]
        for name in compiled.findall(text):
            if re.search(rf"\b{name}\.(?:match|search)\(", text):
                found.append(f"{path.relative_to(ROOT)}: {name} is anchored with $ and used with match or search")
    assert found == []


# The engines' own full checks (imported here, where they are used, so that this module does
# not depend on them to run the template checks above).
def test_a_commit_a_node_name_and_a_torch_pin_are_matched_in_full() -> None:
    from ansible_collections.comfybake.core.plugins.module_utils.environment.errors import EnvError
    from ansible_collections.comfybake.core.plugins.module_utils.environment.spec import (
        _NODE_NAME,
        COMMIT,
        torch_constraint,
    )

    commit = "0123456789abcdef0123456789abcdef01234567"
    assert COMMIT.match(commit) and not COMMIT.match(commit + "\n")
    assert _NODE_NAME.match("ComfyUI-Impact-Pack") and not _NODE_NAME.match("ComfyUI-Impact-Pack\n")
    assert torch_constraint("env", "torch==2.13.0+cpu") == "torch==2.13.0+cpu"
    with pytest.raises(EnvError, match="must be an exact pin"):
        torch_constraint("env", "torch==2.13.0+cpu\n")


def test_a_model_hash_is_matched_in_full(tmp_path: Path) -> None:
    from ansible_collections.comfybake.core.plugins.module_utils.fetch import ManifestError, Options, parse_manifest

    options = Options.from_params({"store": str(tmp_path)})
    entry = {"url": "https://example.com/a.safetensors", "dest": "checkpoints/a.safetensors", "sha256": "ab" * 32}
    assert parse_manifest([entry], options)[0].sha256 == "ab" * 32
    with pytest.raises(ManifestError, match="sha256 must be 64 hex digits"):
        parse_manifest([entry | {"sha256": "ab" * 32 + "\n"}], options)
