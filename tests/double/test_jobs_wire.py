"""The double speaks ComfyUI's job wire format: POST /prompt, /ws messages, /history, /queue, /interrupt,
/upload/image and /view, each checked against a running double with a real WebSocket client."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websocket
from harness.double import Double

DATA = Path(__file__).resolve().parents[1] / "jobs" / "data"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
StartJobDouble = Callable[..., tuple[Double, Path]]


@pytest.fixture
def job_double(start_double, tmp_path: Path) -> StartJobDouble:
    """A double with its own base directory (models, input, output, temp): one checkpoint installed."""

    def start(*args: str) -> tuple[Double, Path]:
        base = tmp_path / "base"
        (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (base / "models" / "checkpoints" / "sd15.safetensors").write_bytes(b"\0" * 16)
        return start_double("--cpu", "--base-directory", str(base), *args), base

    return start


def txt2img(steps: int = 3, batch: int = 1, prefix: str = "ComfyUI") -> dict[str, Any]:
    graph: dict[str, Any] = json.loads((DATA / "txt2img.json").read_text())
    graph["4"]["inputs"]["ckpt_name"] = "sd15.safetensors"
    graph["3"]["inputs"]["steps"] = steps
    graph["5"]["inputs"].update(width=64, height=32, batch_size=batch)
    graph["9"]["inputs"]["filename_prefix"] = prefix
    return graph


def connect(double: Double, client_id: str) -> websocket.WebSocket:
    ws = websocket.create_connection(f"ws://127.0.0.1:{double.port}/ws?clientId={client_id}", timeout=10)
    first = json.loads(ws.recv())
    assert first["type"] == "status" and first["data"]["sid"] == client_id
    return ws


def submit(double: Double, graph: dict[str, Any], client_id: str, **extra: Any) -> str:
    prompt_id = str(uuid.uuid4())
    body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id, "extra_data": extra}
    status, answer = double.post("/prompt", body)
    assert status == 200, answer
    assert answer == {"prompt_id": prompt_id, "number": answer["number"], "node_errors": {}}
    return prompt_id


def messages(ws: websocket.WebSocket, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every message up to and including the first that `until` accepts, status messages left out."""
    seen = []
    while True:
        message = json.loads(ws.recv())
        if message["type"] != "status":
            seen.append(message)
        if until(message):
            return seen


def until_closed(ws: websocket.WebSocket) -> list[dict[str, Any]]:
    """Every message until the socket closes or its timeout passes with nothing more."""
    seen = []
    try:
        while True:
            seen.append(json.loads(ws.recv()))
    except (websocket.WebSocketConnectionClosedException, websocket.WebSocketTimeoutException):
        return seen


def finished(message: dict[str, Any]) -> bool:
    return message["type"] == "executing" and message["data"]["node"] is None


def history(double: Double, prompt_id: str) -> dict[str, Any]:
    status, body = double.get(f"/history/{prompt_id}")
    assert status == 200 and list(body) == [prompt_id], body
    return body[prompt_id]  # type: ignore[no-any-return]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks (kind, data), each CRC checked."""
    assert data.startswith(PNG_SIGNATURE)
    chunks, at = [], len(PNG_SIGNATURE)
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + size]
        assert int.from_bytes(data[at + 8 + size : at + 12 + size], "big") == zlib.crc32(kind + body)
        chunks.append((kind, body))
        at += 12 + size
    return chunks


