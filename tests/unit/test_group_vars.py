"""The top-level group_vars/ is loaded by every playbook, under the inventory's groups."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from harness.tools import venv_bin


def show_config(root: Path, env: dict[str, str], inventory: Path) -> dict[str, dict[str, object]]:
    env = {**env, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"}
    done = subprocess.run(
        [venv_bin("ansible-playbook"), "-i", str(inventory), "playbooks/show_config.yml"],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    task = json.loads(done.stdout)["plays"][0]["tasks"][0]["hosts"]
    return {host: result["msg"] for host, result in task.items()}


def test_site_settings_reach_every_host(root: Path, ansible_env: dict[str, str], tmp_path: Path) -> None:
    site = yaml.safe_load((root / "group_vars" / "all" / "comfybake.yml").read_text())
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump({"comfybake": {"hosts": {"a": None, "b": None}, "vars": {"ansible_connection": "local"}}})
    )
    config = show_config(root, {**ansible_env, "COMFYBAKE_EXTRA_CA_BUNDLE": ""}, inventory)
    assert config["a"]["comfyui_model_store"] == site["comfyui_model_store"]
    assert config["b"]["comfyui_extra_ca_certificates"] == []


def test_inventory_groups_and_hosts_override_the_site(root: Path, ansible_env: dict[str, str], tmp_path) -> None:
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "host_vars").mkdir()
    (inventory / "hosts.yml").write_text(
        yaml.safe_dump({"comfybake": {"hosts": {"a": None, "b": None}, "vars": {"ansible_connection": "local"}}})
    )
    (inventory / "group_vars" / "comfybake.yml").write_text("comfyui_model_store: /mnt/fleet\n")
    (inventory / "host_vars" / "b.yml").write_text("comfyui_model_store: /mnt/b\n")
    config = show_config(root, {**ansible_env, "COMFYBAKE_EXTRA_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"},
                         inventory)  # fmt: skip
    assert config["a"]["comfyui_model_store"] == "/mnt/fleet"
    assert config["b"]["comfyui_model_store"] == "/mnt/b"
    assert config["a"]["comfyui_extra_ca_certificates"] == ["/etc/ssl/certs/ca-certificates.crt"]


def test_show_config_prints_no_secret(root: Path, ansible_env: dict[str, str], tmp_path: Path) -> None:
    """Tokens (one vaulted, one plain) and index credentials print as <redacted> and ***, at -vvv
    too; every other setting prints as set."""
    canary = {
        "hf": "SHOWCONFIGcanaryHF",  # vaulted, under a secret's name
        "note": "SHOWCONFIGcanaryNOTE",  # vaulted, under a name that says nothing
        "civitai": "SHOWCONFIGcanaryCIVITAI",  # plain, under a secret's name
        "index": "SHOWCONFIGcanaryINDEX",  # plain, in a URL
    }
    password = tmp_path / "vault-password"
    password.write_text("test-vault-password\n")

    def vault(name: str, secret: str) -> str:
        return subprocess.run(
            [venv_bin("ansible-vault"), "encrypt_string", "--vault-password-file", str(password), "--stdin-name", name],
            input=secret, cwd=root, env=ansible_env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

    vaulted = vault("comfyui_models_hf_token", canary["hf"]) + vault("comfyui_site_note", canary["note"])
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(
        yaml.safe_dump({"comfybake": {"hosts": {"a": None}, "vars": {"ansible_connection": "local"}}})
    )
    index = f"https://builder:{canary['index']}@pypi.example/simple"
    plain = {
        "comfyui_model_store": "/mnt/fleet",
        "comfyui_models_boot_tokens": True,
        "comfyui_models_civitai_token": canary["civitai"],
        "comfyui_environments_index_url": index,
        "comfyui_environments_extra_index_urls": [index],
    }
    (inventory / "group_vars" / "comfybake.yml").write_text(yaml.safe_dump(plain) + vaulted)
    env = {**ansible_env, "ANSIBLE_VAULT_PASSWORD_FILE": str(password), "COMFYBAKE_EXTRA_CA_BUNDLE": ""}

    printed = subprocess.run(
        [venv_bin("ansible-playbook"), "-vvv", "-i", str(inventory), "playbooks/show_config.yml"],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert printed.returncode == 0, printed.stdout + printed.stderr
    output = printed.stdout + printed.stderr
    assert [name for name, secret in canary.items() if secret in output] == []
    config = show_config(root, env, inventory)["a"]
    assert config["comfyui_model_store"] == "/mnt/fleet", "a setting that is no secret prints as set"
    assert config["comfyui_models_hf_token"] == config["comfyui_models_civitai_token"] == "<redacted>"
    assert config["comfyui_site_note"] == "<redacted>", "a vaulted value is a secret whatever its name"
    assert config["comfyui_environments_index_url"] == "https://***@pypi.example/simple"
    assert config["comfyui_environments_extra_index_urls"] == ["https://***@pypi.example/simple"]
    assert config["comfyui_models_boot_tokens"] is True, "a flag named after tokens is no secret"
