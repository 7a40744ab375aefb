# PRIVATE to comfybake: not a public API; it may change without notice.
"""The settings of a fetch run and the keys of a manifest entry, each declared once.

Every user-facing setting is a field of Options whose metadata says how a user gives it (its
Ansible type, choices, environment fallback, whether it is a secret and which commands take it).
From these declarations come the module's argument spec (argument_spec), the CLI's flags
(add_arguments), the one conversion from user values to an Options object (Options.from_params)
and the module documentation (render_documentation, written to the doc fragment
comfybake.core.fetch_options by scripts/render-docs.py and kept in sync by a test).
ENTRY is the same table for the keys of one manifest entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import os
import pwd
import re
import textwrap
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..redaction import url_credentials
from .errors import ManifestError

MiB = 1 << 20
SEGMENT = 16 * MiB  # unit of parallel ranges and of resume checkpoints
FETCH_ONLY = ("fetch",)  # settings of the store, which `models lock` does not touch
STORE_COMMANDS = ("fetch", "du", "ls", "prune")  # the settings that name the store and its policy
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?)(B?)\s*\Z", re.IGNORECASE)


@dataclass(frozen=True)
class Setting:
    """How a user gives one value: its Ansible type and documentation, its CLI flag."""

    type: str  # the Ansible type: str, int, float, bool, path, raw or list (of str)
    description: tuple[str, ...]
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()
    env: str | None = None  # the environment variable it falls back to
    secret: bool = False  # a token: never logged; the CLI reads it from a file, never a flag value
    minimum: int | None = None  # the smallest number allowed
    convert: str | None = None  # how a str becomes the value: octal (a mode), user or group (name or id), url, size
    flag: str | None = None  # the CLI flag when it is not --<name>
    commands: tuple[str, ...] = ("fetch", "lock")


def _convert(name: str, declared: Setting, value: Any) -> Any:
    if declared.choices and value not in declared.choices:
        raise ManifestError(f"{name} must be one of {', '.join(declared.choices)}, got {value!r}")
    if declared.convert == "octal":
        return _octal(name, value)
    if declared.convert in ("user", "group"):
        return _account(name, declared.convert, str(value))
    if declared.convert == "size":
        return parse_size(name, value)
    if declared.type == "list":
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ManifestError(f"{name} must be a list of strings, got {value!r}")
        if declared.convert == "url":
            for item in value:
                _url(name, item)
        return tuple(value)
    if declared.type == "bool":
        if not isinstance(value, bool):
            raise ManifestError(f"{name} must be true or false, got {value!r}")
        return value
    if declared.type in ("int", "float"):
        number = _number(name, declared.type, value)
        if declared.minimum is not None and number < declared.minimum:
            raise ManifestError(f"{name} must be {declared.minimum} or more, got {value!r}")
        return number
    if declared.type == "path":
        return os.path.expanduser(str(value))
    if declared.convert == "url":
        _url(name, str(value))
    return str(value)


def _url(name: str, text: str) -> None:
    try:
        _port = urllib.parse.urlsplit(text).port  # urlsplit checks the host's brackets, .port its range
    except ValueError as error:
        raise ManifestError(f"{name} is not a valid URL ({error}); check its host and port") from None


def _number(name: str, kind: str, value: Any) -> int | float:
    if isinstance(value, bool):
        raise ManifestError(f"{name} must be a number, got {value!r}")
    try:
        return int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise ManifestError(f"{name} must be a{'n integer' if kind == 'int' else ' number'}, got {value!r}") from None


def parse_size(name: str, value: Any) -> int:
    """A size in bytes from a number or a string such as C(200GiB), C(1.5TB) or C(500G).

    KiB, MiB, GiB, TiB and PiB (and K, M, G, T, P alone) are powers of 1024; KB, MB, GB, TB and
    PB are powers of 1000, as disk vendors count.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise ManifestError(f"{name} must be a size such as '200GiB', '1.5TB' or a number of bytes, got {value!r}")
    number, prefix, binary, unit = match.groups()
    power = "KMGTP".find(prefix.upper()) + 1 if prefix else 0  # find("") is 0: a plain number is bytes
    base = 1000 if prefix and unit and not binary else 1024
    if binary and not prefix:
        raise ManifestError(f"{name} must be a size such as '200GiB', '1.5TB' or a number of bytes, got {value!r}")
    return int(float(number) * base**power)


def _octal(name: str, value: Any) -> int:
    text = value if isinstance(value, str) else f"{value:o}" if isinstance(value, int) else repr(value)
    if not re.fullmatch(r"0?[0-7]{3,4}", text):
        raise ManifestError(f"{name} must be an octal string such as '0640', got {value!r}")
    return int(text, 8)


