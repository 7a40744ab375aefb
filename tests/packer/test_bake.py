"""A real `packer build` of the `test` target, then the image run with `docker run` and only the
capabilities docs/bake.md documents.

The bake uses the local base image and, over https from an origin on this machine whose
certificates a throwaway CA signed (handed to the bake only as extra_ca_bundle, as a proxy's CA),
the ComfyUI test double and fixture nodes from git remotes, the fixture wheelhouse as a package
index, and the models, whose token is a canary.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ansible_collections.comfybake.core.plugins.module_utils.gateway import credentials
from harness import bake as baking
from harness.bake import Bake, Origin, docker, image_files
from harness.tools import failure_reason, save_log

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory, docker_engine: None) -> Iterator[Origin]:
    with baking.origin(tmp_path_factory.mktemp("bake")) as served:
        yield served


def bake(origin: Origin, policy: str, version: str) -> Bake:
    try:
        return baking.bake(origin, policy, version)
    except baking.BakeError as error:
        pytest.fail(str(error), pytrace=False)


# What docs/bake.md gives `docker run`: every capability dropped but these, no new privileges.
CAPABILITIES = ("CHOWN", "SETUID", "SETGID", "KILL")
STORE = "/srv/comfybake/models"
SUPERVISORD_CONF = "/etc/comfybake/supervisord.conf"
CLI = "/usr/local/bin/comfybake"
# Every process of the container: its argv, real uid, and whether its environment holds argv[1]
# (null where this reader may not read it: another account's, without CAP_SYS_PTRACE).
PROCESSES = """
import json, os, sys
canary, rows = sys.argv[1].encode(), []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\\0")
        status = open(f"/proc/{pid}/status").read()
        uid = int(status.split("Uid:")[1].split()[0])
        ppid = int(status.split("PPid:")[1].split()[0])
    except (OSError, IndexError):
        continue
    try:
        found = canary in open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        found = None
    rows.append({"pid": int(pid), "ppid": ppid, "argv": [arg for arg in argv if arg], "uid": uid, "canary": found})
print(json.dumps(rows))
"""


# The gateway's routes in the test image (ports mode): instance a, instance b, environment comm.
GATEWAY_PORTS = {"a": 9188, "b": 9189, "comm": 8443}
# The gateway's metrics route to the exporter (comfyui_gateway_metrics_port), authenticated too.
METRICS_PORT = 9722
GATEWAY_CA = "/var/lib/comfybake-gateway/pki/authorities/local/root.crt"
# The TCP sockets listening in the container: [address in /proc/net hex, port].
LISTENERS = """
import json
rows = []
for path in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(path).read().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":
            address, port = fields[1].split(":")
            rows.append([address, int(port, 16)])
print(json.dumps(rows))
"""
LOOPBACK = ("0100007F", "00000000000000000000000001000000")


def run_image(
    image: str, name: str, *env: str, secrets: dict[str, Path] | None = None, publish: tuple[int, ...] = ()
) -> str:
    """`docker run` with only the documented capabilities; `secrets` are mounted in /run/secrets,
    `publish` ports published on this host's loopback (on ports Docker picks)."""
    docker("rm", "-f", name, check=False)
    args = [arg for item in env for arg in ("--env", item)]
    args += [arg for key, path in (secrets or {}).items() for arg in ("--volume", f"{path}:/run/secrets/{key}:ro")]
    args += [arg for port in publish for arg in ("--publish", f"127.0.0.1::{port}")]
    caps = [arg for cap in CAPABILITIES for arg in ("--cap-add", cap)]
    privileges = ["--cap-drop", "ALL", *caps, "--security-opt", "no-new-privileges"]
    return docker("run", "--detach", "--name", name, *privileges, *args, image).stdout.strip()


def secret(folder: Path, name: str, value: str, mode: int) -> Path:
    """A token file as a Docker secret is: owned by root (this test's user), with `mode`."""
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


