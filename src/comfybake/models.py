"""`comfybake models fetch|lock`: the model engine from the command line (and boot-time units)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from comfybake.cli import SUBCOMMANDS
from comfybake.engine import fetch as engine

LOCK_FORMAT = 1
EXIT_CODES = {
    "fetch": "exit status:\n  0  the store holds the manifest\n  1  some entries failed (each is named)\n"
    "  2  the manifest, an option or the store is wrong; nothing was fetched",
    "lock": "exit status:\n  0  the lock file is written\n  2  the manifest, an option or a source is wrong",
}


def load_manifest(path: Path) -> list[Any]:
    """A manifest is a YAML/JSON list, a lock (`models:`), or a vars file with `comfyui_models:`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise engine.ManifestError(f"cannot read manifest {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise engine.ManifestError(f"manifest {path} is not valid YAML: {error}") from None
    if isinstance(data, dict):
        for key in ("models", "comfyui_models"):
            if isinstance(data.get(key), list):
                return list(data[key])
        raise engine.ManifestError(f"manifest {path} has no 'models' or 'comfyui_models' list")
    if isinstance(data, list):
        return data
    raise engine.ManifestError(f"manifest {path} must hold a list of models, got {type(data).__name__}")


def read_token(explicit: Path | None, credential: str, variable: str) -> str | None:
    """A token file, else a systemd credential, else the environment; never a command-line value."""
    candidates = [explicit] if explicit else []
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(os.environ["CREDENTIALS_DIRECTORY"]) / credential)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").strip() or None
        if candidate is explicit:
            raise engine.ManifestError(f"token file {candidate} does not exist")
    return os.environ.get(variable) or None


def octal_mode(text: str) -> int:
    """An argparse type: a file mode such as 0640 (a bad one is a usage error, not a traceback)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0640") from None
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (0000 to 7777)")
    return mode


def options_from(args: argparse.Namespace, check_mode: bool = False) -> engine.Options:
    return engine.Options(
        store=str(args.store) if getattr(args, "store", None) else ".",
        parallel=args.parallel,
        connections=args.connections,
        verify=getattr(args, "verify", "recorded"),
        hf_token=read_token(args.hf_token_file, "hf_token", "HF_TOKEN"),
        civitai_token=read_token(args.civitai_token_file, "civitai_token", "CIVITAI_TOKEN"),
        hf_endpoint=args.hf_endpoint,
        civitai_endpoint=args.civitai_endpoint,
        mirrors=tuple(getattr(args, "mirror", None) or ()),
        allow_http=args.allow_http,
        ca_bundle=args.ca_bundle,
        retries=args.retries,
        timeout=args.timeout,
        mode=getattr(args, "mode", 0o640),
        directory_mode=getattr(args, "directory_mode", 0o2750),
        check_mode=check_mode,
    )


class Bars(engine.Progress):
    """One redrawn status line on a terminal; a line per finished file elsewhere (journals)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.totals: dict[str, int | None] = {}
        self.done: dict[str, int] = {}
        self.lock = threading.Lock()
        self.drawn = 0.0
        self.started = time.monotonic()

    def start(self, name: str, total: int | None) -> None:
        with self.lock:
            self.totals[name] = total
            self.done.setdefault(name, 0)

    def advance(self, name: str, amount: int) -> None:
        with self.lock:
            self.done[name] = self.done.get(name, 0) + amount
            now = time.monotonic()
            if self.tty and now - self.drawn > 0.2:
                self.drawn = now
                self._draw(now)

    def finish(self, name: str, action: str) -> None:
        with self.lock:
            if self.tty:
                self.stream.write("\r\033[K")
            total = self.totals.get(name) or self.done.get(name, 0)
            self.stream.write(f"{action:>10}  {engine.human(total):>10}  {name}\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        got = sum(self.done.values())
        want = sum(t or 0 for t in self.totals.values())
        rate = got / max(now - self.started, 1e-6)
        active = [n for n, t in self.totals.items() if t is None or self.done.get(n, 0) < t]
        width = 24
        filled = int(width * got / want) if want else 0
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {engine.human(got)} / {engine.human(want)}"
            f"  {engine.human(rate)}/s  {len(active)} active"
        )
        self.stream.write("\r\033[K" + line[:200])
        self.stream.flush()


