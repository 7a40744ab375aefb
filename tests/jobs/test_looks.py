"""Placement under load (placement.Looks, the runner's use of it): each instance's look reused for
a while, the jobs placed since counted on top of its queue, and an instance that stopped within
that while taking nothing: the job goes to another one, once, and is not lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from harness.jobs import JobsHost, run_runner, txt2img
from jobs_loopback import DATA, StartInstance, write_routing

from comfybake.jobs import placement, workflow
from comfybake.jobs.placement import Looks, ObjectInfoCache
from comfybake.jobs.runner import JobSpec, Runner

TXT2IMG = workflow.load(DATA / "txt2img.json")
T = TypeVar("T")
StartHost = Callable[..., JobsHost]


def run(work: Callable[[Runner], Coroutine[Any, Any, T]], host: JobsHost, looks: Looks) -> T:
    """Run `work(runner)` with a started runner placing with `looks`, closing it after."""
    return run_runner(work, host, looks=looks)


def spec(graph: dict[str, Any], seconds: float = 0.0) -> JobSpec:
    return JobSpec(workflow=workflow.check(graph), extra_data={"test_double_seconds": seconds} if seconds else {})


def prompts(host: JobsHost) -> dict[str, int]:
    """How many prompts each instance ran (its /history)."""
    counts = {}
    for name, item in host.instances.items():
        status, history = item.double.get("/history")
        assert status == 200 and isinstance(history, dict), history
        counts[name] = len(history)
    return counts


def test_a_look_is_reused_and_jobs_placed_since_count_until_a_later_look_sees_them(
    tmp_path: Path, instance: StartInstance
) -> None:
    a, b = instance("a", "prod", queue_remaining=0), instance("b", "prod", queue_remaining=0)
    found = placement.load_routing(write_routing(tmp_path, [a.record(), b.record()]))
    now = [100.0]
    looks, cache = Looks(ttl=1.0, clock=lambda: now[0]), ObjectInfoCache()

    burst = [placement.place(TXT2IMG, found, cache, looks=looks) for _ in range(3)]
    assert [(item.route.name, item.queue_remaining) for item in burst] == [("a", 0), ("b", 0), ("a", 1)]
    assert a.hits["/prompt"] == b.hits["/prompt"] == 1  # one look each for the three

    looks.posted(burst[0].claim)  # a took the first job: the next look of a sees it queued
    a.queue_remaining = 1
    now[0] += 1.0
    later = placement.place(TXT2IMG, found, cache, looks=looks)
    assert a.hits["/prompt"] == b.hits["/prompt"] == 2
    # a: 1 queued (the first) + the third, not posted yet; b: the second, not posted yet
    assert (later.route.name, later.queue_remaining) == ("b", 1)

    for item in (burst[1], burst[2], later):
        looks.release(item.claim)  # ended
    assert placement.place(TXT2IMG, found, cache, looks=looks).route.name == "b"  # a's queue holds one


def test_a_burst_is_spread_evenly_over_four_instances(jobs_host: StartHost) -> None:
    """Twelve jobs submitted at once, each running 3 s: three on each instance. The look is kept
    for the whole burst, so only what the runner counts spreads them (a queue length read before
    the burst is 0 everywhere)."""
    host = jobs_host(dict.fromkeys(("a", "b", "c", "d"), "prod"))

    async def work(found: Runner) -> list[Any]:
        jobs = await asyncio.gather(*(found.submit(spec(txt2img(prefix=f"burst{index}"), 3)) for index in range(12)))
        return [await found.wait(job.id, 120) for job in jobs]

    ended = run(work, host, Looks(ttl=60.0))
    assert [job.state for job in ended] == ["succeeded"] * 12, [job.error for job in ended]
    assert prompts(host) == {"a": 3, "b": 3, "c": 3, "d": 3}
    assert sorted(job.instance for job in ended) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3


def test_an_instance_stopped_since_its_look_takes_nothing_and_the_job_runs_elsewhere(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod", "b": "prod"})

    async def work(found: Runner) -> tuple[Any, Any]:
        first = await found.wait((await found.submit(spec(txt2img(prefix="first")))).id, 60)
        await asyncio.to_thread(host["a"].double.stop)  # a's look, still kept, says ready and idle
        moved = await found.submit(spec(txt2img(prefix="moved")))
        assert moved.instance == "a"
        return first, await found.wait(moved.id, 60)

    first, moved = run(work, host, Looks(ttl=60.0))
    assert (first.state, first.instance) == ("succeeded", "a")
    assert moved.state == "succeeded", moved.error
    assert (moved.instance, moved.attempts) == ("b", 2)  # placed once more, on b
    assert [path.name for path in host["a"].output_files()] == ["first_00001_.png"]
    assert [path.name for path in host["b"].output_files()] == ["moved_00001_.png"]
    assert list(host["b"].history(moved.prompt_id)) == [moved.prompt_id]  # posted once, with its prompt id


def test_when_no_other_instance_can_take_it_the_job_fails_saying_why(jobs_host: StartHost) -> None:
    host = jobs_host({"a": "prod"})

    async def work(found: Runner) -> Any:
        await found.wait((await found.submit(spec(txt2img()))).id, 60)
        await asyncio.to_thread(host["a"].double.stop)
        return await found.wait((await found.submit(spec(txt2img()))).id, 60)

    job = run(work, host, Looks(ttl=60.0))
    assert job.state == "failed" and job.error["type"] == "instance"
    message = job.error["message"]
    assert message.startswith("instance a (http://127.0.0.1:") and "POST /prompt" in message, message
    assert "the job was not run, and no other instance can run it now" in message
    assert "environment prod: no instance is ready: a: it refused a connection when a job was posted" in message
