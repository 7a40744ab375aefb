"""`comfybake environments list|rollback|lock`: the releases of a host's environments, and pinned refs.

`list` and `rollback` run on the host (as root: a rollback changes root's files), from what the
roles wrote: `<config root>/instances.json` (where the code lives, which instances use which
environment) and each environment's releases below `<code root>/envs/<name>/`. `lock` runs where
the inventory is: it resolves every tag and branch of a vars file's `comfyui_environments` to the
commit it names now, as `comfybake models lock` pins a model manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from comfybake import instances, logs, yamlfile
from comfybake.cli import SUBCOMMANDS
from comfybake.engine import runtime
from comfybake.engine.environment import EnvError, releases
from comfybake.engine.environment.gitcache import Git
from comfybake.engine.environment.spec import COMMIT, Source
from comfybake.instances import (
    HostError,
    load_host,
    process_state,
    program,
    supervised,
    supervisorctl,
)

LOCK_HEADER = (
    "# Written by `comfybake environments lock {name}`: every tag and branch pinned to the commit it\n"
    "# named on {date}. Use it as the vars file to build the same code on every host.\n"
)


def env_root(host: dict[str, Any], name: str) -> str:
    root = os.path.join(host["code_root"], "envs", name)
    if not os.path.isdir(os.path.join(root, releases.RELEASES)):
        there = (
            sorted(entry for entry in os.listdir(os.path.dirname(root))) if os.path.isdir(os.path.dirname(root)) else []
        )
        raise HostError(f"environment {name} has no releases in {root} (environments: {', '.join(there) or 'none'})")
    return root


def environment_names(host: dict[str, Any]) -> list[str]:
    envs = os.path.join(host["code_root"], "envs")
    if not os.path.isdir(envs):
        return []
    return sorted(name for name in os.listdir(envs) if os.path.isdir(os.path.join(envs, name, releases.RELEASES)))


def instances_by_pid(host: dict[str, Any], environment: str) -> dict[int, str]:
    """Main process id of each running instance of an environment, to its name."""
    found = {}
    for record in host["instances"]:
        if record["environment"] == environment:
            state = process_state(host, record)
            if state["ActiveState"] in ("active", "activating", "reloading") and int(state["MainPID"] or 0):
                found[int(state["MainPID"])] = record["name"]
    return found


def release_rows(host: dict[str, Any], name: str) -> list[dict[str, Any]]:
    root = env_root(host, name)
    owners = instances_by_pid(host, name)
    rows = []
    for release in releases.releases(root):
        lock = json.loads(Path(release.path, releases.LOCK_NAME).read_text(encoding="utf-8"))
        rows.append(
            {
                "environment": name,
                "release": release.id,
                "path": release.path,
                "built_at": lock.get("built_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(release.built)),
                "comfyui": f"{lock['comfyui']['version']} {lock['comfyui']['commit'][:12]}",
                "live": release.live,
                "instances": sorted({owners[pid] for pid in release.pids if pid in owners}),
                "pids": release.pids,
            }
        )
    return rows


def list_releases(args: argparse.Namespace) -> int:
    host = load_host(args.config_root)
    names = [args.name] if args.name else environment_names(host)
    rows = [row for name in names for row in release_rows(host, name)]
    if args.json:
        json.dump({"releases": rows}, sys.stdout, indent=2)
        print()
        return 0
    table = [("ENVIRONMENT", "RELEASE", "BUILT", "COMFYUI", "LIVE", "IN USE BY")]
    for row in rows:
        users = ",".join(row["instances"]) or (f"{len(row['pids'])} other process(es)" if row["pids"] else "-")
        table.append(
            (row["environment"], row["release"], row["built_at"], row["comfyui"], "yes" if row["live"] else "no", users)
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())
    return 0


# --------------------------------------------------------------------------- rollback


def pin_instance(record: dict[str, Any], release: str) -> None:
    """Point the instance's code link at `release` and name it in its environment file (as the
    comfyui_instances role writes both, so its next converge changes nothing)."""
    target = f"../envs/{record['environment']}/{releases.RELEASES}/{release}"
    link = record["code_dir"]
    if os.path.islink(link) and os.readlink(link) != target:
        staged = f"{link}.comfybake-new"
        if os.path.lexists(staged):
            os.unlink(staged)
        os.symlink(target, staged)
        os.replace(staged, link)
    env_file = Path(record["env_file"])
    if env_file.is_file():
        lines = env_file.read_text(encoding="utf-8").splitlines(keepends=True)
        wanted = f"COMFYUI_RELEASE={releases.RELEASES}/{release}\n"
        changed = [wanted if line.startswith("COMFYUI_RELEASE=") else line for line in lines]
        if changed != lines:
            staged_file = env_file.with_name(f".{env_file.name}.tmp")
            staged_file.write_text("".join(changed), encoding="utf-8")
            staged_file.chmod(env_file.stat().st_mode & 0o7777)
            os.replace(staged_file, env_file)


def restart(host: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Restart instances; the error of the service manager, or an empty string."""
    if supervised(host):
        done = supervisorctl(host, "restart", *[program(record) for record in records])
        tool = "supervisorctl restart"
    else:
        units = [record["unit"] for record in records]
        runtime.systemctl("reset-failed", *units)  # a crash loop before the rollback must not block it
        done = runtime.systemctl("restart", *units)
        tool = "systemctl restart"
    return f"{tool} failed: {(done.stderr or done.stdout).strip()}" if done.returncode != 0 else ""


