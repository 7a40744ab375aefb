"""The ComfyUI test double keeps the contract in docs/testing.md (ComfyUI's own behaviour)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websocket
import yaml
from harness import repos
from harness.double import DOUBLE, run_double
from harness.repos import git
from harness.tools import venv_bin


@pytest.fixture
def checkout(tmp_path: Path, fixture_repos: dict[str, repos.Repo]) -> Path:
    """A clone of the double at v0.8.0, as the environment role would make it."""
    code = tmp_path / "ComfyUI"
    git(tmp_path, "clone", "--quiet", fixture_repos["ComfyUI"].url, str(code))
    git(code, "checkout", "--quiet", "v0.8.0")
    return code


def add_node(code: Path, fixture_repos: dict[str, repos.Repo], name: str, where: Path | None = None) -> Path:
    target = (where or code / "custom_nodes") / name
    git(code, "clone", "--quiet", fixture_repos[name].url, str(target))
    return target


def user_dir(tmp_path: Path) -> str:
    path = tmp_path / "user"
    path.mkdir(exist_ok=True)
    return str(path)


# -- command line -------------------------------------------------------------------------


def test_unknown_flag_is_an_argparse_error(double_tree: Path, tmp_path: Path) -> None:
    done = run_double(double_tree, "--no-such-flag", log=tmp_path / "log")
    assert done.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in done.stderr


def test_missing_user_directory_is_rejected(double_tree: Path, tmp_path: Path) -> None:
    done = run_double(double_tree, "--user-directory", str(tmp_path / "absent"), log=tmp_path / "log")
    assert done.returncode == 2
    assert f"The path '{tmp_path / 'absent'}' does not exist." in done.stderr


def test_bare_listen_means_all_addresses() -> None:
    import main  # the double's main.py, importable from tests/comfyui_double

    assert main.build_parser().parse_args(["--listen"]).listen == "0.0.0.0,::"
    assert main.build_parser().parse_args([]).listen == "127.0.0.1"


def test_port_already_in_use_fails_the_start(start_double, double_tree: Path, tmp_path: Path) -> None:
    first = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path))
    done = run_double(double_tree, "--cpu", "--port", str(first.port), "--user-directory", user_dir(tmp_path),
                      "--temp-directory", str(tmp_path / "t2"), log=tmp_path / "log")  # fmt: skip
    assert done.returncode != 0
    assert "Address already in use" in done.stderr


# -- start-up order, temp, database -----------------------------------------------------


def test_temp_is_wiped_at_start_and_at_exit(start_double, tmp_path: Path) -> None:
    stale = tmp_path / "temp" / "stale.png"
    stale.parent.mkdir()
    stale.write_text("x")
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path))
    assert not stale.exists()
    assert (tmp_path / "temp").is_dir()
    (tmp_path / "temp" / "during.png").write_text("x")
    assert double.stop() == 0
    assert not (tmp_path / "temp").exists()
    assert (tmp_path / "user").is_dir()  # only <temp>/temp is ComfyUI's to delete


def test_database_defaults_to_the_code_tree(start_double, checkout: Path, tmp_path: Path) -> None:
    double = start_double("--cpu", "--temp-directory", str(tmp_path), code=checkout)
    assert (checkout / "user" / "comfyui.db").is_file()
    assert "Database: " + str(checkout / "user" / "comfyui.db") in double.output()


def test_database_url_moves_the_database(start_double, tmp_path: Path) -> None:
    db = tmp_path / "state" / "comfyui.db"
    db.parent.mkdir()
    start_double("--cpu", "--user-directory", user_dir(tmp_path), "--database-url", f"sqlite:///{db}",
                 "--temp-directory", str(tmp_path))  # fmt: skip
    assert db.is_file()


def test_unopenable_database_is_logged_and_the_server_starts(start_double, tmp_path: Path) -> None:
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path),
                          "--database-url", "sqlite:////nonexistent-dir/comfyui.db")  # fmt: skip
    assert "Failed to initialize database" in double.output()
    assert "unable to open database file" in double.output()
    assert double.get("/system_stats")[0] == 200


def test_sigterm_stops_cleanly(start_double, tmp_path: Path) -> None:
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path))
    double.process.send_signal(signal.SIGTERM)
    assert double.process.wait(timeout=10) == 0
    assert "Stopped server" in double.output()


# -- custom nodes ---------------------------------------------------------------------------


def test_quick_test_imports_nodes_then_exits(checkout: Path, fixture_repos, tmp_path: Path) -> None:
    add_node(checkout, fixture_repos, "ComfyUI-Comfybake-Basic")
    add_node(checkout, fixture_repos, "ComfyUI-Comfybake-Broken")
    done = run_double(checkout, "--quick-test-for-ci", "--cpu", log=tmp_path / "log")
    assert done.returncode == 0, done.stderr
    out = done.stderr
    assert "comfybake-basic prestartup ran" in out
    assert out.index("comfybake-basic prestartup ran") < out.index("Import times for custom nodes:")
    assert f"Cannot import {checkout / 'custom_nodes' / 'ComfyUI-Comfybake-Broken'} module for custom nodes" in out
    assert "No module named 'comfybake_fixture_missing_module'" in out
    assert f"(IMPORT FAILED): {checkout / 'custom_nodes' / 'ComfyUI-Comfybake-Broken'}" in out
    # ComfyUI's own optional nodes: imported first, like custom nodes (the audio ones need
    # torchaudio, which this venv lacks), and listed after the custom nodes' import times.
    extras = checkout / "comfy_extras" / "nodes_audio.py"
    assert f"Cannot import {extras} module for custom nodes: No module named 'torchaudio'" in out
    warning = "WARNING: some comfy_extras/ nodes did not import correctly."
    assert out.index(str(extras)) < out.index("Import times for custom nodes:") < out.index(warning)
    assert f"{warning} This may be because they are missing some dependencies.\n\nIMPORT FAILED: nodes_audio.py" in out
    assert "IMPORT FAILED: nodes_latent.py" not in out and "(IMPORT FAILED): " + str(extras) not in out
    assert "To see the GUI" not in out  # it never serves


def test_import_failure_keeps_serving(start_double, checkout: Path, fixture_repos, tmp_path: Path) -> None:
    add_node(checkout, fixture_repos, "ComfyUI-Comfybake-Basic")
    add_node(checkout, fixture_repos, "ComfyUI-Comfybake-Broken")
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), code=checkout)
    assert "IMPORT FAILED" in double.output()
    status, info = double.get("/object_info/ComfybakeEcho")
    assert status == 200
    assert info["ComfybakeEcho"]["python_module"] == "custom_nodes.ComfyUI-Comfybake-Basic"
    assert double.get("/object_info/ComfybakeMissing") == (200, {})
    assert double.get("/api/object_info/KSampler")[1]["KSampler"]["python_module"] == "nodes"
    assert double.get("/object_info/LatentAdd")[1]["LatentAdd"]["python_module"] == "comfy_extras.nodes_latent"
    assert double.get("/object_info/EmptyLatentAudio") == (200, {}), "the optional audio nodes did not import"


def test_pinned_node_commit_decides_its_classes(start_double, checkout: Path, fixture_repos, tmp_path) -> None:
    node = add_node(checkout, fixture_repos, "ComfyUI-Comfybake-Basic")
    git(node, "checkout", "--quiet", fixture_repos["ComfyUI-Comfybake-Basic"].commits["initial"])
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), code=checkout)
    assert double.get("/object_info/ComfybakeAddedLater") == (200, {})
    double.stop()
    git(node, "checkout", "--quiet", fixture_repos["ComfyUI-Comfybake-Basic"].commits["update"])
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), code=checkout)
    assert "ComfybakeAddedLater" in double.get("/object_info/ComfybakeAddedLater")[1]


def test_disabled_and_example_entries_are_not_loaded(checkout: Path, fixture_repos, tmp_path: Path) -> None:
    node = add_node(checkout, fixture_repos, "ComfyUI-Comfybake-Broken")
    node.rename(node.with_name(node.name + ".disabled"))
    done = run_double(checkout, "--quick-test-for-ci", "--cpu", log=tmp_path / "log")
    assert done.returncode == 0
    assert "(IMPORT FAILED)" not in done.stderr


# -- model folders and extra_model_paths.yaml ----------------------------------------------

EXTRA_PATHS = """\
# comfybake renders files like this one
shared_store:
  base_path: {store}
  is_default: true
  checkpoints: checkpoints/
  diffusion_models: |
    diffusion_models
    unet
  text_encoders: |
    text_encoders
    clip
  insightface: insightface/   # a key only custom nodes read
  custom_nodes: {nodes}
