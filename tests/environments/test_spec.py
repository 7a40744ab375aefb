"""An environment as written in comfyui_environments becomes the engine's Spec; every key is read
and checked by the engine alone, and a problem names the environment, the key and what it accepts."""

from __future__ import annotations

import re
from typing import Any

import pytest
from ansible_collections.comfybake.core.plugins.filter.environments import environment_problems
from ansible_collections.comfybake.core.plugins.modules import environment as module
from harness.environments import engine
from harness.tools import ROOT

COMFYUI = "https://github.com/comfyanonymous/ComfyUI.git"
NODE = "https://github.com/comfybake-fixtures/ComfyUI-Comfybake-Basic.git"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FLAVORS: dict[str, Any] = {
    "cu128": {
        "index_url": "https://download.pytorch.org/whl/cu128",
        "packages": ["torch==2.13.0+cu128", "torchvision==0.28.0+cu128"],
        "xformers": "xformers==0.0.35",
    },
    "cpu": {"index_url": "https://download.pytorch.org/whl/cpu", "packages": ["torch==2.13.0+cpu"]},
}
SITE: dict[str, Any] = {
    "root": "/opt/comfybake/envs/comm",
    "uv": "/opt/comfybake/tools/bin/uv",
    "torch_flavors": FLAVORS,
    "default_torch_flavor": "cu128",
}


def spec(written: dict[str, Any], **site: Any) -> engine.Spec:
    return engine.environment_spec("comm", written, **{**SITE, **site})


def problem(written: Any, **site: Any) -> str:
    with pytest.raises(engine.EnvError) as failure:
        spec(written, **site)
    return str(failure.value)


def test_a_written_environment_becomes_its_spec_with_the_site_settings() -> None:
    written = {
        "comfyui_repo": COMFYUI,
        "comfyui_version": " v0.8.0 ",
        "xformers": True,
        "custom_nodes": [{"repo": NODE, "version": COMMIT}, {"repo": NODE, "version": COMMIT, "name": "Other"}],
        "protected_packages": ["numpy"],
        "pip_constraints": ["numpy<2"],
        "pip_packages": ["six"],
        "hook": "files/hook.sh",
        "revision": 3,
        "import_gate": False,
        "extra_model_folders": ["insightface"],
        "required_node_classes": ["ComfybakeEcho"],
    }
    result = spec(
        written, protected_packages=["pillow"], config_dir="/etc/comfybake/envs/comm", python="/usr/bin/python3"
    )
    assert result.comfyui == engine.Source("ComfyUI", COMFYUI, "v0.8.0")
    assert result.custom_nodes == [
        engine.Source("ComfyUI-Comfybake-Basic", NODE, COMMIT),
        engine.Source("Other", NODE, COMMIT),
    ]
    assert result.torch_flavor == "cu128"  # the site's default flavour
    assert result.torch_packages == ["torch==2.13.0+cu128", "torchvision==0.28.0+cu128", "xformers==0.0.35"]
    assert result.torch_index_url == "https://download.pytorch.org/whl/cu128"
    assert result.protected_packages == ["pillow", "numpy"]  # the site's, then the environment's
    assert (result.pip_constraints, result.pip_packages) == (["numpy<2"], ["six"])
    assert result.hook == "/etc/comfybake/envs/comm/hook"  # where the role installs it
    assert result.extra_model_paths == "/etc/comfybake/envs/comm/extra_model_paths.yaml"
    assert result.revision == "3"
    assert result.import_gate is False  # the environment's own setting wins over the site's
    assert (result.root, result.uv, result.python) == (SITE["root"], SITE["uv"], "/usr/bin/python3")
    engine.spec.validate(result, check_mode=True)


def test_what_an_environment_leaves_out_comes_from_the_site() -> None:
    result = spec({"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0", "torch_flavor": "cpu", "xformers": True})
    assert result.torch_packages == ["torch==2.13.0+cpu"]  # cpu has no xformers pin
    assert result.torch_index_url == "https://download.pytorch.org/whl/cpu"
    assert (result.custom_nodes, result.protected_packages, result.revision) == ([], [], "")
    assert (result.hook, result.extra_model_paths, result.import_gate) == (None, None, True)
    assert spec({"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0"}, import_gate=False).import_gate is False


def test_torch_packages_and_index_override_the_flavour() -> None:
    wheel = "/srv/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    written = {"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0", "torch_flavor": "mine", "xformers": True}
    result = spec({**written, "torch_packages": [wheel]})
    assert (result.torch_flavor, result.torch_packages, result.torch_index_url) == ("mine", [wheel], None)
    result = spec({**written, "torch_flavor": "cu128", "torch_packages": [wheel], "torch_index_url": ""})
    assert (result.torch_packages, result.torch_index_url) == ([wheel], "")


def test_without_config_dir_the_hook_is_a_path_on_the_host() -> None:
    result = spec({"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0", "hook": "/srv/hooks/comm.sh"})
    assert (result.hook, result.extra_model_paths) == ("/srv/hooks/comm.sh", None)


