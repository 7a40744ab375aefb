"""The job store (jobs/store.py) on real SQLite files: explicit transitions that refuse illegal
moves, safe with threads and processes, consistent after a process killed mid-transition, no
input data in the file, one JSON log line per finished job."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import stat
import threading
import uuid
from pathlib import Path

import pytest

from comfybake import logs
from comfybake.jobs import store
from comfybake.jobs.store import IllegalTransitionError, JobNotFoundError, JobStore

CANARY = b"\x89PNG canary-image-bytes hf_CanaryCanaryCanaryCanary1234"
FORK = multiprocessing.get_context("fork")


def canonical_uuid4(text: str) -> bool:
    value = uuid.UUID(text)
    return value.version == 4 and str(value) == text


def test_a_job_is_created_queued_with_its_prompt_id_and_no_input_data(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path / "state")
    job = jobs.create("portrait", {"image": CANARY, "mask": 1234})
    assert job.state == "queued" and job.attempts == 0
    assert canonical_uuid4(job.id) and canonical_uuid4(job.prompt_id) and job.id != job.prompt_id
    assert job.inputs == {"image": len(CANARY), "mask": 1234}
    assert job.created.endswith("+00:00") and job.started is None and job.finished is None
    assert jobs.get(job.id) == job
    for path in (tmp_path / "state").iterdir():  # the database, its -wal and -shm
        assert CANARY not in path.read_bytes() and b"canary" not in path.read_bytes()


def test_the_file_is_wal_0600_and_a_widened_mode_is_put_back(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    reader = jobs.connect()  # while a connection is open, SQLite keeps the -wal and -shm files
    try:
        reader.execute("SELECT count(*) FROM jobs").fetchone()
        jobs.create("w")
        assert jobs.path == tmp_path / "jobs.sqlite"
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    finally:
        reader.close()
    assert modes == {"jobs.sqlite": 0o600, "jobs.sqlite-wal": 0o600, "jobs.sqlite-shm": 0o600}
    with sqlite3.connect(jobs.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    os.chmod(jobs.path, 0o644)
    JobStore(tmp_path)
    assert stat.S_IMODE(jobs.path.stat().st_mode) == 0o600


def test_a_job_runs_through_its_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.create("portrait")
    job = jobs.submit(job.id, "prod", "a")
    assert (job.state, job.environment, job.instance, job.attempts) == ("submitting", "prod", "a", 1)
    job = jobs.start(job.id)
    assert job.state == "running" and job.started
    assert capsys.readouterr().err == ""  # nothing logged before the job ends
    job = jobs.succeed(job.id, {"images": [{"filename": "ComfyUI_00001_.png"}]})
    assert job.state == "succeeded" and job.finished and job.result == {"images": [{"filename": "ComfyUI_00001_.png"}]}
    assert job.duration() is not None and job.duration() >= 0  # type: ignore[operator]


@pytest.mark.parametrize(
    ("moves", "target", "message"),
    [
        ([], "start", "is queued: it cannot become running (only a job submitting can)"),
        (["submit", "start", "succeed"], "start", "is succeeded: it cannot become running"),
        (["submit", "start"], "submit", "is running: it cannot become submitting (only a job queued or submitting"),
        (["cancel"], "fail", "is cancelled: it cannot become failed"),
        (["submit", "start", "time_out"], "succeed", "is timed_out: it cannot become succeeded"),
        ([], "succeed", "is queued: it cannot become succeeded (only a job running can)"),
    ],
)
def test_an_illegal_transition_is_refused_and_changes_nothing(
    tmp_path: Path, moves: list[str], target: str, message: str
) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.create("w")
    calls = {
        "submit": lambda: jobs.submit(job.id, "prod", "a"),
        "start": lambda: jobs.start(job.id),
        "succeed": lambda: jobs.succeed(job.id, {}),
        "fail": lambda: jobs.fail(job.id, {"error": "x"}),
        "cancel": lambda: jobs.cancel(job.id),
        "time_out": lambda: jobs.time_out(job.id),
    }
    for move in moves:
        calls[move]()
    before = jobs.get(job.id)
    with pytest.raises(IllegalTransitionError) as raised:
        calls[target]()
    assert str(raised.value).startswith(f"job {job.id} {message}")
    assert jobs.get(job.id) == before


def test_an_unknown_job_is_named(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    with pytest.raises(JobNotFoundError, match="no job nope in "):
        jobs.start("nope")
    with pytest.raises(store.StoreError, match=r"^paused is not a job state"):
        jobs.jobs("paused")


def test_recover_lists_the_jobs_to_resume_and_a_resubmit_counts_an_attempt(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    queued, submitting, running, done = (jobs.create(name) for name in ("q", "s", "r", "d"))
    jobs.submit(submitting.id, "prod", "a")
    jobs.start(jobs.submit(running.id, "prod", "b").id)
    jobs.fail(jobs.submit(done.id, "prod", "a").id, {"error": "boom"})
    again = JobStore(tmp_path)  # a restarted process
    assert [(job.workflow, job.state) for job in again.recover()] == [("s", "submitting"), ("r", "running")]
    # the instance does not know the prompt: post it again, same prompt_id, one more attempt
    resubmitted = again.submit(submitting.id, "prod", "c")
    assert (resubmitted.attempts, resubmitted.instance) == (2, "c")
    assert resubmitted.prompt_id == jobs.get(submitting.id).prompt_id
    assert [job.state for job in again.jobs("queued")] == ["queued"] and again.jobs("queued")[0].id == queued.id


def test_threads_racing_for_one_transition_let_exactly_one_through(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.submit(jobs.create("w").id, "prod", "a")
    outcomes: list[str] = []
    barrier = threading.Barrier(12)

    def race() -> None:
        barrier.wait()
        try:
            jobs.start(job.id)
            outcomes.append("won")
        except IllegalTransitionError:
            outcomes.append("refused")

    threads = [threading.Thread(target=race) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 11 + ["won"]
    assert jobs.get(job.id).state == "running"


def _worker(root: str, count: int) -> None:
    jobs = JobStore(root)
    for _ in range(count):
        job = jobs.create("w")
        jobs.start(jobs.submit(job.id, "prod", str(os.getpid())).id)


def test_processes_write_at_once_and_every_job_is_whole(tmp_path: Path) -> None:
    JobStore(tmp_path)
    workers = [FORK.Process(target=_worker, args=(str(tmp_path), 15)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    found = JobStore(tmp_path).jobs()
    assert len(found) == 60 and {job.state for job in found} == {"running"}
    assert len({job.prompt_id for job in found}) == 60


class _DiesAtCommit(JobStore):
    """A store whose process dies (os._exit, as a kill would) the moment its transaction commits."""

    def connect(self) -> sqlite3.Connection:
        connection = super().connect()
        connection.set_trace_callback(lambda statement: os._exit(9) if statement == "COMMIT" else None)
        return connection


def _killed(root: str, job_id: str, move: str) -> None:
    jobs = JobStore(root)
    dying = _DiesAtCommit(root)
    if move == "start":
        dying.start(job_id)
    elif move == "submit":
        dying.submit(job_id, "prod", "a")
    else:  # committed, then killed before anything else
        jobs.submit(job_id, "prod", "a")
        os._exit(9)


def run_killed(root: Path, job_id: str, move: str) -> None:
    process = FORK.Process(target=_killed, args=(str(root), job_id, move))
    process.start()
    process.join(timeout=30)
    assert process.exitcode == 9


def test_a_process_killed_mid_transition_leaves_the_store_consistent(tmp_path: Path) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.create("w")
    run_killed(tmp_path, job.id, "submit")  # killed inside the transaction: it never happened
    with sqlite3.connect(jobs.path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert jobs.get(job.id).state == "queued" and jobs.recover() == []
    run_killed(tmp_path, job.id, "committed")  # killed right after: the job is submitting
    assert [(item.id, item.state) for item in jobs.recover()] == [(job.id, "submitting")]
    run_killed(tmp_path, job.id, "start")  # killed inside start: still submitting, still resumed
    assert [(item.id, item.state, item.attempts) for item in JobStore(tmp_path).recover()] == [
        (job.id, "submitting", 1)
    ]
    assert jobs.start(job.id).state == "running"  # and the store takes writes again at once


def test_a_finished_job_logs_one_json_line_without_its_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.create("portrait", {"image": CANARY})
    jobs.start(jobs.submit(job.id, "prod", "a").id)
    jobs.succeed(job.id, {"images": []})
    cancelled = jobs.create("poster", {"image": CANARY})
    jobs.cancel(cancelled.id)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == f"job {job.id} succeeded" and first["level"] == "info"
    assert {key: first[key] for key in ("job", "workflow", "environment", "instance", "state", "attempts")} == {
        "job": job.id, "workflow": "portrait", "environment": "prod", "instance": "a", "state": "succeeded",
        "attempts": 1,
    }  # fmt: skip
    assert isinstance(first["duration"], float) and first["duration"] >= 0
    assert first["component"] == "jobs" and first["time"].endswith("Z")
    assert (second["state"], second["level"], second["workflow"]) == ("cancelled", "warning", "poster")
    assert "environment" not in second  # never submitted
    assert "canary" not in "\n".join(lines).lower() and "image" not in first


def test_in_json_mode_the_line_joins_the_commands_log_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = JobStore(tmp_path)
    job = jobs.submit(jobs.create("w").id, "prod", "a")
    logs.install("json", "serve")
    try:
        jobs.fail(job.id, {"error": "Workflow validation failed"})
    finally:
        logs.install("text", "serve")
    [line] = capsys.readouterr().err.splitlines()
    logged = json.loads(line)
    assert (logged["component"], logged["level"], logged["state"], logged["job"]) == (
        "serve",
        "error",
        "failed",
        job.id,
    )
