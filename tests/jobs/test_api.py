"""The job API and the control API: a real `comfybake jobs serve` process, the real runner, and
ComfyUI test doubles on loopback; the control API runs the real `comfybake instances` on a
config root with its instances.json."""

from __future__ import annotations

import base64
import grp
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.jobs import JobsHost, img2img, start_host, txt2img
from harness.tools import venv_bin
from jobs_serve import Served, call, serve, written

ONE = {"workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}}  # a graph the request is refused before placing


def instances_root(tmp_path: Path) -> Path:
    """A host's config root with two instances (of environments comm and xl) in instances.json."""
    records = [
        {"name": name, "environment": environment, "port": port, "gpus": ["0"], "enabled": True,
         "unit": f"comfyui@{name}.service", "state_dir": str(tmp_path / "state" / name)}
        for name, environment, port in (("a", "comm", 8188), ("b", "xl", 8189))
    ]  # fmt: skip
    config = tmp_path / "etc"
    config.mkdir(exist_ok=True)
    (config / "instances.json").write_text(json.dumps({"format": 1, "instances": records}))
    (config / "routing.json").write_text(json.dumps({"format": 1, "instances": [], "environments": []}))
    return config


def instances_cli(config_root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [venv_bin("comfybake"), "instances", "--config-root", str(config_root), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def control_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    """One `comfybake jobs serve` for the module's control and request tests (those that drain resume)."""
    scratch = tmp_path_factory.mktemp("control")
    config = instances_root(scratch)
    served = serve(config, scratch / "jobs", scratch / "serve.log")
    yield served, config
    served.stop()


# --------------------------------------------------------------------------- control API


def test_instances_status_is_the_commands_own_report(control_host: tuple[Served, Path]) -> None:
    served, config = control_host
    reply = served.control_api("GET", "/v1/instances")
    assert reply.status == 200, reply.body
    assert reply.body == json.loads(instances_cli(config, "status", "--json").stdout)
    narrowed = served.control_api("GET", "/v1/instances?environment=xl")
    assert [row["name"] for row in narrowed.body["instances"]] == ["b"]


def test_a_failed_action_answers_500_with_the_commands_own_report(control_host: tuple[Served, Path]) -> None:
    """systemctl cannot stop a unit here: the report names the failure, exactly as the command's."""
    served, config = control_host
    reply = served.control_api("POST", "/v1/instances/stop", {"names": ["a"]})
    direct = instances_cli(config, "stop", "a", "--json")
    assert direct.returncode == 1
    assert reply.status == 500
    assert reply.body == json.loads(direct.stdout)
    assert (
        reply.body["action"] == "stop" and reply.body["instances"] == ["a"] and "systemctl stop" in reply.body["error"]
    )


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"names": ["zz"]}, "names", "no instance named zz (instances: a, b)"),
        ({"environment": "video"}, "environment", "no instance matches the selection"),
        ({"ports": "abc"}, "ports", "not a port or a range"),
        ({"names": "a"}, "names", "not a list of instance names"),
        ({"names": ["--all"]}, "names", "not a list of instance names"),
        ({"drain": -1}, "drain", "not a number of seconds"),
        ({"everything": True}, "everything", "not a field of restart"),
    ],
)
def test_a_bad_selection_is_refused_with_400_naming_the_field(
    control_host: tuple[Served, Path], body: dict[str, object], field: str, words: str
) -> None:
    served, _config = control_host
    reply = served.control_api("POST", "/v1/instances/restart", body)
    assert reply.status == 400, reply.body
    assert reply.body["error"]["field"] == field
    assert words in reply.body["error"]["message"]


def test_an_unknown_action_and_route_answer_404_in_json(control_host: tuple[Served, Path]) -> None:
    served, _config = control_host
    assert served.control_api("POST", "/v1/instances/reboot", {}).status == 404
    reply = served.control_api("GET", "/v2/instances")
    assert reply.status == 404 and "/v1" in reply.body["error"]["message"]


def test_drain_refuses_new_jobs_with_503_until_resume(control_host: tuple[Served, Path]) -> None:
    served, _config = control_host
    drained = served.control_api("POST", "/v1/drain", {"timeout": 1})
    assert drained.status == 200 and drained.body == {"draining": True, "unfinished": []}
    health = served.job_api("GET", "/v1/health")
    assert health.status == 503 and health.headers["retry-after"]
    refused = served.job_api("POST", "/v1/jobs", {"workflow": {"1": {"class_type": "SaveImage", "inputs": {}}}})
    assert refused.status == 503 and refused.headers["retry-after"]
    assert refused.body["error"]["type"] == "draining"
    assert served.control_api("POST", "/v1/resume").body == {"draining": False}
    assert served.job_api("GET", "/v1/health").status == 200


