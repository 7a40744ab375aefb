"""Filters `instance_layout` (validate `comfyui_instances` and expand it for the units),
`instance_route` (an instance's entry in the routing file) and `instance_quote` (a value of a
record written into one kind of file); their documentation is in the `.yml` files beside this one.

The layout is the one place that declares what an instance process gets: its environment
variables, its command line and its resource limits. The systemd files and supervisord's
configuration only render those fields, each with its own quoting (`instance_quote`).

Pure: it reads only its arguments, so it is unit-tested without Ansible running, and every
problem is found before any file is written. All problems are reported at once, each naming
the instance (both instances, for a collision) and what to change.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeGuard

from ansible.errors import AnsibleFilterError

KEYS = {
    "name",
    "environment",
    "port",
    "gpus",
    "share_gpus",
    "extra_args",
    "enabled",
    "listen",
    "description",
    "required_models",
    "log_file",
    "memory_high",
    "memory_max",
}
# Every pattern below is used with `fullmatch`: `match` with `$` accepts a trailing line break.
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,22}")  # becomes the user comfyui-<name> (at most 31 characters)
GPU = re.compile(r"\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-fA-F/-]+")
MEMORY = re.compile(r"\d+[KMGT]?|\d+%|infinity|auto")
# Every value that reaches a rendered file (an environment value, a word of the command line,
# a limit, a path) holds only these characters: no space, quote, backslash, `$`, `;` or line
# break, so no file can read it as more than one value. `%` is escaped where a file expands it.
SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]*")
SAFE_ARG = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
SAFE_PATH = re.compile(r"/[A-Za-z0-9_@+=:,./-]*")
ENVIRONMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # as the environment engine names them
# What ends a line somewhere: C0 and C1 controls (NEL too), DEL, and Unicode's line and
# paragraph separators. No string that reaches a file may hold one, not even a description.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The settings that become paths, with the variable that sets each.
PATH_SETTINGS = {
    "state_root": "comfyui_state_root",
    "cache_root": "comfyui_cache_root",
    "config_root": "comfyui_config_root",
    "code_root": "comfyui_code_root",
    "log_dir": "comfyui_instances_log_dir",
    "model_store": "comfyui_model_store",
}
OPTIONAL_PATHS = {"log_dir", "model_store"}  # empty: no log folder; absent: a caller that renders no unit
MEMORY_SETTINGS = {"memory_high": "comfyui_instances_memory_high", "memory_max": "comfyui_instances_memory_max"}
# `auto` memory limits: each instance gets an even share of what the reserve leaves, MemoryHigh
# (where the kernel starts reclaiming and throttling) at 80% of it and MemoryMax (the OOM kill)
# at 90%, in whole percents of the host's memory, which systemd resolves on the machine that
# runs the unit (a VM image baked on a small builder still fits the VM it boots as).
MEMORY_RESERVE = 10  # percent of the host's memory kept for the system when the role sets none
MEMORY_SHARES = {"MemoryHigh": 80, "MemoryMax": 90}
MAX_RESERVE = 90
# Resource limits of every instance, by their systemd names (supervisord has none: a
# container's limits are those of `docker run`). MemoryHigh and MemoryMax come from the layout.
TASKS_MAX = "4096"
OPEN_FILES = "65536"
# How `instance_quote` writes a safe value into each kind of file.
QUOTING: dict[str, Callable[[str], str]] = {
    # where nothing is expanded: a value of systemd's EnvironmentFile= (the rest of the line),
    # or a unit setting that takes no specifiers (MemoryMax=80% and the other limits).
    "plain": lambda text: text,
    # a unit setting that expands %-specifiers: one word of ExecStart=, a path.
    "systemd": lambda text: text.replace("%", "%%"),
    # supervisord.conf: a value or one word of command=; supervisord expands %(name)s.
    "supervisor": lambda text: text.replace("%", "%%"),
    # a value of supervisord's environment=: quoted, since its pairs are split on commas.
    "supervisor_env": lambda text: '"' + text.replace("%", "%%") + '"',
}
# ComfyUI's long options, as its argument parser (argparse) knows them, read from
# comfyanonymous/ComfyUI comfy/cli_args.py at commit 005d79c828d88f60e356fe4b422a21ae8a595442
# (the 0.3 series), with the ComfyUI-Manager options added in v0.4.0 (--enable-manager,
# --disable-manager-ui, --enable-manager-legacy-ui) and argparse's own --help. argparse takes
# any unambiguous prefix of one of them (allow_abbrev), `--flag=value` too, so extra_args are
# resolved against this list before the flags below are checked (`resolve_option`). A newer
# ComfyUI may add options: a word that begins a flag comfybake sets is refused even where the
# newer list makes it ambiguous (argparse refuses those too), and a word that begins no option
# known here is passed through, as ComfyUI itself decides what it is.
COMFYUI_OPTIONS = (
    "--help",
    "--listen", "--port", "--tls-keyfile", "--tls-certfile", "--enable-cors-header", "--max-upload-size",
    "--base-directory", "--extra-model-paths-config", "--output-directory", "--temp-directory",
    "--input-directory", "--models-directory", "--auto-launch", "--disable-auto-launch", "--cuda-device",
    "--cuda-malloc", "--disable-cuda-malloc",
    "--force-fp32", "--force-fp16",
    "--fp32-unet", "--fp64-unet", "--bf16-unet", "--fp16-unet", "--fp8_e4m3fn-unet", "--fp8_e5m2-unet",
    "--fp8_e8m0fnu-unet",
    "--fp16-vae", "--fp32-vae", "--bf16-vae", "--cpu-vae",
    "--fp8_e4m3fn-text-enc", "--fp8_e5m2-text-enc", "--fp16-text-enc", "--fp32-text-enc", "--bf16-text-enc",
    "--force-channels-last", "--directml", "--oneapi-device-selector", "--disable-ipex-optimize",
    "--supports-fp8-compute", "--preview-method", "--preview-size",
    "--cache-classic", "--cache-lru", "--cache-none",
    "--use-split-cross-attention", "--use-quad-cross-attention", "--use-pytorch-cross-attention",
    "--use-sage-attention", "--use-flash-attention", "--disable-xformers",
    "--force-upcast-attention", "--dont-upcast-attention",
    "--enable-manager", "--disable-manager-ui", "--enable-manager-legacy-ui",
    "--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram", "--cpu",
    "--reserve-vram", "--async-offload", "--default-hashing-function", "--disable-smart-memory",
    "--deterministic", "--fast", "--mmap-torch-files", "--disable-mmap", "--dont-print-server",
    "--quick-test-for-ci", "--windows-standalone-build", "--disable-metadata", "--disable-all-custom-nodes",
    "--whitelist-custom-nodes", "--disable-api-nodes", "--multi-user", "--verbose", "--log-stdout",
    "--front-end-version", "--front-end-root", "--user-directory", "--enable-compress-response-body",
    "--comfy-api-base", "--database-url",
)  # fmt: skip
# Flags comfybake sets itself, with the instance key that controls each.
MANAGED_FLAGS = {
    "--listen": "listen",
    "--port": "port",
    "--cpu": "gpus: [] (CPU only)",
    "--cuda-device": "gpus",
    "--base-directory": "the layout (comfyui_state_root)",
    "--user-directory": "the layout (comfyui_state_root)",
    "--input-directory": "the layout (comfyui_state_root)",
    "--output-directory": "the layout (comfyui_state_root)",
    "--temp-directory": "the layout (comfyui_cache_root)",
    "--database-url": "the layout (comfyui_state_root)",
    "--extra-model-paths-config": "the environment's extra_model_folders",
    "--models-directory": "the environment's extra_model_folders (the shared model store)",
    "--auto-launch": "nothing: a service never opens a browser",
    "--windows-standalone-build": "nothing: it turns on --auto-launch",
    "--quick-test-for-ci": "nothing: the import gate runs it while building the environment",
}
REFUSED_FLAGS = {
    "--enable-manager": "ComfyUI-Manager then installs packages into the live venv at start-up; "
    "install custom nodes through the environment instead",
    "--enable-manager-legacy-ui": "it implies --enable-manager, and ComfyUI-Manager then installs packages "
    "into the live venv at start-up; install custom nodes through the environment instead",
}
# Refused unless the operator opts in (comfyui_instances_allow_cors): it turns off the check
# that keeps other web sites, open in a browser on a client, from driving the instance.
CORS_FLAG = "--enable-cors-header"
MIN_PORT = 1024
MAX_PORT = 65535
WILDCARDS = ("", "0.0.0.0", "::", "0.0.0.0,::", "[::]")  # noqa: S104 - the addresses refused


def _reach(listen: str) -> str:
    """The host part of a URL that reaches an instance listening on `listen` (a wildcard on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen, listen)  # noqa: S104 - a container's wildcard
    return f"[{host}]" if ":" in host else host


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_listen(
    label: str, address: Any, allowed_clients: list[str], container: bool, listen_all: bool, problems: list[str]
) -> str:
    text = "" if address is None else str(address)
    if CONTROL.search(text):
        problems.append(
            f"{label}: listen {text!r} has a line break or another control character; set one address such as 127.0.0.1"
        )
        return text
    text = text.strip()
    if container and text in ("0.0.0.0", "::"):  # noqa: S104 - the container's namespace is the boundary
        if listen_all:
            return text  # in a container only what `docker run -p` publishes is reachable
        problems.append(
            f"{label}: listen {text!r} binds every address of the container, and ComfyUI has no authentication: "
            "whoever reaches a port `docker run -p` publishes drives the instance; opt in with "
            "comfyui_instances_container_listen_all: true (docs/security.md says who can reach it on each platform), "
            "or keep 127.0.0.1"
        )
        return text
    if text in WILDCARDS:
        problems.append(
            f"{label}: listen {text!r} binds every address (a bare --listen binds 0.0.0.0,::); "
            "set 127.0.0.1 and publish the instance through a reverse proxy"
        )
        return text
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        problems.append(f"{label}: listen {text!r} is not one IP address; set an address such as 127.0.0.1")
        return text
    if not SAFE_ARG.fullmatch(str(parsed)):  # an IPv6 scope (fe80::1%eth0) may hold anything but '%'
        problems.append(f"{label}: listen {text!r} has a space, quote or shell character in its scope")
        return text
    if not parsed.is_loopback and not allowed_clients:
        problems.append(
            f"{label}: listen {text} is reachable from other hosts, and ComfyUI has no authentication; "
            "listen on 127.0.0.1 behind a reverse proxy, or list the clients allowed to connect "
            "in comfyui_instances_allowed_clients"
        )
    return str(parsed)