def view(double: Double, item: dict[str, Any]) -> bytes:
    query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item["subfolder"], "type": item["type"]})
    with urllib.request.urlopen(f"http://127.0.0.1:{double.port}/view?{query}", timeout=5) as response:
        return bytes(response.read())


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_a_prompt_runs_in_comfyuis_event_order(job_double: StartJobDouble) -> None:
    double, base = job_double()
    ws, other = connect(double, "c1"), connect(double, "c2")
    graph = txt2img(steps=3, batch=2)
    prompt_id = submit(double, graph, "c1", test_double_seconds=0.3, auth_token_comfy_org="canary-token")
    seen = messages(ws, finished)
    kinds = [m["type"] for m in seen]
    assert kinds == ["execution_start", "execution_cached"] + ["executing"] * 5 + ["progress"] * 3 + [
        "executing", "executing", "executed", "execution_success", "executing"]  # fmt: skip
    assert all(m["data"]["prompt_id"] == prompt_id for m in seen)
    assert seen[1]["data"]["nodes"] == []
    ran = [m["data"]["node"] for m in seen if m["type"] == "executing"]
    assert ran[:-1] == ["4", "6", "7", "5", "3", "8", "9"] and ran[-1] is None  # each node after its inputs
    assert all(m["data"]["display_node"] == m["data"]["node"] for m in seen if m["type"] == "executing"
               and m["data"]["node"])  # fmt: skip
    assert [(m["data"]["value"], m["data"]["max"], m["data"]["node"]) for m in seen if m["type"] == "progress"] == [
        (1, 3, "3"), (2, 3, "3"), (3, 3, "3")]  # fmt: skip
    executed = next(m["data"] for m in seen if m["type"] == "executed")
    assert executed["node"] == executed["display_node"] == "9"
    images = executed["output"]["images"]
    assert [(i["filename"], i["subfolder"], i["type"]) for i in images] == [
        ("ComfyUI_00001_.png", "", "output"), ("ComfyUI_00002_.png", "", "output")]  # fmt: skip
    # The history: ComfyUI's queue item, outputs, status with its messages, meta.
    item = history(double, prompt_id)
    _number, item_id, item_graph, extra, outputs = item["prompt"]
    assert (item_id, item_graph, outputs) == (prompt_id, graph, ["9"])
    assert extra["client_id"] == "c1" and extra["test_double_seconds"] == 0.3
    assert "auth_token_comfy_org" not in json.dumps(item)  # ComfyUI keeps sensitive keys out
    assert item["outputs"] == {"9": {"images": images}}
    assert item["meta"]["9"]["node_id"] == item["meta"]["9"]["display_node"] == "9"
    assert (item["status"]["status_str"], item["status"]["completed"]) == ("success", True)
    assert [name for name, _ in item["status"]["messages"]] == [
        "execution_start", "execution_cached", "execution_success"]  # fmt: skip
    assert item["status"]["messages"][0][1] == next(m["data"] for m in seen if m["type"] == "execution_start")
    # Real PNG files of the latent's size, served by /view byte for byte.
    for image in images:
        data = (base / "output" / image["filename"]).read_bytes()
        chunks = png_chunks(data)
        assert [kind for kind, _ in chunks] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
        assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (64, 32)
        assert len(zlib.decompress(chunks[2][1])) == 32 * (1 + 3 * 64)  # 8-bit RGB rows, each with its filter byte
        assert json.loads(chunks[1][1].split(b"\0", 1)[1]) == graph  # the prompt embedded, as ComfyUI's SaveImage does
        assert view(double, image) == data
    # The other client saw the queue change, and nothing of the prompt.
    other.settimeout(0.5)
    assert {m["type"] for m in until_closed(other)} == {"status"}
    ws.close()
    other.close()


def test_a_prompt_run_twice_leaves_two_files(job_double: StartJobDouble) -> None:
    double, base = job_double()
    ws = connect(double, "twice")
    graph = txt2img(prefix="jobs/run")
    first = submit(double, graph, "twice")
    messages(ws, finished)
    second = submit(double, graph, "twice")
    messages(ws, finished)
    items = [history(double, p)["outputs"]["9"]["images"][0] for p in (first, second)]
    assert items == [{"filename": "run_00001_.png", "subfolder": "jobs", "type": "output"},
                     {"filename": "run_00002_.png", "subfolder": "jobs", "type": "output"}]  # fmt: skip
    assert sorted(p.name for p in (base / "output" / "jobs").iterdir()) == ["run_00001_.png", "run_00002_.png"]
    assert view(double, items[1]) == (base / "output" / "jobs" / "run_00002_.png").read_bytes()
    ws.close()