def test_jobs_drain_and_resume_commands_reach_the_control_api(control_host: tuple[Served, Path]) -> None:
    served, _config = control_host
    command = [venv_bin("comfybake"), "jobs"]
    drained = subprocess.run(
        [*command, "drain", "--control-listen", served.control], capture_output=True, text=True, timeout=60
    )
    assert drained.returncode == 0, drained.stderr
    assert "no new jobs" in drained.stdout
    assert served.job_api("GET", "/v1/health").status == 503
    resumed = subprocess.run(
        [*command, "resume", "--control-listen", served.control, "--json"], capture_output=True, text=True, timeout=60
    )
    assert json.loads(resumed.stdout) == {"draining": False}
    assert served.job_api("GET", "/v1/health").status == 200


def test_drain_without_a_server_names_the_address(tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'absent.sock'}"
    done = subprocess.run(
        [venv_bin("comfybake"), "jobs", "drain", "--control-listen", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert address in done.stderr and "cannot reach the control API" in done.stderr


# --------------------------------------------------------------------------- sockets


def test_unix_sockets_are_0660_with_the_socket_group_and_serve(tmp_path: Path) -> None:
    config = instances_root(tmp_path)
    # Another group than the process's own, where it may give one (root: any), so the test sees the chown.
    others = [entry for entry in grp.getgrall() if entry.gr_gid != os.getgid()]
    mine = [entry for entry in others if os.getuid() != 0 and entry.gr_gid in os.getgroups()]
    chosen = (others if os.getuid() == 0 else mine) or [grp.getgrgid(os.getgid())]
    group, gid = chosen[0].gr_name, chosen[0].gr_gid
    run = tmp_path / "run"
    served = serve(
        config,
        tmp_path / "jobs",
        tmp_path / "serve.log",
        "--socket-group",
        group,
        jobs=f"unix:{run / 'jobs.sock'}",
        control=f"unix:{run / 'control.sock'}",
    )
    try:
        for name in ("jobs.sock", "control.sock"):
            info = (run / name).stat()
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o660
            assert info.st_gid == gid
        assert served.job_api("GET", "/v1/health").body == {"status": "ok"}
        assert served.control_api("GET", "/v1/instances").status == 200
    finally:
        assert served.stop() == 0


def test_an_unknown_socket_group_is_refused_before_serving(tmp_path: Path) -> None:
    config = instances_root(tmp_path)
    command = [venv_bin("comfybake"), "jobs", "serve", "--config-root", str(config),
               "--state-root", str(tmp_path / "s"), "--jobs-listen", f"unix:{tmp_path / 'j.sock'}",
               "--control-listen", f"unix:{tmp_path / 'c.sock'}",
               "--socket-group", "no-such-group-here"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--socket-group 'no-such-group-here' is not a group" in done.stderr


def test_a_bad_listen_address_is_refused_naming_the_option(tmp_path: Path) -> None:
    config = instances_root(tmp_path)
    command = [venv_bin("comfybake"), "jobs", "serve", "--config-root", str(config),
               "--state-root", str(tmp_path / "s"), "--jobs-listen", "localhost"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--jobs-listen 'localhost' is neither unix:/path nor HOST:PORT" in done.stderr


def test_a_bad_bucket_setting_is_refused_in_one_line(tmp_path: Path) -> None:
    config = instances_root(tmp_path)
    command = [venv_bin("comfybake"), "jobs", "serve", "--config-root", str(config),
               "--state-root", str(tmp_path / "s"), "--jobs-listen", f"unix:{tmp_path / 'j.sock'}",
               "--control-listen", f"unix:{tmp_path / 'c.sock'}"]  # fmt: skip
    environ = {**os.environ, "COMFYBAKE_JOBS_S3_BUCKET": "media", "COMFYBAKE_JOBS_S3_EXPIRES": "2w"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ)
    assert done.returncode == 2, done.stderr
    assert "COMFYBAKE_JOBS_S3_EXPIRES '2w' is not a number of seconds" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- request shapes


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "workflow", "send either 'workflow'"),
        ({"workflow": {}, "workflow_name": "x"}, "workflow", "send either 'workflow'"),
        ({"workflow_name": "portrait"}, "workflow_name", "no workflow is named \"portrait\""),
        ({**ONE, "wait": 301}, "wait", "from 0 to 300"),
        ({**ONE, "timeout": "1m"}, "timeout", "not a number"),
        ({**ONE, "outputs": "s3"}, "outputs", "COMFYBAKE_JOBS_S3_BUCKET"),
        ({**ONE, "inputs": [{"name": "../x.png", "data": ""}]},
         "inputs[0].name", "not a file name"),
        ({**ONE, "images": [{"name": "x.png", "image": "!!"}]},
         "images[0].image", "not valid base64"),
        ({**ONE, "prompt": "x"}, "prompt", "not a field of a job"),
        ({**ONE, "extra_data": [1]}, "extra_data", "not an object"),
    ],
)  # fmt: skip
def test_a_bad_submission_is_refused_with_400_naming_the_field(
    control_host: tuple[Served, Path], body: dict[str, object], field: str, words: str
) -> None:
    served, _config = control_host
    reply = served.job_api("POST", "/v1/jobs", body)
    assert reply.status == 400, reply.body
    assert reply.body["error"]["field"] == field
    assert words in reply.body["error"]["message"]
    assert served.job_api("GET", "/v1/jobs").body == {"jobs": []}  # nothing was created


def test_a_body_that_is_not_a_json_object_is_refused(control_host: tuple[Served, Path]) -> None:
    served, _config = control_host
    for raw in (b"{not json", b"[1, 2]"):
        reply = call(served.jobs, "POST", "/v1/jobs", raw=raw)
        assert reply.status == 400 and reply.body["error"]["field"] == "body"


def test_a_ui_format_workflow_is_a_workflow_error(control_host: tuple[Served, Path]) -> None:
    served, _config = control_host
    reply = served.job_api("POST", "/v1/jobs", {"workflow": {"nodes": [], "links": []}})
    assert reply.status == 400
    assert reply.body["error"]["type"] == "workflow"
    assert "Save (API Format)" in reply.body["error"]["message"]


def test_unknown_jobs_answer_404_and_bad_queries_400(control_host: tuple[Served, Path]) -> None:
    served, _config = control_host
    for route in ("/v1/jobs/nope", "/v1/jobs/nope/result"):
        reply = served.job_api("GET", route)
        assert reply.status == 404 and "no job nope" in reply.body["error"]["message"]
    assert served.job_api("POST", "/v1/jobs/nope/cancel").status == 404
    assert served.job_api("GET", "/v1/jobs?state=done").body["error"]["field"] == "state"
    assert served.job_api("GET", "/v1/jobs?limit=-1").body["error"]["field"] == "limit"


def test_inputs_decode_from_base64_and_data_urls() -> None:
    from comfybake.jobs.api import RequestError, inputs_of

    data = b"\x89PNG\r\n"
    encoded = base64.b64encode(data).decode()
    assert inputs_of({"inputs": [{"name": "a.png", "data": encoded}]}) == {"a.png": data}
    assert inputs_of({"images": [{"name": "a.png", "image": f"data:image/png;base64,{encoded}"}]}) == {"a.png": data}
    with pytest.raises(RequestError, match="given twice"):
        inputs_of({"inputs": [{"name": "a.png", "data": encoded}, {"name": "a.png", "data": encoded}]})


# --------------------------------------------------------------------------- jobs on doubles


@dataclass
class JobHost:
    served: Served
    host: JobsHost


@pytest.fixture(scope="module")
def job_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobHost]:
    """Doubles a (environment prod) and v (video), a named workflow of video, one `comfybake jobs serve`."""
    scratch = tmp_path_factory.mktemp("api")
    host = start_host(scratch, {"a": "prod", "v": "video"})
    host.write_named({"portrait": ("video", txt2img("sdxl.safetensors", prefix="portrait"))})
    served = serve(host.config_root, host.state_root, scratch / "serve.log")
    yield JobHost(served, host)
    served.stop()
    host.stop()


