"""Jobs survive the API process: `comfybake jobs serve` killed with SIGKILL mid-job and started
again on the same state root follows the job to its end, once. The double counts: a prompt
posted twice would save two files (its SaveImage numbers each run), and its /history would hold
the job's prompt id once either way, so the files are what is counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.jobs import JobInstance, start_host, txt2img
from jobs_serve import serve, written


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[JobInstance]:
    host = start_host(tmp_path, {"a": "prod"})
    yield host["a"]
    host.stop()


def wait_until(check: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@pytest.mark.parametrize("restart", ["while it runs", "after it ended"])
def test_a_job_survives_a_killed_api_process_and_runs_once(tmp_path: Path, instance: JobInstance, restart: str) -> None:
    config, state = tmp_path / "etc", tmp_path / "state"
    first = serve(config, state, tmp_path / "first.log")
    body = {"workflow": txt2img(prefix="restart", steps=10), "extra_data": {"test_double_seconds": 3}}
    job = first.job_api("POST", "/v1/jobs", body).body["job"]
    wait_until(lambda: first.job_api("GET", f"/v1/jobs/{job['id']}").body["job"]["state"] == "running", "running")
    first.kill()  # SIGKILL: no drain, no goodbye
    if restart == "after it ended":
        wait_until(lambda: instance.double.get(f"/history/{job['prompt_id']}")[1], "the prompt's end on the instance")
    second = serve(config, state, tmp_path / "second.log")
    try:
        ended = second.job_api("GET", f"/v1/jobs/{job['id']}?wait=60").body["job"]
        assert ended["state"] == "succeeded", ended["error"]
        assert ended["attempts"] == 1  # adopted by its prompt id, not posted again
        assert ended["prompt_id"] == job["prompt_id"] and ended["instance"] == "a"
        files = written(instance, "restart")
        assert len(files) == 1, files
        assert [item["filename"] for item in ended["result"]["images"]] == [files[0].name]
        [line] = [item for item in second.finished_lines() if item.get("job") == job["id"]]
        assert line["state"] == "succeeded"
        assert not [item for item in first.finished_lines() if item.get("job") == job["id"]]
    finally:
        assert second.stop() == 0
    _status, queue = instance.double.get("/queue")
    assert queue == {"queue_running": [], "queue_pending": []}
    assert len(written(instance, "restart")) == 1


def test_sigterm_drains_the_running_job_before_exiting(tmp_path: Path, instance: JobInstance) -> None:
    """A stop (SIGTERM) refuses new jobs and follows the running one to its end within --stop-timeout."""
    served = serve(tmp_path / "etc", tmp_path / "state", tmp_path / "serve.log", "--stop-timeout", "60")
    body = {"workflow": txt2img(prefix="drained", steps=10), "extra_data": {"test_double_seconds": 4}}
    job = served.job_api("POST", "/v1/jobs", body).body["job"]
    served.process.terminate()
    wait_until(lambda: served.job_api("GET", "/v1/health").status == 503, "draining")
    refused = served.job_api("POST", "/v1/jobs", {"workflow": txt2img(prefix="late")})
    assert refused.status == 503 and refused.headers["retry-after"]
    assert served.process.wait(timeout=60) == 0
    [line] = [item for item in served.finished_lines() if item.get("job") == job["id"]]
    assert line["state"] == "succeeded"
    assert len(written(instance, "drained")) == 1 and written(instance, "late") == []


def test_a_request_waiting_for_a_job_is_answered_when_the_drain_ends(tmp_path: Path, instance: JobInstance) -> None:
    """A stop whose drain ends with the job still running answers the requests waiting for it
    (202, the job as it is, resumed by the next start) before the process exits."""
    served = serve(tmp_path / "etc", tmp_path / "state", tmp_path / "serve.log", "--stop-timeout", "0.5")
    body = {"workflow": txt2img(prefix="long", steps=10), "extra_data": {"test_double_seconds": 600}}
    job = served.job_api("POST", "/v1/jobs", body).body["job"]
    wait_until(lambda: served.job_api("GET", f"/v1/jobs/{job['id']}").body["job"]["state"] == "running", "running")
    replies: list[Any] = []
    waiting = threading.Thread(
        target=lambda: replies.append(served.job_api("GET", f"/v1/jobs/{job['id']}?wait=300", timeout=300))
    )
    waiting.start()
    time.sleep(0.5)  # the request is in (the double runs its prompt for 600 s)
    served.process.terminate()
    waiting.join()
    assert served.process.wait(timeout=60) == 0
    [reply] = replies
    assert reply.status == 200 and reply.body["job"]["state"] == "running", reply.body