other:
  loras: {loras}
"""


def write_store(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    for name in ("checkpoints/a.safetensors", "checkpoints/sub/b.ckpt", "checkpoints/readme.txt",
                 "unet/u.safetensors", "clip/c.safetensors", "insightface/models/antelopev2/x.onnx"):  # fmt: skip
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_text("x")
    (store / "checkpoints" / "dangling.safetensors").symlink_to(tmp_path / "absent")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(EXTRA_PATHS.format(store=store, nodes=tmp_path / "more_nodes", loras="loras"))
    return store, config


def test_extra_model_paths_are_served_by_models(start_double, fixture_repos, tmp_path: Path) -> None:
    _store, config = write_store(tmp_path)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "l.safetensors").write_text("x")
    (tmp_path / "more_nodes").mkdir()
    git(tmp_path, "clone", "--quiet", fixture_repos["ComfyUI-Comfybake-Basic"].url,
        str(tmp_path / "more_nodes" / "ComfyUI-Comfybake-Basic"))  # fmt: skip
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path),
                          "--extra-model-paths-config", str(config))  # fmt: skip
    assert double.get("/models/checkpoints") == (200, ["a.safetensors", "sub/b.ckpt"])
    assert double.get("/models/diffusion_models") == (200, ["u.safetensors"])
    assert double.get("/models/unet") == (200, ["u.safetensors"])  # legacy name
    assert double.get("/models/text_encoders") == (200, ["c.safetensors"])
    assert double.get("/models/loras") == (200, ["l.safetensors"])  # relative to the YAML file
    assert double.get("/models/insightface") == (200, ["models/antelopev2/x.onnx"])
    assert double.get("/models/no_such_folder")[0] == 404
    assert "insightface" in double.get("/models")[1]
    assert "Unable to access" in double.output()  # the dangling link is skipped with a warning
    assert "ComfybakeEcho" in double.get("/object_info/ComfybakeEcho")[1]  # custom_nodes key


def test_is_default_paths_go_first(tmp_path: Path) -> None:
    import folder_paths
    from utils import extra_config

    store, config = write_store(tmp_path)
    folder_paths.set_base_directory(str(tmp_path / "code"))
    try:
        extra_config.load_extra_path_config(str(config))
        assert folder_paths.get_folder_paths("checkpoints")[0] == str(store / "checkpoints")
        assert folder_paths.get_folder_paths("loras")[-1] == str(tmp_path / "loras")
        assert folder_paths.get_full_path("checkpoints", "a.safetensors") == str(
            store / "checkpoints" / "a.safetensors"
        )
    finally:
        folder_paths.set_base_directory(str(DOUBLE))


@pytest.mark.parametrize(
    "text",
    [
        EXTRA_PATHS.format(store="/srv/models", nodes="/opt/nodes", loras="loras"),
        "comfyui:\n  base_path: '/opt/ComfyUI'\n  is_default: false\n  checkpoints: \"models/checkpoints\"\n",
        "a:\n  k: |-\n    one\n    two\n\n  j: v # comment\nempty:\n",
    ],
)
def test_yaml_subset_matches_pyyaml(text: str) -> None:
    from utils import extra_config

    assert extra_config.parse(text) == yaml.safe_load(text)


# What comfybake's template writes, and values that make PyYAML pick every style it has: plain
# over several lines (long, with spaces), single-quoted (several lines, a quote, a colon, a
# YAML word), double-quoted (a control character, with escapes), and keys it must quote.
TO_NICE_YAML: dict[str, object] = {
    "comfybake_store": {
        "base_path": "/srv/comfybake/models",
        "is_default": True,
        "checkpoints": "checkpoints/",
        "text_encoders": "text_encoders\nclip\n",
        "diffusion_models": "diffusion_models\nunet",
        "spaced": "/srv/a folder/with spaces " * 8,
        "quoted": 'it\'s "here": # not a comment',
        "word": "no",
        "empty": "",
        "bell": "one\x07\n  two\t\n\n",
        "no": "the key is a YAML word",
        "a key: with colon": "x",
    },
    "other": {"loras": "loras", "nothing": None},
}


@pytest.mark.parametrize("indent", [2, 4])
@pytest.mark.parametrize("width", [80, 24])
def test_yaml_subset_reads_what_to_nice_yaml_writes(indent: int, width: int) -> None:
    from ansible.plugins.filter.core import to_nice_yaml
    from utils import extra_config

    text = to_nice_yaml(TO_NICE_YAML, indent=indent, width=width, sort_keys=False)
    assert "'text_encoders\n" in text and '"one' in text  # several lines, both quotes
    assert extra_config.parse(text) == yaml.safe_load(text) == TO_NICE_YAML


def test_the_role_writes_model_paths_the_double_reads(root: Path, ansible_env: dict[str, str], tmp_path: Path) -> None:
    """The environments role's template, rendered by Ansible, means what the old hand-written YAML meant."""
    from utils import extra_config

    rendered = tmp_path / "extra_model_paths.yaml"
    settings = {
        "comfyui_model_store": "/srv/comfybake/models",
        "comfyui_environments_extra_model_folders": ["insightface", "loras"],
        "item": {"key": "comm", "value": {"extra_model_folders": ["ipadapter", "insightface"]}},
        "ansible_python_interpreter": sys.executable,
    }
    template = root / "roles/comfyui_environments/templates/extra_model_paths.yaml.j2"
    subprocess.run(
        [venv_bin("ansible"), "localhost", "-c", "local", "-i", "localhost,", "-m", "ansible.builtin.template",
         "-a", f"src={template} dest={rendered} mode=0644",
         "-e", f"@{root / 'roles/comfyui_environments/defaults/main.yml'}", "-e", json.dumps(settings)],
        cwd=root, env=ansible_env, check=True, capture_output=True,
    )  # fmt: skip
    text = rendered.read_text()
    assert text.startswith("#\n# Ansible managed") and "# Environment comm:" in text
    store = extra_config.parse(text)["comfybake_store"]
    assert extra_config.parse(text) == yaml.safe_load(text)
    assert isinstance(store, dict)
    assert list(store)[:5] == ["base_path", "is_default", "checkpoints", "configs", "loras"]
    assert store["base_path"] == "/srv/comfybake/models" and store["is_default"] is True
    assert store["checkpoints"] == "checkpoints/"
    assert store["text_encoders"] == "text_encoders\nclip\n"  # what `|` gave before
    assert store["controlnet"] == "controlnet\nt2i_adapter\n"
    assert list(store)[-2:] == ["insightface", "ipadapter"]  # the extra keys, once each
    assert store["insightface"] == "insightface/" and store["ipadapter"] == "ipadapter/"