def gateway_credentials(folder: Path, password: str) -> tuple[Path, str]:
    """The secret comfybake_gateway (credentials.json's format, bcrypt hashes only): user `alice`
    with `password` and a new API key `ci`, both for every route; returns it and the key."""
    key, key_hash = credentials.new_key("ci")
    principals = [
        credentials.Principal("alice", "user", credentials.hash_secret(password), ["*"], "cli", "2026-01-01T00:00:00Z"),
        credentials.Principal("ci", "key", key_hash, ["*"], "cli", "2026-01-01T00:00:00Z"),
    ]
    return secret(folder, "comfybake_gateway", credentials.dumps(principals).strip(), 0o400), key


def published(name: str, port: int) -> int:
    """The port of this host's loopback that `docker run --publish` gave the container's `port`."""
    return int(docker("port", name, f"{port}/tcp").stdout.split()[0].rpartition(":")[2])


def gateway_ca(name: str, folder: Path, timeout: float = 30) -> Path:
    """The root certificate of the CA the container's gateway made when it first started."""
    path = folder / f"{name}-ca.crt"
    deadline = time.monotonic() + timeout
    while docker("cp", f"{name}:{GATEWAY_CA}", str(path), check=False).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail(f"the gateway made no CA in {timeout} s:\n{docker('logs', name, check=False).stdout}")
        time.sleep(1)
    return path


def ask(ca: Path, port: int, path: str = "/system_stats", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET https://localhost:<port><path> trusting only `ca` (and no proxy); (status, body)."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca))
    )
    request = urllib.request.Request(f"https://localhost:{port}{path}", headers=headers or {})
    try:
        with opener.open(request, timeout=15) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def processes(name: str, canary: str, uid: int = 0) -> list[dict]:
    return json.loads(docker("exec", "--user", str(uid), name, "python3", "-c", PROCESSES, canary).stdout)


def without_log_format(argv: list[str]) -> list[str]:
    """A command line without the `--log-format FORMAT` that comfybake's programs start with."""
    at = argv.index("--log-format") if "--log-format" in argv else len(argv)
    return argv[:at] + argv[at + 2 :]


def comfyui_processes(name: str, canary: str) -> dict[int, dict]:
    """The ComfyUI processes by pid, and supervisord's under 0, each environment read as the
    process's own account (what a node running as it can read)."""
    found = {}
    for row in processes(name, canary):
        if any(arg.endswith("/ComfyUI/main.py") for arg in row["argv"]):
            key = row["pid"]
        elif any(arg.endswith("/supervisord") for arg in row["argv"][:2]):
            key = 0
        else:
            continue
        (found[key],) = [own for own in processes(name, canary, row["uid"]) if own["pid"] == row["pid"]]
    assert 0 in found and None not in [row["canary"] for row in found.values()], found
    return found