def test_a_dropped_socket_still_finishes_in_history(job_double: StartJobDouble) -> None:
    double, _base = job_double()
    ws = connect(double, "dropped")
    graph = txt2img(steps=10)
    prompt_id = submit(double, graph, "dropped", test_double_seconds=5, test_double_drop_ws_after_seconds=0.3)
    seen = [m["type"] for m in until_closed(ws)]
    assert ws.connected is False  # the double closed it without a close frame
    assert "execution_start" in seen and "execution_success" not in seen
    # A reconnect with the same clientId: status, then ComfyUI's note of the node running, then the rest.
    again = connect(double, "dropped")
    assert json.loads(again.recv()) == {"type": "executing", "data": {"node": "3"}}
    rest = messages(again, finished)
    assert [m["type"] for m in rest][-2:] == ["execution_success", "executing"]
    assert history(double, prompt_id)["status"]["status_str"] == "success"
    again.close()


def test_interrupt_ends_the_running_prompt_with_an_error_entry(job_double: StartJobDouble) -> None:
    double, _base = job_double()
    ws = connect(double, "stop")
    running = submit(double, txt2img(steps=100), "stop", test_double_seconds=60)
    pending = submit(double, txt2img(), "stop")
    messages(ws, lambda m: m["type"] == "progress")
    queue = double.get("/queue")[1]
    assert [i[1] for i in queue["queue_running"]] == [running] and [i[1] for i in queue["queue_pending"]] == [pending]
    assert double.post("/queue", {"delete": [pending]})[0] == 200  # drops a pending prompt
    assert double.get("/queue")[1]["queue_pending"] == []
    assert double.post("/interrupt", {"prompt_id": pending})[0] == 200  # not the one running: nothing happens
    assert [i[1] for i in double.get("/queue")[1]["queue_running"]] == [running]
    assert double.post("/interrupt", {"prompt_id": running})[0] == 200
    seen = messages(ws, finished)
    assert [m["type"] for m in seen if m["type"] != "progress"][-2:] == ["execution_interrupted", "executing"]
    interrupted = next(m["data"] for m in seen if m["type"] == "execution_interrupted")
    assert interrupted == {"prompt_id": running, "node_id": "3", "node_type": "KSampler",
                           "executed": ["4", "6", "7", "5"], "timestamp": interrupted["timestamp"]}  # fmt: skip
    item = history(double, running)
    assert (item["status"]["status_str"], item["status"]["completed"]) == ("error", False)
    assert item["status"]["messages"][-1] == ["execution_interrupted", interrupted]
    assert double.get(f"/history/{pending}") == (200, {})
    ws.close()


def test_a_failing_node_sends_execution_error(job_double: StartJobDouble) -> None:
    double, _base = job_double()
    ws = connect(double, "fail")
    graph = {"1": {"class_type": "TestDoubleFail", "inputs": {"message": "no such luck"}}}
    prompt_id = submit(double, graph, "fail")
    seen = messages(ws, finished)
    assert [m["type"] for m in seen] == [
        "execution_start", "execution_cached", "executing", "execution_error", "executing"]  # fmt: skip
    error = seen[3]["data"]
    assert {k: error[k] for k in ("prompt_id", "node_id", "node_type", "executed", "exception_message",
                                  "exception_type", "current_inputs")} == {
        "prompt_id": prompt_id, "node_id": "1", "node_type": "TestDoubleFail", "executed": [],
        "exception_message": "no such luck", "exception_type": "RuntimeError",
        "current_inputs": {"message": ["no such luck"]}}  # fmt: skip
    assert isinstance(error["traceback"], list) and error["current_outputs"] == []
    item = history(double, prompt_id)
    assert (item["status"]["status_str"], item["status"]["messages"][-1][0]) == ("error", "execution_error")
    ws.close()


