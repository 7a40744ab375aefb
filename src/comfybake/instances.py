"""`comfybake instances status|start|stop|restart|diagnose|prepare|clean|retry|keeper`: operate a host's instances.

Runs on the host, as root for start/stop/restart and the journal, or in a container image as
its user, where supervisord runs the instances (`"manager": "supervisor"` in instances.json)
and the same commands go through supervisorctl. It reads what the comfyui_instances role
wrote: `<config root>/instances.json` (the instance layout, the same records the units or
supervisord's programs were generated from) and each environment's lock.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from comfybake import logs
from comfybake.cli import SUBCOMMANDS
from comfybake.engine import comfyui_log, runtime
from comfybake.engine.environment import writable

DEFAULT_CONFIG_ROOT = "/etc/comfybake"


class HostError(Exception):
    """The host's comfybake files are missing or a selection matches nothing."""


def load_json(path: Path, role: str) -> dict[str, Any]:
    """A file a role wrote on the host, `role` naming the one that writes it."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HostError(f"{path} does not exist: converge the host with the {role} role first") from None
    except (OSError, ValueError) as error:
        raise HostError(f"cannot read {path}: {error}") from None
    return data


def load_host(config_root: str) -> dict[str, Any]:
    return load_json(Path(config_root) / "instances.json", "comfyui_instances")


def select(host: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Instances named, of an environment, or in a port range; all when nothing narrows it."""
    instances: list[dict[str, Any]] = host["instances"]
    if not instances:
        raise HostError(
            "no instances are configured on this host (comfyui_instances is empty): define some "
            "(docs/instances.md) and converge it with the comfyui_instances role"
        )
    names = set(getattr(args, "names", None) or [])
    unknown = names - {item["name"] for item in instances}
    if unknown:
        known = ", ".join(item["name"] for item in instances) or "none"
        raise HostError(f"no instance named {', '.join(sorted(unknown))} (instances: {known})")
    low, high = parse_ports(getattr(args, "ports", None))
    chosen = [
        item
        for item in instances
        if (not names or item["name"] in names)
        and (not getattr(args, "environment", None) or item["environment"] == args.environment)
        and low <= item["port"] <= high
    ]
    if not chosen:
        raise HostError("no instance matches the selection")
    return chosen