def test_an_unknown_key_is_named_with_the_keys_an_environment_takes() -> None:
    message = problem({"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0", "torch_flavour": "cpu"})
    assert message.startswith("environment comm: unknown key 'torch_flavour' (did you mean torch_flavor?);")
    assert "an environment takes comfyui_repo, comfyui_version, torch_flavor, torch_packages," in message
    assert message.endswith(", ".join(engine.ENVIRONMENT_KEYS))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("xformers", "yes", "xformers must be true or false, got 'yes' (a string)"),
        ("import_gate", 0, "import_gate must be true or false, got 0 (an integer)"),
        ("comfyui_version", None, "comfyui_version must be a tag or a full 40-hex commit, a string, got null"),
        ("comfyui_repo", "", "comfyui_repo must be the git URL of ComfyUI, a string, got '' (a string)"),
        ("pip_packages", "six", "pip_packages must be a list of requirements, strings, got 'six' (a string)"),
        ("pip_constraints", [["numpy<2"]], "pip_constraints must be a list of constraints (numpy<2), strings, got"),
        ("torch_index_url", None, 'torch_index_url must be the URL of the index that serves the torch packages, or ""'),
        ("revision", True, "revision must be any string, got true (a boolean)"),
        ("custom_nodes", {"repo": NODE}, "custom_nodes must be a list of mappings with repo, version and optionally"),
        ("extra_model_folders", "insightface", "extra_model_folders must be a list of model folder keys, strings"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_what_the_key_accepts(key: str, value: Any, expected: str) -> None:
    written = {"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0", key: value}
    assert problem(written).startswith(f"environment comm: {expected}")


def test_custom_nodes_are_checked_key_by_key() -> None:
    nodes = [{"repo": NODE, "version": COMMIT}, {"repo": NODE, "ref": "main"}, {"repo": NODE, "version": True}]
    message = problem({"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0", "custom_nodes": nodes})
    assert message.splitlines() == [
        "environment comm:",
        "- custom_nodes[1]: unknown key 'ref'; a custom node takes repo, version, name, writable",
        "- custom_nodes[1]: version is missing",
        "- custom_nodes[2]: version must be a full 40-hex commit, a string, got true (a boolean)",
    ]


def test_every_problem_is_reported_at_once() -> None:
    message = problem({"comfyui_version": "v0.8.0", "torch_flavor": "rocm", "hook": 1})
    assert message.splitlines() == [
        "environment comm:",
        "- hook must be the path of a script on the controller, a string, got 1 (an integer)",
        "- comfyui_repo is missing; it must be the git URL of ComfyUI, a string",
        "- torch flavour rocm is not in torch_flavors (cu128, cpu); pick one with torch_flavor, or set torch_packages",
    ]


def test_an_environment_must_be_a_mapping_and_its_flavour_well_formed() -> None:
    assert problem(["comfyui_repo"]) == "environment comm must be a mapping of keys (docs/environments.md), got a list"
    broken = {"cu128": {"packages": "torch==2.13.0+cu128", "index": "x"}}
    message = problem({"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0"}, torch_flavors=broken)
    assert "- torch flavour cu128 (torch_flavors): unknown key 'index' (did you mean index_url?);" in message
    assert "- torch flavour cu128 (torch_flavors): packages must be a list of exact pins or wheel files" in message


def test_the_module_passes_every_site_option_to_the_engine() -> None:
    """The module's options are the environment as written plus settings the engine takes."""
    params = {name: option.get("default") for name, option in module.ARGUMENT_SPEC.items()}
    params.update(name="comm", environment={"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0"}, **SITE)
    site = {key: value for key, value in params.items() if key not in module.MODULE_OPTIONS}
    result = module.environment_spec(params["name"], params["environment"], **site)
    assert result.torch_packages == FLAVORS["cu128"]["packages"]
    assert result.keep_releases == module.ARGUMENT_SPEC["keep_releases"]["default"]


def test_the_preflight_filter_reports_what_the_engine_finds() -> None:
    good = {"comfyui_repo": COMFYUI, "comfyui_version": "v0.8.0"}
    assert environment_problems({"comm": good}, FLAVORS, "cu128") == []
    problems = environment_problems(
        {
            "comm": good,
            "aua-sp": {**good, "xformer": True},
            "moving": {**good, "custom_nodes": [{"repo": NODE, "version": "main"}]},
            "elsewhere": {**good, "custom_nodes": [{"repo": "https://example.com/x.git", "version": COMMIT}]},
        },
        FLAVORS,
        "cu128",
        ["https://github.com/comfybake-fixtures/"],
    )
    assert len(problems) == 3
    assert problems[0].startswith("environment aua-sp: unknown key 'xformer' (did you mean xformers?)")
    assert problems[1].startswith("environment moving: custom node ComfyUI-Comfybake-Basic: version must be a full")
    assert "is not allowlisted" in problems[2]
    assert environment_problems([good]) == [
        "comfyui_environments must map environment names to environments, got a list"
    ]


def test_the_documented_keys_are_the_engine_keys() -> None:
    """docs/environments.md documents each key the engine reads, and no other."""
    text = (ROOT / "docs" / "environments.md").read_text()
    table = text.split("## Keys of an environment", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    documented = [key for row in rows for key in re.findall(r"`([a-z_]+)`", row)]
    assert documented == list(engine.ENVIRONMENT_KEYS)
