"""The RunPod serverless worker (jobs/worker.py) with RunPod's real SDK: its input validated by
the SDK's own validator, and jobs run through the SDK's local test mode (`--test_input` and
test_input.json) and its local API (`--rp_serve_api`, POST /runsync) against real double
instances, answering the double's outputs in worker-comfyui's shape."""

from __future__ import annotations

import argparse
import ast
import base64
import configparser
import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from harness.double import free_port, stop_process
from harness.jobs import JobsHost, S3Server, img2img, txt2img
from harness.tools import ROOT, venv_bin
from runpod.serverless.utils.rp_validator import validate

from comfybake.jobs import worker
from comfybake.jobs.store import Job, JobStore

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
StartHost = Callable[..., JobsHost]
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


def test_a_bad_bucket_setting_stops_the_worker_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COMFYBAKE_JOBS_S3_BUCKET", "media")
    monkeypatch.setenv("COMFYBAKE_JOBS_S3_EXPIRES", "2w")
    (tmp_path / "routing.json").write_text(json.dumps({"format": 1, "instances": [], "environments": []}))
    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    assert worker.run(parser.parse_args(["--config-root", str(tmp_path)])) == 2
    assert capsys.readouterr().err == (
        "error: COMFYBAKE_JOBS_S3_EXPIRES '2w' is not a number of seconds (1 to 604800)\n"
    )


# --------------------------------------------------------------------------- the SDK's local modes, real doubles

SRC = Path(__file__).resolve().parents[2] / "src"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def worker_command(host: JobsHost, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "comfybake",
        "jobs",
        "worker",
        "--config-root",
        str(host.config_root),
        "--state-root",
        str(host.state_root),
        "--ready-timeout",
        "30",
        *args,
    ]


def worker_environment(**extra: str) -> dict[str, str]:
    """The worker's environment: none of RunPod's platform variables, so the SDK runs locally."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("RUNPOD_", "BUCKET_"))}
    return {**environ, "PYTHONPATH": str(SRC), **extra}


def run_worker(host: JobsHost, *args: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        worker_command(host, *args),
        cwd=cwd,
        env=worker_environment(**extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def job_result(stdout: str) -> dict[str, Any]:
    """What the SDK's local test prints: `INFO   | local_test | Job result: {...}` (a Python repr)."""
    (line,) = [line for line in stdout.splitlines() if "Job result: " in line]
    found: dict[str, Any] = ast.literal_eval(line.split("Job result: ", 1)[1])
    return found