def test_a_sync_job_answers_200_with_the_doubles_image_inline(job_host: JobHost) -> None:
    reply = job_host.served.job_api("POST", "/v1/jobs", {"workflow": txt2img(prefix="sync"), "wait": 60})
    assert reply.status == 200, reply.body
    job = reply.body["job"]
    assert job["state"] == "succeeded" and job["attempts"] == 1
    [image] = job["result"]["images"]
    assert image["type"] == "base64" and image["node"] == "9"
    assert job["instance"] == "a" and job["environment"] == "prod"
    files = written(job_host.host["a"], "sync")
    assert [path.name for path in files] == [image["filename"]]
    assert base64.b64decode(image["data"]) == files[0].read_bytes()
    [line] = [item for item in job_host.served.finished_lines() if item.get("job") == job["id"]]
    assert line["state"] == "succeeded" and line["instance"] == job["instance"]


def test_an_async_job_answers_202_and_is_followed_to_its_result(job_host: JobHost) -> None:
    body = {"workflow": txt2img(prefix="async"), "extra_data": {"test_double_seconds": 1}}
    reply = job_host.served.job_api("POST", "/v1/jobs", body)
    assert reply.status == 202, reply.body
    job_id = reply.body["job"]["id"]
    assert reply.headers["location"] == f"/v1/jobs/{job_id}"
    assert reply.body["job"]["state"] in ("submitting", "running")
    assert "result" not in reply.body["job"]
    followed = job_host.served.job_api("GET", f"/v1/jobs/{job_id}?wait=60").body["job"]
    assert followed["state"] == "succeeded"
    result = job_host.served.job_api("GET", f"/v1/jobs/{job_id}/result")
    assert result.status == 200
    assert result.body["state"] == "succeeded" and result.body["result"]["images"][0]["filename"].startswith("async_")
    listed = job_host.served.job_api("GET", "/v1/jobs?state=succeeded&limit=1000").body["jobs"]
    assert job_id in [item["id"] for item in listed] and all("result" not in item for item in listed)