def resolve_option(word: str) -> list[str]:
    """The options ComfyUI's parser may read `word` as, the way argparse resolves them.

    An option given in full (`--port`, `--port=9000`) is itself. Any other word starting with
    `--` stands for every option it begins, the part before `=` included (`--por` is `--port`,
    `--cu` is `--cuda-device` or `--cuda-malloc`, which argparse refuses as ambiguous). A
    single-dash word (`-listen`) abbreviates nothing: argparse matches `-x` prefixes only
    against single-dash options, and ComfyUI has only `-h`. [] for a value, `--` alone, or a
    word that begins no option known here.
    """
    flag = word.split("=", 1)[0]
    if not flag.startswith("--") or flag == "--":
        return []
    known = {*COMFYUI_OPTIONS, *MANAGED_FLAGS, *REFUSED_FLAGS, CORS_FLAG}
    if flag in known:
        return [flag]
    return sorted(option for option in known if option.startswith(flag))


def _check_extra_args(label: str, args: Any, allow_cors: bool, problems: list[str]) -> list[str]:
    if not isinstance(args, list) or not all(isinstance(arg, (str, int, float)) for arg in args):
        problems.append(f"{label}: extra_args must be a list of strings, such as ['--reserve-vram', '2']")
        return []
    words = [str(arg) for arg in args]
    for word in words:
        if CONTROL.search(word):
            problems.append(f"{label}: extra_args value {word!r} holds a line break or another control character")
            continue
        flag = word.split("=", 1)[0]
        for option in resolve_option(word):
            named = option if option == flag else f"{option} (as {flag}: ComfyUI takes a prefix of an option for it)"
            if option in MANAGED_FLAGS:
                problems.append(f"{label}: extra_args sets {named}, which comfybake sets from {MANAGED_FLAGS[option]}")
            elif option in REFUSED_FLAGS:
                problems.append(f"{label}: extra_args sets {named}, which comfybake refuses: {REFUSED_FLAGS[option]}")
            elif option == CORS_FLAG and not allow_cors:
                problems.append(
                    f"{label}: extra_args sets {named}, which turns off ComfyUI's same-origin check, so any web "
                    "page open in a client's browser may drive the instance; set comfyui_instances_allow_cors: "
                    "true to allow it"
                )
        if not SAFE_ARG.fullmatch(word):
            problems.append(
                f"{label}: extra_args value {word!r} has a space, quote or shell character; "
                "pass each word as its own list item, using only letters, digits and _@%+=:,./-"
            )
    return words


