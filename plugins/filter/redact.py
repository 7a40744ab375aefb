"""Filter `redact`: a copy of a value with every secret replaced, for what is printed or stored
(`playbooks/show_config.yml`, the image's bill of materials); its documentation is in
`redact.yml` beside this one.

It adds no rule of its own: the rules are those the environment engine and the modules use
(`module_utils/redaction.py`), plus vaulted values, which only the controller can tell apart.
"""

from __future__ import annotations

from typing import Any

from ansible_collections.comfybake.core.plugins.module_utils.redaction import redact_data


def _vaulted(value: Any) -> bool:
    """Whether a value came from Ansible Vault (decrypted or not)."""
    try:
        from ansible.parsing.vault import VaultHelper  # ansible-core 2.19 and later
    except ImportError:
        return type(value).__name__ == "AnsibleVaultEncryptedUnicode"
    return VaultHelper.get_ciphertext(value, with_tags=False) is not None


def redact(value: Any) -> Any:
    """`value` with URL credentials, secret-named settings and vaulted values replaced."""
    return redact_data(value, hidden=_vaulted)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"redact": redact}
