"""One ComfyUI instance's job API over aiohttp: upload inputs, queue a prompt, follow it, fetch outputs.

The wire format is ComfyUI's own (server.py, execution.py; docs/serving.md#how-a-job-runs):

- `POST /prompt {"prompt", "client_id", "prompt_id", "extra_data"}`: the prompt id is made by the
  job store before posting, so a restarted runner can find the prompt again. A 400 carries
  ComfyUI's `error` and `node_errors`, raised as `PromptRefusedError`; so is a 200 whose
  `node_errors` is not empty (ComfyUI then runs only the outputs that passed), after the prompt
  is taken back off the queue.
- `/ws?clientId=<client id>`: ComfyUI sends a prompt's execution messages only to the sockets of
  its `client_id`. The socket is opened *before* the prompt is posted, so no message is missed;
  when it drops, it is opened again with the same client id (backoff), and meanwhile
  `GET /history/<prompt id>` is polled, so a prompt that ends while the socket is down is seen.
- `GET /history/<id>` (the outcome and outputs), `GET /queue`, `POST /queue {"delete"}`,
  `POST /interrupt {"prompt_id"}`, `POST /upload/image`, `GET /view`.

Instances are asked directly, never through a proxy the environment names (a host's loopback
is not reachable through one), as `engine.runtime` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from comfybake import logs

HTTP_TIMEOUT = 30.0  # seconds for one call (a /view of a large video gets VIEW_TIMEOUT)
VIEW_TIMEOUT = 300.0
HISTORY_WAIT = 10.0  # seconds to wait for /history after the socket said the prompt ended
IDLE_CHECK = 10.0  # seconds of silence on the socket after which /history and /queue are asked
BACKOFF = (0.25, 0.5, 1.0, 2.0)  # reconnect delays, /history polled before each; the last repeats
MAX_MESSAGE = 64 << 20  # ComfyUI's binary preview frames can be large

Event = Callable[[dict[str, Any]], None]
# What a failed call raises. On Python 3.10 asyncio's TimeoutError is not yet the builtin one.
FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, OSError)  # not TimeoutError: Python 3.10 hosts


def why(error: BaseException) -> str:
    """A failed call's reason: its message, else its kind (a timeout's message is empty)."""
    return str(error) or type(error).__name__


class InstanceError(Exception):
    """The instance did not answer as ComfyUI does; the message names it and the call."""


class UnreachableError(InstanceError):
    """No connection to the instance could be made (it refused it: stopped, or restarting), so the
    call was never sent: a prompt posted so was not queued, and may go to another instance."""


class PromptRefusedError(InstanceError):
    """ComfyUI refused the prompt (400): `body` is its `{"error", "node_errors"}`."""

    def __init__(self, message: str, body: dict[str, Any]) -> None:
        super().__init__(message)
        self.body = body


@dataclass(frozen=True)
class Outcome:
    """How a prompt ended: `success` (with `outputs`, node id to its output), `error` (`error` is
    ComfyUI's execution_error data), `interrupted`, or `lost` (its instance no longer knows it)."""

    status: str
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueState:
    running: frozenset[str]
    pending: frozenset[str]

    def holds(self, prompt_id: str) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


def session() -> aiohttp.ClientSession:
    """The session a runner shares between its instances (no proxies from the environment)."""
    return aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))