def _check_gpus(label: str, gpus: Any, problems: list[str]) -> list[str]:
    if gpus is None:
        problems.append(f"{label}: set gpus, a list of GPU indexes or UUIDs ([0], [0, 1]), or [] for CPU only")
        return []
    if not isinstance(gpus, list):
        gpus = [gpus]
    result = []
    for gpu in gpus:
        text = str(gpu)
        if isinstance(gpu, bool) or not GPU.fullmatch(text):
            problems.append(f"{label}: GPU {gpu!r} is not an index (0, 1, ...) or a GPU-/MIG- UUID")
        elif text in result:
            problems.append(f"{label}: GPU {text} is listed twice")
        else:
            result.append(text)
    return result


def _check_models(label: str, models: Any, problems: list[str]) -> dict[str, list[str]]:
    if not isinstance(models, dict) or not all(
        isinstance(folder, str) and isinstance(names, list) and all(isinstance(n, str) for n in names)
        for folder, names in models.items()
    ):
        problems.append(
            f"{label}: required_models must map a model folder to file names, "
            "such as {{checkpoints: [sd_xl_base_1.0.safetensors]}}"
        )
        return {}
    return {folder: list(names) for folder, names in models.items()}


def _expand(
    raw: dict[str, Any],
    index: int,
    environments: dict[str, Any],
    settings: dict[str, Any],
    auto: dict[str, str],
    problems: list[str],
) -> dict[str, Any]:
    name = raw.get("name")
    label = f"instance {name!r}" if name is not None else f"comfyui_instances[{index}]"
    for key in sorted(set(raw) - KEYS):
        problems.append(f"{label}: unknown key {key!r}; the keys are {', '.join(sorted(KEYS))}")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        problems.append(
            f"{label}: the name must be 1 to 23 lower-case letters, digits or '-', starting with a letter "
            "or digit (it names the unit comfyui@<name> and its user comfyui-<name>)"
        )
        name = str(name)

    environment = raw.get("environment")
    if not isinstance(environment, str) or environment not in environments:
        known = ", ".join(sorted(environments)) or "none"
        problems.append(
            f"{label}: environment {environment!r} is not defined in comfyui_environments (defined: {known})"
        )
    elif not ENVIRONMENT.fullmatch(environment):
        problems.append(
            f"{label}: environment {environment!r} is not a name of letters, digits, '.', '_' or '-'; "
            "rename it in comfyui_environments"
        )
    environment = str(environment)
    port = raw.get("port")
    if not _is_int(port) or not MIN_PORT <= port <= MAX_PORT:
        problems.append(
            f"{label}: port {port!r} must be a number from {MIN_PORT} to {MAX_PORT} "
            "(the unit has no privilege to bind lower ports)"
        )
        port = None

    gpus = _check_gpus(label, raw.get("gpus"), problems)
    listen = _check_listen(
        label,
        raw.get("listen", settings.get("listen", "127.0.0.1")),
        settings.get("allowed_clients") or [],
        settings.get("manager") == "supervisor",
        str(settings.get("container_listen_all", False)).lower() == "true",
        problems,
    )
    common, own = settings.get("extra_args") or [], raw.get("extra_args") or []
    extra_args = _check_extra_args(
        label,
        common + own if isinstance(common, list) and isinstance(own, list) else None,
        str(settings.get("allow_cors", False)).lower() == "true",
        problems,
    )
    limits: dict[str, str] = {}
    for key, directive in (("memory_high", "MemoryHigh"), ("memory_max", "MemoryMax")):
        if raw.get(key) not in (None, "") and not MEMORY.fullmatch(str(raw[key])):
            problems.append(f"{label}: {key} {raw[key]!r} is not a size such as 48G, 80%, auto or infinity")
        size = str(raw.get(key) or settings.get(key) or "auto")
        limits[directive] = auto.get(directive, "infinity") if size == "auto" else size
    limits |= {"TasksMax": TASKS_MAX, "LimitNOFILE": OPEN_FILES}
    for key in ("enabled", "share_gpus", "log_file"):
        if key in raw and not isinstance(raw[key], bool):
            problems.append(f"{label}: {key} must be true or false, not {raw[key]!r}")
    description = raw.get("description") or ""
    if not isinstance(description, str) or CONTROL.search(description):
        problems.append(
            f"{label}: description {description!r} must be one line of text, without line breaks or other "
            "control characters (it is written into a comment of the environment file)"
        )
        description = str(description)

    state = f"{settings['state_root']}/instances/{name}"
    cache = f"{settings['cache_root']}/instances/{name}"
    code = f"{settings['code_root']}/instances/{name}"
    env_config = f"{settings['config_root']}/envs/{environment}"
    args = [
        "--listen", listen,
        "--port", str(port),
        "--disable-auto-launch",
        "--extra-model-paths-config", f"{env_config}/extra_model_paths.yaml",
        "--user-directory", f"{state}/user",
        "--input-directory", f"{state}/input",
        "--output-directory", f"{state}/output",
        "--temp-directory", cache,
        "--database-url", f"sqlite:///{state}/comfyui.db",
    ]  # fmt: skip
    if not gpus:
        args.append("--cpu")
    args += extra_args

    log_dir = settings.get("log_dir") or ""
    wants_log = raw.get("log_file", bool(log_dir)) is True
    if wants_log and not log_dir:
        problems.append(f"{label}: log_file is true but comfyui_instances_log_dir is empty; set a folder for the logs")
    chosen = environments.get(environment)
    environment_settings: dict[str, Any] = chosen if isinstance(chosen, dict) else {}
    # What the process gets, whichever service manager starts it.
    process_environment = {
        "COMFYUI_INSTANCE": name,
        "COMFYUI_ENVIRONMENT": environment,
        "COMFYUI_PORT": str(port),
        "CUDA_VISIBLE_DEVICES": ",".join(gpus),  # empty: no GPU at all (with --cpu)
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # the indexes of nvidia-smi, not fastest-first
        "HOME": state,
        "XDG_CACHE_HOME": cache,
        "TRITON_CACHE_DIR": f"{cache}/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
        "HF_HUB_OFFLINE": "1",  # libraries do not try the network
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",  # output reaches the journal or the log at once
        "PYTHONDONTWRITEBYTECODE": "1",  # the code is read-only
    }
    argv = [f"{code}/venv/bin/python", "-s", f"{code}/ComfyUI/main.py", *args]
    return {
        "name": name,
        "environment": environment,
        "port": port,
        "listen": listen,
        "url": f"http://{_reach(listen)}:{port}",
        "gpus": gpus,
        "share_gpus": raw.get("share_gpus", False) is True,
        "enabled": raw.get("enabled", True) is not False,
        "description": description,
        "extra_args": extra_args,
        "args": args,  # what readiness compares with system.argv[1:] in /system_stats
        "argv": argv,
        # Its own folder: the writable paths of the release link into it (module_utils/environment/writable.py).
        "working_dir": state,
        "env": process_environment,
        "limits": limits,
        "required_node_classes": list(environment_settings.get("required_node_classes") or []),
        "required_models": _check_models(label, raw.get("required_models", {}), problems),
        "log_file": f"{log_dir}/comfyui_instance_{name}.log" if wants_log and log_dir else "",
        "unit": f"comfyui@{name}.service",
        "user": f"comfyui-{name}",
        "state_dir": state,
        "cache_dir": cache,
        "code_dir": code,
        "env_file": f"{settings['config_root']}/instances/{name}.env",
    }


