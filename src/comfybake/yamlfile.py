"""Reading a YAML file a user or a role wrote (a model manifest, a models file, a vars file):
the one loader of every comfybake command, bounded so that no file can hang or crash it.

A YAML alias repeats a node without copying it, so ten lines of aliases can stand for a billion
values (the "billion laughs"), and an alias inside its own anchor makes a structure without end.
The loader counts the values a document holds with every alias expanded, before building it,
and refuses more than `MAX_VALUES`, or a cycle. Anchors and aliases within that bound (merge keys
in a vars file) keep working. Bytes that are not UTF-8, a file past `MAX_BYTES` and nesting past
`MAX_DEPTH` are refused too: every failure is a `YAMLFileError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 64 << 20  # far above any manifest or vars file; the whole file is read into memory
MAX_VALUES = 100_000  # scalars, lists and mappings once every alias is expanded
MAX_DEPTH = 100  # lists and mappings within each other (a manifest needs four)


class YAMLFileError(ValueError):
    """A file that cannot be read as YAML; the message names the file and what to do."""


class _Refused(yaml.YAMLError):
    """Raised by the loader with what to do; `load` adds the file's name."""


class _BoundedLoader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
    """PyYAML's safe loader that refuses nesting past `MAX_DEPTH` while it composes a document,
    and a document whose aliases expand past `MAX_VALUES` before it builds it."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1  # type: ignore[no-untyped-call]
                raise _Refused(f"it nests lists or mappings more than {MAX_DEPTH} deep (line {line}); flatten it")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _count(node, {}, set())
        return super().construct_document(node)  # type: ignore[no-untyped-call]


def _count(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for with its aliases expanded; each node is counted once."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _Refused(
            f"an alias refers to the node that holds it (line {node.start_mark.line + 1}); write the values out"
        )
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            total += _count(item, sizes, open_nodes)
            _check(total, node)
    elif isinstance(node, yaml.MappingNode):
        for name, value in node.value:
            total += _count(name, sizes, open_nodes) + _count(value, sizes, open_nodes)
            _check(total, node)
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _check(total: int, node: yaml.Node) -> None:
    if total > MAX_VALUES:
        raise _Refused(
            f"its aliases expand to more than {MAX_VALUES:,} values (from line {node.start_mark.line + 1}); "
            "write the values out or use fewer aliases"
        )


def load(path: Path, what: str = "") -> Any:
    """The document in `path`; `what` ("manifest") names the kind of file in messages."""
    name = f"{what} {path}".strip()
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as error:
        raise YAMLFileError(f"cannot read {name}: {error.strerror or error}") from None
    if len(data) > MAX_BYTES:
        raise YAMLFileError(f"{name} is larger than {MAX_BYTES >> 20} MiB; it cannot be a manifest or a vars file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise YAMLFileError(
            f"{name} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader with a bound
    except _Refused as error:
        raise YAMLFileError(f"{name} is refused: {error}") from None
    except yaml.YAMLError as error:
        raise YAMLFileError(f"{name} is not valid YAML: {error}") from None
    except RecursionError:  # MAX_DEPTH stops the composer first; this only if the caller is deep already
        raise YAMLFileError(f"{name} nests lists or mappings too deeply to read; flatten it") from None
