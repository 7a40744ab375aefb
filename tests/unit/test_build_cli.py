"""scripts/build-cli.py: the host's zipapp carries the job service (comfybake.jobs and aiohttp with its
pure-Python dependencies), which the system python3 runs with no site packages and no venv."""

from __future__ import annotations

import ast
import email
import importlib.util
import re
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # the host's interpreter, the zipapp's shebang
OLDEST_HOST = "3.10"  # Ubuntu 22.04's python3


def build_cli() -> ModuleType:
    """scripts/build-cli.py as a module (its name has a dash), for its pins."""
    spec = importlib.util.spec_from_file_location("build_cli", ROOT / "scripts" / "build-cli.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module  # its dataclass looks its module up while it is made
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "comfybake.pyz"
    subprocess.run([sys.executable, "scripts/build-cli.py", "--output", str(path)], cwd=ROOT, check=True)
    return path


# Under the system python3 in isolated mode (-I: no site packages, no user site, no PYTHON* variables),
# with the zipapp alone on its path: an aiohttp server and client on loopback, over HTTP and a WebSocket,
# and where each module came from.
SERVE_AND_ASK = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import aiohttp
from aiohttp import web

async def hello(request):
    return web.json_response({"got": request.query["q"]})

async def echo(request):
    socket = web.WebSocketResponse()
    await socket.prepare(request)
    async for message in socket:
        await socket.send_str(message.data.upper())
    return socket

async def main():
    app = web.Application()
    app.add_routes([web.get("/hello", hello), web.get("/ws", echo)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/hello", params={"q": "ok"}) as answer:
            print((await answer.json())["got"])
        async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as socket:
            await socket.send_str("socket")
            print((await socket.receive()).data)
    await runner.cleanup()

asyncio.run(main())
names = ("aiohttp", "multidict", "yarl", "propcache", "frozenlist", "aiosignal", "aiohappyeyeballs", "attr", "idna")
for name in names + tuple(n for n in ("async_timeout", "typing_extensions") if n in sys.modules):
    print(name, sys.modules[name].__file__)
compiled = sorted(name for name, module in sys.modules.items() if name.split(".")[0] in names
                  and not (getattr(module, "__file__", None) or "").startswith(sys.argv[1]))
print("elsewhere", compiled)
"""


def test_the_system_python_serves_and_asks_with_the_bundled_aiohttp(pyz: Path) -> None:
    """Hosts run the job service with the system python3 and nothing installed: aiohttp's pure-Python
    code (no compiled speedups, none needed) answers HTTP and a WebSocket, every module from the zipapp."""
    probe = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import aiohttp"], capture_output=True, check=False)
    assert probe.returncode != 0, f"{SYSTEM_PYTHON} has aiohttp: this test needs one without it"
    env = {"PATH": "/usr/bin:/bin"}  # no AIOHTTP_NO_EXTENSIONS: the pure wheel has nothing to turn off
    done = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", SERVE_AND_ASK, str(pyz)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["ok", "SOCKET"], done.stdout
    where = dict(line.split(" ", 1) for line in lines[2:])
    assert where.pop("elsewhere") == "[]", done.stdout
    assert where and all(path.startswith(f"{pyz}/") for path in where.values()), where


def test_the_zipapp_carries_the_jobs_subpackage(pyz: Path) -> None:
    """Every module of src/comfybake goes in, subpackages such as comfybake.jobs included, and the
    package's `engine` link only once (as the engines, from plugins/module_utils)."""
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
    package = ROOT / "src" / "comfybake"
    wanted = {f"comfybake/{path.relative_to(package).as_posix()}" for path in (package / "jobs").glob("*.py")}
    assert wanted and wanted <= set(names), sorted(wanted - set(names))
    assert "comfybake/engine/runtime.py" in names
    assert len(names) == len(set(names)), "an entry is in the archive twice"
    assert not [name for name in names if "__pycache__" in name]


def test_every_bundled_wheel_runs_on_the_oldest_host_python(pyz: Path) -> None:
    """aiohttp's and its dependencies' METADATA admit Python 3.10 (multidict 7.2 does not: the archive
    carries 7.1), their code parses as 3.10's, and what aiohttp requires there is in the archive."""
    serve = {wheel.requirement.partition("==")[0].lower().replace("_", "-") for wheel in build_cli().SERVE}
    with zipfile.ZipFile(pyz) as archive:
        found = {}
        for name in archive.namelist():
            if name.endswith(".dist-info/METADATA"):
                fields = email.message_from_bytes(archive.read(name))
                found[fields["Name"].lower().replace("_", "-")] = fields
        assert serve <= set(found), sorted(serve - set(found))
        for project in serve:
            requires = found[project]["Requires-Python"] or ""
            assert OLDEST_HOST in SpecifierSet(requires), f"{project} needs Python {requires}"
        top = {module for wheel in build_cli().SERVE for module in wheel.modules}
        code = [
            name
            for name in archive.namelist()
            if name.endswith(".py") and name.split("/")[0].removesuffix(".py") in top
        ]
        assert len(code) > 50, code
        for name in code:
            ast.parse(archive.read(name), filename=name, feature_version=(3, 10))
    wanted = {
        re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in found["aiohttp"].get_all("Requires-Dist") or []
        if "extra ==" not in requirement
    }
    assert wanted == {
        "aiohappyeyeballs",
        "aiosignal",
        "async-timeout",
        "attrs",
        "frozenlist",
        "multidict",
        "propcache",
        "typing-extensions",
        "yarl",
    }
    assert wanted <= set(found), sorted(wanted - set(found))


def test_the_aiohttp_pin_is_one_version() -> None:
    """build-cli.py reads aiohttp's pin from pyproject.toml's `serve` extra; the constraints and this venv
    agree, and the bundled dependencies are the constraints' versions but multidict's (for Python 3.10)."""
    build = build_cli()
    assert f"aiohttp=={metadata.version('aiohttp')}" == build.AIOHTTP
    constraints = (ROOT / "requirements" / "constraints.txt").read_text().lower().replace("_", "-").splitlines()
    for wheel in build.SERVE:
        pin = wheel.requirement.lower().replace("_", "-")
        if pin.startswith("multidict=="):  # 7.2 needs Python 3.11
            assert pin.partition("==")[2] in SpecifierSet("<7.2,>=4.5"), pin
            continue
        if pin.startswith("async-timeout=="):  # aiohttp needs it below Python 3.11 only: not the venv's
            assert pin.partition("==")[2] in SpecifierSet("<6.0,>=4.0"), pin
            continue
        assert pin in constraints, f"{wheel.requirement} is not the constraints' version"
    assert re.search(r"aiohttp[=-][0-9]", (ROOT / "scripts" / "build-cli.py").read_text()) is None


def test_the_system_python_runs_the_job_commands_from_the_zipapp(pyz: Path, tmp_path: Path) -> None:
    """`comfybake jobs serve` starts under the system python3 with no site packages, answers /v1/health on its
    unix socket, and stops on SIGTERM (the unit's stop)."""
    (tmp_path / "routing.json").write_text('{"format": 1, "instances": []}')
    help_done = subprocess.run([SYSTEM_PYTHON, "-s", str(pyz), "jobs", "--help"], capture_output=True, text=True)
    assert help_done.returncode == 0 and "serve" in help_done.stdout, help_done.stderr
    jobs_socket = tmp_path / "jobs.sock"
    argv = [SYSTEM_PYTHON, "-I", str(pyz), "jobs", "serve", "--config-root", str(tmp_path)]
    argv += ["--state-root", str(tmp_path / "state"), "--jobs-listen", f"unix:{jobs_socket}"]
    argv += ["--control-listen", f"unix:{tmp_path / 'control.sock'}"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as serving:
        try:
            answer = ""
            for _attempt in range(100):
                asked = subprocess.run(
                    [SYSTEM_PYTHON, "-I", "-c", ASK_HEALTH, str(jobs_socket)], capture_output=True, text=True
                )
                answer = asked.stdout
                if asked.returncode == 0:
                    break
                time.sleep(0.1)
            assert answer.startswith("200 "), answer
            assert '"ok"' in answer
        finally:
            serving.terminate()
            output = serving.communicate(timeout=30)[0]
        assert serving.returncode == 0, output
    assert (tmp_path / "state").is_dir()


ASK_HEALTH = """
import http.client, socket, sys
connection = http.client.HTTPConnection("localhost", timeout=5)
connection.sock = socket.socket(socket.AF_UNIX)
connection.sock.connect(sys.argv[1])
connection.request("GET", "/v1/health")
answer = connection.getresponse()
print(answer.status, answer.read().decode())
"""
