# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""Keeping secrets out of what comfybake prints and stores: one implementation for all of it.

Private to comfybake. Four kinds of secret are recognised:

- credentials in a URL (`https://user:token@host/simple`): the user info becomes `***`;
- the value of a setting whose name says it is a secret (`comfyui_models_hf_token`, a
  `password`, an `api_key`, ...): a non-empty string becomes `<redacted>`;
- a value the caller marks as secret (`hidden`: the filter plugin marks vaulted values);
- the secrets a run holds (`scrub`: the model engine's tokens), wherever they appear in a text,
  since a server may echo them back in a header or a redirect.

Empty values stay empty, so a reader still sees that a secret is not set. Standard library
only: the environment engine, the modules, the filter plugins and the host CLI share it.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

REDACTED = "<redacted>"

# The user info of a URL: everything between `scheme://` and the last `@` of the authority.
_USERINFO = re.compile(r"(://)[^/?#\s'\"<>]*@")
# Names of settings that hold secrets, matched on whole words of a snake_case or kebab-case name.
_SECRET_NAME = re.compile(
    r"(^|[_\-.])(tokens?|passwords?|passwd|secrets?|credentials?|api_?keys?|private_?keys?|auth)($|[_\-.])",
    re.IGNORECASE,
)
# A key that names a setting (`comfyui_models_hf_token`, `api-key`), not data keyed by a path or
# file name (a BOM's `loras/detail-tokens.safetensors`), whose values are never secrets by name.
_SETTING = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# Values shaped like a Hugging Face token, wherever they appear.
_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def redact(text: str) -> str:
    """Drop credentials embedded in URLs (`https://user:token@host` -> `https://***@host`) and
    values shaped like a token."""
    return _TOKEN_SHAPE.sub(REDACTED, _USERINFO.sub(r"\1***@", text))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every one of `secrets` (the values a run holds: tokens, URL credentials) replaced
    wherever it appears, as given or percent-encoded, then `redact`ed: for messages built from what
    a server sent (a header or a redirect that echoes the request's token)."""
    forms = {
        form
        for secret in secrets
        if secret
        for form in (
            secret,
            urllib.parse.quote(secret, safe=""),
            urllib.parse.quote(secret),
            urllib.parse.quote_plus(secret),
        )
    }
    for form in sorted(forms, key=len, reverse=True):  # a longer form before a secret it contains
        text = text.replace(form, REDACTED)
    return redact(text)


def secret_name(name: str) -> bool:
    """Whether a setting's name says it holds a secret (`comfyui_models_hf_token`, `db_password`);
    never for a path or file name (`loras/detail-tokens.safetensors`)."""
    return bool(_SETTING.fullmatch(name) and _SECRET_NAME.search(name))


def redact_data(value: Any, hidden: Callable[[Any], bool] | None = None, secret: bool = False) -> Any:
    """A copy of `value` (mappings, lists, strings, scalars) with every secret replaced: URL
    credentials in any string, non-empty strings under a key that names a secret, and values
    for which `hidden` is true. Keys are kept; other scalars are kept as they are."""
    if hidden is not None and hidden(value) and value not in ("", None):
        return REDACTED
    if isinstance(value, Mapping):
        return {
            key: redact_data(item, hidden, secret or (isinstance(key, str) and secret_name(key)))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_data(item, hidden, secret) for item in value]
    if isinstance(value, str):
        if secret and value:
            return REDACTED
        return redact(str(value))
    return value


def url_credentials(value: Any) -> set[str]:
    """The credentials in every URL found in `value` (strings, mappings, lists): each user info
    and its password, as written and percent-decoded, for Ansible's `no_log_values`."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for item in value.values():
            found |= url_credentials(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found |= url_credentials(item)
    elif isinstance(value, str):
        for match in _USERINFO.finditer(value):
            userinfo = match.group(0)[3:-1]
            password = userinfo.partition(":")[2]
            for part in (userinfo, password):
                if part:
                    found.update({part, urllib.parse.unquote(part)})
    return found


def without_credentials(url: str) -> str:
    """`url` with its user info removed (`https://user:token@host/simple` -> `https://host/simple`)."""
    return _USERINFO.sub(r"\1", url)