@pytest.mark.parametrize("text", ["a:\n  k: [1, 2]\n", "a:\n  - item\n", "a:\n\tk: v\n", "  k: v\n"])
def test_yaml_outside_the_subset_is_rejected(text: str) -> None:
    from utils import extra_config

    with pytest.raises(extra_config.ExtraConfigError, match=r"<string>:\d+:"):
        extra_config.parse(text)


# -- HTTP API -------------------------------------------------------------------------------


def test_system_stats_reports_argv_version_and_devices(start_double, tmp_path: Path) -> None:
    double = start_double("--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path))
    status, stats = double.get("/system_stats")
    assert status == 200
    assert stats["system"]["argv"][1:] == ["--port", str(double.port), "--user-directory", user_dir(tmp_path),
                                           "--temp-directory", str(tmp_path)]  # fmt: skip
    assert stats["system"]["comfyui_version"] == "0.8.0"
    assert stats["devices"][0]["type"] == "cuda"
    api_status, api_stats = double.get("/api/system_stats")  # the same route under /api/
    assert (api_status, api_stats["system"]["argv"]) == (200, stats["system"]["argv"])


def test_cuda_visible_devices_are_reported(start_double, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    double = start_double("--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path))
    assert [d["name"] for d in double.get("/system_stats")[1]["devices"]] == [
        "cuda:0 Test Double GPU 2",
        "cuda:1 Test Double GPU 3",
    ]


def test_queue_fills_and_drains(start_double, tmp_path: Path) -> None:
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path))
    prompt = {"1": {"class_type": "KSampler", "inputs": {}}}
    for _ in range(2):
        status, queued = double.post("/prompt", {"prompt": prompt, "extra_data": {"test_double_seconds": 0.5}})
        assert status == 200
        assert queued["node_errors"] == {}
    assert double.get("/prompt")[1]["exec_info"]["queue_remaining"] == 2
    queue = double.get("/queue")[1]
    assert len(queue["queue_running"]) == 1
    assert len(queue["queue_pending"]) == 1
    deadline = time.monotonic() + 10
    while double.get("/prompt")[1]["exec_info"]["queue_remaining"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert double.get("/queue")[1] == {"queue_running": [], "queue_pending": []}
    history = double.get("/history")[1]
    assert len(history) == 2
    for prompt_id, item in history.items():  # ComfyUI's status: outcome and messages with ms timestamps
        assert item["status"]["status_str"] == "success" and item["status"]["completed"] is True
        (start, start_data), (cached, _), (end, end_data) = item["status"]["messages"]
        assert (start, cached, end) == ("execution_start", "execution_cached", "execution_success")
        assert start_data["prompt_id"] == end_data["prompt_id"] == prompt_id
        assert 400 <= end_data["timestamp"] - start_data["timestamp"] < 5000
    assert double.post("/history", {"delete": [next(iter(history))]})[0] == 200
    assert list(double.get("/history")[1]) == list(history)[1:]
    assert double.post("/history", {"clear": True})[0] == 200
    assert double.get("/history")[1] == {}


def test_prompt_with_unknown_node_is_refused(start_double, tmp_path: Path) -> None:
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path))
    status, body = double.post("/prompt", {"prompt": {"7": {"class_type": "NoSuchNode"}}})
    assert status == 400
    assert body == {  # ComfyUI 0.3.x names the node's title (its class without one) and the class
        "error": {
            "type": "missing_node_type",
            "message": "Node 'NoSuchNode' not found. The custom node may not be installed.",
            "details": "Node ID '#7'",
            "extra_info": {"node_id": "7", "class_type": "NoSuchNode", "node_title": "NoSuchNode"},
        },
        "node_errors": {},
    }