def _account(name: str, kind: str, value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if kind == "user" else grp.getgrnam(value).gr_gid
    except KeyError:
        raise ManifestError(f"{name} {value!r} does not exist on this host; create it first or fix {name}") from None


def setting(type: str, *description: str, default: Any = None, **how: Any) -> Any:  # noqa: A002 - Ansible's word
    """A dataclass field of Options declared with how a user gives it."""
    declared = Setting(type, description, default, **how)
    # pylint cannot see that these fields end up in the class body of Options, where they belong.
    if declared.required:
        return field(metadata={"setting": declared})  # pylint: disable=invalid-field-call
    value = None if default is None else _convert("default", declared, default)
    return field(default=value, repr=not declared.secret, metadata={"setting": declared})  # pylint: disable=invalid-field-call


@dataclass(frozen=True)
class Options:
    """Settings of one run. Tokens live here and nowhere else."""

    store: str = setting(
        "path", "Root of the model store (C(<folder>/<file>)).", required=True, commands=STORE_COMMANDS
    )
    parallel: int = setting("int", "Files fetched at the same time.", default=4, minimum=1)
    connections: int = setting(
        "int", "Ranged connections per file of 64 MiB or more, when the server supports ranges.", default=4, minimum=1
    )
    verify: str = setting(
        "str",
        "C(recorded) trusts a recorded verification while size, mtime and inode are unchanged.",
        "C(full) re-hashes every file in the store that the manifest names.",
        default="recorded",
        choices=("recorded", "full"),
        commands=FETCH_ONLY,
    )
    hf_token: str | None = setting(
        "str", "Hugging Face token, sent only to O(hf_endpoint).", env="HF_TOKEN", secret=True
    )
    civitai_token: str | None = setting(
        "str", "Civitai token, sent only to O(civitai_endpoint).", env="CIVITAI_TOKEN", secret=True
    )
    hf_endpoint: str = setting(
        "str", "The Hugging Face Hub (or a compatible mirror of its API).", default="https://huggingface.co",
        env="HF_ENDPOINT", convert="url",
    )  # fmt: skip
    civitai_endpoint: str = setting(
        "str", "The Civitai site.", default="https://civitai.com", env="CIVITAI_ENDPOINT", convert="url"
    )
    mirrors: tuple[str, ...] = setting(
        "list",
        "Base URLs tried before the origin, as C(<mirror>/<dest path>) (C(https://), C(http://) or C(file://)).",
        "Used only for entries whose SHA-256 is known; no token is ever sent to a mirror.",
        default=[],
        convert="url",
        flag="--mirror",
        commands=FETCH_ONLY,
    )
    allow_http: bool = setting(
        "bool", "Permit plain http for every entry (for sites with an internal http mirror).", default=False
    )
    ca_bundle: str | None = setting("path", "CA bundle used to verify TLS (a proxy's CA); the system bundle otherwise.")
    owner: int | None = setting(
        "str",
        "Owner of the files and created folders (name or uid); the running user otherwise.",
        convert="user",
        commands=FETCH_ONLY,
    )
    group: int | None = setting(
        "str",
        "Group of the files and created folders (name or gid), usually the service group.",
        convert="group",
        commands=FETCH_ONLY,
    )
    mode: int = setting(
        "raw", "Mode of the model files, an octal string.", default="0640", convert="octal", commands=FETCH_ONLY
    )
    directory_mode: int = setting(
        "raw", "Mode of the folders it creates, an octal string.", default="2750", convert="octal", commands=FETCH_ONLY
    )
    retries: int = setting(
        "int", "Retries of a request after 408, 429, 5xx or a broken connection.", default=5, minimum=0
    )
    timeout: float = setting("float", "Connect and read timeout in seconds.", default=30.0, minimum=1)
    archive_max_bytes: int = setting(
        "int", "Largest total uncompressed size of an archive.", default=32 << 30, minimum=0, commands=FETCH_ONLY
    )
    archive_max_members: int = setting(
        "int", "Largest number of members in an archive.", default=10_000, minimum=0, commands=FETCH_ONLY
    )
    allow_pickle: bool = setting(
        "bool",
        "Permit pickle-based files (C(.ckpt), C(.pt), C(.pth), C(.pkl), and any file or archive member whose bytes are"
        " a pickle stream or a PyTorch zip) for every entry. Loading them can run code, so each is scanned with"
        " picklescan before it is moved into place and refused when it imports anything dangerous.",
        default=False,
    )
    budget: int | None = setting(
        "str",
        "Most bytes the store may hold, such as C(200GiB) (powers of 1024) or C(2TB) (powers of 1000); none by"
        " default.",
        "Before the first byte the run checks that the store's usage plus everything it is about to download (an"
        " archive counts its size plus its extracted size: O(models[].extracted_size), else twice the archive's)"
        " fits, and fails naming both numbers otherwise. C(comfybake models prune --budget) removes unreferenced"
        " files, least recently used first, until the store fits.",
        convert="size",
        commands=("fetch", "du", "prune"),
    )
    protected: tuple[str, ...] = setting(
        "list",
        "Globs of paths in the store (such as C(checkpoints/mine-*)) that pruning never removes; one that names"
        " a folder (C(loras/keep/)) protects everything under it. Every models file's globs and the flags add up.",
        default=[],
        commands=("fetch", "prune"),
    )
    prune: bool = setting(
        "bool",
        "After fetching, remove the files in the store that no entry of the manifest references (and their records"
        " and stale partial downloads), except O(protected) globs and files a process has open.",
        default=False,
        commands=FETCH_ONLY,
    )
    # Tuning that users do not set.
    backoff: float = 1.0
    max_retry_wait: float = 120.0
    segment_size: int = SEGMENT
    min_split_size: int = 4 * SEGMENT
    check_mode: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any], check_mode: bool = False) -> Options:
        """The one conversion from what a user wrote (module parameters, a models file, CLI flags).

        A missing or None value falls back to its environment variable, then to its default.
        Modes are octal strings, owner and group names or ids; every bad value raises a
        ManifestError naming it.
        """
        unknown = sorted(str(name) for name in set(params) - set(SETTINGS))  # YAML keys may be numbers
        if unknown:
            raise ManifestError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(SETTINGS)}")
        values: dict[str, Any] = {}
        for name, declared in SETTINGS.items():
            value = params.get(name)
            if value is None and declared.env:
                value = os.environ.get(declared.env) or None
            if value is None and declared.required:
                raise ManifestError(f"{name} is required")
            if value is not None:
                values[name] = _convert(name, declared, value)
        return cls(**values, check_mode=check_mode)

    def secrets(self) -> set[str]:
        """Every credential the run holds: the tokens, and the user info of any URL among the settings."""
        tokens = {getattr(self, name) for name, declared in SETTINGS.items() if declared.secret}
        return {token for token in tokens if token} | url_credentials([getattr(self, name) for name in SETTINGS])


