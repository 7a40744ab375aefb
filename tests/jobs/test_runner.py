"""The job runner (jobs/runner.py) against ComfyUI test doubles as real processes on loopback, with
real WebSockets, a real SQLite store and moto's S3 server: outputs inline and as working presigned
URLs, placement by node class and model before anything is queued, a dropped socket, timeouts,
ComfyUI's structured errors, cancel, drain, and recovery by prompt id (adopted, never run twice)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from harness.jobs import JobsHost, S3Server, img2img, txt2img
from harness.jobs import run_runner as run
from jobs_loopback import stopped, write_routing

from comfybake.jobs import outputs, runner, workflow
from comfybake.jobs.runner import JobError, JobSpec, Runner
from comfybake.jobs.store import JobStore

PNG = b"\x89PNG\r\n\x1a\n"
T = TypeVar("T")
StartHost = Callable[..., JobsHost]


def spec(graph: dict[str, Any], **kwargs: Any) -> JobSpec:
    return JobSpec(workflow=workflow.check(graph), **kwargs)


def seconds(value: float, **extra: Any) -> dict[str, Any]:
    return {"test_double_seconds": value, **extra}


def test_a_job_returns_the_doubles_png_inline(tmp_path: Path, jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    events: list[str] = []

    async def work(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(prefix="lighthouse")), on_progress=lambda _, e: events.append(e["type"]))
        return await found.wait(job.id, 60)

    job = run(work, host)
    assert job.state == "succeeded", job.error
    (image,) = job.result["images"]
    assert (image["filename"], image["subfolder"], image["node"], image["type"]) == (
        "lighthouse_00001_.png", "", "9", "base64")  # fmt: skip
    data = base64.b64decode(image["data"])
    assert data.startswith(PNG) and data == (host["a"].base / "output" / "lighthouse_00001_.png").read_bytes()
    assert job.result["videos"] == job.result["files"] == []
    assert (job.environment, job.instance, job.attempts) == ("prod", "a", 1)
    assert events[0] == "execution_start" and "progress" in events and "executed" in events
    assert host["a"].history(job.prompt_id)[job.prompt_id]["status"]["status_str"] == "success"


def test_outputs_go_to_s3_as_working_presigned_urls(jobs_host: StartHost, s3_server: S3Server) -> None:
    host = jobs_host({"a": "prod"})
    sink = outputs.S3.from_environment(s3_server.environ())
    assert sink is not None

    async def work(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), outputs="s3"))
        return await found.wait(job.id, 60)

    job = run(work, host, sinks={"inline": outputs.Inline(), "s3": sink})
    assert job.state == "succeeded", job.error
    (image,) = job.result["images"]
    assert image["type"] == "s3_url" and "data" not in image
    response = requests.get(image["url"], timeout=10)
    assert response.status_code == 200
    assert response.content == (host["a"].base / "output" / image["filename"]).read_bytes()
    assert response.content.startswith(PNG)
    key = f"comfybake/jobs/{job.id}/{image['filename']}"
    assert s3_server.client().head_object(Bucket=s3_server.bucket, Key=key)["ContentType"] == "image/png"


def test_a_class_only_one_environment_has_lands_there(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod", "v": "video"})
    graph = txt2img("sdxl.safetensors")
    graph["10"] = {"class_type": "TestEnvOnlyUpscale", "inputs": {"image": ["8", 0]}}
    graph["11"] = {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "upscaled"}}

    async def work(found: Runner) -> Any:
        return await found.wait((await found.submit(spec(graph))).id, 60)

    job = run(work, host)
    assert job.state == "succeeded", job.error
    assert (job.environment, job.instance) == ("video", "v")
    assert host["a"].output_files() == []


def test_a_missing_class_or_model_is_refused_before_anything_is_queued(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod", "v": "video"})
    graph = txt2img("flux.safetensors")
    graph["10"] = {"class_type": "VHS_VideoCombine", "inputs": {"images": ["8", 0]}}

    async def work(found: Runner) -> JobError:
        with pytest.raises(JobError) as raised:
            await found.submit(spec(graph))
        return raised.value

    error = run(work, host)
    assert error.type == "placement"
    assert "environment prod: lacks node classes VHS_VideoCombine" in error.message
    assert error.as_dict()["environments"]["video"]["missing_classes"] == ["VHS_VideoCombine"]
    del graph["10"]  # the class aside, the model: named with its node
    error = run(work, host)
    assert "ckpt_name 'flux.safetensors' of node 4" in error.message
    assert JobStore(host.state_root).jobs() == []
    for item in host.instances.values():
        assert item.queued_ids() == [] and item.double.get("/history")[1] == {}


def test_a_dropped_websocket_mid_job_still_completes(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), extra_data=seconds(2, test_double_drop_ws_after_seconds=0.5)))
        return await found.wait(job.id, 60)

    job = run(work, host)
    assert job.state == "succeeded", job.error
    assert len(job.result["images"]) == 1 and len(host["a"].output_files()) == 1


def test_a_job_past_its_timeout_is_interrupted_and_reported(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), timeout=3.0, extra_data=seconds(60)))
        return await found.wait(job.id, 60)

    job = run(work, host)
    assert job.state == "timed_out"
    assert job.error["type"] == "timeout"
    assert job.error["message"] == "the job ran past its timeout of 3 s on instance a: its prompt was interrupted"
    status = host["a"].history(job.prompt_id)[job.prompt_id]["status"]
    assert [name for name, _ in status["messages"]][-1] == "execution_interrupted"
    assert host["a"].output_files() == [] and host["a"].queued_ids() == []


def test_comfyuis_node_errors_come_back_structured(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    graph = txt2img()
    graph["9"]["inputs"]["images"] = ["4", 0]  # a MODEL where SaveImage takes an IMAGE

    async def work(found: Runner) -> Any:
        return await found.wait((await found.submit(spec(graph))).id, 60)

    job = run(work, host)
    assert job.state == "failed"
    error = job.error
    assert error["type"] == "validation"
    assert error["message"].startswith("instance a refused the workflow: Prompt outputs failed validation\n  node 9")
    (node,) = error["nodes"]
    assert (node["node"], node["class_type"]) == ("9", "SaveImage")
    assert node["errors"][0]["type"] == "return_type_mismatch" and node["errors"][0]["input"] == "images"
    assert host["a"].queued_ids() == []


def test_an_execution_error_names_the_node(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    graph = txt2img()
    graph["10"] = {"class_type": "TestDoubleFail", "inputs": {"message": "the sampler ran out of memory"}}

    async def work(found: Runner) -> Any:
        return await found.wait((await found.submit(spec(graph))).id, 60)

    job = run(work, host)
    assert job.state == "failed"
    assert job.error["type"] == "execution"
    (node,) = job.error["nodes"]
    assert (node["node"], node["class_type"]) == ("10", "TestDoubleFail")
    assert job.error["message"].startswith("node 10 (TestDoubleFail) failed on instance a: ")
    assert node["errors"][0]["message"] == "the sampler ran out of memory" and node["errors"][0]["details"]


def test_cancel_interrupts_a_running_job_and_drops_a_pending_one(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> tuple[Any, Any, list[str]]:
        first = await found.submit(spec(txt2img(), extra_data=seconds(60)))
        second = await found.submit(spec(txt2img(), extra_data=seconds(60)))
        while (await found.wait(first.id, 0.05)).state != "running" or len(host["a"].queued_ids()) < 2:
            await asyncio.sleep(0.05)
        pending = await found.cancel(second.id)
        queued = host["a"].queued_ids()
        return await found.cancel(first.id), pending, queued

    first, second, queued = run(work, host)
    assert (first.state, second.state) == ("cancelled", "cancelled")
    assert queued == [first.prompt_id]  # the pending one left the queue, the running one ran on
    assert host["a"].history(second.prompt_id) == {}
    status = host["a"].history(first.prompt_id)[first.prompt_id]["status"]
    assert status["messages"][-1][0] == "execution_interrupted"
    assert host["a"].output_files() == []


def test_drain_refuses_new_jobs_and_waits_for_running_ones(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), extra_data=seconds(1)))
        draining = asyncio.ensure_future(found.drain(60))
        await asyncio.sleep(0)
        with pytest.raises(JobError) as raised:
            await found.submit(spec(txt2img()))
        assert raised.value.type == "draining"
        assert await draining == []
        found.resume()
        later = await found.submit(spec(txt2img()))
        return await found.wait(job.id), await found.wait(later.id, 60)

    first, later = run(work, host)
    assert (first.state, later.state) == ("succeeded", "succeeded")


def test_a_drain_past_its_timeout_lists_the_unfinished_jobs(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), extra_data=seconds(60)))
        left = await found.drain(0.5)
        return job, left

    job, left = run(work, host)
    assert [item.id for item in left] == [job.id] and left[0].state in ("submitting", "running")
    assert JobStore(host.state_root).get(job.id).state in ("submitting", "running")  # resumed by the next start


def test_a_job_left_running_and_finished_meanwhile_is_adopted_not_run_again(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def first(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), extra_data=seconds(1.5)))
        while (await found.wait(job.id, 0.05)).state != "running":
            pass
        return job  # close(): the runner stops following; the prompt runs on

    job = run(first, host)
    assert JobStore(host.state_root).get(job.id).state == "running"
    while host["a"].history(job.prompt_id) == {}:  # finished while no runner followed it
        asyncio.run(asyncio.sleep(0.1))

    async def second(found: Runner) -> Any:
        return await found.wait(job.id, 60)

    adopted = run(second, host)
    assert adopted.state == "succeeded", adopted.error
    assert adopted.attempts == 1 and len(adopted.result["images"]) == 1
    assert len(host["a"].output_files()) == 1  # ran once
    assert not (host.state_root / runner.SPECS / f"{job.id}.json").exists()


def test_a_start_with_a_broken_routing_file_keeps_the_unfinished_jobs_and_serves(
    jobs_host: StartHost, capfd: pytest.CaptureFixture[str]
) -> None:
    host = jobs_host({"a": "prod"})

    async def first(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), extra_data=seconds(1.5)))
        while (await found.wait(job.id, 0.05)).state != "running":
            pass
        return job

    job = run(first, host)
    routing = host.config_root / "routing.json"
    good = routing.read_text()
    routing.write_text("{not json")

    async def refused(found: Runner) -> Any:  # the runner started: a submission gets the file's error
        with pytest.raises(JobError) as refusal:
            await found.submit(spec(txt2img()))
        return refusal.value

    error = run(refused, host)
    assert error.type == "placement" and "routing.json" in str(error)
    assert JobStore(host.state_root).get(job.id).state == "running"  # kept, not failed
    assert "1 unfinished jobs are kept for the next start" in capfd.readouterr().err

    routing.write_text(good)

    async def second(found: Runner) -> Any:
        return await found.wait(job.id, 60)

    adopted = run(second, host)
    assert adopted.state == "succeeded", adopted.error
    assert len(host["a"].output_files()) == 1


def test_a_job_left_running_still_runs_after_a_restart(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def first(found: Runner) -> Any:
        job = await found.submit(spec(txt2img(), extra_data=seconds(2)))
        while (await found.wait(job.id, 0.05)).state != "running":
            pass
        return job

    job = run(first, host)

    async def second(found: Runner) -> Any:
        return await found.wait(job.id, 60)

    adopted = run(second, host)  # adopted while still on the double's queue, followed to its end
    assert adopted.state == "succeeded", adopted.error
    assert len(host["a"].output_files()) == 1


def test_a_running_job_its_instance_does_not_know_fails_naming_why(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    store = JobStore(host.state_root)
    job = store.create("portrait", {})
    store.submit(job.id, "prod", "a")
    store.start(job.id)

    async def nothing(found: Runner) -> Any:
        return await found.wait(job.id, 5)

    found = run(nothing, host)
    assert found.state == "failed" and found.error["type"] == "instance"
    assert found.error["message"] == (
        f"instance a no longer knows prompt {job.prompt_id} (it restarted while the runner was down): "
        "submit the job again"
    )
    assert host["a"].queued_ids() == [] and host["a"].output_files() == []


def test_inputs_are_uploaded_per_job_and_the_workflow_rewritten(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> Any:
        png = await _a_png(found, host)
        job = await found.submit(spec(img2img("input.png"), inputs={"input.png": png}))
        return await found.wait(job.id, 60), png

    job, png = run(work, host)
    assert job.state == "succeeded", job.error
    assert job.inputs == {"input.png": len(png)}
    assert host["a"].input_files() == [f"comfybake-{job.id}/input.png"]
    assert (host["a"].base / "input" / f"comfybake-{job.id}" / "input.png").read_bytes() == png
    assert base64.b64decode(job.result["images"][0]["data"]).startswith(PNG)


async def _a_png(found: Runner, host: JobsHost) -> bytes:
    """A real PNG made by the double (a txt2img job), to use as an input file."""
    job = await found.wait((await found.submit(spec(txt2img(prefix="source")))).id, 60)
    return base64.b64decode(job.result["images"][0]["data"])


def test_a_bad_input_name_is_refused_before_placement(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> JobError:
        with pytest.raises(JobError) as raised:
            await found.submit(spec(img2img("../x.png"), inputs={"../x.png": b"x"}))
        return raised.value

    error = run(work, host)
    assert error.type == "workflow" and error.message.startswith("input name '../x.png' is not a plain file name")
    assert JobStore(host.state_root).jobs() == []


def test_a_named_workflow_runs_in_its_environment(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod", "v": "video"})
    host.write_named({"poster": ("video", txt2img("sdxl.safetensors", prefix="poster"))})

    async def work(found: Runner) -> Any:
        with pytest.raises(JobError) as raised:
            await found.submit_named("portrait")
        assert raised.value.type == "workflow"
        assert raised.value.message == "no workflow is named 'portrait' (named workflows: poster)"
        with pytest.raises(JobError) as raised:
            await found.submit_named("poster", environment="prod")
        assert raised.value.message == (
            "the workflow poster runs in environment video, not prod: leave the environment out, or name video"
        )
        return await found.wait((await found.submit_named("poster", extra_data=seconds(0.2))).id, 60)

    job = run(work, host)
    assert job.state == "succeeded", job.error
    assert (job.workflow, job.environment, job.instance) == ("poster", "video", "v")
    assert [path.name for path in host["v"].output_files()] == ["poster_00001_.png"]


def test_a_finished_job_logs_one_json_line_without_inputs(
    jobs_host: StartHost, capfd: pytest.CaptureFixture[str]
) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> Any:
        return await found.wait((await found.submit(spec(img2img(), inputs={"input.png": b"canary-bytes"}))).id, 60)

    job = run(work, host)
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    (line,) = [line for line in lines if line.get("job") == job.id]
    assert line["state"] == job.state and line["instance"] == "a"
    assert "canary" not in json.dumps(lines)


def test_a_workflow_with_an_output_comfyui_refuses_is_refused_whole(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    graph = txt2img()
    graph["10"] = {"class_type": "TestDoubleFail", "inputs": {}}  # lacks its required `message`

    async def work(found: Runner) -> Any:
        return await found.wait((await found.submit(spec(graph, extra_data=seconds(1)))).id, 60)

    job = run(work, host)
    assert job.state == "failed" and job.error["type"] == "validation"
    assert job.error["message"].startswith("instance a refused the workflow: Some outputs failed validation\n  node 10")
    assert [(node["node"], node["errors"][0]["type"]) for node in job.error["nodes"]] == [
        ("10", "required_input_missing")]  # fmt: skip
    assert host["a"].queued_ids() == [] and host["a"].output_files() == []


def test_a_job_left_submitting_that_its_instance_never_got_is_posted_once_more(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})
    store = JobStore(host.state_root)
    job = store.create("", {})
    store.submit(job.id, "prod", "a")  # the runner stopped after keeping the graph, before posting
    kept = host.state_root / runner.SPECS
    kept.mkdir(mode=0o700)
    graph = {"graph": txt2img(prefix="again"), "outputs": "inline", "timeout": 60, "extra_data": {}}
    (kept / f"{job.id}.json").write_text(json.dumps(graph))

    async def nothing(found: Runner) -> Any:
        return await found.wait(job.id, 60)

    posted = run(nothing, host)
    assert posted.state == "succeeded", posted.error
    assert posted.attempts == 2 and [path.name for path in host["a"].output_files()] == ["again_00001_.png"]
    assert not (kept / f"{job.id}.json").exists()


def test_a_missing_node_type_refusal_names_its_node() -> None:
    body = {
        "error": {"type": "missing_node_type", "message": "Node 'X' not found. The custom node may not be installed.",
                  "details": "Node ID '#3'", "extra_info": {"node_id": "3", "class_type": "X", "node_title": "X"}},
        "node_errors": {},
    }  # fmt: skip
    error = runner.refused(body, "a").as_dict()
    assert error == {
        "type": "validation",
        "message": "instance a refused the workflow: Node 'X' not found. The custom node may not be installed.\n"
        "  node 3 (X): Node 'X' not found. The custom node may not be installed. (Node ID '#3')",
        "nodes": [{"node": "3", "class_type": "X", "errors": [{"type": "missing_node_type", "message": body["error"][
            "message"], "details": "Node ID '#3'", "input": None}]}],
    }  # fmt: skip


def test_without_routing_json_a_runner_starts_and_refuses_jobs_saying_so(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()

    async def main() -> JobError:
        found = Runner(tmp_path / "etc", JobStore(tmp_path / "state"), sinks={"inline": outputs.Inline()})
        await found.start()
        try:
            with pytest.raises(JobError) as raised:
                await found.submit(spec(txt2img()))
            return raised.value
        finally:
            await found.close()

    error = asyncio.run(main())
    assert error.type == "placement" and "routing.json" in error.message
    assert JobStore(tmp_path / "state").jobs() == []


def test_a_closed_runner_refuses_to_cancel_leaving_the_job_to_the_next_start(tmp_path: Path) -> None:
    """A cancel that reaches a stopping service cannot stop the prompt: marking the job cancelled
    would leave its prompt running with nobody to follow it."""
    (tmp_path / "etc").mkdir()
    write_routing(tmp_path / "etc", [stopped("a", "prod").record()])
    store = JobStore(tmp_path / "state")

    async def main() -> tuple[str, JobError]:
        found = Runner(tmp_path / "etc", store, sinks={"inline": outputs.Inline()})
        await found.start()
        job = store.create("")  # running, as a job of this runner's before its stop
        store.submit(job.id, "prod", "a")
        store.start(job.id)
        await found.close()
        with pytest.raises(JobError) as raised:
            await found.cancel(job.id)
        return job.id, raised.value

    job_id, error = asyncio.run(main())
    job = store.get(job_id)
    assert error.type == "draining" and job.id in error.message
    assert store.get(job.id).state == "running"
