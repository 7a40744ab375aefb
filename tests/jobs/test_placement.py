"""Placement (jobs/placement.py) against real routing.json files and real HTTP servers on
loopback: the ready instance with the shortest queue among those whose environment has every
node class and combo value of the workflow; a structured refusal naming what each environment
lacks otherwise, before anything is queued."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness.double import DOUBLE, Double, free_port
from jobs_loopback import DATA, StartInstance, stopped, write_routing

from comfybake.instances import HostError
from comfybake.jobs import placement, workflow
from comfybake.jobs.placement import ObjectInfoCache, PlacementError

TXT2IMG = workflow.load(DATA / "txt2img.json")


def routes(tmp_path: Path, *instances: object, **extra: dict[str, object]) -> list[placement.Route]:
    records = [item.record(**extra.get(item.name, {})) for item in instances]  # type: ignore[attr-defined]
    return placement.load_routing(write_routing(tmp_path, records))


def test_the_ready_instance_with_the_shortest_queue_wins_ties_by_name(tmp_path: Path, instance: StartInstance) -> None:
    busy = instance("a", "prod", queue_remaining=3)
    later = instance("c", "prod", queue_remaining=1)
    first = instance("b", "prod", queue_remaining=1)
    down = stopped("d", "prod")  # listed, nothing listens: not ready, skipped
    found = routes(tmp_path, busy, later, first, down)
    chosen = placement.place(TXT2IMG, found, ObjectInfoCache())
    assert (chosen.route.name, chosen.queue_remaining) == ("b", 1)
    first.queue_remaining = 5
    assert placement.place(TXT2IMG, found, ObjectInfoCache()).route.name == "c"


def test_a_disabled_instance_is_never_chosen(tmp_path: Path, instance: StartInstance) -> None:
    idle = instance("a", "prod", queue_remaining=0)
    busy = instance("b", "prod", queue_remaining=4)
    chosen = placement.place(TXT2IMG, routes(tmp_path, idle, busy, a={"enabled": False}), ObjectInfoCache())
    assert chosen.route.name == "b"


def test_a_missing_model_file_is_found_before_queueing_naming_the_node(tmp_path: Path, instance: StartInstance) -> None:
    graph = json.loads((DATA / "txt2img.json").read_text())
    graph["4"]["inputs"]["ckpt_name"] = "x.safetensors"
    graph["3"]["inputs"]["sampler_name"] = "euler_fast"
    graph["6"]["inputs"]["text"] = "a prompt is free text, not a combo"
    prod = instance("a", "prod")
    with pytest.raises(PlacementError) as raised:
        placement.place(workflow.check(graph), routes(tmp_path, prod), ObjectInfoCache())
    assert str(raised.value) == (
        "no environment can run the workflow now; nothing was queued:\n"
        "  environment prod: lacks values sampler_name 'euler_fast' of node 3; ckpt_name 'x.safetensors' of node 4"
    )
    report = raised.value.as_dict()["environments"]["prod"]
    assert report["missing_classes"] == []
    assert report["missing_values"] == [
        {"node": "3", "class_type": "KSampler", "input": "sampler_name", "value": "euler_fast"},
        {"node": "4", "class_type": "CheckpointLoaderSimple", "input": "ckpt_name", "value": "x.safetensors"},
    ]
    assert "/prompt" in prod.hits  # its queue was read; nothing else than readiness, queue and object_info


def test_the_environment_whose_combo_lists_accept_the_values_is_chosen(tmp_path: Path, instance: StartInstance) -> None:
    sdxl_info = json.loads((DATA / "object_info.json").read_text())
    sdxl_info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = ["sd_xl_base_1.0.safetensors"]
    sd15 = instance("a", "sd15", queue_remaining=7)
    sdxl = instance("b", "sdxl", queue_remaining=0, object_info=sdxl_info)
    chosen = placement.place(TXT2IMG, routes(tmp_path, sd15, sdxl), ObjectInfoCache())
    assert chosen.route.name == "a"  # the only environment with the checkpoint, however busy


def test_the_newer_combo_schema_is_checked_too(tmp_path: Path, instance: StartInstance) -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "nearest", "scale_by": 2}},
    }
    with pytest.raises(PlacementError, match="upscale_method 'nearest' of node 2"):
        placement.place(workflow.check(graph), routes(tmp_path, instance("a", "prod")), ObjectInfoCache())
    graph["2"]["inputs"]["upscale_method"] = "bicubic"
    assert placement.place(workflow.check(graph), routes(tmp_path, instance("b", "prod")), ObjectInfoCache())


def test_missing_node_classes_are_named_per_environment(tmp_path: Path, instance: StartInstance) -> None:
    graph = json.loads((DATA / "txt2img.json").read_text())
    graph["10"] = {"class_type": "VHS_VideoCombine", "inputs": {"images": ["8", 0]}}
    small = dict(json.loads((DATA / "object_info.json").read_text()))
    del small["SaveImage"]
    prod = instance("a", "prod")
    lean = instance("b", "lean", object_info=small)
    with pytest.raises(PlacementError) as raised:
        placement.place(workflow.check(graph), routes(tmp_path, prod, lean), ObjectInfoCache())
    assert str(raised.value).splitlines()[1:] == [
        "  environment lean: lacks node classes SaveImage, VHS_VideoCombine",
        "  environment prod: lacks node classes VHS_VideoCombine",
    ]
    assert raised.value.environments["lean"].missing_classes == ["SaveImage", "VHS_VideoCombine"]
    assert "/object_info" not in prod.hits  # no class, no need to read the combo lists


def test_an_environment_without_a_ready_instance_says_why(tmp_path: Path) -> None:
    down = stopped("a", "prod")
    with pytest.raises(PlacementError) as raised:
        placement.place(TXT2IMG, routes(tmp_path, down), ObjectInfoCache())
    assert f"environment prod: no instance is ready: a: port {down.port} on 127.0.0.1" in str(raised.value)
    assert raised.value.environments["prod"].not_ready == {
        "a": f"port {down.port} on 127.0.0.1 does not accept connections"
    }


def test_an_instance_missing_a_required_class_is_not_ready(tmp_path: Path, instance: StartInstance) -> None:
    # readiness is runtime.probe: routing.json's required_node_classes must answer on /object_info/<Class>
    odd = instance("a", "prod")
    with pytest.raises(PlacementError, match="a: node class ComfybakeEcho is missing"):
        placement.place(
            TXT2IMG, routes(tmp_path, odd, a={"required_node_classes": ["ComfybakeEcho"]}), ObjectInfoCache()
        )


def test_object_info_is_fetched_once_per_environment_within_the_ttl(tmp_path: Path, instance: StartInstance) -> None:
    a = instance("a", "prod")
    b = instance("b", "prod", queue_remaining=1)
    found = routes(tmp_path, a, b)
    cache = ObjectInfoCache(ttl=0.5)
    for _ in range(3):
        placement.place(TXT2IMG, found, cache)
    assert cache.fetches == 1
    assert a.hits.get("/object_info", 0) + b.hits.get("/object_info", 0) == 1
    time.sleep(0.6)
    placement.place(TXT2IMG, found, cache)
    assert cache.fetches == 2


def test_the_routing_file_must_exist_and_have_format_1(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"routing\.json does not exist: converge the host with the comfyui_instances"):
        placement.load_routing(tmp_path)
    (tmp_path / "routing.json").write_text('{"format": 2, "instances": []}')
    with pytest.raises(HostError, match="is not a routing file of format 1"):
        placement.load_routing(tmp_path)
    (tmp_path / "routing.json").write_text('{"format": 1, "instances": []}')
    with pytest.raises(PlacementError, match=r"routing\.json lists no instances"):
        placement.place(TXT2IMG, placement.load_routing(tmp_path), ObjectInfoCache())


# --------------------------------------------------------------------------- named workflows


def named_file(tmp_path: Path, text: str) -> Path:
    shutil.copy(DATA / "txt2img.json", tmp_path / "txt2img.json")
    graph = json.loads((DATA / "txt2img.json").read_text())
    graph["4"]["inputs"]["ckpt_name"] = "sd_xl_base_1.0.safetensors"
    (tmp_path / "xl.json").write_text(json.dumps(graph))
    path = tmp_path / "workflows.yml"
    path.write_text(text)
    return path


def test_a_named_workflow_runs_only_in_its_environment(tmp_path: Path, instance: StartInstance) -> None:
    path = named_file(
        tmp_path,
        "workflows:\n  portrait:\n    environment: slow\n    file: txt2img.json\n"
        "  poster:\n    environment: fast\n    file: xl.json\n",
    )
    named = placement.load_named(path)
    fast = instance("a", "fast", queue_remaining=0)
    slow = instance("b", "slow", queue_remaining=9)
    found = routes(tmp_path, fast, slow)
    assert placement.place_named("portrait", named, found, ObjectInfoCache()).route.name == "b"
    with pytest.raises(PlacementError, match=r"^environment fast can run the workflow now") as raised:
        placement.place_named("poster", named, found, ObjectInfoCache())
    assert "ckpt_name 'sd_xl_base_1.0.safetensors' of node 4" in str(raised.value)
    with pytest.raises(PlacementError, match=r"no workflow is named 'nope' \(named workflows: portrait, poster\)"):
        placement.place_named("nope", named, found, ObjectInfoCache())


def test_check_named_reports_what_each_environment_lacks(tmp_path: Path, instance: StartInstance) -> None:
    path = named_file(
        tmp_path,
        "workflows:\n  portrait:\n    environment: fast\n    file: txt2img.json\n"
        "  poster:\n    environment: fast\n    file: xl.json\n"
        "  video:\n    environment: gone\n    file: txt2img.json\n",
    )
    found = routes(tmp_path, instance("a", "fast"))
    reports = placement.check_named(placement.load_named(path), found, ObjectInfoCache())
    assert sorted(reports) == ["poster", "video"]  # portrait lacks nothing
    assert [item.describe() for item in reports["poster"].missing_values] == [
        "ckpt_name 'sd_xl_base_1.0.safetensors' of node 4"
    ]
    assert reports["video"].describe() == "is not an environment of this host (routing.json)"


def test_a_wrong_named_workflows_file_names_every_problem(tmp_path: Path) -> None:
    (tmp_path / "ui.json").write_text((DATA / "txt2img-ui.json").read_text())
    path = named_file(
        tmp_path,
        "workflows:\n  a:\n    file: txt2img.json\n  b:\n    environment: prod\n    file: ui.json\n"
        "  c:\n    environment: prod\n    file: absent.json\n",
    )
    with pytest.raises(HostError) as raised:
        placement.load_named(path)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"{path} is refused:"
    assert lines[1] == "  workflow a: needs 'environment' (a name) and 'file' (its API-format JSON)"
    assert lines[2].startswith("  workflow b: the workflow ") and "Save (API Format)" in lines[2]
    assert lines[3].startswith("  workflow c: cannot read the workflow ") and "absent.json" in lines[3]
    path.write_text("- a list\n")
    with pytest.raises(HostError, match="has no 'workflows' mapping"):
        placement.load_named(path)


def test_threads_placing_at_once_fetch_object_info_once(tmp_path: Path, instance: StartInstance) -> None:
    prod = instance("a", "prod")
    found = routes(tmp_path, prod)
    cache = ObjectInfoCache()
    with ThreadPoolExecutor(max_workers=8) as pool:
        chosen = list(pool.map(lambda _: placement.place(TXT2IMG, found, cache).route.name, range(8)))
    assert chosen == ["a"] * 8
    assert cache.fetches == 1 and prod.hits["/object_info"] == 1


# --------------------------------------------------------------------------- the ComfyUI double


@pytest.fixture
def doubles(tmp_path: Path) -> Iterator[Callable[[str], Double]]:
    """Start the ComfyUI test double (as it is on main) as local processes, one checkpoint installed."""
    tree = tmp_path / "ComfyUI"
    shutil.copytree(DOUBLE, tree, ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "models" / "checkpoints").mkdir(parents=True)
    (tree / "models" / "checkpoints" / "sd15.safetensors").write_bytes(b"\0" * 16)
    started: list[Double] = []

    def start(name: str) -> Double:
        port, user = free_port(), tmp_path / name / "user"
        user.mkdir(parents=True)
        log = tmp_path / f"{name}.log"
        with log.open("wb") as sink:
            command = [sys.executable, "-s", str(tree / "main.py"), "--port", str(port), "--cpu",
                       "--user-directory", str(user), "--temp-directory", str(tmp_path / name)]  # fmt: skip
            double = Double(subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT), port, log)
        started.append(double)
        return double

    yield start
    for double in started:
        double.stop()


def test_placement_against_the_comfyui_double(tmp_path: Path, doubles: Callable[[str], Double]) -> None:
    first, second = doubles("a"), doubles("b")
    records = [
        {"name": name, "environment": "prod", "url": f"http://127.0.0.1:{double.port}", "port": double.port,
         "enabled": True, "required_node_classes": ["CheckpointLoaderSimple"],
         "node_classes": ["CheckpointLoaderSimple", "SaveImage"]}
        for name, double in (("a", first), ("b", second))
    ]  # fmt: skip
    found = placement.load_routing(write_routing(tmp_path, records))
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
    }
    deadline = time.monotonic() + 20
    while placement.assess(workflow.check(graph), "prod", found, ObjectInfoCache())[0].not_ready:
        assert time.monotonic() < deadline, "the doubles did not get ready"
        time.sleep(0.1)
    assert placement.place(workflow.check(graph), found, ObjectInfoCache()).route.name == "a"
    # a prompt running on a: b has the shorter queue now
    assert first.post("/prompt", {"prompt": graph, "extra_data": {"test_double_seconds": 30}})[0] == 200
    chosen = placement.place(workflow.check(graph), found, ObjectInfoCache())
    assert (chosen.route.name, chosen.queue_remaining) == ("b", 0)
    graph["1"]["inputs"]["ckpt_name"] = "sdxl.safetensors"
    with pytest.raises(PlacementError, match=r"ckpt_name 'sdxl\.safetensors' of node 1"):
        placement.place(workflow.check(graph), found, ObjectInfoCache())
