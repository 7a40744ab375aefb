"""Filter `setting_problems`: what is wrong with role-wide settings that templates write into
files (unit files, the container entrypoint, apt's sources and pins); its documentation is in
`setting_problems.yml` beside this one.

A role's preflight asserts that the list is empty, so a line break in an inventory string
(which would add a line such as `ExecStartPre=+...` to a unit) fails before any file is
written. Pure: it reads only its arguments. Each pattern is matched in full (`fullmatch`):
`re.match` with `$` accepts a trailing line break.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

# What ends a line somewhere: C0 and C1 controls (NEL too), DEL, and Unicode's line and
# paragraph separators.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Each kind: the pattern a whole value must match (None: any text without a control
# character), and what to write instead.
KINDS: dict[str, tuple[re.Pattern[str] | None, str]] = {
    "text": (None, "text without line breaks or other control characters"),
    "path": (
        re.compile(r"/[A-Za-z0-9_@+=:,./-]*"),
        "an absolute path of letters, digits and _@+=:,./- (no space, quote or line break)",
    ),
    "account": (
        re.compile(r"[a-z_][a-z0-9_-]{0,31}|[0-9]+"),
        "a user or group name (up to 32 lower-case letters, digits, '_' or '-', not starting with a digit "
        "or '-') or a numeric id",
    ),
    "url": (
        re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\x00-\x1f\x7f-\x9f\u2028\u2029]+"),
        "a URL such as https://host/path, without spaces or line breaks",
    ),
    "digits": (re.compile(r"[0-9]+"), "digits only"),
    # Also parsed with ipaddress (1.2.3.4.5 matches the pattern, but systemd would drop it).
    "network": (
        re.compile(r"[0-9A-Fa-f.:]+(/[0-9]{1,3})?"),
        "one IP address or network as systemd's IPAddressAllow= takes it, such as 10.0.0.7 or 10.0.0.0/24",
    ),
}


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _strings(where: str, value: Any) -> Iterator[tuple[str, Any]]:
    """Every scalar of `value` (lists and mappings walked, keys too), with where it is."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield f"{where} key", key
            yield from _strings(f"{where}[{key!r}]", item)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _strings(f"{where}[{index}]", item)
    else:
        yield where, value


def setting_problems(settings: Any, kind: str = "text") -> list[str]:
    """One message per value of `settings` (variable name to value) that is not of `kind`; [] when all are."""
    if kind not in KINDS:
        raise AnsibleFilterError(f"setting_problems - kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(settings, Mapping):
        raise AnsibleFilterError("setting_problems - give a mapping of variable names to their values")
    pattern, wanted = KINDS[kind]
    problems = []
    for name, value in settings.items():
        for where, item in _strings(str(name), value):
            if kind == "text" and (item is None or isinstance(item, (bool, int, float))):
                continue  # a number or a boolean is written as digits or a word
            text = item if isinstance(item, str) else None
            if (
                text is None
                or CONTROL.search(text)
                or (pattern is not None and not pattern.fullmatch(text))
                or (kind == "network" and not _is_network(text))
            ):
                problems.append(f"{where} {item!r} must be {wanted}")
    return problems


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"setting_problems": setting_problems}
