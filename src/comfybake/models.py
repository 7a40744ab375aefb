"""`comfybake models fetch|lock|scan|du|ls|prune`: the model engine from the command line (and boot-time units)."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import yaml

from comfybake import logs, yamlfile
from comfybake.cli import SUBCOMMANDS
from comfybake.engine import fetch as engine
from comfybake.engine.fetch import pickles
from comfybake.engine.redaction import url_credentials
from comfybake.instances import config_root_option

LOCK_FORMAT = 1
MANIFEST_HELP = "YAML/JSON list of models, a lock file, a vars file, or a models file with settings"
EXIT_CODES = {
    "fetch": "exit status:\n  0  the store holds the manifest\n  1  some entries failed (each is named)\n"
    "  2  the manifest, an option or the store is wrong; nothing was fetched",
    "lock": "exit status:\n  0  the lock file is written\n  2  the manifest, an option or a source is wrong",
    "scan": "exit status:\n  0  no dangerous import\n  1  some file imports something dangerous, or could not be\n"
    "     read whole, or imports something neither picklescan's safe list nor comfybake's\n"
    "     allow list names (each is named)\n  2  a file is missing or picklescan is not available",
    "du": "exit status:\n  0  the usage is printed\n  2  a manifest, an option or the store is wrong",
    "ls": "exit status:\n  0  the files are listed\n  2  a manifest, an option or the store is wrong",
    "prune": "exit status:\n  0  pruned (or, without --yes, listed what would go)\n"
    "  2  a manifest, an option or the store is wrong; nothing was removed",
}
STORE_MANIFESTS_HELP = "manifests or models files whose entries are in use (default <config-root>/models.yml)"


def read_models_file(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The manifest and the settings a file holds.

    A file is a YAML/JSON list of entries, a lock (`models:`), a vars file with `comfyui_models:`,
    or a models file: `models:` with any of the module's settings beside it (the role writes one
    for the boot-time fetch). Tokens never come from a file.
    """
    try:
        data = yamlfile.load(path, "manifest")
    except yamlfile.YAMLFileError as error:
        raise engine.ManifestError(str(error)) from None
    found = _url_credentials(data, "") if path.stat().st_mode & stat.S_IROTH else []
    if found:
        raise engine.ManifestError(
            f"{path} is readable by every user and holds credentials in a URL ({', '.join(found)}): they "
            "do not belong in a file others can read; use a token (--hf-token-file, --civitai-token-file, a "
            "systemd credential), or make the file unreadable to others (chmod o-r)"
        )
    if isinstance(data, list):
        return data, {}
    if isinstance(data, dict) and isinstance(data.get("comfyui_models"), list):
        return list(data["comfyui_models"]), {}
    if isinstance(data, dict) and isinstance(data.get("models"), list):
        settings = {k: v for k, v in data.items() if k not in ("models", "comfybake_models_lock")}
        secrets = sorted(name for name, declared in engine.SETTINGS.items() if declared.secret and name in settings)
        if secrets:
            raise engine.ManifestError(
                f"{path} holds {', '.join(secrets)}: a token does not belong in a file others can read; "
                "use --hf-token-file/--civitai-token-file, a systemd credential or HF_TOKEN/CIVITAI_TOKEN"
            )
        return list(data["models"]), settings
    if isinstance(data, dict):
        raise engine.ManifestError(f"manifest {path} has no 'models' or 'comfyui_models' list")
    raise engine.ManifestError(f"manifest {path} must hold a list of models, got {type(data).__name__}")


def _url_credentials(value: Any, where: str) -> list[str]:
    """The keys (models[0].url, mirrors.huggingface[1]) whose value is a URL with user-info (user:pass@)."""
    if isinstance(value, str):
        return [where] if url_credentials(value) else []
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in _url_credentials(item, f"{where}.{key}".lstrip("."))]
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in _url_credentials(item, f"{where}[{index}]")]
    return []


def read_token(explicit: str | None, credential: str) -> str | None:
    """A token file, else a systemd credential; never a command-line value (the environment comes after, in Options)."""
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(os.environ["CREDENTIALS_DIRECTORY"]) / credential)
    for index, candidate in enumerate(candidates):
        if candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as error:  # the error names no byte of the token
                reason = getattr(error, "strerror", None) or "it is not UTF-8 text"
                raise engine.ManifestError(f"cannot read token file {candidate}: {reason}") from None
        if explicit and index == 0:
            raise engine.ManifestError(f"token file {candidate} does not exist")
    return None


