"""The one redaction of secrets (plugins/module_utils/redaction.py): URLs, secret-named settings,
token-shaped values and what the module hands Ansible's no_log."""

from __future__ import annotations

import pytest

from comfybake.engine.redaction import REDACTED, redact, redact_data, scrub, url_credentials, without_credentials


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:tok@host/simple", "https://***@host/simple"),
        ("https://tok@host:8443/simple", "https://***@host:8443/simple"),
        ("https://user:p@ss@host/x", "https://***@host/x"),  # an unencoded @ in the password
        ("uv failed: https://u:t@a/s and https://b/s", "uv failed: https://***@a/s and https://b/s"),
        ("'https://u:t@a/s', 'git@github.com:o/r'", "'https://***@a/s', 'git@github.com:o/r'"),
        ("https://host/simple?x=a@b", "https://host/simple?x=a@b"),
        ("token hf_abcdefghijklmnopqrstuvwxyz12 sent", f"token {REDACTED} sent"),
        ("hf_transfer", "hf_transfer"),
    ],
)
def test_redact_drops_url_credentials_and_token_shapes(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_data_walks_values_and_keeps_what_is_no_secret() -> None:
    data = {
        "comfyui_models_hf_token": "secret",
        "comfyui_models_civitai_token": "",
        "comfyui_models_boot_tokens": True,
        "nested": {"db_password": ["a", "b"], "index": "https://u:t@h/s", "port": 8188},
        "hashes": ["sha256:abc"],
    }
    assert redact_data(data) == {
        "comfyui_models_hf_token": REDACTED,
        "comfyui_models_civitai_token": "",
        "comfyui_models_boot_tokens": True,
        "nested": {"db_password": [REDACTED, REDACTED], "index": "https://***@h/s", "port": 8188},
        "hashes": ["sha256:abc"],
    }
    assert redact_data({"note": "vaulted"}, hidden=lambda value: value == "vaulted") == {"note": REDACTED}
    # Data keyed by a file name (a BOM's models) is not a setting: its name hides nothing.
    files = {"loras/detail-tokens.safetensors": {"sha256": "ab12", "source": "https://u:t@h/f"}}
    assert redact_data({"files": files}) == {
        "files": {"loras/detail-tokens.safetensors": {"sha256": "ab12", "source": "https://***@h/f"}}
    }


def test_url_credentials_are_what_no_log_masks() -> None:
    params = {"index_url": "https://user:p%40ss@h/s", "flavors": {"cpu": {"index_url": "https://tok@h2/s"}}, "x": None}
    assert url_credentials(params) == {"user:p%40ss", "user:p@ss", "p%40ss", "p@ss", "tok"}
    assert without_credentials("https://user:tok@h/s") == "https://h/s"


def test_gateway_secrets_of_the_inventory_are_redacted() -> None:
    keys = {"comfyui_gateway_keys": [{"name": "ci", "scope": ["*"], "api_key": "Y2k6c2VjcmV0c2VjcmV0"}]}
    users = {"comfyui_gateway_users": [{"name": "alice", "scope": ["*"], "password": "a long password"}]}
    assert redact_data(keys) == {"comfyui_gateway_keys": [{"name": "ci", "scope": ["*"], "api_key": "<redacted>"}]}
    assert redact_data(users)["comfyui_gateway_users"][0]["password"] == "<redacted>"


def test_scrub_drops_the_secrets_a_run_holds_in_any_form() -> None:
    """What a server echoed back: the token as sent, percent-encoded, and inside a URL."""
    token = "s3cr3t/tok+en"
    text = f"404 ({token}) at https://h/x/{token.replace('/', '%2F').replace('+', '%2B')}/f and https://u:p@h/"
    assert scrub(text, {token, ""}) == f"404 ({REDACTED}) at https://h/x/{REDACTED}/f and https://***@h/"
    assert scrub("nothing to hide", set()) == "nothing to hide"