class Client:
    """ComfyUI's API of the instance at `url`, named `name` in errors."""

    def __init__(self, http: aiohttp.ClientSession, url: str, name: str = "") -> None:
        self.http = http
        self.url = url.rstrip("/")
        self.name = name or self.url

    def _fail(self, call: str, error: BaseException | str) -> InstanceError:
        kind = UnreachableError if isinstance(error, aiohttp.ClientConnectorError) else InstanceError
        return kind(f"instance {self.name} ({self.url}): {call}: {error}")

    async def _json(self, method: str, route: str, body: Any = None) -> Any:
        """A JSON call; an error status or a connection failure is an InstanceError naming both."""
        call = f"{method} {route}"
        try:
            async with self.http.request(method, self.url + route, json=body) as response:
                text = await response.text()
                if response.status >= 400:
                    raise self._fail(call, f"HTTP {response.status} {text[:300]}")
        except FAILURES as error:
            raise self._fail(call, why(error)) from None
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            raise self._fail(call, f"the answer is not JSON: {text[:200]!r}") from None

    # ----------------------------------------------------------------------- calls

    async def upload(self, name: str, data: bytes, subfolder: str) -> str:
        """Upload an input file (`overwrite`), returning the name a workflow gives it: `subfolder/name`
        as ComfyUI answered (its LoadImage reads a subfolder of input/ so)."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="application/octet-stream")
        form.add_field("overwrite", "true")
        form.add_field("type", "input")
        form.add_field("subfolder", subfolder)
        call = f"POST /upload/image ({name})"
        try:
            async with self.http.post(self.url + "/upload/image", data=form) as response:
                text = await response.text()
                if response.status >= 400:
                    raise self._fail(call, f"HTTP {response.status} {text[:300]}")
                answer = json.loads(text)
        except (*FAILURES, ValueError) as error:
            raise self._fail(call, why(error)) from None
        folder = str(answer.get("subfolder") or "")
        return f"{folder}/{answer['name']}" if folder else str(answer["name"])

    async def queue_prompt(
        self, graph: Mapping[str, Any], prompt_id: str, client_id: str, extra_data: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Post the prompt with its id and client id; PromptRefused with ComfyUI's errors on 400."""
        body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id, "extra_data": dict(extra_data or {})}
        call = "POST /prompt"
        try:
            async with self.http.post(self.url + "/prompt", json=body) as response:
                text = await response.text()
                status = response.status
        except aiohttp.ClientConnectorError as error:  # no connection: nothing was sent, nothing queued
            raise self._fail(call, error) from None
        except FAILURES as error:
            # The instance may have queued the prompt before the answer was lost (a timeout, a
            # dropped connection): take it back, so that a job reported "not run" does not run.
            with contextlib.suppress(InstanceError):
                await self.stop(prompt_id)
            raise self._fail(call, why(error)) from None
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if status == 400 and isinstance(answer, dict):
            raise PromptRefusedError(f"instance {self.name} refused the prompt", answer)
        if status >= 400 or not isinstance(answer, dict):
            raise self._fail(call, f"HTTP {status} {text[:300]}")
        if answer.get("node_errors"):
            # ComfyUI queued the outputs that passed and dropped the others: a partial result
            # nobody asked for. The prompt is taken back and refused as a whole.
            await self.stop(prompt_id)
            whole = {"type": "prompt_outputs_failed_validation", "message": "Some outputs failed validation"}
            raise PromptRefusedError(f"instance {self.name} refused part of the prompt", {**answer, "error": whole})
        if answer.get("prompt_id") not in (None, prompt_id):
            # A ComfyUI older than the client's prompt_id would make its own; nothing could find it again.
            raise self._fail(call, f"it queued the prompt as {answer['prompt_id']}, not {prompt_id}: upgrade ComfyUI")
        return answer

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry, None while it is not finished (or unknown)."""
        answer = await self._json("GET", f"/history/{prompt_id}")
        entry = answer.get(prompt_id) if isinstance(answer, dict) else None
        return entry if isinstance(entry, dict) else None

    async def queue(self) -> QueueState:
        answer = await self._json("GET", "/queue")
        try:
            return QueueState(
                frozenset(str(item[1]) for item in answer["queue_running"]),
                frozenset(str(item[1]) for item in answer["queue_pending"]),
            )
        except (KeyError, TypeError, IndexError):
            raise self._fail("GET /queue", "the answer has no queue_running and queue_pending lists") from None

    async def delete(self, prompt_id: str) -> None:
        """Drop the prompt from the pending queue (nothing happens to a running one)."""
        await self._json("POST", "/queue", {"delete": [prompt_id]})

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt the prompt if it is the one running (ComfyUI's targeted interrupt)."""
        await self._json("POST", "/interrupt", {"prompt_id": prompt_id})

    async def stop(self, prompt_id: str) -> None:
        """Stop the prompt wherever it is: dropped if pending, interrupted if running. A ComfyUI
        that ignores the interrupt's prompt_id would stop whatever runs, so it is asked only when
        /queue says this prompt is the running one. A pending prompt may start between reading
        the queue and the delete: the queue is read again after it."""
        for _ in range(3):
            state = await self.queue()
            if prompt_id in state.running:
                await self.interrupt(prompt_id)
                return
            if prompt_id not in state.pending:
                return
            await self.delete(prompt_id)

    async def view(self, filename: str, subfolder: str, kind: str) -> bytes:
        """An output file's bytes (`kind`: output, temp or input)."""
        params = {"filename": filename, "subfolder": subfolder, "type": kind}
        call = f"GET /view ({subfolder + '/' if subfolder else ''}{filename}, {kind})"
        try:
            timeout = aiohttp.ClientTimeout(total=VIEW_TIMEOUT)
            async with self.http.get(self.url + "/view", params=params, timeout=timeout) as response:
                if response.status >= 400:
                    raise self._fail(call, f"HTTP {response.status}")
                return await response.read()
        except FAILURES as error:
            raise self._fail(call, why(error)) from None

    def follow(self, prompt_id: str, client_id: str, on_event: Event | None = None) -> Follower:
        return Follower(self, prompt_id, client_id, on_event)


def outcome_of(entry: Mapping[str, Any]) -> Outcome:
    """The outcome a /history entry records (its status and messages)."""
    status = entry.get("status") or {}
    outputs = entry.get("outputs") or {}
    messages = {message[0]: message[1] for message in status.get("messages") or [] if len(message) == 2}
    if "execution_error" in messages:
        return Outcome("error", outputs, dict(messages["execution_error"]))
    if "execution_interrupted" in messages:
        return Outcome("interrupted", outputs)
    if status.get("status_str", "success") == "success":
        return Outcome("success", dict(outputs))
    return Outcome("error", outputs, {"exception_message": f"ComfyUI's status is {status.get('status_str')!r}"})