def rollback(args: argparse.Namespace) -> int:
    host = load_host(args.config_root)
    root = env_root(host, args.name)
    report: dict[str, Any] = {"environment": args.name}
    with releases.locked(root):
        before = releases.live(root)
        try:
            target = releases.find(root, args.to) if args.to else releases.previous(root)
        except EnvError as error:
            raise HostError(str(error)) from None
        if target is None:
            raise HostError(
                f"environment {args.name} has no release built before the live one"
                f" ({os.path.basename(before or 'none')}): nothing to roll back to; see `comfybake environments list`"
            )
        report.update(previous=os.path.basename(before) if before else None, release=target.id)
        report["changed"] = before != target.path
        releases.switch(root, target.path)
        records = [record for record in host["instances"] if record["environment"] == args.name]
        # Running, starting or failed (crashed on the release left behind); a stopped one stays stopped.
        running = [record for record in records if process_state(host, record)["ActiveState"] not in ("inactive", "")]
        for record in records:
            pin_instance(record, target.id)
    report["restarted"] = [] if args.no_restart else [record["name"] for record in running]
    if not args.json:
        print(f"environment {args.name}: live release {report['previous']} -> {target.id}")
    code = 0
    if running and not args.no_restart:
        failure = restart(host, running)
        if failure:
            report["error"] = failure
            logs.emit(failure, "error", environment=args.name)
            code = 1
        else:
            results = runtime.wait_all(
                [runtime.Instance(record) for record in running], args.timeout, use_systemd=not supervised(host)
            )
            report["results"] = results
            code = 0 if all(result["ready"] for result in results) else 1
            if not args.json:
                for result in results:
                    print(f"{result['name']}: ready in {result['seconds']} s" if result["ready"] else result["message"])
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    return code


# --------------------------------------------------------------------------- lock


