"""A workflow in ComfyUI's API format, checked before anything is queued.

The API format (what ComfyUI's "Save (API Format)" writes and `POST /prompt` takes as `prompt`)
maps each node id to `{"class_type": str, "inputs": {...}, "_meta": {...}}`; an input's value is
a literal or a link `[node id, output slot]`. The UI format (what "Save" writes: a top-level
`nodes` list with `links`) cannot be queued and is refused with what to do. Every problem of
every node is reported at once, each naming the node id and what is wrong.

Placement checks the plain string values against each environment's combo lists
(`string_inputs`), as ComfyUI's own validation would refuse them (`value_not_in_list`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_BYTES = 16 << 20  # far above any workflow; images travel as uploads, not inside the graph


class WorkflowError(ValueError):
    """A workflow that cannot be queued; the message names the node and what is wrong."""


@dataclass(frozen=True)
class StringInput:
    """A node input whose value is a plain string (not a link): a candidate for a combo list."""

    node: str
    class_type: str
    name: str
    value: str

    def describe(self) -> str:
        """As an error names it: `ckpt_name 'x.safetensors' of node 4`."""
        return f"{self.name} {self.value!r} of node {self.node}"


@dataclass(frozen=True)
class Workflow:
    """A checked API-format workflow: node id to its node (`class_type`, `inputs`, `_meta`)."""

    nodes: dict[str, dict[str, Any]]

    def classes(self) -> set[str]:
        """The node classes the workflow uses."""
        return {node["class_type"] for node in self.nodes.values()}

    def string_inputs(self) -> list[StringInput]:
        """Every input whose value is a plain string, in node id then input order."""
        return [
            StringInput(node_id, node["class_type"], name, value)
            for node_id, node in sorted(self.nodes.items(), key=lambda item: _node_order(item[0]))
            for name, value in node["inputs"].items()
            if isinstance(value, str)
        ]


def _node_order(node_id: str) -> tuple[int, int, str]:
    """Numeric ids in number order (2 before 10), then the others by text."""
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def is_link(value: Any) -> bool:
    """Whether an input's value is a link `[node id, output slot]` (ComfyUI reads any list as one)."""
    return isinstance(value, list)


def check(data: Any, source: str = "the workflow") -> Workflow:
    """`data` (parsed JSON) as a Workflow, or a WorkflowError listing every problem."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        raise WorkflowError(
            f"{source} is in ComfyUI's UI format (a top-level 'nodes' list), which cannot be queued: "
            "export it from ComfyUI with 'Save (API Format)' (Workflow menu, or Export (API))"
        )
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        raise WorkflowError(
            f"{source} is a whole POST /prompt body ('prompt' holds the graph): give the graph itself, "
            "the value of its 'prompt' key"
        )
    if not isinstance(data, dict):
        raise WorkflowError(f"{source} is a JSON {type(data).__name__}, not an object of node id to node")
    if not data:
        raise WorkflowError(f"{source} has no nodes")
    problems = [problem for node_id, node in data.items() for problem in _node_problems(node_id, node, data)]
    if problems:
        raise WorkflowError(f"{source} is not a valid API-format workflow:\n  " + "\n  ".join(problems))
    return Workflow(dict(data))


def _node_problems(node_id: str, node: Any, graph: dict[str, Any]) -> list[str]:
    where = f"node {node_id}"
    if not isinstance(node, dict):
        return [f"{where} is a {type(node).__name__}, not an object with 'class_type' and 'inputs'"]
    problems = []
    class_type = node.get("class_type")
    if not isinstance(class_type, str) or not class_type.strip():
        problems.append(f"{where} has no 'class_type' (the node class's name, such as 'KSampler')")
    else:
        where = f"node {node_id} ({class_type})"
    inputs = node.get("inputs")
    if not isinstance(inputs, dict):
        problems.append(f"{where} has no 'inputs' object (an empty one {{}} where the node takes none)")
        inputs = {}
    if "_meta" in node and not isinstance(node["_meta"], dict):
        problems.append(f"{where}: '_meta' is a {type(node['_meta']).__name__}, not an object")
    for name, value in inputs.items():
        if not is_link(value):
            continue
        if len(value) != 2 or not isinstance(value[0], str) or type(value[1]) is not int or value[1] < 0:
            problems.append(
                f"{where}: input {name!r} is {json.dumps(value)}, not a link "
                "[node id (a string), output slot (a number >= 0)]"
            )
        elif value[0] not in graph:
            problems.append(f"{where}: input {name!r} links to node {value[0]}, which the workflow does not have")
    return problems


def parse(text: str | bytes, source: str = "the workflow") -> Workflow:
    """A workflow from JSON text."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise WorkflowError(f"{source} is not JSON: {error}") from None
    return check(data, source)


def load(path: Path) -> Workflow:
    """A workflow from a JSON file."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as error:
        raise WorkflowError(f"cannot read the workflow {path}: {error.strerror or error}") from None
    if len(data) > MAX_BYTES:
        raise WorkflowError(f"the workflow {path} is larger than {MAX_BYTES >> 20} MiB; a workflow is a small graph")
    return parse(data, f"the workflow {path}")
