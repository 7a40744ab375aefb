"""Benchmark of instance start-up: all at once with readiness (comfybake) against the seed's loop.

The seed (`start_comfyui_multi.sh`) starts each instance of `instances.json` in turn and sleeps
`startup_delay` (2 s in its example) before the next; nothing tells it when an instance can
serve. comfybake's `comfyui.target` starts every instance at once, and readiness
(`comfybake.core.wait`, the same code as here) polls each until `/system_stats` shows its command
line and its node classes answer. Each instance is the ComfyUI test double with a custom node
that takes --import-seconds to import (real nodes take seconds: torch, model scans).

Two ways to run it:

    .venv/bin/python bench/instances.py                      # processes on this machine: 1, 2, 4 instances
    .venv/bin/python bench/instances.py --cpu-bound          # the same with imports that burn CPU
    .venv/bin/python bench/instances.py --container NAME     # systemd in a converged container

With --container, the same comparison runs under systemd in a container the comfyui_instances
molecule scenario converged (`molecule converge -s comfyui_instances`): for each count the
bench converges that many CPU instances of environment `comm` with playbooks/instances.yml
(replacing the scenario's instances), then times `systemctl start comfyui.target` against the
seed's loop of `systemctl start comfyui@<name>` and sleeps, each until `comfybake instances
status` reports every instance ready. Nothing here asserts a time: it measures, and prints
ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from harness.double import DOUBLE, free_port  # noqa: E402

from comfybake.engine import runtime  # noqa: E402 - after the path set-up

SLOW_NODE = '''\
"""Bench node: imports slowly, like a real node that imports torch and scans models."""
import time

if {cpu}:  # CPU-bound, like importing torch: parallel imports share the cores
    while time.process_time() < {seconds}:
        pass
else:  # waiting, like reading weights from a network disk
    time.sleep({seconds})


class ComfybakeSlow:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{}}}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    CATEGORY = "comfybake"

    def run(self):
        return ()


NODE_CLASS_MAPPINGS = {{"ComfybakeSlow": ComfybakeSlow}}
'''


def code_with_slow_node(scratch: Path, seconds: float, cpu: bool) -> Path:
    code = scratch / "ComfyUI"
    shutil.copytree(DOUBLE, code, ignore=shutil.ignore_patterns("__pycache__"))
    node = code / "custom_nodes" / "ComfyUI-Bench-Slow"
    node.mkdir(parents=True, exist_ok=True)
    (node / "__init__.py").write_text(SLOW_NODE.format(seconds=seconds, cpu=cpu))
    return code


def instance_args(scratch: Path, name: str, port: int) -> list[str]:
    state = scratch / "state" / name
    (state / "user").mkdir(parents=True, exist_ok=True)
    return [
        "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", "--cpu",
        "--user-directory", str(state / "user"), "--input-directory", str(state / "input"),
        "--output-directory", str(state / "output"), "--temp-directory", str(state / "temp"),
        "--database-url", f"sqlite:///{state}/comfyui.db",
    ]  # fmt: skip


def launch(code: Path, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-s", str(code / "main.py"), *args], stdout=out, stderr=out)


def run_round(code: Path, scratch: Path, count: int, sequential_delay: float | None) -> float:
    """Seconds from the first start to every instance ready; sequential with a delay for the seed."""
    records = []
    for index in range(count):
        name = f"i{index}"
        args = instance_args(scratch, name, free_port())
        records.append({"name": name, "port": int(args[3]), "args": args, "required_node_classes": ["ComfybakeSlow"]})
    processes = []
    started = time.monotonic()
    try:
        for index, record in enumerate(records):
            if sequential_delay is not None and index:
                time.sleep(sequential_delay)  # between starts only: the baseline's best case
            processes.append(launch(code, record["args"], scratch / f"{record['name']}.log"))
        results = runtime.wait_all([runtime.Instance(r) for r in records], timeout=120, use_systemd=False)
        elapsed = time.monotonic() - started
        if not all(result["ready"] for result in results):
            raise SystemExit(f"an instance did not become ready: {results}")
        return elapsed
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def docker_exec(container: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", container, *args], capture_output=True, text=True, check=False)


def converge_layout(container: str, count: int, scratch: Path) -> None:
    """Run the comfyui_instances role on the container with `count` CPU instances of environment comm."""
    inventory = scratch / "inventory.json"
    inventory.write_text(
        json.dumps({"comfybake": {"hosts": {container: {"ansible_connection": "community.docker.docker"}}}})
    )
    settings = scratch / "vars.json"
    bundle = os.environ.get("COMFYBAKE_EXTRA_CA_BUNDLE", "")
    settings.write_text(json.dumps({
        "comfyui_model_store": "/srv/molecule/models",  # the scenario's store
        "comfyui_extra_ca_certificates": [bundle] if bundle else [],
        "comfyui_environments": {"comm": {"required_node_classes": ["ComfybakeEcho"]}},
        "comfyui_instances": [
            {"name": f"bench{index}", "environment": "comm", "port": 8300 + index, "gpus": []} for index in range(count)
        ],
    }))  # fmt: skip
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ansible-playbook"), "-i", str(inventory), "-e", f"@{settings}",
         str(ROOT / "playbooks" / "instances.yml")],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(
            f"converging {count} instances on {container} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
        )


def container_round(container: str, count: int, sequential_delay: float | None) -> float:
    """`systemctl start comfyui.target` (or the seed's loop of starts and sleeps) until all are ready."""
    docker_exec(container, "systemctl", "stop", "comfyui.target")
    # The rounds start each unit more often than its crash-loop limit (StartLimitBurst=) allows.
    docker_exec(container, "systemctl", "reset-failed", "comfyui@*.service")
    started = time.monotonic()
    if sequential_delay is None:
        docker_exec(container, "systemctl", "start", "--no-block", "comfyui.target")
    else:
        for index in range(count):
            if index:
                time.sleep(sequential_delay)  # between starts only: the baseline's best case
            docker_exec(container, "systemctl", "start", "--no-block", f"comfyui@bench{index}.service")
    while docker_exec(container, "comfybake", "instances", "status").returncode != 0:
        if time.monotonic() - started > 300:
            raise SystemExit(f"the instances in {container} were not ready within 300 s")
        time.sleep(0.05)
    return time.monotonic() - started


def compare(count: int, rounds: int, measure: Callable[[int, float | None], float], delay: float) -> None:
    """One row: medians of the seed's loop (a delay between starts) and of comfybake (none), and their ratio."""
    seed = statistics.median(measure(count, delay) for _ in range(rounds))
    ours = statistics.median(measure(count, None) for _ in range(rounds))
    print(f"{count:>9}  {seed:>9.2f}s  {ours:>9.2f}s  {seed / ours:>5.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per row; medians are printed")
    parser.add_argument("--import-seconds", type=float, default=3.0, help="import time of the bench node")
    parser.add_argument(
        "--cpu-bound", action="store_true", help="the bench node burns CPU while importing instead of waiting"
    )
    parser.add_argument("--startup-delay", type=float, default=2.0, help="the seed's startup_delay")
    parser.add_argument("--container", help="also time systemctl start comfyui.target in this converged container")
    args = parser.parse_args()

    kind = "CPU-bound" if args.cpu_bound else "waiting"
    print(f"node import time {args.import_seconds:g} s ({kind}, {os.cpu_count()} cores), "
          f"seed startup_delay {args.startup_delay:g} s, medians of {args.rounds}")  # fmt: skip
    print(f"{'instances':>9}  {'seed loop':>10}  {'comfybake':>10}  {'ratio':>6}")
    with tempfile.TemporaryDirectory(prefix="comfybake-bench-") as tmp:
        scratch = Path(tmp)
        code = code_with_slow_node(scratch, args.import_seconds, args.cpu_bound)
        for count in args.counts:
            compare(count, args.rounds, functools.partial(run_round, code, scratch), args.startup_delay)
    if args.container:
        print(f"\nsystemd in {args.container}: systemctl start comfyui.target against the seed's loop "
              f"of systemctl start and sleep {args.startup_delay:g} s, until `comfybake instances status` "
              "passes")  # fmt: skip
        print(f"{'instances':>9}  {'seed loop':>10}  {'comfybake':>10}  {'ratio':>6}")
        with tempfile.TemporaryDirectory(prefix="comfybake-bench-") as tmp:
            for count in args.counts:
                converge_layout(args.container, count, Path(tmp))
                compare(count, args.rounds, functools.partial(container_round, args.container), args.startup_delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
