"""The RunPod serverless worker (jobs/worker.py) with RunPod's real SDK: its input validated by
the SDK's own validator, and jobs run through the SDK's local test mode (`--test_input` and
test_input.json) and its local API (`--rp_serve_api`, POST /runsync) against real double
instances, answering the double's outputs in worker-comfyui's shape."""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from runpod.serverless.utils.rp_validator import validate

from comfybake.jobs import worker
from comfybake.jobs.store import Job

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "worker"}},
}


def refused(raw: Any) -> list[str]:
    with pytest.raises(worker.InputError) as raised:
        worker.validate_input(raw, validate)
    answer = raised.value.answer()
    assert answer["error"] == str(raised.value) and answer["details"]["type"] == "input"
    errors: list[str] = answer["details"]["errors"]
    return errors


def test_the_official_workers_input_is_accepted_with_a_data_uri_or_plain_base64() -> None:
    encoded = base64.b64encode(PNG).decode()
    values = worker.validate_input(
        {
            "workflow": GRAPH,
            "images": [
                {"name": "in.png", "image": f"data:image/png;base64,{encoded}"},
                {"name": "b.png", "image": encoded},
            ],
            "timeout": 30,
        },
        validate,
    )
    assert values["inputs"] == {"in.png": PNG, "b.png": PNG}
    assert values["workflow"].classes() == {"LoadImage", "SaveImage"}
    assert values["timeout"] == 30.0 and isinstance(values["timeout"], float)  # the validator's float
    assert (values["workflow_name"], values["environment"], values["outputs"]) == (None, None, None)


def test_the_input_may_be_a_json_string_as_the_official_worker_takes_it() -> None:
    values = worker.validate_input(json.dumps({"workflow": GRAPH}), validate)
    assert values["inputs"] == {} and values["workflow"].nodes == GRAPH


def test_the_sdk_validators_errors_come_back_each_with_what_the_field_must_be() -> None:
    errors = refused({"workflow": GRAPH, "images": "in.png", "timeout": "soon", "outputs": "ftp", "seed": 3})
    assert "Unexpected input. seed is not a valid input option." in errors
    assert "images does not meet the constraints: images must be a list of {'name', 'image': base64} objects" in errors
    assert "outputs does not meet the constraints: outputs must be 'inline' or 's3'" in errors
    assert any(error.startswith("timeout should be <class 'float'> type") for error in errors)
    assert refused({"workflow": [1, 2]}) == [
        "workflow should be <class 'dict'> type, not <class 'list'>.",
        "workflow does not meet the constraints: workflow must be an API-format workflow object",
    ]
    assert refused({"workflow": GRAPH, "timeout": 0}) == [
        "timeout does not meet the constraints: timeout must be a number of seconds above 0"
    ]


def test_one_of_workflow_and_workflow_name_is_needed() -> None:
    expected = ["give 'workflow' (an API-format graph) or 'workflow_name' (a named workflow), one of them"]
    assert refused({"images": []}) == expected
    assert refused({"workflow": GRAPH, "workflow_name": "portrait"}) == expected
    values = worker.validate_input({"workflow_name": "portrait"}, validate)
    assert values["workflow"] is None and values["workflow_name"] == "portrait"


def test_a_workflow_not_in_api_format_and_bad_base64_are_named() -> None:
    (error,) = refused({"workflow": {"nodes": [], "links": []}})
    assert "Save (API Format)" in error
    assert refused({"workflow": GRAPH, "images": [{"name": "in.png", "image": "not base64!"}]}) == [
        "images[0] ('in.png'): 'image' is not valid base64"
    ]
    assert refused({"workflow": GRAPH, "images": [{"name": "in.png", "image": 7}]}) == [
        "images[0] ('in.png'): 'image' must be a base64 string"
    ]
    assert refused("{not json") == ["the input is a string that is not JSON"]
    assert refused(None) == ["the input must be an object with 'workflow', not NoneType"]