def options_from(args: argparse.Namespace, settings: dict[str, Any], check_mode: bool = False) -> engine.Options:
    """The run's options: flags over the file's settings, then the environment, then the defaults."""
    given = {**settings, **{name: getattr(args, name) for name in engine.SETTINGS if hasattr(args, name)}}
    if hasattr(args, "protected"):  # --protected adds to the models files' globs, never replaces them
        given["protected"] = [*(settings.get("protected") or []), *args.protected]
    for name, declared in engine.SETTINGS.items():
        if declared.secret:  # its flag is --<name>-file (add_arguments); the credential has its name
            given[name] = read_token(getattr(args, f"{name}_file", None), name)
    if args.action not in ("fetch", "lock"):  # du, ls, prune: neither tokens nor the environment matter
        given = {name: value for name, value in given.items() if not engine.SETTINGS[name].secret}
    if args.action == "lock":
        given["store"] = "."  # a lock resolves sources; it never touches a store
    return engine.Options.from_params(given, check_mode=check_mode)


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
        self.logged: set[str] = set()  # the entries logged as they finished (JSON mode)

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
            if logs.json_mode():  # as it happens (a boot-time fetch may take an hour); not again in the summary
                self.logged.add(name)
                logs.emit(f"{action} {name}", entry=name, action=action, bytes=total)
                return
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
        mark = "  (unverified)" if not result.verified and result.action != "failed" else ""
        stream.write(f"{result.action:<15} {size:>10} {moved:>10} {result.seconds:>8.2f}  {result.name}{mark}\n")
    for warning in report.warnings:
        stream.write(f"warning: {warning}\n")
    for result in report.failed:
        stream.write(f"error: {result.msg}\n")
    counts: dict[str, int] = {}
    for result in report.results:
        counts[result.action] = counts.get(result.action, 0) + 1
    unverified = sum(1 for r in report.results if not r.verified and r.action != "failed")
    note = f" ({unverified} unverified: no sha256 was known to check)" if unverified else ""
    stream.write(", ".join(f"{count} {action}" for action, count in sorted(counts.items())) + note + "\n")


def log_summary(report: engine.Report, logged: set[str]) -> None:
    """The summary as log objects (JSON mode, on stderr): one per entry not `logged` as it finished,
    and a total; the warnings were logged as they came."""
    for result in report.results:
        if result.name in logged:
            continue
        level = "error" if result.action == "failed" else "info"
        message = result.msg if result.action == "failed" and result.msg else f"{result.action} {result.name}"
        fields = {"action": result.action, "bytes": result.bytes, "seconds": round(result.seconds, 3)}
        logs.emit(message, level, entry=result.name, verified=result.verified, **fields)
    counts: dict[str, int] = {}
    for result in report.results:
        counts[result.action] = counts.get(result.action, 0) + 1
    logs.emit(", ".join(f"{count} {action}" for action, count in sorted(counts.items())) or "no models", totals=counts)


def warnings_of(entries: list[engine.Entry]) -> Callable[[str], None]:
    """How the engine's warnings reach stderr: each names the entry it concerns, if one (the
    message starts with the entry's name), for the `entry` field of JSON lines."""
    names = sorted((entry.name for entry in entries), key=len, reverse=True)

    def warn(message: str) -> None:
        logs.emit(message, "warning", entry=next((name for name in names if message.startswith(f"{name}: ")), None))

    return warn


