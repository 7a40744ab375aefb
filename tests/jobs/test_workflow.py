"""Workflows in ComfyUI's API format are checked before anything is queued (jobs/workflow.py):
the UI format and malformed nodes are refused, each problem naming the node."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from comfybake.jobs import workflow
from comfybake.jobs.workflow import StringInput, WorkflowError

DATA = Path(__file__).resolve().parent / "data"


def test_an_api_workflow_gives_its_classes_and_its_plain_string_inputs() -> None:
    graph = workflow.load(DATA / "txt2img.json")
    assert graph.classes() == {
        "KSampler", "CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "VAEDecode", "SaveImage",
    }  # fmt: skip
    strings = graph.string_inputs()
    assert StringInput("4", "CheckpointLoaderSimple", "ckpt_name", "v1-5-pruned-emaonly.safetensors") in strings
    assert [(item.node, item.name) for item in strings] == [
        ("3", "sampler_name"), ("3", "scheduler"), ("4", "ckpt_name"), ("6", "text"), ("7", "text"),
        ("9", "filename_prefix"),
    ]  # fmt: skip
    # links ([node id, slot]) and numbers are not string values
    assert all(item.name not in ("model", "clip", "seed", "steps") for item in strings)
    assert strings[2].describe() == "ckpt_name 'v1-5-pruned-emaonly.safetensors' of node 4"


def test_node_ids_sort_as_numbers() -> None:
    graph = workflow.check({
        "10": {"class_type": "A", "inputs": {"x": "ten"}},
        "2": {"class_type": "A", "inputs": {"x": "two"}},
        "b": {"class_type": "A", "inputs": {"x": "bee"}},
    })  # fmt: skip
    assert [item.value for item in graph.string_inputs()] == ["two", "ten", "bee"]


def test_the_ui_format_is_refused_with_what_to_do() -> None:
    with pytest.raises(WorkflowError) as raised:
        workflow.load(DATA / "txt2img-ui.json")
    assert "UI format" in str(raised.value)
    assert "Save (API Format)" in str(raised.value)
    assert "txt2img-ui.json" in str(raised.value)


def test_every_malformed_node_is_named_with_what_is_wrong() -> None:
    data = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": ["not", "a", "node"],
        "3": {"inputs": {}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1"], "positive": [1, 0], "latent_image": ["9", 0]}},
        "5": {"class_type": "SaveImage", "inputs": "images"},
        "6": {"class_type": "VAEDecode", "inputs": {"vae": ["1", -1], "samples": ["1", True]}, "_meta": "title"},
        "7": {"class_type": "  ", "inputs": {}},
    }
    with pytest.raises(WorkflowError) as raised:
        workflow.check(data)
    lines = str(raised.value).splitlines()
    assert lines[0] == "the workflow is not a valid API-format workflow:"
    not_a_link = "not a link [node id (a string), output slot (a number >= 0)]"
    assert [line.strip() for line in lines[1:]] == [
        "node 2 is a list, not an object with 'class_type' and 'inputs'",
        "node 3 has no 'class_type' (the node class's name, such as 'KSampler')",
        "node 4 (KSampler): input 'model' is [\"1\"], " + not_a_link,
        "node 4 (KSampler): input 'positive' is [1, 0], " + not_a_link,
        "node 4 (KSampler): input 'latent_image' links to node 9, which the workflow does not have",
        "node 5 (SaveImage) has no 'inputs' object (an empty one {} where the node takes none)",
        "node 6 (VAEDecode): '_meta' is a str, not an object",
        "node 6 (VAEDecode): input 'vae' is [\"1\", -1], " + not_a_link,
        "node 6 (VAEDecode): input 'samples' is [\"1\", true], " + not_a_link,
        "node 7 has no 'class_type' (the node class's name, such as 'KSampler')",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "the workflow is not JSON: "),
        ("[]", "the workflow is a JSON list, not an object of node id to node"),
        ("{}", "the workflow has no nodes"),
        (json.dumps({"prompt": {"1": {"class_type": "A", "inputs": {}}}}), "the workflow is a whole POST /prompt body"),
    ],
)
def test_what_is_not_a_graph_is_refused(text: str, message: str) -> None:
    with pytest.raises(WorkflowError, match="^" + re.escape(message)):
        workflow.parse(text)


def test_an_unreadable_or_huge_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"cannot read the workflow .*absent\.json"):
        workflow.load(tmp_path / "absent.json")
    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (workflow.MAX_BYTES + 1))
    with pytest.raises(WorkflowError, match="larger than 16 MiB"):
        workflow.load(huge)