SETTINGS: dict[str, Setting] = {
    spec.name: spec.metadata["setting"] for spec in dataclasses.fields(Options) if "setting" in spec.metadata
}

# The keys of one manifest entry; manifest.parse_manifest checks their values.
ENTRY: dict[str, Setting] = {
    "url": Setting("str", ("Where the file comes from.",), required=True),
    "dest": Setting(
        "str",
        (
            "Path relative to O(store). Ending in C(/) it names a folder (such as C(loras/)) and the file name comes"
            " from the source (Civitai's file name, the Hub path, the URL, or a sanitised C(Content-Disposition));"
            " otherwise it is the exact file path.",
            "Absolute paths, C(..), backslashes and hidden components are refused, and so is any destination that"
            " resolves outside the store through a symlink.",
        ),
        required=True,
    ),
    "sha256": Setting("str", ("Expected SHA-256 (64 hex digits).",)),
    "size": Setting("int", ("Expected size in bytes.",)),
    "extract": Setting(
        "bool",
        (
            "Unpack a zip or tar archive into the folder O(models[].dest). A single wrapping folder named like the"
            " destination is dropped (C(antelopev2.zip) holding C(antelopev2/*)).",
            "Archives with members that escape the folder, links, devices or FIFOs, or that expand past"
            " O(archive_max_bytes) or O(archive_max_members), are refused whole.",
        ),
        default=False,
    ),
    "files": Setting("list", ("Files the extracted folder must contain.",)),
    "state": Setting(
        "str",
        ("C(absent) removes the file (or extracted folder) and its record.",),
        default="present",
        choices=("present", "absent"),
    ),
    "auth": Setting(
        "str",
        (
            "Which token the entry may use. Inferred from the URL (C(hf://) and the Hub host use O(hf_token),"
            " C(civitai://) and the Civitai host use O(civitai_token)); naming a token for any other host is an"
            " error.",
        ),
        choices=("hf", "civitai", "none"),
    ),
    "allow_http": Setting("bool", ("Permit a plain http URL or redirect for this entry.",), default=False),
    "allow_unverified": Setting(
        "bool",
        ("Accept a file whose SHA-256 neither the entry nor the source gives (recorded on first fetch).",),
        default=False,
    ),
    "allow_pickle": Setting(
        "bool",
        (
            "Permit a pickle-based file for this entry (or pickle-based members of its archive); see"
            " O(allow_pickle). It is scanned before it is moved into place.",
        ),
        default=False,
    ),
    "extracted_size": Setting(
        "int",
        (
            "Bytes an archive (O(models[].extract)) takes once unpacked, for O(budget); twice the archive's size"
            " when unset.",
        ),
    ),
}
MODELS = Setting(
    "list",
    ("The manifest, or the C(models) list of a lock written by C(comfybake models lock).",),
    required=True,
)