def finished(state: str, result: Any = None, error: Any = None) -> Job:
    return Job(
        id="j1",
        state=state,
        workflow="",
        environment="prod",
        instance="a",
        prompt_id="p1",
        inputs={},
        created="2026-12-05T12:00:00+00:00",
        started=None,
        finished="2026-12-05T12:00:01+00:00",
        result=result,
        error=error,
        attempts=1,
    )


def test_the_answer_has_the_official_workers_shape() -> None:
    image = {"filename": "worker_00001_.png", "subfolder": "", "node": "2", "type": "base64", "data": "aGk="}
    assert worker.answer(finished("succeeded", {"images": [image], "videos": [], "files": []})) == {"images": [image]}
    stored = {"filename": "a.mp4", "subfolder": "", "node": "5", "type": "s3_url", "url": "http://s3/a.mp4?sig"}
    assert worker.answer(finished("succeeded", {"images": [], "videos": [stored]})) == {
        "images": [],  # always there, as the official worker's
        "videos": [dict(stored, data="http://s3/a.mp4?sig")],  # the URL in `data`, as worker-comfyui's
    }
    error = {"type": "execution", "message": "node 3 (TestDoubleFail) failed: boom", "nodes": []}
    assert worker.answer(finished("failed", error=error)) == {"error": error["message"], "details": error}
    assert worker.answer(finished("cancelled")) == {
        "error": "the job cancelled",
        "details": {"type": "cancelled", "message": "the job cancelled"},
    }


def test_progress_has_the_official_workers_uniform_shape() -> None:
    message = {"type": "progress", "data": {"value": 12, "max": 25, "prompt_id": "p", "node": "3"}}
    assert worker.progress_payload(message) == {
        "type": "progress",
        "value": 12,
        "max": 25,
        "percent": 48.0,
        "node": "3",
    }
    assert worker.progress_payload({"type": "executing", "data": {"node": "3", "prompt_id": "p"}}) is None
    assert worker.progress_payload({"type": "progress", "data": {"value": 1, "max": 0}}) is None


def test_concurrency_is_one_job_per_enabled_instance_unless_the_variable_says() -> None:
    def route(name: str, enabled: bool) -> worker.placement.Route:
        return worker.placement.Route(name, "prod", "http://127.0.0.1:1", 1, enabled, frozenset(), {})

    routes = [route("a", True), route("b", True), route("c", False)]
    assert worker.concurrency(None, routes) == 2
    assert worker.concurrency("", []) == 1
    assert worker.concurrency("3", routes) == 3
    for value in ("0", "two"):
        with pytest.raises(ValueError, match=f"COMFYBAKE_WORKER_CONCURRENCY='{value}' is not a whole number"):
            worker.concurrency(value, routes)


def test_the_sdks_flags_pass_through_as_it_reads_them() -> None:
    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    args = parser.parse_args(["--rp_serve_api", "--rp_api_port", "8001", "--test_input", "{}", "--state-root", "/s"])
    assert worker.sdk_argv(args) == ["--test_input", "{}", "--rp_serve_api", "--rp_api_port", "8001"]
    assert args.state_root == Path("/s") and args.config_root == Path("/etc/comfybake")


def test_the_environment_file_takes_any_value_but_nul(tmp_path: Path) -> None:
    path = tmp_path / "environment"
    path.write_bytes(b"RUNPOD_AI_API_KEY=k=v\nsecond line\0BUCKET_ENDPOINT_URL=http://x\0")
    assert worker.read_environment_file(path) == {
        "RUNPOD_AI_API_KEY": "k=v\nsecond line",
        "BUCKET_ENDPOINT_URL": "http://x",
    }
    path.write_bytes(b"not a record\0")
    with pytest.raises(ValueError, match="holds a record that is not NAME=VALUE"):
        worker.read_environment_file(path)
    with pytest.raises(ValueError, match="start the container with COMFYBAKE_SERVE=runpod"):
        worker.read_environment_file(tmp_path / "absent")
