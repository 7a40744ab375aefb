"""A serving host for the job tests: ComfyUI test doubles as real processes on loopback, grouped in
environments that differ in node classes and models, a config root whose routing.json lists them
(as the comfyui_instances role writes it, node classes read from each double's /object_info), a
state root for the job store, and moto's S3 server on a free port.

Shared by the runner's, the job API's and the worker's tests (tests/jobs/conftest.py makes the
fixtures): `host = jobs_host({"a": "prod", "b": "prod", "v": "video"})`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from comfybake.jobs import outputs
from comfybake.jobs.runner import Runner
from comfybake.jobs.store import JobStore
from harness.double import DOUBLE, Double, free_port

T = TypeVar("T")

# A custom node only the `video` environment has (the double runs a custom node as a no-op).
ENV_ONLY_NODE = """
class TestEnvOnlyUpscale:
    CATEGORY = "image/upscaling"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}


NODE_CLASS_MAPPINGS = {"TestEnvOnlyUpscale": TestEnvOnlyUpscale}
"""


@dataclass(frozen=True)
class Environment:
    """What an environment's instances have: checkpoint files and custom node files (name to source)."""

    name: str
    checkpoints: tuple[str, ...] = ("sd15.safetensors",)
    custom_nodes: Mapping[str, str] = field(default_factory=dict)


# The environments the job tests use unless they give their own: `prod` (an SD 1.5 checkpoint),
# `video` (an SDXL checkpoint and a custom node class nothing else has).
ENVIRONMENTS = {
    "prod": Environment("prod"),
    "video": Environment("video", ("sdxl.safetensors",), {"env_only.py": ENV_ONLY_NODE}),
}


@dataclass
class JobInstance:
    """One running double: its name, environment, base directory (models/, input/, output/)."""

    name: str
    environment: str
    double: Double
    base: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.double.port}"

    def output_files(self) -> list[Path]:
        """Files the instance's output nodes wrote (output/, sub-folders too), by name."""
        folder = self.base / "output"
        return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []

    def input_files(self) -> list[str]:
        folder = self.base / "input"
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

    def queue(self) -> dict[str, Any]:
        status, body = self.double.get("/queue")
        assert status == 200 and isinstance(body, dict), body
        return body

    def queued_ids(self) -> list[str]:
        body = self.queue()
        return [str(item[1]) for key in ("queue_running", "queue_pending") for item in body[key]]

    def history(self, prompt_id: str) -> dict[str, Any]:
        status, body = self.double.get(f"/history/{prompt_id}")
        assert status == 200 and isinstance(body, dict), body
        return body


@dataclass
class JobsHost:
    """Doubles in environments, the config root listing them (routing.json), a state root."""

    config_root: Path
    state_root: Path
    instances: dict[str, JobInstance]

    def __getitem__(self, name: str) -> JobInstance:
        return self.instances[name]

    def write_routing(self, enabled: Mapping[str, bool] | None = None) -> Path:
        """routing.json as comfyui_instances writes it; node classes from each double's /object_info."""
        records = []
        for item in self.instances.values():
            status, info = item.double.get("/object_info")
            assert status == 200 and isinstance(info, dict), info
            records.append(
                {
                    "name": item.name,
                    "environment": item.environment,
                    "url": item.url,
                    "public_url": "",
                    "port": item.double.port,
                    "gpus": ["0"],
                    "enabled": (enabled or {}).get(item.name, True),
                    "description": "",
                    "required_node_classes": ["KSampler"],
                    "node_classes": sorted(info),
                }
            )
        path = self.config_root / "routing.json"
        path.write_text(json.dumps({"format": 1, "instances": records, "environments": []}, indent=2) + "\n")
        return path

    def write_named(self, entries: Mapping[str, tuple[str, dict[str, Any]]]) -> Path:
        """workflows.yml: name to (environment, graph); each graph in its own JSON file."""
        lines = ["workflows:"]
        for name, (environment, graph) in entries.items():
            (self.config_root / f"{name}.json").write_text(json.dumps(graph))
            lines += [f"  {name}:", f"    environment: {environment}", f"    file: {name}.json"]
        path = self.config_root / "workflows.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def stop(self) -> None:
        for item in self.instances.values():
            item.double.stop()