def argument_spec(env_fallback: Callable[..., Any]) -> dict[str, Any]:
    """The module's argument spec: the manifest and every setting."""
    models = {**_argument(MODELS), "elements": "dict", "options": {n: _argument(s) for n, s in ENTRY.items()}}
    spec = {"models": models}
    for name, declared in SETTINGS.items():
        spec[name] = _argument(declared)
        if declared.env:
            spec[name]["fallback"] = (env_fallback, [declared.env])
    return spec


def _argument(declared: Setting) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": declared.type}
    if declared.type == "list":
        spec["elements"] = "str"
    if declared.required:
        spec["required"] = True
    if declared.default is not None:
        spec["default"] = declared.default
    if declared.choices:
        spec["choices"] = list(declared.choices)
    if declared.secret:
        spec["no_log"] = True
    return spec


def render_documentation() -> str:
    """The options section of the module documentation, as the doc fragment holds it."""
    lines = ["options:", *_document("models", MODELS, 2)]
    lines += ["    elements: dict", "    suboptions:"]
    for name, declared in ENTRY.items():
        lines += _document(name, declared, 6)
    for name, declared in SETTINGS.items():
        lines += _document(name, declared, 2)
    return "\n".join(lines) + "\n"


def _document(name: str, declared: Setting, indent: int) -> list[str]:
    pad = " " * indent
    paragraphs = list(declared.description)
    if declared.env:
        paragraphs.append(f"Falls back to E({declared.env}).")
    lines = [f"{pad}{name}:", f"{pad}  description:"]
    for text in paragraphs:  # a double-quoted YAML string folds its line breaks into spaces
        wrapped = textwrap.wrap(_quote(text), width=110 - indent, break_long_words=False, break_on_hyphens=False)
        lines.append(f"{pad}    - {wrapped[0]}")
        lines += [f"{pad}      {line}" for line in wrapped[1:]]
    lines.append(f"{pad}  type: {declared.type}")
    if declared.type == "list" and name != "models":
        lines.append(f"{pad}  elements: str")
    if declared.required:
        lines.append(f"{pad}  required: true")
    if declared.choices:
        lines.append(f"{pad}  choices: [{', '.join(declared.choices)}]")
    if declared.default is not None:
        lines.append(f"{pad}  default: {_quote(declared.default)}")
    return lines


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, list)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The CLI flags of a command. An unset flag is absent from the namespace (a models file may set it)."""
    for name, declared in SETTINGS.items():
        if command not in declared.commands:
            continue
        flag = declared.flag or "--" + name.replace("_", "-")
        how: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(declared)}
        how["metavar"] = "FILE" if declared.secret else flag[2:].upper().replace("-", "_")
        if declared.secret:
            flag += "-file"
            how["dest"] = name + "_file"
            how["help"] = f"file holding the {_plain(declared.description[0]).split(',')[0]} (else {declared.env})"
        elif declared.type == "bool":
            how.update(action=argparse.BooleanOptionalAction, metavar=None)
        elif declared.type == "list":
            how["action"] = "append"
        elif declared.choices:
            how.update(choices=declared.choices, metavar=None)
        else:
            how["type"] = _checked(name, declared)
        parser.add_argument(flag, **how)


def how_to_set(name: str) -> str:
    """A setting as a user gives it, for a message that says which one to change.

    The module and a models file take its name, the CLI its flag (as add_arguments makes it),
    and the comfyui_models role its variable comfyui_models_<name>.
    """
    declared = SETTINGS[name]
    flag = declared.flag or "--" + name.replace("_", "-")
    return f"{name} ({flag}, comfyui_models_{name})"


def _checked(name: str, declared: Setting) -> Callable[[str], str]:
    """An argparse type: the value checked as Options.from_params will convert it (a usage error, not a traceback)."""

    def check(text: str) -> str:
        try:
            _convert(name, declared, text)
        except ManifestError as error:
            raise argparse.ArgumentTypeError(error.reason) from None
        return text

    return check


def _help(declared: Setting) -> str:
    text = " ".join(_plain(paragraph) for paragraph in declared.description)
    if declared.type == "list":
        text += " Repeatable."
    if declared.default not in (None, [], False):
        text += f" Default {declared.default}."
    if declared.env:
        text += f" Falls back to {declared.env}."
    return text.replace("%", "%%")


def _plain(text: str) -> str:
    """Ansible documentation markup (C(...), O(...), E(...)) as plain text."""
    return re.sub(r"\b[COEV]\(([^)]*)\)", r"\1", text)