def memory_limits(count: int, reserve: Any = None) -> dict[str, str]:
    """The `auto` MemoryHigh and MemoryMax of each of `count` instances on one host, in percent of
    its memory: `reserve` percent (default MEMORY_RESERVE) stays with the system, the instances
    share the rest evenly, and each gets MEMORY_SHARES of its share, rounded down to a whole
    percent but never below 1. {} when there is no instance (nothing to limit)."""
    if count < 1:
        return {}
    left = 100 - (MEMORY_RESERVE if reserve in (None, "") else int(reserve))
    return {directive: f"{max(1, left * share // (100 * count))}%" for directive, share in MEMORY_SHARES.items()}


def _rendered(record: dict[str, Any]) -> list[str]:
    """Every value of a record that a template writes into a file."""
    return [
        *record["env"].values(),
        *record["argv"],
        *record["limits"].values(),
        record["working_dir"],
        record["log_file"],
        record["env_file"],
        record["unit"],
        record["user"],
    ]


def _check_settings(settings: dict[str, Any]) -> list[str]:
    """Problems with the role-wide settings, named by their variables."""
    problems = []
    for key, variable in PATH_SETTINGS.items():
        value = settings.get(key)
        if key in OPTIONAL_PATHS and value in (None, ""):
            continue
        if not isinstance(value, str) or not SAFE_PATH.fullmatch(value):
            problems.append(
                f"{variable} {value!r} must be an absolute path of letters, digits and _@+=:,./- "
                "(it is written into the units and supervisord's configuration)"
            )
    for key, variable in MEMORY_SETTINGS.items():
        value = settings.get(key)
        if value not in (None, "") and not MEMORY.fullmatch(str(value)):
            problems.append(f"{variable} {value!r} is not a size such as 48G, 80%, auto or infinity")
    reserve = settings.get("memory_reserve")
    if reserve not in (None, "") and not (str(reserve).isdigit() and int(reserve) <= MAX_RESERVE):
        problems.append(
            f"comfyui_instances_memory_reserve {reserve!r} must be a whole percent of the host's memory "
            f"from 0 to {MAX_RESERVE}, such as {MEMORY_RESERVE}"
        )
    clients = settings.get("allowed_clients") or []
    if not isinstance(clients, list):
        problems.append(f"comfyui_instances_allowed_clients {clients!r} must be a list of addresses or CIDR ranges")
        clients = []
    for client in clients:
        problems += _check_client(client)
    common = settings.get("extra_args") or []
    if not isinstance(common, list):
        problems.append(
            f"comfyui_instances_extra_args {common!r} must be a list of strings, such as ['--reserve-vram', '2']"
        )
    return problems