def test_validation_errors_have_comfyuis_shapes(job_double: StartJobDouble) -> None:
    double, _base = job_double()
    graph = txt2img()
    graph["4"]["inputs"]["ckpt_name"] = "x.safetensors"
    status, body = double.post("/prompt", {"prompt": graph})
    assert status == 400
    assert body == {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "", "extra_info": {}},
        "node_errors": {"4": {"errors": [{
            "type": "value_not_in_list", "message": "Value not in list",
            "details": "ckpt_name: 'x.safetensors' not in ['sd15.safetensors']",
            "extra_info": {"input_name": "ckpt_name", "input_config": [["sd15.safetensors"]],
                           "received_value": "x.safetensors"}}],
            "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}},
    }  # fmt: skip
    graph = txt2img()
    graph["1"] = {"class_type": "NotInstalled", "inputs": {}, "_meta": {"title": "My node"}}
    status, body = double.post("/prompt", {"prompt": graph})
    assert (status, body["error"]["message"], body["error"]["extra_info"]) == (
        400, "Node 'My node' not found. The custom node may not be installed.",
        {"node_id": "1", "class_type": "NotInstalled", "node_title": "My node"})  # fmt: skip
    # One good output runs; the bad one is named in node_errors, as ComfyUI answers.
    graph = txt2img()
    graph["10"] = {"class_type": "KSampler", "inputs": {"sampler_name": "euler_fast"}}
    graph["11"] = {"class_type": "TestDoubleVideoCombine", "inputs": {"images": ["10", 0]}}
    status, body = double.post("/prompt", {"prompt": graph})
    assert status == 200 and list(body["node_errors"]) == ["10"]
    assert body["node_errors"]["10"]["dependent_outputs"] == ["11"]
    assert body["node_errors"]["10"]["errors"][0]["type"] == "value_not_in_list"
    # Graphs without outputs or inputs, as older tests post them, run unless the double is strict.
    assert double.post("/prompt", {"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}})[0] == 200


def test_strict_adds_comfyuis_other_checks(job_double: StartJobDouble) -> None:
    double, _base = job_double("--test-double-strict")
    status, body = double.post("/prompt", {"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}})
    assert (status, body) == (400, {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs",
                                              "details": "", "extra_info": {}}, "node_errors": {}})  # fmt: skip
    graph = txt2img()
    del graph["9"]["inputs"]["filename_prefix"]
    graph["8"]["inputs"]["vae"] = ["4", 0]  # a MODEL where a VAE goes
    status, body = double.post("/prompt", {"prompt": graph})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    assert [e["type"] for e in body["node_errors"]["9"]["errors"]] == ["required_input_missing"]
    assert [e["type"] for e in body["node_errors"]["8"]["errors"]] == ["return_type_mismatch"]
    assert body["error"]["details"] == "Required input is missing: filename_prefix"
    assert double.post("/prompt", {"prompt": txt2img()})[0] == 200  # a whole graph passes


def multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]  # fmt: skip
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")  # fmt: skip
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(double: Double, filename: str, data: bytes, **fields: str) -> dict[str, Any]:
    body, content_type = multipart(fields, filename, data)
    request = urllib.request.Request(f"http://127.0.0.1:{double.port}/upload/image", data=body, method="POST",
                                     headers={"Content-Type": content_type})  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_upload_then_load_image_then_view(job_double: StartJobDouble) -> None:
    double, base = job_double()
    first = png_bytes(20, 10)
    assert upload(double, "in.png", first) == {"name": "in.png", "subfolder": "", "type": "input"}
    assert upload(double, "in.png", first) == {"name": "in.png", "subfolder": "", "type": "input"}  # same bytes
    assert upload(double, "in.png", png_bytes(30, 10)) == {"name": "in (1).png", "subfolder": "", "type": "input"}
    assert upload(double, "in.png", png_bytes(40, 10), overwrite="true")["name"] == "in.png"
    assert upload(double, "x.png", first, subfolder="jobs") == {"name": "x.png", "subfolder": "jobs", "type": "input"}
    assert (base / "input" / "jobs" / "x.png").read_bytes() == first
    assert double.get("/object_info/LoadImage")[1]["LoadImage"]["input"]["required"]["image"] == [
        ["in (1).png", "in.png"], {"image_upload": True}]  # fmt: skip
    assert view(double, {"filename": "x.png", "subfolder": "jobs", "type": "input"}) == first
    url = f"http://127.0.0.1:{double.port}/view"
    assert status_of(f"{url}?filename=..%2Fsecret&type=input") == 400
    assert status_of(f"{url}?filename=a.png&subfolder=..%2F..&type=input") == 403
    assert status_of(f"{url}?filename=absent.png&type=input") == 404
    assert status_of(f"{url}?filename=in.png&type=elsewhere") == 400
    # LoadImage reads the upload (by its sub-folder name too); the saved image keeps its size.
    ws = connect(double, "load")
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}},
             "3": {"class_type": "LoadImage", "inputs": {"image": "jobs/x.png"}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}  # fmt: skip
    prompt_id = submit(double, graph, "load")
    messages(ws, finished)
    outputs = history(double, prompt_id)["outputs"]
    saved = view(double, outputs["2"]["images"][0])
    assert saved.startswith(PNG_SIGNATURE) and int.from_bytes(saved[16:20], "big") == 40
    preview = outputs["4"]["images"][0]
    assert preview["type"] == "temp" and preview["filename"].startswith("ComfyUI_temp_")
    assert int.from_bytes(view(double, preview)[16:20], "big") == 20
    graph["1"]["inputs"]["image"] = "absent.png"
    status, body = double.post("/prompt", {"prompt": graph})
    assert (
        status == 200 and body["node_errors"]["1"]["errors"][0]["details"] == "image - Invalid image file: absent.png"
    )
    ws.close()


def png_bytes(width: int, height: int) -> bytes:
    """A PNG written by the double's own writer, as a client's upload."""
    import files  # the double's module, importable from tests/comfyui_double

    return bytes(files.png(files.Image(width, height, b"\x10\x20\x30"), {}))


def test_video_and_file_outputs(job_double: StartJobDouble) -> None:
    double, base = job_double()
    ws = connect(double, "media")
    graph = txt2img(batch=3)
    graph["10"] = {
        "class_type": "TestDoubleVideoCombine",
        "inputs": {"images": ["8", 0], "frame_rate": 12, "filename_prefix": "clip"},
    }
    graph["11"] = {"class_type": "TestDoubleSaveAudio", "inputs": {"filename_prefix": "sound"}}  # fmt: skip
    prompt_id = submit(double, graph, "media")
    messages(ws, finished)
    outputs = history(double, prompt_id)["outputs"]
    video = outputs["10"]["gifs"][0]
    assert {k: video[k] for k in ("filename", "subfolder", "type", "format", "frame_rate")} == {
        "filename": "clip_00001.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4",
        "frame_rate": 12.0}  # fmt: skip
    data = view(double, video)
    assert data[4:8] == b"ftyp" and data == (base / "output" / "clip_00001.mp4").read_bytes()
    audio = outputs["11"]["audio"][0]
    assert audio == {"filename": "sound_00001_.wav", "subfolder": "", "type": "output"}
    assert view(double, audio).startswith(b"RIFF")
    assert len(outputs["9"]["images"]) == 3
    ws.close()


def test_odd_requests_get_comfyuis_answers(job_double: StartJobDouble) -> None:
    double, _base = job_double()
    ws = connect(double, "odd")  # hooks that are no numbers are ignored: the prompt runs, the worker goes on
    odd = submit(double, txt2img(), "odd", test_double_seconds="soon", test_double_drop_ws_after_seconds=[1])
    messages(ws, finished)
    assert history(double, odd)["status"]["status_str"] == "success"
    ws.close()
    assert double.get(f"/history/{uuid.uuid4()}") == (200, {})
    assert double.get("/api/history/x") == (200, {})
    assert double.post("/prompt", {"no": "prompt"}) == (
        400, {"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                        "extra_info": {}}, "node_errors": {}})  # fmt: skip


def test_an_upload_over_the_limit_is_refused(job_double: StartJobDouble) -> None:
    double, base = job_double("--max-upload-size", "0.001")  # MB, as ComfyUI's flag
    with pytest.raises(urllib.error.HTTPError) as refused:
        upload(double, "big.png", png_bytes(8, 8) + b"\0" * 2048)
    assert refused.value.code == 413
    assert not (base / "input" / "big.png").exists()
    assert upload(double, "small.png", png_bytes(2, 2))["name"] == "small.png"