def fetch(args: argparse.Namespace) -> int:
    try:
        models, settings = read_models_file(args.manifest)
        if "store" not in settings and not hasattr(args, "store"):
            raise engine.ManifestError(f"{args.manifest} names no store: give --store DIR")
        options = options_from(args, settings, check_mode=args.check)
        entries = engine.parse_manifest(models, options)
        if not Path(options.store).is_dir():
            raise engine.ManifestError(f"model store {options.store} does not exist; create it or fix --store")
        bars = Bars(sys.stderr)
        fetcher = engine.Fetcher(options, progress=bars, log=warnings_of(entries))
        fetcher.prunable = engine.prunable(options, entries, [str(args.manifest)])
        report = fetcher.run(entries)
        pruned = None
        if options.prune:
            pruned = engine.prune(
                options, entries, apply=not args.check, report=report, store=fetcher.store, sources=[str(args.manifest)]
            )
    except engine.FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        payload = {"changed": report.changed, "results": [r.as_dict() for r in report.results]}
        if pruned is not None:
            payload.update(changed=report.changed or pruned.changed, pruned=pruned.as_dict())
        json.dump({**payload, "warnings": report.warnings}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif logs.json_mode():  # a journal reads one object per entry, not a table
        log_summary(report, bars.logged)
        if pruned is not None:
            print_pruned(pruned, sys.stderr)
    else:
        print_summary(report, sys.stdout)
        if pruned is not None:
            print_pruned(pruned, sys.stdout)
    return 1 if report.failed else 0


def lock(args: argparse.Namespace) -> int:
    output: Path = args.output or args.manifest.with_name(args.manifest.stem + ".lock.yml")
    try:
        models, settings = read_models_file(args.manifest)
        options = options_from(args, settings)
        entries = engine.parse_manifest(models, options)
        locked = engine.Fetcher(options, log=warnings_of(entries)).resolve(entries)
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


def scan(args: argparse.Namespace) -> int:
    """Scan files with the picklescan this command carries; the module runs it when it cannot import picklescan."""
    results: list[dict[str, Any]] = []
    try:
        for path in args.files:
            name = args.as_name or path.name
            findings = pickles.scan(str(path), name, command=False)
            results.append({"path": str(path), "name": name, **findings.as_dict()})
    except (engine.FetchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        json.dump({"results": results}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for result in results:
            verdict = "dangerous: " + ", ".join(result["dangerous"]) if result["dangerous"] else "no dangerous import"
            if unknown(result):
                verdict += "; not on a safe or allow list: " + ", ".join(unknown(result))
            if result["error"]:
                verdict += f" (not read whole: {result['error']})"
            print(f"{result['path']}: {verdict}")
    return 1 if any(result["dangerous"] or result["error"] or unknown(result) for result in results) else 0


def unknown(result: dict[str, Any]) -> list[str]:
    """The imports picklescan rates suspicious that ALLOWED_GLOBALS does not allow: the engine refuses them."""
    return [found for found in result["suspicious"] if not pickles.allowed_global(found)]


def store_context(args: argparse.Namespace) -> tuple[engine.Options, list[engine.Entry], dict[str, list[str]]]:
    """The store, the entries of every manifest in use and the environments' folders, for du, ls and prune."""
    manifests: list[Path] = list(args.manifests)
    default = Path(args.config_root) / "models.yml"
    if not manifests and default.is_file():
        manifests = [default]
    loaded = [read_models_file(path) for path in manifests]
    settings: dict[str, Any] = {}
    for _models, found in reversed(loaded):  # the first file's settings win
        settings.update({k: v for k, v in found.items() if k in engine.SETTINGS})
    protected = [glob for _models, found in loaded for glob in found.get("protected") or []]
    if protected:  # every file's globs protect
        settings["protected"] = protected
    if "store" not in settings and not hasattr(args, "store"):
        raise engine.ManifestError(f"no store: give --store DIR, or a models file that names one (such as {default})")
    options = options_from(args, settings)
    if not Path(options.store).is_dir():
        raise engine.ManifestError(f"model store {options.store} does not exist; fix --store")
    if args.action == "prune" and not manifests:
        raise engine.ManifestError(
            f"no manifest: {default} does not exist and none was given; prune removes what no manifest "
            "references, so give the manifests in use"
        )
    entries = [entry for models, _settings in loaded for entry in engine.parse_manifest(models, options)]
    root = os.path.realpath(options.store)
    environments: dict[str, list[str]] = {}
    for path in sorted(Path(args.config_root).glob("envs/*/extra_model_paths.yaml")):
        try:
            document = yamlfile.load(path, "extra_model_paths")
        except yamlfile.YAMLFileError as error:
            raise engine.ManifestError(str(error)) from None
        environments[path.parent.name] = engine.environment_folders(document, root)
    return options, entries, environments


def store_usage(args: argparse.Namespace) -> tuple[engine.Options, engine.Usage] | None:
    """The store's usage for du and ls; None (after printing why) when the store or a manifest is wrong."""
    try:
        options, entries, environments = store_context(args)
        return options, engine.scan(options, entries, environments)
    except (engine.FetchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def du(args: argparse.Namespace) -> int:
    found = store_usage(args)
    if found is None:
        return 2
    options, usage = found
    summary = usage.summary()
    if options.budget is not None:
        summary["budget"] = options.budget
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    for title in ("folders", "entries", "environments"):
        out.write(f"{'bytes':>10} {'files':>6}  {title[:-1] if title != 'entries' else 'entry'}\n")
        for name, row in summary[title].items():
            out.write(f"{engine.human(row['bytes']):>10} {row['files']:>6}  {name}\n")
        out.write("\n")
    for label in ("unreferenced", "partial"):
        row = summary[label]
        extra = f" ({row['in_use']} in use)" if label == "partial" else ""
        out.write(f"{engine.human(row['bytes']):>10} {row['files']:>6}  {label}{extra}\n")
    total = summary["total"]
    out.write(f"{engine.human(total['bytes']):>10} {total['files']:>6}  total in {summary['store']}\n")
    out.write(f"{engine.human(summary['free']):>10} {'':>6}  free\n")
    if options.budget is not None:
        out.write(f"{engine.human(options.budget):>10} {'':>6}  budget\n")
    return 0


def ls(args: argparse.Namespace) -> int:
    found = store_usage(args)
    if found is None:
        return 2
    _options, usage = found
    if args.json:
        json.dump([item.as_dict() for item in usage.files], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(f"{'size':>10}  {'state':<12}  {'path':<40}  {'entry':<30}  environments\n")
    for item in usage.files:
        state = item.state + (" (in use)" if item.in_use else "")
        who = item.entry or (f"-> {item.target}" if item.target else "-")
        where = ",".join(item.environments) or "-"
        sys.stdout.write(f"{engine.human(item.size):>10}  {state:<12}  {item.path:<40}  {who:<30}  {where}\n")
    return 0


def print_pruned(pruned: engine.Pruned, stream: TextIO) -> None:
    if pruned.skipped:
        stream.write(pruned.skipped + "\n")
        return
    for pattern in pruned.unmatched:
        stream.write(f"warning: protected glob {pattern!r} matches nothing in the store\n")
    verb = "would remove" if pruned.dry_run else "removed"
    for item in pruned.removed:
        stream.write(f"{verb:>12} {engine.human(item['bytes']):>10}  {item['path']}  ({item['why']})\n")
    for item in pruned.kept:
        stream.write(f"{'kept':>12} {engine.human(item['bytes']):>10}  {item['path']}  ({item['why']})\n")
    for path in pruned.gone:
        stream.write(f"{'gone':>12} {'':>10}  {path}  (removed meanwhile by someone else)\n")
    freed = "would free" if pruned.dry_run else "freed"
    budget = f", budget {engine.human(pruned.budget)}" if pruned.budget is not None else ""
    stream.write(
        f"{len(pruned.removed)} file(s), {freed} {engine.human(pruned.freed)} of {engine.human(pruned.usage)}{budget}\n"
    )
    if pruned.dry_run and pruned.removed:
        stream.write("dry run: nothing was removed; run again with --yes to remove them\n")


def prune(args: argparse.Namespace) -> int:
    try:
        options, entries, _environments = store_context(args)
        budget = options.budget if hasattr(args, "budget") else None  # the flag, not a models file's setting
        sources = [str(path) for path in args.manifests] or [str(Path(args.config_root) / "models.yml")]
        pruned = engine.prune(options, entries, apply=args.yes, budget=budget, sources=sources)
    except (engine.FetchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        json.dump({"changed": pruned.changed and not pruned.dry_run, **pruned.as_dict()}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_pruned(pruned, sys.stdout)
    return 0


def _store_parser(actions: Any, name: str, helptext: str, func: Callable[[argparse.Namespace], int]) -> Any:
    parser = actions.add_parser(
        name, help=helptext, epilog=EXIT_CODES[name], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifests", type=Path, nargs="*", help=STORE_MANIFESTS_HELP)
    engine.add_arguments(parser, name)
    config_root_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=func)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch_parser = actions.add_parser(
        "fetch",
        help="download and verify a manifest into a model store",
        epilog=EXIT_CODES["fetch"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch_parser.add_argument("manifest", type=Path, help=MANIFEST_HELP)
    engine.add_arguments(fetch_parser, "fetch")
    fetch_parser.add_argument("--check", action="store_true", help="dry run: probe sources, write nothing")
    fetch_parser.add_argument("--json", action="store_true", help="print the results as JSON")
    fetch_parser.set_defaults(func=fetch)
    lock_parser = actions.add_parser(
        "lock",
        help="pin a manifest: exact revisions, file names, sizes, SHA-256",
        epilog=EXIT_CODES["lock"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lock_parser.add_argument("manifest", type=Path, help=MANIFEST_HELP)
    engine.add_arguments(lock_parser, "lock")
    lock_parser.add_argument("-o", "--output", type=Path, help="lock file (default <manifest>.lock.yml)")
    lock_parser.add_argument("--json", action="store_true", help="also print the lock file and its models as JSON")
    lock_parser.set_defaults(func=lock)
    scan_parser = actions.add_parser(
        "scan",
        help="scan pickle-based files (.ckpt, .pt, .bin, ...) for dangerous imports, without loading them",
        epilog=EXIT_CODES["scan"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan_parser.add_argument("files", type=Path, nargs="+", metavar="FILE", help="files to scan")
    scan_parser.add_argument(
        "--as", dest="as_name", metavar="NAME", help="scan as a file named NAME (its extension picks the reader)"
    )
    scan_parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    scan_parser.set_defaults(func=scan)
    _store_parser(actions, "du", "the store's usage by folder, manifest entry and environment; free space", du)
    _store_parser(actions, "ls", "every file of the store: size, state, entry, environments that see it", ls)
    prune_parser = _store_parser(
        actions, "prune", "remove files no manifest references (a dry run unless --yes)", prune
    )
    prune_parser.add_argument(
        "--yes", "--apply", dest="yes", action="store_true", help="remove the files (default: only list them)"
    )


SUBCOMMANDS["models"] = (
    "fetch and verify models, lock a manifest, scan pickle-based files, show and prune the store",
    configure,
)