def _check_client(client: Any) -> list[str]:
    """A client of comfyui_instances_allowed_clients: one address or network, as `IPAddressAllow=` takes it."""
    text = str(client)
    what = f"comfyui_instances_allowed_clients: {client!r}"
    if not isinstance(client, str) or CONTROL.search(text) or not SAFE_ARG.fullmatch(text):
        return [f"{what} must be one address or CIDR range, without spaces, line breaks or other control characters"]
    if "%" in text:
        return [f"{what} has an IPv6 zone (%...), which IPAddressAllow= does not take; give the address alone"]
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return [f"{what} is not an address or a CIDR range such as 10.0.0.0/24"]
    return []


def _collisions(layout: list[dict[str, Any]], settings: dict[str, Any], problems: list[str]) -> None:
    names: dict[str, int] = {}
    ports: dict[int, str] = {}
    gpus: dict[str, dict[str, Any]] = {}
    reserved = {int(port) for port in settings.get("reserved_ports") or []}
    busy = {int(port): owner for port, owner in (settings.get("busy_ports") or {}).items()}
    for instance in layout:
        name = instance["name"]
        names[name] = names.get(name, 0) + 1
        if names[name] == 2:
            problems.append(f"instance {name!r} is defined more than once; instance names must be unique")
        if names[name] > 1:
            continue  # its port and GPUs would only repeat the same instance name
        port = instance["port"]
        if port is None:
            continue
        if port in ports:
            problems.append(f"instances {ports[port]!r} and {name!r} both use port {port}; give each its own port")
        else:
            ports[port] = name
        if port in reserved:
            problems.append(
                f"instance {name!r}: port {port} is in comfyui_instances_reserved_ports; choose another port"
            )
        if port in busy:
            problems.append(
                f"instance {name!r}: port {port} is already used on this host by {busy[port]}; "
                "choose another port or stop that service"
            )
        for gpu in instance["gpus"]:
            other = gpus.get(gpu)
            if other is None:
                gpus[gpu] = instance
            elif not (other["share_gpus"] and instance["share_gpus"]):
                problems.append(
                    f"instances {other['name']!r} and {name!r} both use GPU {gpu}; set share_gpus: true on both "
                    "to let them share it (each loads its own weights: cap them with --reserve-vram)"
                )