def test_listens_only_where_told(start_double, tmp_path: Path) -> None:
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path),
                          "--listen", "127.0.0.2", host="127.0.0.2")  # fmt: skip
    listeners = subprocess.run(["ss", "-ltnH", f"sport = :{double.port}"], capture_output=True, text=True)
    if listeners.returncode != 0:
        pytest.fail(f"ss failed: {listeners.stderr}")
    assert f"127.0.0.2:{double.port}" in listeners.stdout
    assert f"127.0.0.1:{double.port}" not in listeners.stdout


def test_websocket_speaks_comfyuis_status_protocol(start_double, tmp_path: Path) -> None:
    double = start_double("--cpu", "--user-directory", user_dir(tmp_path), "--temp-directory", str(tmp_path),
                          "--verbose", "DEBUG")  # fmt: skip
    named = websocket.create_connection(f"ws://127.0.0.1:{double.port}/ws?clientId=c0ffee", timeout=5)
    anonymous = websocket.create_connection(f"ws://127.0.0.1:{double.port}/api/ws", timeout=5)
    try:
        first = json.loads(named.recv())
        assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "c0ffee"}}
        sid = json.loads(anonymous.recv())["data"]["sid"]
        assert len(sid) == 32 and int(sid, 16) >= 0  # uuid4().hex, as ComfyUI makes it
        named.ping(b"are you there")
        named.settimeout(5)
        opcode, data = named.recv_data(control_frame=True)
        assert (opcode, data) == (websocket.ABNF.OPCODE_PONG, b"are you there")
        # Every change of the queue goes to every socket: queued, started, finished.
        prompt = {"1": {"class_type": "KSampler", "inputs": {}}}
        assert double.post("/prompt", {"prompt": prompt, "extra_data": {"test_double_seconds": 0.2}})[0] == 200
        for client in (named, anonymous):
            seen = []
            while not seen or seen[-1] != 0:
                message = json.loads(client.recv())
                assert message["type"] == "status" and "sid" not in message["data"]
                seen.append(message["data"]["status"]["exec_info"]["queue_remaining"])
            assert seen[0] == 1, seen
    finally:
        named.close()
        anonymous.close()
    assert double.get("/ws")[0] == 400  # a plain GET is no upgrade
    status, page = double.get("/")
    assert status == 200 and "new WebSocket(" in page and 'document.title = "ws:" + message.data.sid' in page
    # With --verbose DEBUG every request's URI and headers are in the log (what a proxy forwarded).
    assert 'request GET /ws?clientId=c0ffee headers {"Upgrade": "websocket"' in double.output()