def parse_ports(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 65535
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise HostError(f"--ports {text!r} is not a port or a range such as 8188-8190") from None


# --------------------------------------------------------------------------- service managers

# supervisord's process states as systemd's (ActiveState, SubState), so both read the same.
SUPERVISOR_STATES = {
    "RUNNING": ("active", "running"),
    "STARTING": ("activating", "start"),
    "BACKOFF": ("activating", "auto-restart"),
    "STOPPING": ("deactivating", "stop"),
    "STOPPED": ("inactive", "dead"),
    "EXITED": ("failed", "exited"),
    "FATAL": ("failed", "fatal"),
}


def supervised(host: dict[str, Any]) -> bool:
    """Whether supervisord runs the instances (a container image) rather than systemd."""
    return host.get("manager") == "supervisor"


def supervisorctl(host: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    command = ["supervisorctl", "--configuration", host["supervisor_conf"], *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def program(record: dict[str, Any]) -> str:
    return f"comfyui:comfyui-{record['name']}"


def process_state(host: dict[str, Any], record: dict[str, Any]) -> dict[str, str]:
    """The instance's unit state, or its supervisord state in the same keys."""
    if not supervised(host):
        return runtime.unit_state(record["unit"])
    fields = supervisorctl(host, "status", program(record)).stdout.split()
    active, sub = SUPERVISOR_STATES.get(fields[1] if len(fields) > 1 else "", ("unknown", "unknown"))
    pid = fields[3].rstrip(",") if len(fields) > 3 and fields[2] == "pid" else "0"
    if pid == "0" and sub == "start":  # STARTING (its first startsecs) shows no pid, `pid` does
        asked = supervisorctl(host, "pid", program(record)).stdout.strip()
        pid = asked if asked.isdigit() else "0"
    return {"ActiveState": active, "SubState": sub, "MainPID": pid, "NRestarts": "0", "InvocationID": ""}


# --------------------------------------------------------------------------- crash loops

# The same policy under both managers (docs/instances.md#crash-loops): a crash restarts the
# instance at once (a few fast restarts: systemd's RestartSec= and StartLimitBurst=,
# supervisord's startretries with its growing delay); once those are spent, it waits
# `retry_interval` seconds (instances.json) and tries again, for as long as it takes.
DEFAULT_RETRY_INTERVAL = 300


def retry_timer(record: dict[str, Any]) -> str:
    """The systemd timer that the instance's OnFailure= arms when its fast restarts are spent."""
    return f"comfyui-retry@{record['name']}.timer"


def show(unit: str, *keys: str) -> dict[str, str]:
    done = runtime.systemctl("show", unit, *[f"--property={key}" for key in keys])
    values = dict.fromkeys(keys, "")
    for line in done.stdout.splitlines():
        key, _equals, value = line.partition("=")
        values[key] = value
    return values


def keeper_state(host: dict[str, Any]) -> dict[str, float]:
    """When the container's keeper retries each FATAL program next (program name to a Unix time)."""
    try:
        data = json.loads(Path(host.get("keeper_state") or "").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(name): float(when) for name, when in data.items()} if isinstance(data, dict) else {}


def crash_loop(host: dict[str, Any], record: dict[str, Any], state: dict[str, str]) -> dict[str, Any] | None:
    """None, or where the instance is in a crash loop: `restarting` (the fast restarts), `waiting`
    (for the slow retry, `next_retry` seconds from now) or `given up` (the slow retry is off)."""
    interval = int(host.get("retry_interval", DEFAULT_RETRY_INTERVAL))
    if supervised(host):
        if state["SubState"] == "auto-restart":  # BACKOFF
            return {"phase": "restarting"}
        if state["SubState"] != "fatal":
            return None
        if interval <= 0:
            return {"phase": "given up"}
        when = keeper_state(host).get(program(record))  # None until the keeper has seen it fail
        return {"phase": "waiting", "next_retry": None if when is None else max(0, round(when - time.time()))}
    if state["SubState"] == "auto-restart":
        return {"phase": "restarting", "restarts": int(state["NRestarts"] or 0)}
    if state["ActiveState"] != "failed":
        return None
    if interval <= 0:
        return {"phase": "given up"}
    timer = show(retry_timer(record), "ActiveState", "ActiveEnterTimestampMonotonic")
    if timer["ActiveState"] != "active":
        return None  # the retry runs right now, or an operator cancelled it
    armed = int(timer["ActiveEnterTimestampMonotonic"] or 0) / 1e6  # the clock of time.monotonic()
    return {"phase": "waiting", "next_retry": max(0, round(armed + interval - time.monotonic()))}


def describe_loop(loop: dict[str, Any] | None) -> str | None:
    if loop is None:
        return None
    if loop["phase"] == "restarting":
        return "crash loop, restarting" + (f" (restart {loop['restarts']})" if loop.get("restarts") else "")
    if loop["phase"] == "waiting" and loop["next_retry"] is None:
        return "crash loop, retry pending"
    if loop["phase"] == "waiting":
        minutes, seconds = divmod(loop["next_retry"], 60)
        return (
            f"crash loop, next retry in {minutes}m{seconds:02d}s"
            if minutes
            else f"crash loop, next retry in {seconds}s"
        )
    return "crash loop, gave up (no retry set): fix it, then comfybake instances start"


def retry_one(host: dict[str, Any], record: dict[str, Any]) -> str:
    """Start an instance whose fast restarts are spent again; leave one that is not failed alone.

    With Restart=on-failure a unit is left failed only when its fast restarts are spent (systemd
    252 then keeps the Result of the last crash, not start-limit-hit) or when a stop of it timed
    out; `comfybake instances stop` cancels the retry of what it stops.
    """
    if supervised(host):
        if process_state(host, record)["SubState"] != "fatal":
            return f"{record['name']}: not in a crash loop, left alone"
        done = supervisorctl(host, "start", program(record))
    else:
        if show(record["unit"], "ActiveState")["ActiveState"] != "failed":
            return f"{record['name']}: not in a crash loop, left alone"
        runtime.systemctl("reset-failed", record["unit"])  # a fresh budget of fast restarts
        done = runtime.systemctl("start", "--no-block", record["unit"])
    if done.returncode != 0:
        return f"{record['name']}: retry failed: {(done.stderr or done.stdout).strip()}"
    return f"{record['name']}: retried after its crash loop"


def retry_reported(host: dict[str, Any], record: dict[str, Any]) -> None:
    """retry_one, reported as the retry unit and the keeper both do: a line on stdout in text mode,
    an object naming the instance (level error when the start failed) in JSON mode."""
    said = retry_one(host, record)
    logs.say(said, "error" if ": retry failed: " in said else "info", instance=record["name"])


def retry(args: argparse.Namespace) -> int:
    host = load_host(args.config_root)
    for record in select(host, args):
        retry_reported(host, record)
    return 0


# --------------------------------------------------------------------------- status


def status_rows(host: dict[str, Any], instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in instances:
        instance = runtime.Instance(record)
        state = process_state(host, record)
        # supervisord calls a program STARTING for its first startsecs, while ComfyUI may serve already.
        running = state["ActiveState"] == "active" or (supervised(host) and state["SubState"] == "start")
        stage, missing, _ = runtime.probe(instance) if running else ("stopped", "", True)
        loop = crash_loop(host, record, state)
        rows.append(
            {
                "name": record["name"],
                "environment": record["environment"],
                "port": record["port"],
                "gpus": record["gpus"],
                "enabled": record["enabled"],
                "unit": f"{state['ActiveState']}/{state['SubState']}",
                "pid": int(state["MainPID"] or 0),
                "restarts": int(state["NRestarts"] or 0),
                "ready": stage == "ready",
                "not_ready": missing,
                "queue": runtime.queue_length(instance) if stage == "ready" else None,
                "crash_loop": loop,
                "note": describe_loop(loop),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    cells = [[title for title, _ in columns]] + [[_cell(row[key]) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "cpu"
    return "-" if value is None else str(value)


def status(args: argparse.Namespace) -> int:
    host = load_host(args.config_root)
    rows = status_rows(host, select(host, args))
    if args.json:
        json.dump({"instances": rows}, sys.stdout, indent=2)
        print()
    else:
        print_table(
            rows,
            [("INSTANCE", "name"), ("ENVIRONMENT", "environment"), ("PORT", "port"), ("GPU", "gpus"),
             ("UNIT", "unit"), ("READY", "ready"), ("QUEUE", "queue"), ("RESTARTS", "restarts"), ("NOTE", "note")],
        )  # fmt: skip
    return 0 if all(row["ready"] or not row["enabled"] for row in rows) else 1


# --------------------------------------------------------------------------- control


def control(args: argparse.Namespace) -> int:
    host = load_host(args.config_root)
    chosen = select(host, args)
    report: dict[str, Any] = {"action": args.action, "instances": [record["name"] for record in chosen]}
    if getattr(args, "drain", 0):
        report["drained"] = runtime.drain_all([runtime.Instance(record) for record in chosen], args.drain)
        for drained in report["drained"]:
            if not drained["drained"]:
                logs.emit(
                    f"{drained['name']}: {drained['queue']} prompts still queued after {args.drain:g} s",
                    "warning",
                    instance=drained["name"],
                )
    if supervised(host):
        done = supervisorctl(host, args.action, *[program(record) for record in chosen])
        tool = "supervisorctl"
    else:
        units = [record["unit"] for record in chosen]
        if args.action != "stop":
            # An operator's start is deliberate: it must not be refused by the crash-loop limit
            # (StartLimitBurst=) that earlier starts and restarts counted towards.
            runtime.systemctl("reset-failed", *units)
        done = runtime.systemctl(args.action, *units)
        if args.action == "stop":  # a stop that timed out fails the unit, which would arm its retry
            runtime.systemctl("stop", *[retry_timer(record) for record in chosen])
        tool = "systemctl"
    if done.returncode != 0:
        report["error"] = f"{tool} {args.action} failed: {(done.stderr or done.stdout).strip()}"
        logs.emit(report["error"], "error", instance=report["instances"][0] if len(chosen) == 1 else None)
        return _reported(args, report, 1)
    if args.action == "stop" or args.no_wait:
        if not args.json:
            print(f"{args.action}: {' '.join(report['instances'])}")
        return _reported(args, report, 0)
    results = runtime.wait_all(
        [runtime.Instance(record) for record in chosen], args.timeout, use_systemd=not supervised(host)
    )
    report["results"] = results
    if not args.json:
        for result in results:
            print(f"{result['name']}: ready in {result['seconds']} s" if result["ready"] else result["message"])
    return _reported(args, report, 0 if all(result["ready"] for result in results) else 1)


def _reported(args: argparse.Namespace, report: dict[str, Any], code: int) -> int:
    """With --json, the whole report on stdout; the exit status either way."""
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    return code


# --------------------------------------------------------------------------- diagnose


def diagnose_report(host: dict[str, Any]) -> dict[str, Any]:
    store = Path(host["model_store"])
    folders: dict[str, Any] = {}
    total = 0
    if store.is_dir():
        for folder in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files: list[dict[str, Any]] = [
                {"path": str(path.relative_to(folder)), "bytes": path.stat().st_size}
                for path in sorted(folder.rglob("*"))
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
            ]
            size = sum(item["bytes"] for item in files)
            total += size
            folders[folder.name] = {"files": files, "bytes": size}
    usage = shutil.disk_usage(store) if store.is_dir() else None
    environments: dict[str, Any] = {}
    for name in sorted({item["environment"] for item in host["instances"]}):
        lock_path = Path(host["code_root"]) / "envs" / name / "current" / "comfybake.lock.json"
        try:
            lock = json.loads(lock_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            environments[name] = {"error": f"cannot read {lock_path}: {getattr(error, 'strerror', error)}"}
            continue
        environments[name] = {
            "release": os.path.basename(os.path.realpath(lock_path.parent)),
            "comfyui": lock["comfyui"],
            "custom_nodes": [{"name": node["name"], "commit": node["commit"]} for node in lock["custom_nodes"]],
            "torch": lock["torch"],
            "packages": len(lock.get("packages") or []),
        }
    failing, optional = {}, {}
    for record in host["instances"]:
        instance = runtime.Instance(record)
        state = process_state(host, record)
        if state["InvocationID"] or instance.log_file:
            log = runtime.recent_log(instance, state["InvocationID"], lines=2000)
            if failures := runtime.import_failures(log):
                failing[record["name"]] = failures
            if missing := comfyui_log.optional_node_failures(log):
                optional[record["name"]] = missing
    return {
        "model_store": {
            "path": str(store),
            "bytes": total,
            "disk_total": usage.total if usage else None,
            "disk_free": usage.free if usage else None,
        },
        "models": folders,
        "environments": environments,
        "import_failures": failing,
        "optional_node_failures": optional,
    }


def human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def diagnose(args: argparse.Namespace) -> int:
    report = diagnose_report(load_host(args.config_root))
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    store = report["model_store"]
    free = f"{human(store['disk_free'])} free of {human(store['disk_total'])}"
    print(f"Model store {store['path']}: {human(store['bytes'])} in models, {free}")
    for folder, info in report["models"].items():
        print(f"  {folder}/ ({len(info['files'])} files, {human(info['bytes'])})")
        for item in info["files"]:
            print(f"    {item['path']}  {human(item['bytes'])}")
    for name, env in report["environments"].items():
        if "error" in env:
            print(f"Environment {name}: {env['error']}")
            continue
        comfyui = env["comfyui"]
        print(f"Environment {name} (release {env['release']}): ComfyUI {comfyui['version']} {comfyui['commit'][:12]}, "
              f"torch {env['torch'].get('flavor') or '-'}, {env['packages']} packages")  # fmt: skip
        for node in env["custom_nodes"]:
            print(f"  custom_nodes/{node['name']}  {node['commit'][:12]}")
    if report["import_failures"]:
        for instance, failures in report["import_failures"].items():
            for node, error in failures.items():
                print(f"IMPORT FAILED in instance {instance}: {node}: {error.splitlines()[0]}")
    else:
        print("No instance reports an IMPORT FAILED custom node.")
    # ComfyUI's own optional nodes (comfy_extras): their classes are missing, the instance still serves.
    for instance, failures in report["optional_node_failures"].items():
        for node, error in failures.items():
            first = error.splitlines()[0]
            print(f"warning: ComfyUI's optional node {node} did not import in instance {instance}: {first}")
    return 1 if report["import_failures"] else 0


# --------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace) -> int:
    """Create an instance's folders, its copy of the release's writable paths, and its environment's user
    files (the unit's ExecStartPre; the container's entrypoint before supervisord)."""
    host = load_host(args.config_root)
    record = next((item for item in host["instances"] if item["name"] == args.name), None)
    if record is None:
        raise HostError(f"no instance named {args.name} in {args.config_root}/instances.json")
    state = Path(record["state_dir"])
    for folder in ("user", "input", "output"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    settings_path = Path(host["config_root"]) / "envs" / record["environment"] / "environment.json"
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
    for relative, source in (settings.get("user_files") or {}).items():
        target = state / "user" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    # What the node packs write in their own folder: the release links it into the working directory.
    code = Path(record["code_dir"])
    lock_path = code / "comfybake.lock.json"
    lock = json.loads(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else {}
    writable.provide(str(code / writable.SEEDS), record["working_dir"], lock.get("writable", []))
    return 0


# --------------------------------------------------------------------------- clean

DEFAULT_RETENTION_DAYS = 30
CLEANED = ("output", "input")  # ComfyUI's outputs, and its uploads (/upload/image and /upload/mask)


def clean_folder(top: str, cutoff: float, report: dict[str, Any]) -> None:
    """Delete the regular files below `top` last modified before `cutoff` (a Unix time), counting
    them, their bytes and what could not be deleted in `report`.

    Walks with directory descriptors and never follows a link (os.fwalk), so a link placed in
    the tree can neither lead it outside nor have anything outside deleted. Folders stay.
    """

    def unreadable(error: OSError) -> None:
        report["errors"].append(f"{error.filename}: {error.strerror}")

    try:
        os.lstat(top)
    except FileNotFoundError:
        return
    except OSError as error:  # a folder this account cannot reach is an error, not "nothing to delete"
        unreadable(error)
        return
    for path, _dirs, names, folder in os.fwalk(top, follow_symlinks=False, onerror=unreadable):
        for name in names:
            try:
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    os.unlink(name, dir_fd=folder)
                    report["files"] += 1
                    report["bytes"] += info.st_size
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as error:
                report["errors"].append(f"{os.path.join(path, name)}: {error.strerror}")


def clean_instances(records: list[dict[str, Any]], days: float, as_owner: bool) -> list[dict[str, Any]]:
    """Clean each instance's outputs and uploads; with `as_owner` (a container image, where root
    holds no DAC_OVERRIDE), as the instance's own account when this process is root. On a
    systemd host the state folder of a dynamic user is behind /var/lib/private (root's, 0700),
    which that user passes only inside its unit: root cleans it (`clean_folder` follows no link)."""
    cutoff = time.time() - days * 86400
    reports = []
    for record in records:

        def work(record: dict[str, Any] = record) -> dict[str, Any]:
            report: dict[str, Any] = {"name": record["name"], "files": 0, "bytes": 0, "errors": []}
            for folder in CLEANED:
                clean_folder(os.path.join(record["state_dir"], folder), cutoff, report)
            return report

        try:
            reports.append(as_account(record.get("user") if as_owner else None, work))
        except HostError as error:
            reports.append({"name": record["name"], "files": 0, "bytes": 0, "errors": [str(error)]})
    return reports


def as_account(user: str | None, work: Callable[[], Any]) -> Any:
    """`work()`, run as `user` (its uid, primary and supplementary groups) when this process is
    root and the account exists; in this process otherwise. Root in a container image holds no
    DAC_OVERRIDE, so only an instance's own account reaches its state folder, and a file deleted
    as that account is one the instance itself could delete. The result (JSON) comes back
    through a pipe from a forked child."""
    if os.geteuid() != 0 or not user:
        return work()
    try:
        account = pwd.getpwnam(user)
    except KeyError:  # no such account here: root reaches the folder itself, or reports why not
        return work()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's code
        status = 1
        try:
            os.close(read)
            os.setgroups(os.getgrouplist(user, account.pw_gid))
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            with os.fdopen(write, "w", encoding="utf-8") as answer:
                json.dump(work(), answer)
            status = 0
        except Exception as error:  # noqa: BLE001 - reported by the parent, which reads no answer
            logs.emit(f"comfybake instances: as {user}: {error}", "error")
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as answer:
        data = answer.read()
    _pid, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise HostError(f"could not work as the account {user} (exit status {status}; its error is above)")
    return json.loads(data)


def clean(args: argparse.Namespace) -> int:
    host = load_host(args.config_root)
    records = select(host, args)
    days = args.older_than if args.older_than is not None else float(host.get("retention_days", DEFAULT_RETENTION_DAYS))
    if days <= 0:
        logs.say("comfybake instances clean: retention is off (retention_days 0); nothing deleted")
        return 0
    report = clean_instances(records, days, supervised(host))
    if args.json:
        json.dump({"older_than_days": days, "instances": report}, sys.stdout, indent=2)
        print()
    else:
        for item in report:  # the journal's lines in JSON mode, as the keeper's are
            said = f"{item['name']}: deleted {item['files']} files ({human(item['bytes'])}) older than {days:g} days"
            logs.say(said, instance=item["name"])
    for item in report:
        for error in item["errors"]:
            logs.emit(f"comfybake instances clean: cannot delete {error}", "error", instance=item["name"])
    return 1 if any(item["errors"] for item in report) else 0


# --------------------------------------------------------------------------- keeper (containers)


def keeper(args: argparse.Namespace) -> int:
    """supervisord has no timers: this program, which it runs beside the instances, retries the
    programs that went FATAL after `retry_interval` seconds and cleans old files once a day."""
    host = load_host(args.config_root)
    records = host["instances"]
    interval = int(host.get("retry_interval", DEFAULT_RETRY_INTERVAL))
    days = float(host.get("retention_days", DEFAULT_RETENTION_DAYS))
    state_path = Path(host.get("keeper_state") or "/run/comfybake-keeper.json")
    next_clean = 0.0
    due: dict[str, float] = {}  # program to when it is retried
    while True:
        now = time.time()
        if days > 0 and records and now >= next_clean:
            for item in clean_instances(records, days, supervised(host)):
                if item["files"] or item["errors"]:
                    logs.say(
                        f"{item['name']}: deleted {item['files']} files older than {days:g} days", instance=item["name"]
                    )
                for error in item["errors"]:
                    logs.say(f"cannot delete {error}", "error", instance=item["name"])
            next_clean = now + args.clean_every
        if interval > 0:
            ripe = []
            # One supervisorctl for all programs: "comfyui:comfyui-a   FATAL   Exited too quickly ..."
            listed = [line.split() for line in supervisorctl(host, "status").stdout.splitlines()]
            states = {words[0]: words[1] for words in listed if len(words) > 1}
            for record in records:
                name = program(record)
                if states.get(name) != "FATAL":
                    due.pop(name, None)
                elif now >= due.setdefault(name, now + interval):
                    ripe.append(record)
                    due.pop(name)
            try:
                state_path.write_text(json.dumps(due), encoding="utf-8")
            except OSError as error:  # status then says "retry pending"; the retries go on
                logs.say(f"cannot write {state_path}: {error.strerror}", "error")
            for record in ripe:  # supervisorctl start waits until the program runs or fails again
                retry_reported(host, record)
        if args.once:
            return 0
        soonest = min(due.values(), default=now + args.poll)  # a retry falls due before the next look
        time.sleep(max(0.5, min(args.poll, soonest - time.time())))


# --------------------------------------------------------------------------- parser


def guarded(
    func: Callable[[argparse.Namespace], int], command: str = "comfybake instances"
) -> Callable[[argparse.Namespace], int]:
    """Exit 2 with one line naming the problem when the host's files or the selection are wrong."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except HostError as error:
            logs.emit(f"{command}: {error}", "error")
            return 2

    return run


def config_root_option(parser: argparse.ArgumentParser) -> None:
    """`--config-root`, which every command on the host takes (`instances`, `environments`)."""
    parser.add_argument(
        "--config-root",
        default=os.environ.get("COMFYBAKE_CONFIG_ROOT", DEFAULT_CONFIG_ROOT),
        help=f"comfybake's configuration folder on this host (default {DEFAULT_CONFIG_ROOT})",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    config_root_option(parser)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def selection(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("names", nargs="*", metavar="NAME", help="instances by name (default: all)")
        sub.add_argument("--environment", help="only the instances of this environment")
        sub.add_argument("--ports", help="only the instances on these ports: 8188 or 8188-8190")

    def action(name: str, help_text: str, exit_codes: str) -> argparse.ArgumentParser:
        epilog = f"exit status:\n{exit_codes}  2  the host's files or the selection are wrong; nothing was done"
        formatter = argparse.RawDescriptionHelpFormatter
        return actions.add_parser(name, help=help_text, epilog=epilog, formatter_class=formatter)

    status_parser = action(
        "status",
        "a table of instances: unit state, readiness, queue",
        "  0  every enabled instance is ready\n  1  some enabled instance is not\n",
    )
    selection(status_parser)
    status_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status_parser.set_defaults(func=guarded(status))
    controls = {
        "start": "start instances, then wait until they are ready",
        "stop": "stop instances (with --drain, once their queues are empty)",
        "restart": "restart instances (with --drain, once their queues are empty), then wait until they are ready",
    }
    for name, help_text in controls.items():
        waits = name != "stop"
        codes = (
            "  0  every instance is ready\n  1  {0} failed, or an instance is not ready\n"
            if waits
            else "  0  done\n  1  {0} failed\n"
        )
        sub = action(name, help_text, codes.format(name))
        selection(sub)
        if name != "start":
            sub.add_argument(
                "--drain", type=float, default=0, help="first wait up to this many seconds for empty queues"
            )
        if waits:
            sub.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness (default 300)")
            sub.add_argument("--no-wait", action="store_true", help="do not wait for readiness")
        else:
            sub.set_defaults(no_wait=True)
        sub.add_argument("--json", action="store_true", help="print what was done (and each readiness) as JSON")
        sub.set_defaults(func=guarded(control))
    diagnose_parser = action(
        "diagnose",
        "models with sizes, nodes with commits, disk, failing imports",
        "  0  no custom node failed to import\n  1  some custom node failed to import\n",
    )
    diagnose_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    diagnose_parser.set_defaults(func=guarded(diagnose))
    clean_parser = action(
        "clean",
        "delete outputs and uploads older than the retention (run daily by comfyui-clean@NAME.timer)",
        "  0  done, or the retention is off\n  1  some old file could not be deleted (each is named)\n",
    )
    selection(clean_parser)
    clean_parser.add_argument(
        "--older-than", type=float, metavar="DAYS", help="days to keep (default: retention_days of instances.json)"
    )
    clean_parser.add_argument("--json", action="store_true", help="print what was deleted as JSON")
    clean_parser.set_defaults(func=guarded(clean))
    retry_parser = action(
        "retry",
        "start instances again whose crash loop spent their fast restarts (run by comfyui-retry@NAME.timer)",
        "  0  done (an instance not in a crash loop is left alone)\n",
    )
    selection(retry_parser)
    retry_parser.set_defaults(func=guarded(retry))
    keeper_parser = action(
        "keeper",
        "container images: retry crash-looping instances and clean old files, forever (supervisord runs it)",
        "  0  --once: one round done\n",
    )
    keeper_parser.add_argument("--poll", type=float, default=10, help="seconds between two looks (default 10)")
    keeper_parser.add_argument(
        "--clean-every", type=float, default=86400, help="seconds between two cleans (default 86400)"
    )
    keeper_parser.add_argument("--once", action="store_true", help="one round, then exit")
    keeper_parser.set_defaults(func=guarded(keeper))
    prepare_parser = actions.add_parser("prepare", help="create an instance's folders (run by its unit)")
    prepare_parser.add_argument("name")
    prepare_parser.set_defaults(func=guarded(prepare))


SUBCOMMANDS["instances"] = (
    "status, start, stop, restart, diagnose and clean this host's ComfyUI instances",
    configure,
)