def instance_layout(instances: Any, environments: Any, settings: dict[str, Any]) -> list[dict[str, Any]]:
    if instances in (None, ""):
        instances = []
    if not isinstance(instances, list) or not all(isinstance(item, dict) for item in instances):
        raise AnsibleFilterError(
            "comfyui_instances must be a list of instances, each a mapping with name, environment, port and gpus"
        )
    if not isinstance(environments, dict):
        raise AnsibleFilterError("comfyui_environments must be a mapping of environment names to settings")
    problems = _check_settings(settings)
    if problems:  # every instance would repeat them
        raise AnsibleFilterError("the instance settings are invalid:\n- " + "\n- ".join(problems))
    auto = memory_limits(len(instances), settings.get("memory_reserve"))
    layout = [_expand(raw, index, environments, settings, auto, problems) for index, raw in enumerate(instances)]
    _collisions(layout, settings, problems)
    if not problems:  # each part is checked above; this keeps a new field from escaping the checks
        for record in layout:
            problems += [
                f"instance {record['name']!r}: {value!r} would be written into its files, but holds a "
                "character other than letters, digits and _@%+=:,./-"
                for value in _rendered(record)
                if not SAFE.fullmatch(value)
            ]
    if problems:
        raise AnsibleFilterError("comfyui_instances is invalid:\n- " + "\n- ".join(problems))
    return layout