def double_tree(root: Path) -> Path:
    """A copy of the double's code to run (ComfyUI writes its database into its code tree)."""
    tree = root / "ComfyUI"
    if not tree.exists():
        shutil.copytree(DOUBLE, tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tree


def start_double(tree: Path, base: Path, environment: Environment, log: Path, *extra: str) -> Double:
    """One double with its own base directory, laid out for `environment`."""
    for folder in ("models/checkpoints", "custom_nodes", "input", "output", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for name in environment.checkpoints:
        (base / "models" / "checkpoints" / name).write_bytes(b"\0" * 16)
    for name, source in environment.custom_nodes.items():
        (base / "custom_nodes" / name).write_text(source)
    port = free_port()
    command = [sys.executable, "-s", str(tree / "main.py"), "--port", str(port), "--cpu",
               "--base-directory", str(base), "--test-double-strict", *extra]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    return Double(process, port, log)


def wait_answering(double: Double, timeout: float = 30) -> None:
    """Until the double answers /system_stats (it imports its nodes first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if double.process.poll() is not None:
            raise AssertionError(f"the double exited with {double.process.returncode}:\n{double.output()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{double.port}/system_stats", timeout=1):
                return
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    raise AssertionError(f"the double on port {double.port} did not answer:\n{double.output()}")


def start_host(
    root: Path,
    layout: Mapping[str, str],
    environments: Mapping[str, Environment] | None = None,
) -> JobsHost:
    """Doubles named as `layout`'s keys in its environments, and routing.json listing them."""
    known = {**ENVIRONMENTS, **(environments or {})}
    tree = double_tree(root)
    config_root, state_root = root / "etc", root / "state"
    config_root.mkdir(exist_ok=True)
    instances = {}
    for name, environment in layout.items():
        base = root / "instances" / name
        double = start_double(tree, base, known[environment], root / f"{name}.log")
        instances[name] = JobInstance(name, environment, double, base)
    host = JobsHost(config_root, state_root, instances)
    try:
        for item in instances.values():
            wait_answering(item.double)
        host.write_routing()
    except BaseException:
        host.stop()
        raise
    return host


# --------------------------------------------------------------------------- workflows


def txt2img(
    ckpt: str = "sd15.safetensors", *, prefix: str = "ComfyUI", steps: int = 4, seed: int = 1
) -> dict[str, Any]:
    """An API-format txt2img graph the double runs (one 64x64 image saved under `prefix`)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def img2img(image: str = "input.png", *, prefix: str = "img2img") -> dict[str, Any]:
    """A graph that loads an input file (LoadImage) and saves it (SaveImage)."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def start_moto(host: str = "127.0.0.1") -> tuple[Any, str]:
    """moto's S3 server (ThreadedMotoServer) on a free port: (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    return server, f"http://{host}:{port}"


MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    """A running moto S3 server with one bucket."""

    server: Any
    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def environ(self) -> dict[str, str]:
        """The environment a runner reads its S3 sink from (outputs.S3.from_environment)."""
        return {
            "COMFYBAKE_JOBS_S3_BUCKET": self.bucket,
            "COMFYBAKE_JOBS_S3_ENDPOINT_URL": self.endpoint_url,
            "COMFYBAKE_JOBS_S3_REGION": "us-east-1",
            "BUCKET_ACCESS_KEY_ID": "testing",
            "BUCKET_SECRET_ACCESS_KEY": "testing",
        }


def start_s3(bucket: str = "comfybake-jobs") -> S3Server:
    server, url = start_moto()
    found = S3Server(server, url, bucket)
    found.client().create_bucket(Bucket=bucket)
    return found


def run_runner(work: Callable[[Runner], Coroutine[Any, Any, T]], host: JobsHost, **kwargs: Any) -> T:
    """Run `work(runner)` with a runner of `host` started on a fresh event loop, closing it after;
    `kwargs` go to Runner (outputs inline unless `sinks` says otherwise)."""

    async def main() -> T:
        sinks = kwargs.pop("sinks", None) or {"inline": outputs.Inline()}
        found = Runner(host.config_root, JobStore(host.state_root), sinks=sinks, **kwargs)
        await found.start()
        try:
            return await work(found)
        finally:
            await found.close()

    return asyncio.run(main())