def test_a_running_jobs_result_is_409_and_cancel_stops_it(job_host: JobHost) -> None:
    body = {"workflow": txt2img(prefix="cancelled", steps=50), "extra_data": {"test_double_seconds": 60}}
    job = job_host.served.job_api("POST", "/v1/jobs", body).body["job"]
    early = job_host.served.job_api("GET", f"/v1/jobs/{job['id']}/result")
    assert early.status == 409 and early.body["error"]["type"] == "not_final"
    cancelled = job_host.served.job_api("POST", f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status == 200 and cancelled.body["job"]["state"] == "cancelled"
    assert job_host.served.job_api("GET", f"/v1/jobs/{job['id']}/result").body["state"] == "cancelled"
    again = job_host.served.job_api("POST", f"/v1/jobs/{job['id']}/cancel")
    assert again.status == 409 and "already cancelled" in again.body["error"]["message"]
    assert written(job_host.host[job["instance"]], "cancelled") == []


def test_a_named_workflow_runs_in_its_environment(job_host: JobHost) -> None:
    listed = job_host.served.job_api("GET", "/v1/workflows").body["workflows"]
    classes = sorted({node["class_type"] for node in txt2img().values()})
    assert listed == [{"name": "portrait", "environment": "video", "node_classes": classes}]
    reply = job_host.served.job_api("POST", "/v1/jobs", {"workflow_name": "portrait", "wait": 60})
    assert reply.status == 200, reply.body
    assert reply.body["job"]["workflow"] == "portrait" and reply.body["job"]["instance"] == "v"
    wrong = job_host.served.job_api("POST", "/v1/jobs", {"workflow_name": "portrait", "environment": "prod"})
    assert wrong.status == 400 and wrong.body["error"]["field"] == "environment"


def test_a_workflow_no_environment_can_run_is_422_naming_what_lacks(job_host: JobHost) -> None:
    before = job_host.served.job_api("GET", "/v1/jobs?limit=1000").body["jobs"]
    reply = job_host.served.job_api("POST", "/v1/jobs", {"workflow": txt2img("flux.safetensors")})
    assert reply.status == 422, reply.body
    assert reply.body["error"]["type"] == "placement"
    for environment in ("prod", "video"):
        [missing] = reply.body["error"]["environments"][environment]["missing_values"]
        assert missing["input"] == "ckpt_name" and missing["value"] == "flux.safetensors"
    assert "flux.safetensors" in reply.body["error"]["message"]
    assert job_host.served.job_api("GET", "/v1/jobs?limit=1000").body["jobs"] == before  # nothing was created


def test_an_input_image_is_uploaded_and_used(job_host: JobHost) -> None:
    data = base64.b64decode(PNG)
    body = {
        "workflow": img2img("face.png", prefix="uploaded"),
        "images": [{"name": "face.png", "image": base64.b64encode(data).decode()}],
        "wait": 60,
    }
    reply = job_host.served.job_api("POST", "/v1/jobs", body)
    assert reply.status == 200, reply.body
    job = reply.body["job"]
    assert job["state"] == "succeeded", job["error"]
    assert job["inputs"] == {"face.png": len(data)}
    assert job["result"]["images"][0]["filename"].startswith("uploaded_")


def test_a_node_that_fails_gives_a_failed_job_with_comfyuis_error(job_host: JobHost) -> None:
    workflow = {"1": {"class_type": "TestDoubleFail", "inputs": {"message": "out of memory, as planned"}}}
    reply = job_host.served.job_api("POST", "/v1/jobs", {"workflow": workflow, "wait": 60})
    assert reply.status == 200
    job = reply.body["job"]
    assert job["state"] == "failed"
    assert job["error"]["type"] == "execution"
    assert "out of memory, as planned" in json.dumps(job["error"])


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"  # 1x1


# --------------------------------------------------------------------------- jobs check


def test_jobs_check_names_each_named_workflow_that_cannot_run(jobs_host: Callable[..., JobsHost]) -> None:
    host = jobs_host({"a": "prod", "v": "video"})
    host.write_named(
        {
            "portrait": ("prod", txt2img()),
            "poster": ("prod", txt2img("sdxl.safetensors")),  # only video has the SDXL checkpoint
            "clip": ("video", txt2img("sdxl.safetensors")),
        }
    )
    command = [venv_bin("comfybake"), "jobs", "check", "--config-root", str(host.config_root)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "workflow portrait (environment prod): ok" in done.stdout
    assert "workflow clip (environment video): ok" in done.stdout
    assert "workflow poster (environment prod): lacks values ckpt_name 'sdxl.safetensors' of node 4" in done.stdout
    assert "1 named workflows cannot run: poster" in done.stderr
    report = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert report["workflows"]["poster"]["ok"] is False
    assert report["workflows"]["poster"]["missing_values"][0]["value"] == "sdxl.safetensors"
    assert report["workflows"]["portrait"] == {
        "environment": "prod",
        "ok": True,
        "missing_classes": [],
        "missing_values": [],
        "not_ready": {},
        "note": "",
    }


def test_jobs_check_without_named_workflows_passes(tmp_path: Path) -> None:
    command = [venv_bin("comfybake"), "jobs", "check", "--config-root", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "no named workflows" in done.stdout


def test_listen_addresses_parse_and_only_loopback_is_quiet() -> None:
    from comfybake.jobs.api import ListenError, loopback, parse_listen

    assert parse_listen("unix:/run/comfybake-jobs/jobs.sock", "--jobs-listen") == "/run/comfybake-jobs/jobs.sock"
    assert parse_listen("[::1]:8290", "--jobs-listen") == ("::1", 8290)
    with pytest.raises(ListenError, match="relative path"):
        parse_listen("unix:jobs.sock", "--jobs-listen")
    assert loopback("127.0.0.1") and loopback("::1") and loopback("localhost")
    assert not loopback("0.0.0.0") and not loopback("10.0.0.5") and not loopback("gpu-1")  # noqa: S104 - a value checked


def test_a_change_that_loses_a_race_with_the_jobs_end_is_a_json_409() -> None:
    """A cancel read the job running, and it ended before the change: 409 with the state, not a 500."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from comfybake.jobs import api
    from comfybake.jobs.store import IllegalTransitionError

    async def ended(_request: web.Request) -> web.Response:
        raise IllegalTransitionError("j1", "succeeded", "cancelled")

    async def ask() -> tuple[int, dict[str, object]]:
        app = web.Application(middlewares=[api.refusals])
        app.router.add_post("/v1/jobs/{id}/cancel", ended)
        async with TestClient(TestServer(app)) as client:
            response = await client.post("/v1/jobs/j1/cancel")
            return response.status, (await response.json())["error"]

    status, body = asyncio.run(ask())
    assert status == 409
    assert body["type"] == "conflict" and body["state"] == "succeeded"
    assert "job j1 is succeeded" in str(body["message"]) and "GET /v1/jobs/j1" in str(body["message"])
