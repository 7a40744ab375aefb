"""ComfyUI's job API over aiohttp (jobs/client.py) against the ComfyUI test double as a process:
the client's prompt id and client id, messages in ComfyUI's order over a socket opened before
posting, a socket dropped mid-run (reconnect), polling when no socket opens, refusals with
ComfyUI's shapes, stop (queue delete or targeted interrupt), uploads and /view."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from harness.jobs import JobInstance, JobsHost, img2img, txt2img

from comfybake.jobs import client as comfy

T = TypeVar("T")
StartHost = Callable[..., JobsHost]


def talk(item: JobInstance, work: Callable[[comfy.Client], Coroutine[Any, Any, T]]) -> T:
    async def main() -> T:
        async with comfy.session() as http:
            return await work(comfy.Client(http, item.url, item.name))

    return asyncio.run(main())


def test_a_prompt_is_queued_with_its_ids_and_followed_to_its_outputs(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]
    prompt_id, client_id = str(uuid.uuid4()), uuid.uuid4().hex
    events: list[dict[str, Any]] = []

    async def work(api: comfy.Client) -> tuple[dict[str, Any], comfy.Outcome, bytes]:
        follower = api.follow(prompt_id, client_id, events.append)
        assert await follower.connect()
        answer = await api.queue_prompt(txt2img(), prompt_id, client_id, {"test_double_seconds": 0.3})
        outcome = await follower.outcome()
        image = outcome.outputs["9"]["images"][0]
        return answer, outcome, await api.view(image["filename"], image["subfolder"], image["type"])

    answer, outcome, data = talk(item, work)
    assert answer["prompt_id"] == prompt_id and answer["node_errors"] == {}
    assert outcome.status == "success"
    assert data.startswith(b"\x89PNG") and data == item.output_files()[0].read_bytes()
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["execution_start", "execution_cached"]
    assert "progress" in kinds and kinds.index("executed") > kinds.index("progress")
    assert all(event["data"]["prompt_id"] == prompt_id for event in events)


def test_a_socket_dropped_mid_run_is_opened_again(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]
    prompt_id, client_id = str(uuid.uuid4()), uuid.uuid4().hex

    async def work(api: comfy.Client) -> tuple[comfy.Outcome, int]:
        follower = api.follow(prompt_id, client_id)
        await follower.connect()
        extra = {"test_double_seconds": 2, "test_double_drop_ws_after_seconds": 0.5}
        await api.queue_prompt(txt2img(), prompt_id, client_id, extra)
        return await follower.outcome(), follower.reconnects

    outcome, reconnects = talk(item, work)
    assert outcome.status == "success" and outcome.outputs["9"]["images"]
    assert reconnects >= 1


def test_without_a_socket_the_prompt_is_polled_to_its_end(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]
    prompt_id, client_id = str(uuid.uuid4()), uuid.uuid4().hex

    async def work(api: comfy.Client) -> comfy.Outcome:
        follower = api.follow(prompt_id, client_id)  # never connected: /history is polled
        await api.queue_prompt(txt2img(), prompt_id, client_id, {"test_double_seconds": 0.3})
        return await follower.outcome()

    assert talk(item, work).status == "success"


def test_a_prompt_its_instance_does_not_know_is_lost(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]

    async def work(api: comfy.Client) -> comfy.Outcome:
        return await api.follow(str(uuid.uuid4()), "x").outcome()

    assert talk(item, work).status == "lost"


def test_a_refusal_carries_comfyuis_error_and_node_errors(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]
    graph = txt2img()
    graph["4"]["class_type"] = "NoSuchLoader"

    async def work(api: comfy.Client) -> dict[str, Any]:
        with pytest.raises(comfy.PromptRefusedError) as raised:
            await api.queue_prompt(graph, str(uuid.uuid4()), "x")
        return raised.value.body

    body = talk(item, work)
    assert body["error"]["type"] == "missing_node_type"
    assert body["error"]["extra_info"]["node_id"] == "4" and body["error"]["extra_info"]["class_type"] == "NoSuchLoader"
    assert item.queued_ids() == []


def test_stop_drops_a_pending_prompt_and_interrupts_the_running_one(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]
    running, pending = str(uuid.uuid4()), str(uuid.uuid4())

    async def work(api: comfy.Client) -> tuple[comfy.QueueState, comfy.Outcome]:
        for prompt_id in (running, pending):
            await api.queue_prompt(txt2img(), prompt_id, "x", {"test_double_seconds": 60})
        while running not in (await api.queue()).running:
            await asyncio.sleep(0.05)
        await api.stop(pending)
        left = await api.queue()
        await api.stop(running)
        return left, await api.follow(running, "x").outcome()

    left, outcome = talk(item, work)
    assert left == comfy.QueueState(frozenset({running}), frozenset())
    assert outcome.status == "interrupted"
    assert item.history(pending) == {}


def test_an_upload_lands_in_its_subfolder_and_a_workflow_reads_it(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]
    prompt_id = str(uuid.uuid4())

    async def work(api: comfy.Client) -> tuple[str, str, comfy.Outcome]:
        await api.queue_prompt(txt2img(), str(uuid.uuid4()), "x")
        while not item.output_files():
            await asyncio.sleep(0.05)
        png = item.output_files()[0].read_bytes()
        first = await api.upload("in.png", png, "comfybake-test")
        again = await api.upload("in.png", png, "comfybake-test")  # overwrite: the same name
        await api.queue_prompt(img2img(first), prompt_id, "x")
        return first, again, await api.follow(prompt_id, "x").outcome()

    first, again, outcome = talk(item, work)
    assert first == again == "comfybake-test/in.png"
    assert item.input_files() == ["comfybake-test/in.png"]
    assert outcome.status == "success"


def test_an_instance_that_does_not_answer_is_named(jobs_host: StartHost) -> None:
    item = jobs_host({"a": "prod"})["a"]
    item.double.stop()

    async def work(api: comfy.Client) -> str:
        with pytest.raises(comfy.InstanceError) as raised:
            await api.queue()
        return str(raised.value)

    assert talk(item, work).startswith(f"instance a ({item.url}): GET /queue: ")


def with_server(
    routes: list[web.RouteDef], work: Callable[[comfy.Client], Coroutine[Any, Any, T]], total: float = 30.0
) -> T:
    """Run `work` against a loopback aiohttp server answering `routes` (what the double cannot do:
    hang, or drop a connection after acting on it), with a client whose calls give up after `total` s."""

    async def main() -> T:
        app = web.Application()
        app.add_routes(routes)
        server = web.AppRunner(app, shutdown_timeout=0.1)  # a hanging handler is cancelled
        await server.setup()
        site = web.TCPSite(server, "127.0.0.1", 0)
        await site.start()
        port = server.addresses[0][1]
        try:
            timeout = aiohttp.ClientTimeout(total=total)
            async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as http:
                return await work(comfy.Client(http, f"http://127.0.0.1:{port}", "a"))
        finally:
            await server.cleanup()

    return asyncio.run(main())


def test_a_call_that_times_out_says_so() -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        return web.json_response({})

    async def work(api: comfy.Client) -> str:
        with pytest.raises(comfy.InstanceError) as raised:
            await api.queue()
        return str(raised.value)

    message = with_server([web.get("/queue", hang)], work, total=0.3)
    assert message.endswith(": GET /queue: TimeoutError"), message


def test_a_prompt_queued_but_not_answered_is_taken_back() -> None:
    pending: list[str] = []

    async def prompt(request: web.Request) -> web.Response:
        pending.append((await request.json())["prompt_id"])
        assert request.transport is not None
        request.transport.close()  # queued, then the answer is lost
        return web.json_response({})

    async def queue(request: web.Request) -> web.Response:
        return web.json_response({"queue_running": [], "queue_pending": [[0, item, {}, {}, []] for item in pending]})

    async def delete(request: web.Request) -> web.Response:
        for item in (await request.json())["delete"]:
            pending.remove(item)
        return web.json_response({})

    prompt_id = str(uuid.uuid4())

    async def work(api: comfy.Client) -> str:
        with pytest.raises(comfy.InstanceError) as raised:
            await api.queue_prompt(txt2img(), prompt_id, "x")
        return str(raised.value)

    routes = [web.post("/prompt", prompt), web.get("/queue", queue), web.post("/queue", delete)]
    message = with_server(routes, work)
    assert message.startswith("instance a (http://127.0.0.1:") and ": POST /prompt: " in message
    assert pending == []  # not left to run while its job says it was not run
