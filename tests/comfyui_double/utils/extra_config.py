"""Load `extra_model_paths.yaml` files the way ComfyUI does, with the standard library only.

The double cannot depend on PyYAML, so it reads the subset of YAML such files use: top-level
sections holding `key: value` pairs, quoted or plain scalars, `true`/`false`/`null`, and
block scalars (`|`, `|-`) for several paths. Anything else is rejected with its line number
rather than guessed at.
"""

from __future__ import annotations

import os
import re

import folder_paths

_KEY = re.compile(r"^(?P<key>[A-Za-z0-9_.\-]+)\s*:(?:\s+(?P<value>.*))?$")


class ExtraConfigError(ValueError):
    """An extra_model_paths.yaml file uses YAML the double does not read."""


def _strip_comment(text: str) -> str:
    quote = ""
    for index, char in enumerate(text):
        if char in "'\"" and not quote:
            quote = char
        elif char == quote:
            quote = ""
        elif char == "#" and not quote and (index == 0 or text[index - 1] in " \t"):
            return text[:index].rstrip()
    return text.rstrip()


def _scalar(text: str) -> object:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("", "~", "null"):
        return None
    return text


def parse(text: str, source: str = "<string>") -> dict[str, object]:
    """Parse the YAML subset into {section: {key: value} | None}."""
    lines = text.splitlines()
    result: dict[str, object] = {}
    section: dict[str, object] | None = None
    section_name = ""
    index = 0
    while index < len(lines):
        raw = lines[index]
        index += 1
        line = _strip_comment(raw)
        if not line.strip() or line.strip() == "---":
            continue
        indent = len(line) - len(line.lstrip(" "))
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ExtraConfigError(f"{source}:{index}: tabs are not allowed for indentation")
        match = _KEY.match(line.strip())
        if not match:
            raise ExtraConfigError(f"{source}:{index}: expected 'key: value', got {raw.strip()!r}")
        key, value = match.group("key"), (match.group("value") or "").strip()
        if indent == 0:
            if value:
                result[key] = _scalar(value)
                section = None
            else:
                section, section_name = {}, key
                result[key] = None  # a section with no keys is null, as in YAML
            continue
        if section is None:
            raise ExtraConfigError(f"{source}:{index}: {key!r} is indented but no section opens above it")
        result[section_name] = section
        if value in ("|", "|-"):
            block: list[str] = []
            block_indent = None
            while index < len(lines):
                candidate = lines[index]
                if candidate.strip():
                    this_indent = len(candidate) - len(candidate.lstrip(" "))
                    if this_indent <= indent:
                        break
                    block_indent = this_indent if block_indent is None else block_indent
                    block.append(candidate[block_indent:].rstrip())
                else:
                    block.append("")
                index += 1
            while block and not block[-1]:
                block.pop()
            section[key] = "\n".join(block) + ("\n" if value == "|" and block else "")
        elif value.startswith(("|", ">", "[", "{", "&", "*", "!")):
            raise ExtraConfigError(f"{source}:{index}: unsupported YAML for {key!r}: {value!r}")
        else:
            section[key] = _scalar(value)
    return result


def load_extra_path_config(yaml_path: str) -> None:
    """Register every path of every section, as ComfyUI's utils/extra_config.py does."""
    with open(yaml_path, encoding="utf-8") as stream:
        config = parse(stream.read(), yaml_path)
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
    for conf in config.values():
        if not isinstance(conf, dict):
            continue
        conf = dict(conf)
        base_path = conf.pop("base_path", None)
        if base_path is not None:
            base_path = os.path.expandvars(os.path.expanduser(str(base_path)))
            if not os.path.isabs(base_path):
                base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
        is_default = bool(conf.pop("is_default", False))
        for folder_name, value in conf.items():
            for entry in str(value if value is not None else "").split("\n"):
                if not entry:
                    continue
                if base_path:
                    full_path = os.path.join(base_path, entry)
                elif os.path.isabs(entry):
                    full_path = entry
                else:
                    full_path = os.path.abspath(os.path.join(yaml_dir, entry))
                folder_paths.add_model_folder_path(folder_name, os.path.normpath(full_path), is_default)