def read_environments(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The vars file's `comfyui_environments` and the whole document."""
    try:
        document = yamlfile.load(path)
    except yamlfile.YAMLFileError as error:
        raise HostError(str(error)) from None
    environments = document.get("comfyui_environments") if isinstance(document, dict) else None
    if not isinstance(environments, dict):
        raise HostError(f"{path} has no comfyui_environments mapping (a vars file of the comfyui_environments role)")
    return environments, document


def pin_refs(environments: dict[str, Any], git: Git) -> list[str]:
    """Replace every tag or branch (ComfyUI's and the nodes') by its commit, in place; what changed."""
    pinned = []
    for name, env in environments.items():
        if not isinstance(env, dict):
            raise HostError(f"environment {name} is not a mapping")
        sources: list[tuple[dict[str, Any], str, str, str]] = []
        if "comfyui_repo" in env and "comfyui_version" in env:
            sources.append((env, "comfyui_repo", "comfyui_version", "ComfyUI"))
        for node in env.get("custom_nodes") or []:
            if isinstance(node, dict) and "repo" in node and "version" in node:
                sources.append((node, "repo", "version", f"custom node {node.get('name') or node['repo']}"))
        for holder, repo_key, version_key, what in sources:
            version = str(holder[version_key])
            if COMMIT.match(version):
                continue
            if "{{" in version or "{{" in str(holder[repo_key]):
                raise HostError(f"environment {name}: {what}: {version_key} is a template; lock a file of plain values")
            try:
                commit, kind = git.resolve(
                    f"environment {name}: {what}", Source(what, str(holder[repo_key]), version), True, True
                )
            except EnvError as error:
                raise HostError(str(error)) from None
            holder[version_key] = commit
            pinned.append(f"{name}: {what} {kind} {version} = {commit}")
    return pinned


def lock(args: argparse.Namespace) -> int:
    output: Path = args.output or args.file.with_name(args.file.stem + ".lock.yml")
    environments, document = read_environments(args.file)
    mirrors = dict(document.get("comfyui_environments_git_mirrors") or {})
    mirrors.update(dict(item.split("=", 1) for item in args.git_mirror))
    with tempfile.TemporaryDirectory(prefix="comfybake-lock-") as scratch:
        pinned = pin_refs(environments, Git(scratch, mirrors, args.ca_bundle))
    header = LOCK_HEADER.format(name=args.file.name, date=time.strftime("%Y-%m-%d", time.gmtime()))
    staged = output.with_name(f".{output.name}.tmp")
    # The vars file may hold secrets (a token, an index URL with credentials): the lock is no
    # more readable than its source.
    mode = stat.S_IMODE(args.file.stat().st_mode)
    with os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), mode)
        out.write(header + yaml.safe_dump(document, sort_keys=False))
    staged.replace(output)
    for line in pinned:
        print(f"pinned {line}", file=sys.stderr)
    print(f"locked {len(pinned)} ref(s) into {output}", file=sys.stderr)
    if args.json:
        json.dump({"output": str(output), "pinned": pinned}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------- parser


def guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Exit 2 with one line naming the problem when the host's files, a release or a ref are wrong."""
    return instances.guarded(func, "comfybake environments")


def configure(parser: argparse.ArgumentParser) -> None:
    instances.config_root_option(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help_text: str, exit_codes: str) -> argparse.ArgumentParser:
        epilog = f"exit status:\n{exit_codes}  2  the host's files, the release or a ref are wrong; nothing was done"
        formatter = argparse.RawDescriptionHelpFormatter
        return actions.add_parser(name, help=help_text, epilog=epilog, formatter_class=formatter)

    list_parser = action(
        "list", "each environment's releases: which is live, which instances use which", "  0  listed\n"
    )
    list_parser.add_argument("name", nargs="?", help="only this environment")
    list_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    list_parser.set_defaults(func=guarded(list_releases))
    back = action(
        "rollback",
        "make the release built before the live one (or --to) live, and restart the environment's running instances",
        "  0  switched, and every restarted instance is ready\n  1  a restart failed, or an instance is not ready\n",
    )
    back.add_argument("name", help="the environment")
    back.add_argument("--to", help="the release to make live (an id from `comfybake environments list`)")
    back.add_argument("--no-restart", action="store_true", help="switch only; restart the instances later")
    back.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness (default 300)")
    back.add_argument("--json", action="store_true", help="print what was done (and each readiness) as JSON")
    back.set_defaults(func=guarded(rollback))
    lock_parser = action(
        "lock",
        "pin every tag and branch of a vars file's comfyui_environments to the commit it names now",
        "  0  the lock file is written\n",
    )
    lock_parser.add_argument("file", type=Path, help="a vars file with comfyui_environments")
    lock_parser.add_argument("-o", "--output", type=Path, help="lock file (default <file>.lock.yml)")
    lock_parser.add_argument(
        "--git-mirror",
        action="append",
        default=[],
        metavar="PREFIX=MIRROR",
        help="resolve URLs that start with PREFIX at MIRROR (the file's comfyui_environments_git_mirrors too)",
    )
    lock_parser.add_argument("--ca-bundle", help="CA bundle for git (a TLS-intercepting proxy)")
    lock_parser.add_argument("--json", action="store_true", help="also print the output path and the pins as JSON")
    lock_parser.set_defaults(func=guarded(lock))


SUBCOMMANDS["environments"] = ("list and roll back this host's environment releases, or lock a vars file", configure)
