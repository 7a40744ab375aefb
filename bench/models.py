"""Benchmark of the model engine against curl, aria2c and ansible.builtin.get_url.

Runs the scenarios S1-S7 of the performance plan (docs/performance.md) side by side in one
run and prints a table with ratios. Nothing here asserts a time: it measures.

    .venv/bin/python bench/models.py              # all scenarios, CI-sized (a few GB)
    .venv/bin/python bench/models.py S3 S5        # some of them
    .venv/bin/python bench/models.py --scale 0.25 # smaller files

Needs curl and aria2c (Debian packages curl and aria2); a missing tool is reported and skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.mockhub import FileBody, MockHub, VirtualFile  # noqa: E402 - after the path set-up

from comfybake.engine import fetch  # noqa: E402

MiB, GiB, MB = 1 << 20, 1 << 30, 1_000_000
ROWS: list[tuple[str, str, str, str]] = []


def row(scenario: str, tool: str, value: str, note: str = "") -> None:
    ROWS.append((scenario, tool, value, note))
    print(f"{scenario:<4} {tool:<34} {value:>14}  {note}", flush=True)


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def have(tool: str) -> bool:
    if shutil.which(tool):
        return True
    print(f"     {tool} is not installed: its rows are skipped", flush=True)
    return False


def engine(store: Path, models: list[dict[str, object]], **options: object) -> fetch.Report:
    opts = fetch.Options(store=str(store), allow_http=True, **options)  # type: ignore[arg-type]
    report = fetch.Fetcher(opts).run(fetch.parse_manifest(models, opts))
    if report.failed:
        raise SystemExit(f"engine failed: {report.failed[0].msg}")
    return report


def get_url(url: str, dest: Path, checksum: str) -> None:
    args = f"url={url} dest={dest} checksum=sha256:{checksum}"
    subprocess.run(
        [str(ROOT / ".venv/bin/ansible"), "localhost", "-c", "local", "-i", "localhost,",
         "-e", f"ansible_python_interpreter={sys.executable}", "-m", "ansible.builtin.get_url", "-a", args],
        check=True, capture_output=True,
    )  # fmt: skip


def pipeline_rate(url: str, size: int) -> float:
    """The reference: requests receiving 1 MiB blocks on one thread, SHA-256 on another, no disk."""
    blocks: list[bytes | None] = []
    ready = threading.Condition()

    def hasher() -> None:
        digest = hashlib.sha256()
        while True:
            with ready:
                while not blocks:
                    ready.wait()
                block = blocks.pop(0)
            if block is None:
                return
            digest.update(block)

    thread = threading.Thread(target=hasher)
    started = time.perf_counter()
    thread.start()
    with requests.get(url, stream=True, timeout=60) as response:
        for block in response.iter_content(MiB):
            with ready:
                blocks.append(block)
                ready.notify()
    with ready:
        blocks.append(None)
        ready.notify()
    thread.join()
    return rate(size, time.perf_counter() - started)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def s1_s2(work: Path, scale: float) -> None:
    size = int(4 * GiB * scale)
    source = work / "origin.bin"
    with source.open("wb") as handle:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            handle.write(block[1:] + block[:1])
            block = block[1:] + block[:1]
    digest = FileBody(source).sha256()
    tmpfs = Path("/dev/shm")  # noqa: S108 - S1 measures without a disk
    shm = Path(tempfile.mkdtemp(dir=tmpfs)) if tmpfs.is_dir() else work / "shm"
    with MockHub() as hub:
        hub.add("/f.bin", FileBody(source), etag=f'"{digest}"')
        url = f"{hub.url}/f.bin"
        model = [{"url": url, "dest": "x/f.bin", "sha256": digest}]
        reference = pipeline_rate(url, size)
        row(
            "S1", "receive→hash pipeline (reference)", f"{reference:.0f} MB/s", f"{size / GiB:.1f} GiB, nothing written"
        )
        scratch = shm / "dd.bin"
        dd = ["dd", "if=/dev/zero", f"of={scratch}", "bs=1M", f"count={size // MiB}"]
        seconds = timed(lambda: subprocess.run(dd, check=True, capture_output=True))
        scratch.unlink()
        write_ceiling = rate(size, seconds)
        row("S1", "dd to tmpfs (new-page write ceiling)", f"{write_ceiling:.0f} MB/s")
        bound = min(reference, write_ceiling)
        for connections in (1, 4):
            store = fresh(shm / "store")
            seconds = timed(lambda c=connections, s=store: engine(s, model, connections=c))
            value = rate(size, seconds)
            row(
                "S1",
                f"comfybake c={connections} (tmpfs)",
                f"{value:.0f} MB/s",
                f"{value / reference:.2f} x pipeline, {value / bound:.2f} x min(pipeline, tmpfs write)",
            )
        if have("curl"):
            seconds = timed(lambda: subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=True))
            row("S1", "curl -o /dev/null (no hash)", f"{rate(size, seconds):.0f} MB/s")
        shutil.rmtree(shm, ignore_errors=True)

        target = work / "dd.bin"
        seconds = timed(lambda: subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size // MiB}", "conv=fdatasync"],
            check=True, capture_output=True))  # fmt: skip
        target.unlink()
        ceiling = rate(size, seconds)
        row("S2", "dd conv=fdatasync (disk ceiling)", f"{ceiling:.0f} MB/s")
        store = fresh(work / "store")
        seconds = timed(lambda: engine(store, model, connections=4))
        value = rate(size, seconds)
        row("S2", "comfybake c=4 (fsync, rename)", f"{value:.0f} MB/s", f"{value / ceiling:.2f} x dd")
        if have("curl"):
            out = work / "curl.bin"

            def curl_and_hash() -> None:
                subprocess.run(["curl", "-s", "-o", str(out), url], check=True)
                subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)

            seconds = timed(curl_and_hash)
            out.unlink()
            row(
                "S2", "curl + sha256sum", f"{rate(size, seconds):.0f} MB/s", f"{rate(size, seconds) / ceiling:.2f} x dd"
            )
        if have("aria2c"):
            seconds = timed(lambda: subprocess.run(
                ["aria2c", "-q", "-x4", "-s4", "--file-allocation=none", f"--checksum=sha-256={digest}",
                 "-d", str(work), "-o", "aria.bin", url], check=True))  # fmt: skip
            (work / "aria.bin").unlink()
            row(
                "S2",
                "aria2c -x4 --checksum",
                f"{rate(size, seconds):.0f} MB/s",
                f"{rate(size, seconds) / ceiling:.2f} x dd",
            )
        out = work / "get_url.bin"
        seconds = timed(lambda: get_url(url, out, digest))
        out.unlink()
        row("S2", "get_url checksum:", f"{rate(size, seconds):.0f} MB/s", f"{rate(size, seconds) / ceiling:.2f} x dd")
    source.unlink()


def s3(work: Path, scale: float) -> None:
    size = int(GiB * scale)
    cap = 50 * MB
    body = VirtualFile(size, seed=3)
    digest = body.sha256()
    with MockHub() as hub:
        hub.add("/capped.bin", body, rate=cap)
        url = f"{hub.url}/capped.bin"
        for connections in (1, 4, 8):
            ideal = min(connections * cap, 1.25e9) / MB
            store = fresh(work / "store")
            seconds = timed(lambda c=connections, s=store: engine(
                s, [{"url": url, "dest": "x/c.bin", "sha256": digest}], connections=c))  # fmt: skip
            ours = rate(size, seconds)
            row("S3", f"comfybake c={connections}", f"{ours:.0f} MB/s", f"{ours / ideal:.2f} x ideal {ideal:.0f} MB/s")
            if have("aria2c"):
                seconds = timed(lambda c=connections: subprocess.run(
                    ["aria2c", "-q", f"-x{c}", f"-s{c}", "-k1M", "--file-allocation=none",
                     f"--checksum=sha-256={digest}", "-d", str(work), "-o", "aria.bin", "--allow-overwrite=true", url],
                    check=True))  # fmt: skip
                theirs = rate(size, seconds)
                row(
                    "S3",
                    f"aria2c -x{connections} --checksum",
                    f"{theirs:.0f} MB/s",
                    f"comfybake/aria2c {ours / theirs:.2f}",
                )
                (work / "aria.bin").unlink()


def s4(work: Path, scale: float) -> None:
    sizes = [int(s * scale) for s in (1 * GiB, 512 * MiB, 256 * MiB, 64 * MiB, 16 * MiB, MiB, 4096, 17)]
    with MockHub() as hub:
        models = []
        for index, size in enumerate(sizes):
            body = VirtualFile(max(size, 1), seed=40 + index)
            hub.add(f"/m{index}.bin", body)
            models.append({"url": f"{hub.url}/m{index}.bin", "dest": f"m/{index}.bin", "sha256": body.sha256()})
        total = sum(max(s, 1) for s in sizes)
        store = fresh(work / "store")
        seconds = timed(lambda: engine(store, models))
        row(
            "S4",
            "comfybake, 8 files cold",
            f"{rate(total, seconds):.0f} MB/s",
            f"served {hub.bytes_served} of {total} bytes ({hub.bytes_served / total:.3f}x)",
        )


def s5(work: Path, files: int, total: int) -> None:
    """A warm re-run over an 80 GB manifest of sparse files (same size, so one real hash)."""
    size = total // files
    zero = hashlib.sha256()
    block = bytes(MiB)
    for _ in range(size // MiB):
        zero.update(block)
    zero.update(bytes(size % MiB))
    digest = zero.hexdigest()
    store = fresh(work / "sparse")
    models = []
    with MockHub() as hub:
        for index in range(files):
            path = store / "checkpoints" / f"m{index:02d}.safetensors"
            path.parent.mkdir(exist_ok=True)
            with path.open("wb") as handle:
                handle.truncate(size)
            models.append({"url": f"{hub.url}/m{index}.bin", "dest": f"checkpoints/m{index:02d}.bin", "sha256": digest})
            path.rename(path.with_suffix(".bin"))
        cold = timed(lambda: engine(store, models))  # hashes each sparse file once and records it
        row("S5", f"first run: hash {files} sparse files", f"{cold:.1f} s", f"{files * size / GiB:.0f} GiB")
        warm = min(timed(lambda: engine(store, models)) for _ in range(5))
        row("S5", "comfybake engine, warm", f"{warm * 1000:.1f} ms", f"{hub.bytes_served} bytes served")
        manifest = work / "manifest.json"
        manifest.write_text(json.dumps(models))
        module = timed(lambda: subprocess.run(
            [str(ROOT / ".venv/bin/ansible"), "localhost", "-c", "local", "-i", "localhost,",
             "-e", f"ansible_python_interpreter={sys.executable}", "-m", "comfybake.core.models",
             "-a", json.dumps({"store": str(store), "models": models, "allow_http": True})],
            check=True, capture_output=True, cwd=ROOT))  # fmt: skip
        row("S5", "comfybake.core.models via `ansible` (whole)", f"{module:.2f} s", "includes Ansible's start-up")
        one = store / "checkpoints" / "m00.bin"
        per_file = timed(lambda: get_url(f"{hub.url}/m0.bin", one, digest))
        row("S5", "get_url checksum:, 1 file", f"{per_file:.2f} s", "re-hashes; x files for the manifest")
        loop = per_file * files
        row(
            "S5",
            f"get_url checksum: x {files} (est.)",
            f"{loop:.0f} s",
            f"comfybake engine is {loop / warm:,.0f}x faster",
        )
        if hub.bytes_served:
            raise SystemExit(f"S5: a warm run served {hub.bytes_served} bytes")
    shutil.rmtree(store)


def s6(work: Path, scale: float) -> None:
    size = int(2 * GiB * scale)
    store = fresh(work / "store")
    models = []
    with MockHub() as hub:
        for index in range(4):
            body = VirtualFile(size // 4, seed=60 + index)
            hub.add(f"/v{index}.bin", body)
            models.append({"url": f"{hub.url}/v{index}.bin", "dest": f"v/{index}.bin", "sha256": body.sha256()})
        engine(store, models)
        block = bytes(4 * MiB)
        started = time.perf_counter()
        digest = hashlib.sha256()
        for _ in range(size // len(block)):
            digest.update(block)
        hash_rate = rate(size, time.perf_counter() - started)
        seconds = timed(lambda: engine(store, models, verify="full", parallel=2))
        ours = rate(size, seconds)
        ideal = 2 * hash_rate
        row("S6", "hashlib, one core (reference)", f"{hash_rate:.0f} MB/s", "page cache; disk reads not forced")
        row("S6", "comfybake verify: full, 4 files", f"{ours:.0f} MB/s", f"{ours / ideal:.2f} x 2 cores of hashing")


def s7(work: Path, scale: float) -> None:
    size = int(GiB * scale)
    body = VirtualFile(size, seed=7)
    digest = body.sha256()
    manifest = work / "s7.json"
    with MockHub() as hub:
        hub.add("/k.bin", body, rate=200 * MB)
        manifest.write_text(json.dumps([{"url": f"{hub.url}/k.bin", "dest": "k/k.bin", "sha256": digest}]))
        for fraction in (0.25, 0.5, 0.9):
            store = fresh(work / "store")
            hub.reset_log()
            command = [str(ROOT / ".venv/bin/comfybake"), "models", "fetch", str(manifest), "--store", str(store),
                       "--allow-http", "--connections", "4"]  # fmt: skip
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while hub.bytes_served < fraction * size and process.poll() is None:
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            visible = (store / "k" / "k.bin").exists()
            rerun = subprocess.run(command, check=True, capture_output=True, text=True)
            warnings = [line for line in rerun.stderr.splitlines() if "discarding" in line or "restart" in line]
            refetched = hub.bytes_served - size  # both runs together, minus one copy
            row(
                "S7",
                f"SIGKILL at {fraction:.0%}, re-run",
                f"{refetched / MiB:.1f} MiB",
                f"re-fetched (window 4 x 16 MiB); partial visible: {visible}; {'; '.join(warnings) or 'resumed'}",
            )


SCENARIOS = {"S1": "s1_s2", "S3": "s3", "S4": "s4", "S5": "s5", "S6": "s6", "S7": "s7"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help="S1 (with S2), S3, S4, S5, S6, S7; default all")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply file sizes (default 1)")
    parser.add_argument("--s5-total", type=float, default=80, help="S5 manifest size in GB (sparse)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder on the disk to measure")
    args = parser.parse_args()
    chosen = [s.upper() for s in args.scenarios] or list(SCENARIOS)
    work = args.work or Path(tempfile.mkdtemp(prefix="comfybake-bench-", dir=ROOT / "bench"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, scratch {work}\n", flush=True)
    try:
        for name in chosen:
            if name == "S2":
                continue
            if name == "S5":
                s5(work, 36, int(args.s5_total * 1e9))
            else:
                globals()[SCENARIOS[name]](work, args.scale)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| scenario | tool | result | note |\n|---|---|---|---|")
    for scenario, tool, value, note in ROWS:
        print(f"| {scenario} | {tool} | {value} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