class Follower:
    """Follows one prompt to its end over the instance's WebSocket, with reconnects and polling.

    `connect()` before the prompt is posted; `outcome()` after. Every message about the prompt
    goes to `on_event` (`{"type", "data"}`, as ComfyUI sends it)."""

    def __init__(self, client: Client, prompt_id: str, client_id: str, on_event: Event | None = None) -> None:
        self.client = client
        self.prompt_id = prompt_id
        self.client_id = client_id
        self.on_event = on_event
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self.outputs: dict[str, Any] = {}  # from `executed` messages, in case /history lacks them
        self.error: dict[str, Any] = {}  # the execution_error message's data
        self.reconnects = 0  # how many times the socket was opened again (the tests read it)

    async def connect(self) -> bool:
        """Open the socket; False (and polling later) when the instance refuses it."""
        url = self.client.url.replace("http", "ws", 1) + "/ws"
        try:
            self.socket = await self.client.http.ws_connect(
                url, params={"clientId": self.client_id}, heartbeat=30, max_msg_size=MAX_MESSAGE
            )
        except FAILURES:
            self.socket = None
        return self.socket is not None

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
            self.socket = None

    async def outcome(self, look_first: bool = False) -> Outcome:
        """Wait for the prompt's end (no bound: the caller bounds it with its timeout).
        `look_first`: ask /history before listening, for a prompt that may have ended before the
        socket opened (one a restarted runner adopts); messages sent meanwhile wait in the socket."""
        try:
            if look_first:
                found = await self._look()
                if found is not None:
                    return found
            delays = iter(BACKOFF)
            while True:
                if self.socket is None:
                    found = await self._look()
                    if found is not None:
                        return found
                    await asyncio.sleep(next(delays, BACKOFF[-1]))
                    if await self.connect():
                        self.reconnects += 1
                    continue
                found = await self._listen()
                if found is not None:
                    return found
                logs.emit(
                    f"warning: instance {self.client.name}: the WebSocket of prompt {self.prompt_id} dropped; "
                    "opening it again, polling /history meanwhile",
                    "warning",
                    instance=self.client.name,
                )
                delays = iter(BACKOFF)  # the socket dropped: reconnect with backoff, polling meanwhile
        finally:
            await self.close()

    async def _listen(self) -> Outcome | None:
        """Read the socket until the prompt ends (its outcome) or the socket drops (None)."""
        socket = self.socket
        while socket is not None:
            try:
                message = await socket.receive(timeout=IDLE_CHECK)
            except asyncio.TimeoutError:  # noqa: UP041 - Python 3.10 hosts
                found = await self._look()  # silence: a prompt ended unseen, or lost, is found here
                if found is not None:
                    return found
                continue
            except (aiohttp.ClientError, OSError):
                break
            if message.type == aiohttp.WSMsgType.TEXT:
                ended = self._read(message.data)
                if ended:
                    return await self._final(ended)
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
            # BINARY: previews; ignored
        await self.close()
        return None

    def _read(self, text: str) -> str:
        """Handle one text message; the end it announces ("success", "error", "interrupted") or ""."""
        try:
            message = json.loads(text)
            kind, data = message["type"], message.get("data") or {}
        except (ValueError, KeyError, TypeError):
            return ""
        if not isinstance(data, dict) or data.get("prompt_id") != self.prompt_id:
            return ""
        if self.on_event is not None:
            self.on_event({"type": kind, "data": data})
        if kind == "executed" and isinstance(data.get("output"), dict):
            self.outputs[str(data.get("node"))] = data["output"]
        elif kind == "execution_error":
            self.error = dict(data)
            return "error"
        elif kind == "execution_interrupted":
            return "interrupted"
        elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            return "success"
        return ""

    async def _final(self, ended: str) -> Outcome:
        """The outcome after the socket said the prompt ended: /history's, once ComfyUI wrote it
        (it does so after its last message), else what the socket said."""
        if ended == "error":
            return Outcome("error", dict(self.outputs), self.error)
        if ended == "interrupted":
            return Outcome("interrupted", dict(self.outputs))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HISTORY_WAIT
        while loop.time() < deadline:
            try:
                entry = await self.client.history(self.prompt_id)
            except InstanceError:
                entry = None
            if entry is not None:
                found = outcome_of(entry)
                return found if found.outputs or not self.outputs else Outcome(found.status, dict(self.outputs))
            await asyncio.sleep(0.05)
        return Outcome("success", dict(self.outputs))

    async def _look(self) -> Outcome | None:
        """Ask /history, then /queue: the outcome, None while the prompt is queued or running (or
        the instance does not answer), `lost` when the instance knows it nowhere."""
        try:
            entry = await self.client.history(self.prompt_id)
            if entry is not None:
                return outcome_of(entry)
            if (await self.client.queue()).holds(self.prompt_id):
                return None
            entry = await self.client.history(self.prompt_id)  # it may have ended between the two calls
        except InstanceError:
            return None
        return outcome_of(entry) if entry is not None else Outcome("lost")