def wait_ready(name: str, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while time.monotonic() < deadline:
        state = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
        if state != "true":
            pytest.fail(f"the container stopped:\n{docker('logs', name).stdout}{docker('logs', name).stderr}")
        done = docker("exec", name, "comfybake", "instances", "status", "--json", check=False)
        if done.stdout.strip():
            rows = json.loads(done.stdout)["instances"]
            if rows and all(row["ready"] for row in rows):
                return rows
        time.sleep(1)
    logs = docker("logs", name, check=False)
    pytest.fail(f"instances not ready after {timeout} s: {rows}\n{logs.stdout}{logs.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def baked(origin: Origin) -> Iterator[Bake]:
    """Models in the image (policy bake): the token is used during the bake, and must not stay."""
    done = bake(origin, "bake", "ci-bake")
    yield done
    docker("rmi", done.image, check=False)


@dataclass
class Running:
    name: str
    rows: list[dict]  # `comfybake instances status --json`
    canary: str  # given as HF_TOKEN, as the secret civitai_token, and as the gateway user's password
    key: str  # the gateway's API key, given at run time (its hash, in the secret comfybake_gateway)
    ca: Path  # the root certificate of the CA the gateway made at start
    ports: dict[str, int]  # route (instance or environment) -> its port on this host's loopback


@pytest.fixture(scope="module")
def running(baked: Bake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The baked image run as docs/bake.md says, given a canary token in the environment and as a
    secret, and the gateway's users and keys as the secret comfybake_gateway."""
    name, canary = "comfybake-test-bake", f"hf_CANARY_RUN_{uuid.uuid4().hex}"
    folder = tmp_path_factory.mktemp("secrets")
    civitai = secret(folder, "civitai_token", canary, 0o400)
    gateway, key = gateway_credentials(folder, canary)
    run_image(
        baked.image,
        name,
        f"HF_TOKEN={canary}",
        secrets={"civitai_token": civitai, "comfybake_gateway": gateway},
        publish=tuple(GATEWAY_PORTS.values()),
    )
    try:
        rows = wait_ready(name)
        ports = {route: published(name, port) for route, port in GATEWAY_PORTS.items()}
        yield Running(name=name, rows=rows, canary=canary, key=key, ca=gateway_ca(name, folder), ports=ports)
    finally:
        docker("rm", "-f", name, check=False)


# -- the bake ---------------------------------------------------------------------------


def test_the_token_is_nowhere_in_the_log_history_or_filesystem(baked: Bake, origin: Origin) -> None:
    assert "Executing Ansible:" in baked.log
    assert origin.token not in baked.log
    history = docker("history", "--no-trunc", baked.image).stdout
    inspect = docker("image", "inspect", baked.image).stdout
    assert origin.token not in history + inspect
    token = origin.token.encode()
    leaks = [path for path, body in image_files(baked.image).items() if token in body]
    assert leaks == []


def test_no_caches_or_build_leftovers(baked: Bake) -> None:
    paths = list(image_files(baked.image))
    build_only = ("/var/cache/comfybake/uv/", "/var/cache/comfybake/git/", "/var/cache/comfybake/wheelhouse/",
                  "/root/.cache/", "/root/.ansible", "/var/lib/apt/lists/", "/tmp/", "/var/tmp/",
                  "/var/cache/apt/archives/", "/srv/mirrors/", "/srv/wheelhouse/")  # fmt: skip
    leftovers = [
        path
        for path in paths
        if (path.startswith(build_only) and not path.endswith("/lock"))  # apt's empty lock files may stay
        or ".comfybake-partial" in path
        or path.endswith(".deb")
        or (path.startswith("/var/cache/apt/") and path.endswith(".bin"))
        or path == "/usr/sbin/policy-rc.d"
    ]
    assert leftovers == []
    assert not any("/credentials/" in path for path in paths), "a token folder is in the image"
    # The gateway makes its CA when a container first starts: no CA key or certificate is baked.
    assert [path for path in paths if path.startswith("/var/lib/comfybake-gateway/")] == []


def test_the_bom_records_commits_packages_and_model_hashes(baked: Bake, origin: Origin) -> None:
    bom = json.loads(image_files(baked.image)["/etc/comfybake/lock.json"])
    fixtures = json.loads((origin.fixtures / "environments.json").read_text())
    environment = bom["environments"]["comm"]
    assert environment["comfyui"]["commit"] == fixtures["commits"]["ComfyUI"]["v0.8.0"]
    nodes = {node["name"]: node["commit"] for node in environment["custom_nodes"]}
    assert nodes == {
        "ComfyUI-Comfybake-Basic": fixtures["commits"]["ComfyUI-Comfybake-Basic"]["initial"],
        "ComfyUI-Comfybake-SixOld": fixtures["commits"]["ComfyUI-Comfybake-SixOld"]["initial"],
        "ComfyUI-Comfybake-Writer": fixtures["commits"]["ComfyUI-Comfybake-Writer"]["initial"],
    }
    packages = {package["name"]: package["version"] for package in environment["packages"]}
    assert packages["torch"].startswith("2.13.0") and "six" in packages
    assert "built_at" not in environment
    files = {path: record["sha256"] for path, record in bom["models"]["files"].items()}
    for expected in origin.read()["expected"]:
        if expected["served"]:  # archives are recorded as the archive, not their members
            assert files[expected["path"]] == expected["sha256"]
    assert bom["bake"]["target"] == "test" and bom["bake"]["models_policy"] == "bake"
    assert [item["name"] for item in bom["instances"]] == ["a", "b"]


def test_the_manifest_post_processor_records_the_image(baked: Bake, root: Path) -> None:
    manifest = json.loads((root / "build" / "packer-manifest.json").read_text())
    image_id = docker("image", "inspect", "-f", "{{.Id}}", baked.image).stdout.strip()
    build = next(item for item in manifest["builds"] if item["artifact_id"] == image_id)
    assert build["custom_data"]["org.comfybake.target"] == "test"
    assert build["custom_data"]["image"] == baked.image
    labels = json.loads(docker("image", "inspect", "-f", "{{json .Config.Labels}}", baked.image).stdout)
    assert labels["org.comfybake.models-policy"] == "bake"


def test_no_instance_gets_a_token_writes_the_store_or_stops_another(running: Running) -> None:
    name, pids = running.name, {row["name"]: row["pid"] for row in running.rows}
    seen = comfyui_processes(name, running.canary)
    # The token given as `docker run --env HF_TOKEN` and as a secret reached neither supervisord
    # nor any instance (/proc/<pid>/environ).
    assert set(pids.values()) <= set(seen), f"instances {pids}, processes {seen}"
    assert [pid for pid, row in seen.items() if row["canary"]] == []
    # Each instance runs as an account of its own, neither root nor the model store's owner.
    uids = {instance: seen[pid]["uid"] for instance, pid in pids.items()}
    owner = int(docker("exec", "--user", str(uids["a"]), name, "stat", "-c", "%u", STORE).stdout)
    assert len(set(uids.values())) == 2 and not {0, owner} & set(uids.values()), f"uids {uids}, store {owner}"
    assert seen[0]["uid"] == 0  # supervisord hands out the accounts
    # An instance's account reads the models and cannot change them.
    for instance, uid in uids.items():
        as_instance = ["exec", "--user", str(uid), name]
        read = docker(*as_instance, "sh", "-c", f"head -c 16 {STORE}/loras/style.safetensors >/dev/null", check=False)
        assert read.returncode == 0, f"instance {instance} cannot read the models: {read.stderr}"
        for attempt in (f": >> {STORE}/loras/style.safetensors", f"touch {STORE}/loras/new.safetensors",
                        f"mkdir {STORE}/new", f"rm {STORE}/vae/test-vae.bin"):  # fmt: skip
            done = docker(*as_instance, "sh", "-c", attempt, check=False)
            assert done.returncode != 0, f"instance {instance} (uid {uid}) could {attempt!r}"
    # Instance a cannot stop b, through supervisord's control socket or with a signal.
    as_a = ["exec", "--user", str(uids["a"]), name]
    stop = docker(*as_a, "supervisorctl", "--configuration", SUPERVISORD_CONF, "stop", "comfyui-b", check=False)
    signal = docker(*as_a, "sh", "-c", f"kill -TERM {pids['b']}", check=False)
    assert signal.returncode != 0, "instance a could signal instance b"
    time.sleep(2)
    after = {row["name"]: row["pid"] for row in wait_ready(name)}
    assert after["b"] == pids["b"], f"instance a stopped b through supervisord: {stop.stdout}{stop.stderr}"


def test_a_token_secret_other_accounts_could_read_is_refused(baked: Bake, tmp_path: Path) -> None:
    name = "comfybake-test-open-secret"
    token = secret(tmp_path, "hf_token", f"hf_CANARY_OPEN_{uuid.uuid4().hex}", 0o444)
    try:
        run_image(baked.image, name, secrets={"hf_token": token})
        assert docker("wait", name, timeout=60).stdout.strip() == "2"
        logs = docker("logs", name)
        refused = "the secret /run/secrets/hf_token (root:root 444) is readable by an account other than root"
        assert refused in logs.stderr
        assert "starting 2 instance(s)" not in logs.stdout
        # The gateway's users and keys too: bcrypt hashes, still something to guess passwords against.
        gateway = secret(tmp_path, "comfybake_gateway", '{"format": 1, "principals": []}', 0o444)
        run_image(baked.image, name, secrets={"comfybake_gateway": gateway})
        assert docker("wait", name, timeout=60).stdout.strip() == "2"
        refused = "the secret /run/secrets/comfybake_gateway (root:root 444) is readable by an account other than root"
        assert refused in docker("logs", name).stderr
    finally:
        docker("rm", "-f", name, check=False)


def test_the_image_serves_only_through_the_gateway(running: Running) -> None:
    name, ports = running.name, running.ports
    # Only the gateway listens beyond the container's loopback; the instances listen on it only.
    listeners = json.loads(docker("exec", name, "python3", "-c", LISTENERS).stdout)
    outside = {port for address, port in listeners if address not in LOOPBACK}
    assert outside == {*GATEWAY_PORTS.values(), METRICS_PORT}, f"listening beyond loopback: {listeners}"
    assert {port for address, port in listeners if address in LOOPBACK} >= {8188, 8189}
    # Without credentials, every route answers 401, on every path.
    for route, port in ports.items():
        for path in ("/", "/system_stats", "/api/queue", "/ws?clientId=x"):
            status, _ = ask(running.ca, port, path)
            assert status == 401, f"{route} {path}: {status} without credentials"
    # With the user and the key given at run time, each route reaches its instance, which
    # listens on loopback only; a wrong password does not.
    for route, port in ports.items():
        for headers in (basic("alice", running.canary), {"Authorization": f"Bearer {running.key}"}):
            status, body = ask(running.ca, port, headers=headers)
            assert status == 200, f"{route}: {status} {body[:200]!r}"
            argv = json.loads(body)["system"]["argv"]
            assert argv[argv.index("--listen") + 1] == "127.0.0.1"
            if route in ("a", "b"):
                assert str(GATEWAY_PORTS[route] - 1000) in argv
        assert ask(running.ca, port, headers=basic("alice", running.canary + "x"))[0] == 401
    # The gateway runs as its own account, without the tokens; neither the password nor the key
    # is in its log (the access log drops credentials).
    gateway = [row for row in processes(name, running.canary) if row["argv"][:2] == ["/usr/bin/caddy", "run"]]
    assert len(gateway) == 1, gateway
    uid = gateway[0]["uid"]
    assert docker("exec", name, "id", "-un", str(uid)).stdout.strip() == "comfybake-gateway"
    (own,) = [row for row in processes(name, running.canary, uid) if row["pid"] == gateway[0]["pid"]]
    assert own["canary"] is False
    logs = docker("logs", name)
    assert running.canary not in logs.stdout + logs.stderr and running.key not in logs.stdout + logs.stderr
    assert '"status":401' in logs.stdout + logs.stderr.replace(" ", "")


# The exporter's /metrics on the container's loopback.
METRICS = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9721/metrics', timeout=15).read().decode())"


def test_the_exporter_answers_metrics_in_the_container_as_its_own_account(running: Running) -> None:
    """Issue 18 item 1: supervisord's program comfybake-exporter serves /metrics on the container's
    loopback, as its own account without the tokens, from the zipapp's own prometheus_client."""
    name = running.name
    metrics = docker("exec", name, "python3", "-c", METRICS).stdout
    for instance in ("a", "b"):  # of environment comm
        assert f'comfybake_instance_up{{environment="comm",instance="{instance}"}} 1.0' in metrics, metrics
    assert running.canary not in metrics and running.key not in metrics
    exporter = [
        row
        for row in processes(name, running.canary)
        if without_log_format(row["argv"])[2:5] == [CLI, "exporter", "serve"]
    ]
    assert len(exporter) == 1, exporter
    uid = exporter[0]["uid"]
    assert docker("exec", name, "id", "-un", str(uid)).stdout.strip() == "comfybake-exporter"
    (own,) = [row for row in processes(name, running.canary, uid) if row["pid"] == exporter[0]["pid"]]
    assert own["canary"] is False


def test_the_image_runs_unprivileged_and_every_instance_is_ready(running: Running) -> None:
    name, rows = running.name, running.rows
    assert {(row["name"], row["port"]) for row in rows} == {("a", 8188), ("b", 8189)}
    # Root runs only tini, supervisord, which hands out the accounts, and the keeper, which uses
    # supervisord's socket (and this docker exec).
    # The keeper asks supervisord through `supervisorctl status` now and then: its own child.
    keeper = "/usr/local/bin/comfybake instances --config-root /etc/comfybake keeper"
    as_root = [row for row in processes(name, running.canary) if row["uid"] == 0]
    keepers = {row["pid"] for row in as_root if keeper in " ".join(without_log_format(row["argv"]))}
    root = [" ".join(without_log_format(row["argv"])) for row in as_root if row["ppid"] not in keepers]
    expected = ("/usr/bin/tini ", "/usr/bin/python3 /usr/bin/supervisord ", "python3 -c ")
    assert [command for command in root if not command.startswith(expected) and keeper not in command] == []
    assert [command for command in root if keeper in command], f"no keeper among root's processes: {root}"
    # The keeper deletes outputs older than the retention (30 days), as the instance's own
    # account: root in the container cannot even list an instance's folders.
    output = "/var/lib/comfybake/instances/a/output"
    as_a = ["exec", "--user", "comfyui-a", name]
    docker(*as_a, "sh", "-c", f"touch -d '40 days ago' {output}/old.png && touch {output}/new.png")
    assert docker("exec", name, "ls", output, check=False).returncode != 0  # root has no DAC_OVERRIDE
    cleaned = docker("exec", name, "comfybake", "instances", "keeper", "--once", check=False)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert "a: deleted 1 files older than 30 days" in cleaned.stdout
    assert docker(*as_a, "ls", output).stdout.split() == ["new.png"]
    # A crashed instance is restarted by supervisord.
    pid = next(row["pid"] for row in rows if row["name"] == "a")
    docker("exec", name, "sh", "-c", f"kill -9 {pid}")
    time.sleep(1)
    again = {row["name"]: row["pid"] for row in wait_ready(name)}
    assert again["a"] not in (0, pid)
    # The writer node wrote at import into each instance's own copy of its writable paths.
    for instance in ("a", "b"):
        log = f"/var/lib/comfybake/instances/{instance}/custom_nodes/ComfyUI-Comfybake-Writer/history/imports.log"
        assert set(docker("exec", "--user", f"comfyui-{instance}", name, "cat", log).stdout.split()) == {instance}
    # docker stop reaches supervisord through tini, which stops the instances cleanly.
    docker("stop", "--time", "30", name)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == "0"


def test_two_bakes_of_the_same_inputs_give_the_same_bom(baked: Bake, origin: Origin) -> None:
    first_id = docker("image", "inspect", "-f", "{{.Id}}", baked.image).stdout
    first = image_files(baked.image)["/etc/comfybake/lock.json"]
    try:
        again = bake(origin, "bake", baked.image.rpartition(":")[2])  # the same inputs, the same tag
        assert docker("image", "inspect", "-f", "{{.Id}}", again.image).stdout != first_id  # a new image
        assert image_files(again.image)["/etc/comfybake/lock.json"] == first  # byte for byte
    finally:
        docker("rmi", first_id.strip(), check=False)  # untagged by the second bake


# -- the main job, with models at boot ----------------------------------------------------


def test_main_job_bakes_runs_and_prints_where_instances_answer(origin: Origin, root: Path, tmp_path: Path) -> None:
    """scripts/up.sh (`make up`) on the test target, models policy boot, the token from HF_TOKEN."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COMFYBAKE_TARGET": "test",
        # The origin's CA, as a proxy's: the image fetches the models over https when it starts.
        "COMFYBAKE_PACKER_ARGS": f"-var models_policy=boot -var extra_ca_bundle={origin.ca}",
        "COMFYBAKE_FIXTURES": str(origin.fixtures / "environments.json"),
        "COMFYBAKE_ORIGIN": str(origin.state),
        "HF_TOKEN": origin.token,
    }
    image, name, tokenless = "comfybake/test:local", "comfybake-up", "comfybake-test-no-token"
    from_secret = "comfybake-test-secret"
    try:
        done = subprocess.run([str(root / "scripts" / "up.sh")], cwd=root, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            log = done.stdout + done.stderr
            pytest.fail(f"scripts/up.sh failed: {failure_reason(log)} (full log: {save_log('up', log)})", pytrace=False)
        assert origin.token not in done.stdout + done.stderr
        # Through the gateway only, with the first key and the CA up.sh printed once.
        printed = dict(line.removeprefix("up: ").split(": ", 1) for line in done.stdout.splitlines()
                       if line.startswith(("up: API key admin-key: ", "up: the gateway's CA")))  # fmt: skip
        key = printed["API key admin-key"].split()[0]
        ca = Path(printed["the gateway's CA (trust it, or curl --cacert)"])
        assert "up: environment comm (a, b) answers at https://localhost:8443/" in done.stdout
        for instance, port in (("a", 9188), ("b", 9189)):
            assert f"up: instance {instance} answers at https://localhost:{port}/" in done.stdout
            assert ask(ca, port)[0] == 401
            status, body = ask(ca, port, headers={"Authorization": f"Bearer {key}"})
            assert status == 200, body
            argv = json.loads(body)["system"]["argv"]
            assert argv[1:3] == ["--listen", "127.0.0.1"]
        # The models came at start, not from the image; the token came from `docker run --env`.
        files = image_files(image)
        assert "/etc/comfybake/models.yml" in files
        assert not any(path.startswith("/srv/comfybake/models/") and "/." not in path for path in files)
        assert origin.token.encode() not in b"".join(files.values())
        as_owner = ["exec", "--user", "comfybake"]  # the store is the owner's and its group's only
        listing = docker(*as_owner, name, "ls", "/srv/comfybake/models/loras", "/srv/comfybake/models/vae").stdout
        assert "style.safetensors" in listing and "test-vae.bin" in listing
        # The fetch used the token; no instance, nor supervisord, has it in its environment.
        seen = comfyui_processes(name, origin.token)
        assert len(seen) == 3 and [pid for pid, row in seen.items() if row["canary"]] == []
        docker("rm", "-f", name)
        # The token as a secret file (mode 0400, root's) instead: the gated model is fetched.
        run_image(image, from_secret, secrets={"hf_token": secret(tmp_path, "hf_token", origin.token, 0o400)})
        wait_ready(from_secret)
        listing = docker(*as_owner, from_secret, "ls", "/srv/comfybake/models/loras").stdout
        assert "style.safetensors" in listing
        docker("rm", "-f", from_secret)
        # Without the token the gated model cannot be fetched, and no instance starts.
        run_image(image, tokenless)
        assert docker("wait", tokenless, timeout=120).stdout.strip() != "0"
        logs = docker("logs", tokenless)
        assert "comfybake/test-models" in logs.stdout + logs.stderr
        assert "starting 2 instance(s)" not in logs.stdout + logs.stderr
    finally:  # whatever failed, nothing is left behind
        docker("rm", "-f", name, tokenless, from_secret, check=False)
        docker("rmi", image, check=False)
