"""A model origin for the molecule scenarios and the bake: a Hub-like origin plus a CDN (another
port, so another origin for tokens), serving a small manifest of deterministic models. It
publishes its URL, the manifest and its counters in a JSON state file and exits when that file
is removed.

With --tls DIR every server speaks https with a certificate signed by a throwaway CA written to
DIR (the state's "ca"): hosts trust it only through comfyui_extra_ca_certificates, as behind a
TLS-intercepting proxy. --packages serves a wheel folder as a package index (the simple API, at
the state's "index") and --repos serves bare git repositories over http(s) (the dumb protocol,
under the state's "git"), both from a third server whose bytes are not counted as models; that
server also serves a harmless and a malicious pickle (the state's "pickles") for the
pickle-policy checks.

    python tests/harness/serve_models.py --bind "$(python tests/harness/bridge.py)" --state /path/origin.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import uuid
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.archives import antelopev2_zip
from harness.mockhub import FileBody, MockHub, VirtualFile, body_sha256
from harness.pickles import harmless_pickle, malicious_pickle
from harness.tls import TLSFiles, make_tls

MiB = 1 << 20


def safetensors(size: int, seed: int) -> bytes:
    header = (b'{"__metadata__":{"seed":"%d"}}' % seed).ljust(64, b" ")
    payload = VirtualFile(size, seed).read(0, size)
    return len(header).to_bytes(8, "little") + header + payload


def model_bytes(hub: MockHub) -> int:
    """GET body bytes of model files (the Civitai API's JSON answers are metadata, not models)."""
    return sum(r.body_bytes for r in hub.requests() if r.method == "GET" and not r.path.startswith("/api/v1/"))


def concrete_address(value: str) -> str:
    """An IP address to listen on; an empty or wildcard one would serve every network."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an IP address (find one with tests/harness/bridge.py)"
        ) from None
    if address.is_unspecified:
        raise argparse.ArgumentTypeError(f"{value} is a wildcard: give the one address containers reach")
    return str(address)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", type=concrete_address, default="127.0.0.1")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--lifetime", type=float, default=3600)
    parser.add_argument("--tls", type=Path, help="serve https; the throwaway CA goes to this folder")
    parser.add_argument("--packages", type=Path, help="a wheel folder to serve as a package index")
    parser.add_argument("--repos", type=Path, help="a folder of bare git repositories to serve")
    return parser.parse_args(argv)


def serve_packages(hub: MockHub, wheelhouse: Path) -> None:
    """The wheels under /files/ and a simple-API page per project under /simple/<name>/, each
    link carrying the wheel's sha256 as pip and uv expect."""
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        body = FileBody(wheel)
        digest = body.sha256()
        quoted = urllib.parse.quote(wheel.name)
        for path in {f"/files/{wheel.name}", f"/files/{quoted}"}:  # pip sends "+" as %2B, uv as "+"
            hub.add(path, body, etag=f'"{digest}"')
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()
        projects.setdefault(project, []).append(f'<a href="/files/{quoted}#sha256={digest}">{wheel.name}</a><br>')
    for project, links in projects.items():
        page = f"<!DOCTYPE html><html><body>{''.join(links)}</body></html>"
        hub.add(f"/simple/{project}/", page.encode(), content_type="text/html")
    index = "".join(f'<a href="/simple/{project}/">{project}</a><br>' for project in sorted(projects))
    hub.add("/simple/", f"<!DOCTYPE html><html><body>{index}</body></html>".encode(), content_type="text/html")


def serve_repos(hub: MockHub, repos: Path) -> None:
    """Every bare repository under /git/, after `git update-server-info`: git's dumb http
    protocol, which a static server can serve. Files are read from disk when asked for, so a push
    to a repository (followed by `git update-server-info`) is served as upstream's new history."""
    for bare in sorted(repos.rglob("*.git")):
        if (bare / "HEAD").is_file():
            subprocess.run(["git", "update-server-info"], cwd=bare, check=True, capture_output=True)
    hub.add_folder("/git/", repos)


def main() -> int:
    args = parse_args()
    token = os.environ.get("COMFYBAKE_CANARY") or f"hf_CANARY_{uuid.uuid4().hex}"

    tls: TLSFiles | None = make_tls(args.tls, hosts=(args.bind,)) if args.tls else None

    with (
        MockHub(args.bind, tls=tls) as origin,
        MockHub(args.bind, tls=tls) as cdn,
        MockHub(args.bind, tls=tls) as packages,
    ):
        if args.packages:
            serve_packages(packages, args.packages)
        if args.repos:
            serve_repos(packages, args.repos)
        # Pickle-based files for the pickle-policy checks, outside the manifest and its counters.
        pickles = {}
        for name, body in (("harmless.pt", harmless_pickle()), ("evil.pt", malicious_pickle())):
            packages.add(f"/pickles/{name}", body)
            pickles[name] = {"url": f"{packages.url}/pickles/{name}", "sha256": body_sha256(body)}
        big = safetensors(80 * MiB, seed=1)  # over 64 MiB: fetched with parallel ranges
        lora = safetensors(2 * MiB, seed=2)
        vae = VirtualFile(3 * MiB + 17, seed=3)
        pack = antelopev2_zip()
        origin.add_hf("comfybake/test-models", "unet/big.safetensors", big, cdn=cdn, token=token, gated=True)
        origin.add_civitai(4242, "style.safetensors", lora, cdn=cdn)
        origin.add("/files/vae.bin", vae)
        origin.add("/files/antelopev2.zip", pack)
        manifest = [
            {"url": "hf://comfybake/test-models/unet/big.safetensors@main", "dest": "unet/"},
            {"url": "civitai://4242", "dest": "loras/"},
            {"url": f"{origin.url}/files/vae.bin", "dest": "vae/test-vae.bin", "sha256": vae.sha256()},
            {
                "url": f"{origin.url}/files/antelopev2.zip",
                "dest": "insightface/models/antelopev2/",
                "extract": True,
                "sha256": body_sha256(pack),
                "files": ["glintr100.onnx", "scrfd_10g_bnkps.onnx"],
            },
        ]
        expected = [
            {"path": "unet/big.safetensors", "sha256": body_sha256(big), "served": len(big)},
            {"path": "loras/style.safetensors", "sha256": body_sha256(lora), "served": len(lora)},
            {"path": "vae/test-vae.bin", "sha256": vae.sha256(), "served": vae.size},
        ]
        total = sum(item["served"] for item in expected) + len(pack)
        with zipfile.ZipFile(io.BytesIO(pack)) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    name = info.filename.split("/", 1)[1]
                    digest = hashlib.sha256(archive.read(info)).hexdigest()
                    expected.append({"path": f"insightface/models/antelopev2/{name}", "sha256": digest, "served": 0})
        deadline = time.monotonic() + args.lifetime
        published = False
        while time.monotonic() < deadline:
            state = {
                "url": origin.url,
                "ca": str(tls.ca) if tls else None,
                "index": f"{packages.url}/simple",
                "git": f"{packages.url}/git",
                "pickles": pickles,
                "token": token,
                "manifest": manifest,
                "expected": expected,
                "total": total,
                "bytes_served": model_bytes(origin) + model_bytes(cdn),
                "requests": len(origin.requests()) + len(cdn.requests()),
            }
            if published and not args.state.exists():
                return 0  # the scenario's cleanup removed the state file
            temporary = args.state.with_name(args.state.name + ".tmp")
            temporary.write_text(json.dumps(state))
            temporary.replace(args.state)
            published = True
            time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