def test_the_sdks_local_test_runs_the_handler_on_test_input(tmp_path: Path, jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    job = {"input": {"workflow": txt2img(prefix="worker")}}
    done = run_worker(host, "--test_input", json.dumps(job), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (image,) = job_result(done.stdout)["output"]["images"]
    assert (image["filename"], image["type"], image["node"]) == ("worker_00001_.png", "base64", "9")
    written = host["a"].base / "output" / "worker_00001_.png"
    assert base64.b64decode(image["data"]) == written.read_bytes() and written.read_bytes().startswith(PNG_MAGIC)
    assert "Local testing complete" in done.stdout
    assert "Retrieved local job" not in done.stdout  # the SDK's debug lines (the whole input) are off


def test_test_input_json_in_the_working_folder_uploads_the_images(tmp_path: Path, jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    made = run_worker(host, "--test_input", json.dumps({"input": {"workflow": txt2img(prefix="src")}}), cwd=tmp_path)
    png = base64.b64decode(job_result(made.stdout)["output"]["images"][0]["data"])
    encoded = base64.b64encode(png).decode()
    job = {
        "input": {
            "workflow": img2img("in.png", prefix="copy"),
            "images": [{"name": "in.png", "image": f"data:image/png;base64,{encoded}"}],
        }
    }
    (tmp_path / "test_input.json").write_text(json.dumps(job))
    done = run_worker(host, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (image,) = job_result(done.stdout)["output"]["images"]
    assert image["filename"] == "copy_00001_.png"
    (uploaded,) = [name for name in host["a"].input_files() if name.endswith("/in.png")]
    assert (host["a"].base / "input" / uploaded).read_bytes() == png
    assert encoded not in done.stderr  # the input's data in no log line


def test_bad_input_gives_the_validators_error_and_queues_nothing(tmp_path: Path, jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    job = {"input": {"workflow": txt2img(), "seed": 3}}
    done = run_worker(host, "--test_input", json.dumps(job), cwd=tmp_path)
    assert done.returncode == 1  # the SDK's local test fails a job that answers an error
    assert "Unexpected input. seed is not a valid input option." in done.stdout + done.stderr
    assert host["a"].queue() == {"queue_running": [], "queue_pending": []}
    assert host["a"].output_files() == []


def test_outputs_go_to_the_bucket_as_the_official_workers_s3_urls(
    tmp_path: Path, jobs_host: StartHost, s3_server: S3Server
) -> None:
    host = jobs_host({"a": "prod"})
    job = {"input": {"workflow": txt2img(prefix="bucket")}}
    done = run_worker(host, "--test_input", json.dumps(job), cwd=tmp_path, **s3_server.environ())
    assert done.returncode == 0, done.stdout + done.stderr
    (image,) = job_result(done.stdout)["output"]["images"]
    assert image["type"] == "s3_url" and image["data"] == image["url"]  # S3 by default once a bucket is set
    response = requests.get(image["data"], timeout=10)
    assert response.status_code == 200
    assert response.content == (host["a"].base / "output" / "bucket_00001_.png").read_bytes()


def wait_listening(process: subprocess.Popen[str], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"the worker's local API did not listen on {port}")


def test_the_local_api_answers_runsync_with_outputs_and_refusals(tmp_path: Path, jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod", "v": "video"})
    port = free_port()
    command = worker_command(host, "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1")
    process = subprocess.Popen(
        command, cwd=tmp_path, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_listening(process, port)
        url = f"http://127.0.0.1:{port}/runsync"
        answer = requests.post(url, json={"input": {"workflow": txt2img("sdxl.safetensors", prefix="api")}}, timeout=60)
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] == "COMPLETED", body
        (image,) = body["output"]["images"]
        assert image["filename"] == "api_00001_.png"  # on `video`, the environment with the SDXL checkpoint
        assert base64.b64decode(image["data"]) == (host["v"].base / "output" / "api_00001_.png").read_bytes()
        refused = requests.post(url, json={"input": {"workflow": txt2img("x.safetensors")}}, timeout=60).json()
        assert refused["status"] == "FAILED" and "x.safetensors" in refused["error"], refused
        assert host["a"].queue()["queue_pending"] == host["v"].queue()["queue_pending"] == []
    finally:
        stop_process(process)


class Platform:
    """RunPod's side of a serverless worker on loopback, as the SDK calls it: /job-take hands out
    the queued jobs (204 when none), /job-done receives progress (IN_PROGRESS) and results,
    /job-stop long-polls for stop signals (`stop`: the request ids to stop, handed out once),
    /ping takes heartbeats."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = list(jobs)
        self.stop: list[str] = []
        self.posted: list[tuple[str, dict[str, Any]]] = []  # (job id, what the worker posted)
        self.lock = threading.Lock()
        platform = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                pass

            def _answer(self, status: int, body: object = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path.startswith(("/job-take/", "/job-take-batch/")):
                    with platform.lock:
                        taken, platform.jobs = platform.jobs, []
                    if not taken:
                        self._answer(204)
                    else:
                        self._answer(200, taken if path.startswith("/job-take-batch/") else taken[0])
                elif path.startswith("/job-stop/"):
                    with platform.lock:
                        stop, platform.stop = platform.stop, []
                    if stop:
                        self._answer(200, {"jobsToStop": stop})
                    else:
                        time.sleep(0.5)
                        self._answer(204)
                else:  # /ping
                    self._answer(200, {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                job_id = urlsplit(self.path).path.rsplit("/", 1)[1]
                with platform.lock:
                    platform.posted.append((job_id, body))
                self._answer(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def environ(self) -> dict[str, str]:
        base = f"http://127.0.0.1:{self.port}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_AI_API_KEY": "rp-test-key",
            "RUNPOD_POD_ID": "worker-1",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",  # memory, disk, 8.8.8.8: the test machine's
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    def results(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {job_id: body for job_id, body in self.posted if body.get("status") != "IN_PROGRESS"}

    def progress(self, job_id: str) -> list[Any]:
        with self.lock:
            return [
                body["output"] for found, body in self.posted if found == job_id and body.get("status") == "IN_PROGRESS"
            ]


def start_on_platform(host: JobsHost, platform: Platform, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        worker_command(host),
        cwd=cwd,
        env=worker_environment(**platform.environ()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate: Callable[[], bool], process: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_on_runpod_the_worker_takes_jobs_reports_progress_and_answers(tmp_path: Path, jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod", "b": "prod"})
    jobs = [
        {"id": "rp-1", "input": {"workflow": txt2img(prefix="one", steps=6)}},
        {"id": "rp-2", "input": {"workflow": txt2img("x.safetensors")}},
    ]
    platform = Platform(jobs)
    process = start_on_platform(host, platform, tmp_path)
    try:
        wait_for(lambda: len(platform.results()) == 2, process)
        results = platform.results()
        assert set(results) == {"rp-1", "rp-2"}, results
        (image,) = results["rp-1"]["output"]["images"]
        instance = next(item for item in host.instances.values() if item.output_files())
        assert base64.b64decode(image["data"]) == (instance.base / "output" / image["filename"]).read_bytes()
        steps = platform.progress("rp-1")
        # worker-comfyui's shape; each update is its own thread's POST, so they may arrive out of order
        assert {"type": "progress", "value": 6, "max": 6, "percent": 100.0, "node": "3"} in steps
        assert {step["type"] for step in steps} == {"progress"}
        assert "x.safetensors" in results["rp-2"]["error"]  # refused before anything was queued
        process.terminate()  # SIGTERM: the SDK stops taking jobs and exits
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "rp-test-key" not in output
        assert "2 job(s) at once" in output  # one per enabled instance
    finally:
        stop_process(process)
        platform.server.shutdown()


def test_a_request_runpod_stops_drops_its_prompt_from_the_queue(tmp_path: Path, jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    # the instance is busy with another client's long prompt: the worker's job waits behind it
    status, busy = host["a"].double.post(
        "/prompt", {"prompt": txt2img(prefix="other"), "extra_data": {"test_double_seconds": 30}}
    )
    assert status == 200, busy
    platform = Platform([{"id": "rp-1", "input": {"workflow": txt2img(prefix="stopped")}}])
    process = start_on_platform(host, platform, tmp_path)
    try:
        wait_for(lambda: len(host["a"].queue()["queue_pending"]) == 1, process)
        (job,) = JobStore(host.state_root).jobs()
        assert job.prompt_id in host["a"].queued_ids()
        with platform.lock:
            platform.stop.append("rp-1")  # RunPod cancels the request
        wait_for(lambda: JobStore(host.state_root).get(job.id).state == "cancelled", process)
        assert host["a"].queued_ids() == [busy["prompt_id"]]  # the other client's prompt runs on
        assert "rp-1" not in platform.results()  # a stopped request gets no answer
    finally:
        stop_process(process)
        platform.server.shutdown()


# --------------------------------------------------------------------------- the image's run-time switch

HOOKS = ("runpod-worker.sh", "model-volume.sh", "runpod-worker.conf")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, root: Path) -> dict[str, Path]:
    """The comfyui_image role's entrypoint hooks and supervisord program as Ansible renders them
    from the roles' defaults and vars (once: a run of ansible-playbook), with the worker's
    account, folders and the model store moved to a folder of the tests (an image's need root)."""
    tmp_path = tmp_path_factory.mktemp("hooks")
    ansible_env = {**os.environ, "ANSIBLE_CONFIG": str(root / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    files = [ROOT / "roles" / role / folder / "main.yml" for role in ("comfyui", "comfyui_image")
             for folder in ("defaults", "vars")]  # fmt: skip
    overrides = {
        "ansible_python_interpreter": sys.executable,
        "_comfyui_image_worker_account": getpass.getuser(),
        "_comfyui_image_worker_state": str(tmp_path / "state"),
        "_comfyui_image_worker_environment": str(tmp_path / "run" / "environment"),
        "comfyui_model_store": str(tmp_path / "store"),
        "comfyui_image_model_volume": str(tmp_path / "volume"),
        "comfyui_models_policy": "none",
    }
    templates = ROOT / "roles" / "comfyui_image" / "templates"
    tasks = [{"ansible.builtin.template": {"src": str(templates / f"{name}.j2"), "dest": str(tmp_path / name)}}
             for name in HOOKS]  # fmt: skip
    play = [{"hosts": "localhost", "gather_facts": False, "vars_files": [str(f) for f in files], "tasks": tasks}]
    (tmp_path / "play.yml").write_text(json.dumps(play))
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    done = subprocess.run(
        [venv_bin("ansible-playbook"), "-i", "localhost,", "-c", "local", "-e", "@overrides.json", "play.yml"],
        cwd=tmp_path,
        env=ansible_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {name: tmp_path / name for name in HOOKS}


@pytest.fixture
def hooks(rendered: dict[str, Path]) -> dict[str, Path]:
    """The rendered hooks, the folders they make or change not there yet."""
    folder = rendered["runpod-worker.sh"].parent
    for name in ("run", "state", "store", "volume"):
        path = folder / name
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    return rendered


def entrypoint(hook: Path, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Source the hook as the image's entrypoint does (sh, set -eu), then print what its
    supervisord would inherit (env -0)."""
    script = f"set -eu\n. {shlex.quote(str(hook))}\nprintf '\\0ENVIRONMENT\\0'\nenv -0\n"
    return subprocess.run(
        ["sh", "-c", script], env={"PATH": os.environ["PATH"], **environ}, capture_output=True, text=True, timeout=30
    )


def inherited(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    records = done.stdout.split("\0ENVIRONMENT\0", 1)[1].split("\0")
    return dict(record.partition("=")[::2] for record in records if record)


def test_serving_runpod_moves_the_platforms_variables_to_the_workers_file(hooks: dict[str, Path]) -> None:
    secrets = {
        "RUNPOD_AI_API_KEY": "rpa_key=with\nline break",
        "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take/$ID?gpu=$RUNPOD_GPU_TYPE_ID",
        "BUCKET_SECRET_ACCESS_KEY": "bucket-secret",
        "AWS_ACCESS_KEY_ID": "AKIA0000",
    }
    done = entrypoint(hooks["runpod-worker.sh"], {"COMFYBAKE_SERVE": "runpod", "OTHER": "kept", **secrets})
    assert done.returncode == 0, done.stderr
    assert "serving RunPod jobs" in done.stdout
    given = inherited(done)
    assert given["COMFYBAKE_RUNPOD_WORKER"] == "true" and given["OTHER"] == "kept"
    assert not set(secrets) & set(given)  # what supervisord hands every instance holds none of them
    environment_file = hooks["runpod-worker.sh"].parent / "run" / "environment"
    assert environment_file.stat().st_mode & 0o777 == 0o400
    assert worker.read_environment_file(environment_file) == secrets  # the worker gets them whole
    assert (hooks["runpod-worker.sh"].parent / "state").is_dir()


def test_without_the_switch_the_worker_stays_off_and_a_wrong_mode_stops_the_start(hooks: dict[str, Path]) -> None:
    done = entrypoint(hooks["runpod-worker.sh"], {"RUNPOD_POD_ID": "pod"})
    assert done.returncode == 0, done.stderr
    assert inherited(done)["COMFYBAKE_RUNPOD_WORKER"] == "false" and inherited(done)["RUNPOD_POD_ID"] == "pod"
    assert not (hooks["runpod-worker.sh"].parent / "run").exists()
    wrong = entrypoint(hooks["runpod-worker.sh"], {"COMFYBAKE_SERVE": "runpd"})
    assert wrong.returncode == 2
    assert "COMFYBAKE_SERVE=runpd is not a mode of this image: give runpod" in wrong.stderr


def test_supervisord_starts_the_worker_only_when_the_entrypoint_says(hooks: dict[str, Path]) -> None:
    program = configparser.RawConfigParser()
    program.read(hooks["runpod-worker.conf"])
    section = program["program:comfybake-runpod-worker"]
    assert section["autostart"] == "%(ENV_COMFYBAKE_RUNPOD_WORKER)s"
    command = shlex.split(section["command"])
    assert command[0] == "/opt/comfybake/runpod-worker/bin/python" and command[1] == "/usr/local/bin/comfybake"
    assert command[command.index("jobs") :][:2] == ["jobs", "worker"]
    assert command[command.index("--environment-file") + 1] == str(
        hooks["runpod-worker.sh"].parent / "run" / "environment"
    )
    assert section["user"] == getpass.getuser()


def test_a_network_volume_becomes_the_empty_model_store(hooks: dict[str, Path]) -> None:
    root = hooks["model-volume.sh"].parent
    store, volume = root / "store", root / "volume"
    store.mkdir()
    assert entrypoint(hooks["model-volume.sh"], {}).returncode == 0 and not store.is_symlink()  # no volume
    (volume / "checkpoints").mkdir(parents=True)
    done = entrypoint(hooks["model-volume.sh"], {})
    assert done.returncode == 0, done.stderr
    assert store.is_symlink() and store.resolve() == volume.resolve() and (store / "checkpoints").is_dir()
    assert entrypoint(hooks["model-volume.sh"], {}).returncode == 0 and store.is_symlink()  # a restart: as it is
    store.unlink()
    store.mkdir()
    (store / "baked.safetensors").write_bytes(b"x")
    assert entrypoint(hooks["model-volume.sh"], {}).returncode == 0
    assert not store.is_symlink() and (store / "baked.safetensors").exists()  # a store with files is left alone
