"""Load `extra_model_paths.yaml` files the way ComfyUI does, with the standard library only.

The double cannot depend on PyYAML, so it reads the subset of YAML such files use: top-level
sections holding `key: value` pairs (keys plain or quoted), plain or quoted scalars,
`true`/`false`/`null`, and several paths in one value, written either as a block scalar
(`|`, `|-`) or as a quoted or plain scalar over several lines, folded as YAML folds them (what
PyYAML, and so Ansible's `to_nice_yaml`, writes). Anything else is rejected with its line
number rather than guessed at.
"""

from __future__ import annotations

import os
import re

import folder_paths

_KEY = re.compile(
    r"""^(?:(?P<plain>[^\s'"#\[\]{},&*!|>%@`?:-][^#]*?)|'(?P<single>(?:[^']|'')*)'|"(?P<double>(?:[^"\\]|\\.)*)")"""
    r"""\s*:(?:\s+(?P<value>.*))?$"""
)
_ESCAPES = {
    "0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
    "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\", "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029",
}  # fmt: skip
_HEX = {"x": 2, "u": 4, "U": 8}


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


def _unescape(text: str, where: str) -> str:
    """The content of a double-quoted key (one line)."""
    chars, _escaped_break = _chars(text, '"', where)
    return "".join(char for char, _kept in chars)


# A line of a quoted or plain scalar: each character, and whether an escape wrote it (so folding
# keeps it even when it is white space).
_Chars = list[tuple[str, bool]]


def _chars(piece: str, quote: str, where: str) -> tuple[_Chars, bool]:
    """The characters of one line of a scalar, and whether it ends with an escaped line break."""
    if quote != '"':
        return [(char, False) for char in (piece.replace("''", "'") if quote else piece)], False
    chars: _Chars = []
    index = 0
    while index < len(piece):
        char = piece[index]
        if char != "\\":
            chars.append((char, False))
            index += 1
            continue
        code = piece[index + 1 : index + 2]
        if not code:
            return chars, True
        if code in _ESCAPES:
            chars.append((_ESCAPES[code], True))
            index += 2
            continue
        digits = piece[index + 2 : index + 2 + _HEX.get(code, 0)]
        if code not in _HEX or len(digits) != _HEX[code] or not re.fullmatch(r"[0-9A-Fa-f]+", digits):
            raise ExtraConfigError(f"{where}: unknown escape \\{code} in a double-quoted string")
        chars.append((chr(int(digits, 16)), True))
        index += 2 + len(digits)
    return chars, False


def _strip(chars: _Chars, left: bool, right: bool) -> _Chars:
    start, end = 0, len(chars)
    while left and start < end and chars[start][0] in " \t" and not chars[start][1]:
        start += 1
    while right and end > start and chars[end - 1][0] in " \t" and not chars[end - 1][1]:
        end -= 1
    return chars[start:end]


def _fold(pieces: list[str], quote: str, where: str) -> str:
    """YAML's line folding of a flow scalar written over several lines: a line break becomes a
    space, each empty line between two lines a newline, and indentation is not content; in
    double quotes a backslash at the end of a line joins the next one with nothing between."""
    out: list[str] = []
    empty = 0
    joined = False
    for number, piece in enumerate(pieces):
        chars, escaped_break = _chars(piece, quote, where)
        last = number == len(pieces) - 1
        text = "".join(char for char, _kept in _strip(chars, number > 0, not last and not escaped_break))
        if number == 0 or joined:
            out.append(text)
        elif not text and not last:
            empty += 1
            continue
        else:
            out += ["\n" * empty if empty else " ", text]
            empty = 0
        joined = escaped_break
    return "".join(out)


def _closing_quote(text: str, quote: str) -> int:
    """Index of the quote that ends a quoted scalar in `text`, or -1 when it ends on a later line."""
    index = 0
    while index < len(text):
        if quote == '"' and text[index] == "\\":
            index += 2
            continue
        if text[index] == quote:
            if quote == "'" and text[index + 1 : index + 2] == "'":
                index += 2
                continue
            return index
        index += 1
    return -1


def _quoted(first: str, lines: list[str], index: int, where: str) -> tuple[str, int]:
    """A quoted scalar that starts with `first` (its opening quote) on line `index` (1-based) and
    may go on over the next lines; returns its value and the index of the line after it."""
    quote, rest, start = first[0], first[1:], index
    pieces: list[str] = []
    while True:
        end = _closing_quote(rest, quote)
        if end >= 0:
            pieces.append(rest[:end])
            if _strip_comment(rest[end + 1 :]).strip():
                raise ExtraConfigError(f"{where}:{index}: unexpected text after the closing quote")
            break
        pieces.append(rest)
        if index >= len(lines):
            raise ExtraConfigError(f"{where}:{start}: the quoted string never ends")
        rest = lines[index]
        index += 1
    return _fold(pieces, quote, f"{where}:{start}"), index


def _scalar(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("", "~", "null"):
        return None
    return text


def _value(value: str, lines: list[str], index: int, indent: int, where: str) -> tuple[object, int]:
    """The value that starts as `value` on line `index` (1-based) and may go on over the next lines."""
    if value.startswith(("'", '"')):
        return _quoted(value, lines, index, where)
    value = _strip_comment(value)
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
        return "\n".join(block) + ("\n" if value == "|" and block else ""), index
    if value.startswith(("|", ">", "[", "{", "&", "*", "!")):
        raise ExtraConfigError(f"{where}:{index}: unsupported YAML: {value!r}")
    # A plain scalar goes on over the following lines that are indented deeper than its key.
    pieces = [value]
    while index < len(lines):
        following = next((line for line in lines[index:] if line.strip()), "")
        if len(following) - len(following.lstrip(" ")) <= indent or following.lstrip().startswith("#"):
            break
        piece = _strip_comment(lines[index]).strip()
        if not value or piece.startswith("- ") or ": " in piece or piece.endswith(":"):
            raise ExtraConfigError(f"{where}:{index + 1}: nested mappings and lists are not supported: {piece!r}")
        pieces.append(piece)
        index += 1
    return (_scalar(value) if len(pieces) == 1 else _fold(pieces, "", where)), index


def parse(text: str, source: str = "<string>") -> dict[str, object]:
    """Parse the YAML subset into {section: {key: value} | None}."""
    lines = text.replace("\r\n", "\n").split("\n")
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
        match = _KEY.match(raw.strip())
        if not match:
            raise ExtraConfigError(f"{source}:{index}: expected 'key: value', got {raw.strip()!r}")
        key = match.group("plain")
        if key is None:
            single, double = match.group("single"), match.group("double")
            key = single.replace("''", "'") if single is not None else _unescape(double, f"{source}:{index}")
        value = (match.group("value") or "").strip()
        if indent == 0:
            if _strip_comment(value):
                result[key], index = _value(value, lines, index, indent, source)
                section = None
            else:
                section, section_name = {}, key
                result[key] = None  # a section with no keys is null, as in YAML
            continue
        if section is None:
            raise ExtraConfigError(f"{source}:{index}: {key!r} is indented but no section opens above it")
        result[section_name] = section
        section[key], index = _value(value, lines, index, indent, source)
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