def instance_route(
    record: dict[str, Any], node_classes: dict[str, list[str]], public_urls: dict[str, str] | None = None
) -> dict[str, Any]:
    """An instance's entry in the routing file: where it answers (on the host, and through the
    gateway) and which node classes it serves."""
    return {
        "name": record["name"],
        "environment": record["environment"],
        "url": record["url"],
        "public_url": (public_urls or {}).get(record["name"], ""),
        "port": record["port"],
        "gpus": record["gpus"],
        "enabled": record["enabled"],
        "description": record["description"],
        "required_node_classes": record["required_node_classes"],
        "node_classes": sorted(node_classes.get(record["name"]) or record["required_node_classes"]),
    }


def instance_quote(value: Any, target: str) -> str:
    """`value` (from a record of the layout) written into one kind of file, `target` (see QUOTING).

    A value outside the safe characters is refused, not quoted: the layout never holds one, so
    meeting one here means a template renders something the layout did not check.
    """
    if target not in QUOTING:
        raise AnsibleFilterError(f"instance_quote - target {target!r} is not one of {', '.join(QUOTING)}")
    text = str(value)
    if not SAFE.fullmatch(text):
        raise AnsibleFilterError(
            f"instance_quote - {text!r} cannot be written safely into a {target} file: only letters, "
            "digits and _@%+=:,./- can (the instance_layout filter checks every value of a record)"
        )
    if not text and target in ("systemd", "supervisor"):
        raise AnsibleFilterError(f"instance_quote - an empty word would vanish from a {target} file")
    return QUOTING[target](text)


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"instance_layout": instance_layout, "instance_route": instance_route, "instance_quote": instance_quote}