def print_summary(report: engine.Report, stream: TextIO) -> None:
    stream.write(f"\n{'action':<15} {'size':>10} {'bytes':>10} {'seconds':>8}  name\n")
    for result in report.results:
        size = engine.human(result.size) if result.size is not None else "-"
        moved = engine.human(result.bytes) if result.bytes else "0"
        stream.write(f"{result.action:<15} {size:>10} {moved:>10} {result.seconds:>8.2f}  {result.name}\n")
    for warning in report.warnings:
        stream.write(f"warning: {warning}\n")
    for result in report.failed:
        stream.write(f"error: {result.msg}\n")
    counts: dict[str, int] = {}
    for result in report.results:
        counts[result.action] = counts.get(result.action, 0) + 1
    stream.write(", ".join(f"{count} {action}" for action, count in sorted(counts.items())) + "\n")


def fetch(args: argparse.Namespace) -> int:
    try:
        options = options_from(args, check_mode=args.check)
        entries = engine.parse_manifest(load_manifest(args.manifest), options)
        if not Path(options.store).is_dir():
            raise engine.ManifestError(f"model store {options.store} does not exist; create it or fix --store")
        fetcher = engine.Fetcher(options, progress=Bars(sys.stderr), log=lambda line: print(line, file=sys.stderr))
        report = fetcher.run(entries)
    except engine.FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        payload = {"changed": report.changed, "results": [r.as_dict() for r in report.results]}
        json.dump({**payload, "warnings": report.warnings}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_summary(report, sys.stdout)
    return 1 if report.failed else 0


def lock(args: argparse.Namespace) -> int:
    output: Path = args.output or args.manifest.with_name(args.manifest.stem + ".lock.yml")
    try:
        options = options_from(args)
        entries = engine.parse_manifest(load_manifest(args.manifest), options)
        locked = engine.Fetcher(options, log=lambda line: print(line, file=sys.stderr)).resolve(entries)
    except engine.FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    header = (
        f"# Written by `comfybake models lock {args.manifest.name}`: exact revisions, sizes and SHA-256.\n"
        "# Use it as the manifest (comfyui_models) to fetch exactly these bytes.\n"
    )
    document = {"comfybake_models_lock": LOCK_FORMAT, "models": locked}
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    temporary.replace(output)
    print(f"locked {len(locked)} model(s) into {output}", file=sys.stderr)
    if args.json:
        json.dump({"output": str(output), "models": locked}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="YAML/JSON list of models, a lock file, or a vars file")
    parser.add_argument("--parallel", type=int, default=4, help="files fetched at once (default 4)")
    parser.add_argument("--connections", type=int, default=4, help="ranged connections per large file (default 4)")
    parser.add_argument("--hf-endpoint", default=os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    parser.add_argument("--civitai-endpoint", default=os.environ.get("CIVITAI_ENDPOINT", "https://civitai.com"))
    parser.add_argument("--hf-token-file", type=Path, help="file holding the Hugging Face token (else HF_TOKEN)")
    parser.add_argument("--civitai-token-file", type=Path, help="file holding the Civitai token (else CIVITAI_TOKEN)")
    parser.add_argument("--allow-http", action="store_true", help="permit plain http sources and redirects")
    parser.add_argument("--ca-bundle", help="CA bundle for TLS (a proxy's CA)")
    parser.add_argument("--retries", type=int, default=5, help="retries for 408/429/5xx and broken connections")
    parser.add_argument("--timeout", type=float, default=30.0, help="connect and read timeout in seconds")


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch_parser = actions.add_parser(
        "fetch",
        help="download and verify a manifest into a model store",
        epilog=EXIT_CODES["fetch"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(fetch_parser)
    fetch_parser.add_argument("--store", type=Path, required=True, help="the model store (its root folder)")
    fetch_parser.add_argument("--mirror", action="append", help="mirror base URL tried first (repeatable)")
    fetch_parser.add_argument("--verify", choices=("recorded", "full"), default="recorded")
    fetch_parser.add_argument("--mode", type=octal_mode, default="0640", help="file mode (default 0640)")
    fetch_parser.add_argument(
        "--directory-mode", type=octal_mode, default="2750", help="mode of created folders (default 2750)"
    )
    fetch_parser.add_argument("--check", action="store_true", help="dry run: probe sources, write nothing")
    fetch_parser.add_argument("--json", action="store_true", help="print the results as JSON")
    fetch_parser.set_defaults(func=fetch)
    lock_parser = actions.add_parser(
        "lock",
        help="pin a manifest: exact revisions, file names, sizes, SHA-256",
        epilog=EXIT_CODES["lock"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(lock_parser)
    lock_parser.add_argument("-o", "--output", type=Path, help="lock file (default <manifest>.lock.yml)")
    lock_parser.add_argument("--json", action="store_true", help="also print the lock file and its models as JSON")
    lock_parser.set_defaults(func=lock)


SUBCOMMANDS["models"] = ("fetch and verify models, or lock a manifest", configure)
