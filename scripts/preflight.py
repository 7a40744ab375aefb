#!/usr/bin/env python3
"""Check, in seconds and before any long step, every external source a bake or a converge needs.

    scripts/preflight.py --target cpu                      # what `make up` bakes (packer/targets/cpu.pkrvars.hcl)
    scripts/preflight.py --target cpu --offline DIR        # a folder of mirrors instead of the network
    scripts/preflight.py --inventory inventories/local     # what `make provision` converges

It reads the target's Packer variables (and COMFYBAKE_PACKER_ARGS' -var and -var-file), the
Ansible settings of the inventory it bakes or converges (the roles' defaults, the site's
group_vars, the inventory's group_vars and host_vars, Packer's extra_vars_files), and checks at
once, with short timeouts: the base image (present in Docker, or its registry answers), the apt
archives of the base image (when it lacks packages the base role installs), each ComfyUI and
custom-node git remote after the git mirrors (`git ls-remote`), each package index (or the
wheelhouse), and the model origins of the manifest. What is unreachable is printed in a table with
the setting (a Packer variable or an Ansible variable) or the mirror that replaces it, then what to
do next; the exit status is 1. A setup it cannot check (an unset variable the inventory reads, a
missing file) exits 2. Offline (--offline DIR), the folder replaces the network and each missing
piece is named with the command that makes it; --out writes the Packer arguments and Ansible
variables of an offline bake (scripts/up.sh uses them). Needs Python 3.10+ and PyYAML only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
HTTP_TIMEOUT = float(os.environ.get("COMFYBAKE_PREFLIGHT_TIMEOUT", "5"))
GIT_TIMEOUT = HTTP_TIMEOUT * 2
# Where an offline bake mounts the folder of mirrors inside the bake container.
OFFLINE_MOUNT = "/srv/comfybake-offline"
# Docker Hub's registry, and the apt archives of the public base images that are not local yet.
DOCKER_HUB = "registry-1.docker.io"
KNOWN_APT = {
    "ubuntu": ["http://archive.ubuntu.com/ubuntu/", "http://security.ubuntu.com/ubuntu/"],
    "debian": ["http://deb.debian.org/debian/"],
    "nvidia/cuda": ["https://developer.download.nvidia.com/compute/cuda/repos/"],
}
DOCS = 'docs/bake.md, section "Offline: a folder of mirrors"'


def _redaction() -> Any:
    """The one implementation of redaction (plugins/module_utils/redaction.py, standard library
    only), loaded from the checkout: this script runs on any python3, without the collection."""
    spec = importlib.util.spec_from_file_location("comfybake_redaction", ROOT / "plugins/module_utils/redaction.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {ROOT / 'plugins/module_utils/redaction.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REDACTION = _redaction()


class SetupError(Exception):
    """The setup itself is incomplete (an unset variable, a missing file): nothing to probe yet."""


# -- reading the settings ------------------------------------------------------------------------


def hcl_value(text: str) -> Any:
    """A value of a .pkrvars.hcl line or a -var: JSON-like (strings, numbers, bools, lists, maps)."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text.strip('"')


def read_pkrvars(path: Path) -> dict[str, Any]:
    """`key = value` lines of a Packer vars file (the subset the targets use; a value may span lines)."""
    values: dict[str, Any] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", "//"))):
            continue
        pending = f"{pending} {line}".strip()
        if pending.count("[") + pending.count("{") > pending.count("]") + pending.count("}"):
            continue  # a list or map that goes on
        key, sep, value = pending.partition("=")
        if sep:
            values[key.strip()] = hcl_value(value)
        pending = ""
    return values


def packer_overrides(args: str, cwd: Path) -> dict[str, Any]:
    """The -var and -var-file arguments of COMFYBAKE_PACKER_ARGS, in order (split on blanks, as up.sh does)."""
    values: dict[str, Any] = {}
    words = args.split()
    for index, word in enumerate(words):
        name, _, inline = word.partition("=")
        if name not in ("-var", "--var", "-var-file", "--var-file"):
            continue
        value = inline or (words[index + 1] if index + 1 < len(words) else "")
        if name.endswith("var-file"):
            values.update(read_pkrvars(cwd / value))
        else:
            key, _, setting = value.partition("=")
            values[key.strip()] = hcl_value(setting)
    return values


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def vars_files(folder: Path) -> list[Path]:
    """group_vars/<name>.yml and group_vars/<name>/*.yml, as Ansible reads them."""
    if folder.is_file():
        return [folder]
    if folder.is_dir():
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".yml", ".yaml", ".json"))
    return [*(folder.with_suffix(s) for s in (".yml", ".yaml") if folder.with_suffix(s).is_file())]


def inventory_hosts(inventory: Path) -> list[str]:
    """Hosts of the comfybake group in hosts.yml (an inventory that Packer fills has none)."""

    def walk(group: dict[str, Any]) -> list[str]:
        found = list((group.get("hosts") or {}).keys())
        for child in (group.get("children") or {}).values():
            found += walk(child or {})
        return found

    hosts = load_yaml(inventory / "hosts.yml") or load_yaml(inventory / "hosts.yaml")
    return sorted(set(walk(hosts.get("comfybake") or {})))


@dataclass
class Settings:
    """The Ansible settings of one host, merged as Ansible ranks them (without templating)."""

    values: dict[str, Any]
    files: list[Path] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def ansible_settings(inventory: Path, host: str | None, extra: list[dict[str, Any]], files: list[Path]) -> Settings:
    layers = [
        ROOT / "roles/comfyui/defaults/main.yml",
        ROOT / "roles/comfyui_environments/defaults/main.yml",
        ROOT / "roles/comfyui_models/defaults/main.yml",
        *vars_files(inventory / "group_vars" / "all"),
        *vars_files(ROOT / "group_vars" / "all"),
        *(
            path
            for path in vars_files(inventory / "group_vars")
            if path.relative_to(inventory / "group_vars").parts[0].split(".")[0] != "all"
        ),
        *(vars_files(inventory / "host_vars" / host) if host else []),
        *files,
    ]
    values: dict[str, Any] = {}
    for path in layers:
        values.update(load_yaml(path) if path.suffix != ".json" else json.loads(path.read_text()))
    for layer in extra:
        values.update(layer)
    return Settings(values=values, files=[p for p in layers if p.is_file()])


def unset_lookups(files: list[Path]) -> dict[str, Path]:
    """Environment variables the settings read without a default that are not set."""
    pattern = re.compile(r"lookup\(\s*'(?:ansible\.builtin\.)?env'\s*,\s*'(\w+)'\s*\)")
    missing: dict[str, Path] = {}
    for path in files:
        for name in pattern.findall(path.read_text()):
            if not os.environ.get(name):
                missing.setdefault(name, path)
    return missing


def templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def header_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            lines.append("      " + line.lstrip("# ").rstrip())
        elif line.strip() and line.strip() != "---":
            break
    return "\n".join(lines)


# -- what a plan needs ---------------------------------------------------------------------------


@dataclass
class Check:
    """One external source: what it is, the setting that replaces it, and how to probe it."""

    kind: str
    source: str
    setting: str
    probe: Callable[[], str | None]  # None when reachable, else why not
    problem: str | None = None


@dataclass
class Plan:
    title: str
    settings: list[Settings]
    packer: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)


def display(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def bake_plan(target: str, packer_args: str, offline: Path | None) -> Plan:
    target_file = ROOT / "packer" / "targets" / f"{target}.pkrvars.hcl"
    if not target_file.is_file():
        names = sorted(p.name.removesuffix(".pkrvars.hcl") for p in (ROOT / "packer" / "targets").glob("*.pkrvars.hcl"))
        raise SetupError(
            f"no target '{target}' (packer/targets/{target}.pkrvars.hcl)\n"
            f"what to do next: choose one of {', '.join(names)}, such as make up TARGET={names[0]}"
        )
    packer = {"inventory_dir": "inventories/bake", "docker_pull": True, "models_policy": "boot", "extra_vars_files": []}
    packer.update(read_pkrvars(target_file))
    packer.update(packer_overrides(packer_args, ROOT))
    inventory = ROOT / str(packer["inventory_dir"])
    if not inventory.is_dir():
        raise SetupError(
            f"the inventory_dir {packer['inventory_dir']} of target {target} does not exist\n"
            "what to do next: pass -var inventory_dir=<folder> in COMFYBAKE_PACKER_ARGS (copy inventories/bake)"
        )
    listed = packer.get("extra_vars_files") or []
    listed = listed if isinstance(listed, list) else [listed]
    extra_files = [Path(f) if Path(f).is_absolute() else ROOT / f for f in listed]
    missing = [display(f) for f in extra_files if not f.is_file()]
    if missing:
        raise SetupError(
            f"extra_vars_files not found: {', '.join(missing)}\nwhat to do next: fix -var extra_vars_files"
        )
    ca = packer.get("extra_ca_bundle") or ""
    if ca and not Path(ca).is_file():
        raise SetupError(
            f"extra_ca_bundle {ca} does not exist\nwhat to do next: point -var extra_ca_bundle at a PEM file"
        )
    bake_vars = {
        "comfyui_environments_default_torch_flavor": packer.get("torch_flavor", "cpu"),
        "comfyui_environments_python": packer.get("python", "/usr/bin/python3"),
        "comfyui_models_policy": packer.get("models_policy", "boot"),
        "comfyui_service_manager": "supervisor",
    }
    settings = ansible_settings(inventory, None, [bake_vars], extra_files)
    how = f"target {target} (packer/targets/{target}.pkrvars.hcl), inventory {display(inventory)}"
    plan = Plan(title=f"bake of {how}", settings=[settings], packer=packer)
    needs_env(plan, inventory, under_tests=display(inventory).startswith("tests/"))
    packages = system_packages(settings, packer.get("python_packages") or [])
    if offline is not None:
        plan.title += f", offline from {offline}"
        offline_checks(plan, offline, settings, packages)
        return plan
    image_checks(plan, str(packer["base_image"]), bool(packer.get("docker_pull", True)), packages, "bake")
    source_checks(plan, settings, {})
    return plan


def provision_plan(inventory: Path, base_image: str, mounts: dict[str, str]) -> Plan:
    if not inventory.is_dir():
        raise SetupError(
            f"no inventory folder {inventory}\nwhat to do next: INVENTORY=<folder>, such as inventories/local"
        )
    hosts = inventory_hosts(inventory)
    if not hosts:
        raise SetupError(f"{display(inventory)} has no host in the group comfybake (hosts.yml)")
    settings = [ansible_settings(inventory, host, [], []) for host in hosts]
    plan = Plan(title=f"converge of {display(inventory)} ({', '.join(hosts)})", settings=settings, packer={})
    needs_env(plan, inventory, under_tests=False)
    if base_image:
        packages = system_packages(settings[0], [])
        image_checks(plan, base_image, False, packages, "provision")
    for one in settings:
        source_checks(plan, one, mounts)
    return plan


def needs_env(plan: Plan, inventory: Path, under_tests: bool) -> None:
    files = [f for s in plan.settings for f in s.files if inventory in f.parents or f.suffix == ".json"]
    missing = unset_lookups(sorted(set(files)))
    if not missing:
        return
    lines = [f"the inventory {display(inventory)} reads environment variables that are not set:"]
    for name, path in missing.items():
        lines.append(f"  {name}  (read in {display(path)})")
    for path in sorted(set(missing.values())):
        comment = header_comment(path)
        if comment:
            lines.append(f"  what {display(path)} says:\n{comment}")
    lines.append("what to do next:")
    if under_tests:
        lines.append(
            "  - this target is the test suite's: `.venv/bin/pytest tests/packer` builds its fixtures and origin,"
            " sets those variables and bakes it"
        )
        lines.append(
            "  - to bake without the network from mirrors of your own: make up OFFLINE=<folder> (TARGET=cpu, "
            f"the default; {DOCS})"
        )
    else:
        lines.append(f"  - export {' and '.join(missing)}, or use another inventory")
    raise SetupError("\n".join(lines))


def system_packages(settings: Settings, python_packages: list[str]) -> list[str]:
    debian = load_yaml(ROOT / "roles/comfyui/vars/Debian.yml")
    packages = ["python3", *debian.get("_comfyui_system_packages", [])]
    if settings.get("comfyui_service_manager") == "supervisor":
        packages += debian.get("_comfyui_supervisor_packages", [])
    extra = settings.get("comfyui_extra_packages") or []
    return [p for p in [*packages, *python_packages, *([] if templated(extra) else extra)] if isinstance(p, str)]


# -- probes --------------------------------------------------------------------------------------


def ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    for bundle in (os.environ.get("COMFYBAKE_EXTRA_CA_BUNDLE"), PACKER_CA):
        if bundle and Path(bundle).is_file():
            context.load_verify_locations(bundle)
    return context


PACKER_CA = ""


def http_probe(url: str, ok_status: Callable[[int], bool] = lambda status: status < 500) -> Callable[[], str | None]:
    def probe() -> str | None:
        if not url.startswith(("http://", "https://")):
            return "not an http(s) URL"
        request = urllib.request.Request(url, method="GET", headers={"User-Agent": "comfybake-preflight"})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=ssl_context()) as answer:  # noqa: S310
                status = answer.status
        except urllib.error.HTTPError as error:
            status = error.code
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            text = str(reason)
            text = re.sub(r"^\[Errno -?\d+\] ", "", text)
            if "CERTIFICATE_VERIFY_FAILED" in text:
                return "TLS: certificate verify failed (a TLS-intercepting proxy? see below)"
            if "Name or service not known" in text or "name resolution" in text:
                return f"cannot resolve {urllib.parse.urlsplit(url).hostname} (DNS)"
            if isinstance(reason, TimeoutError) or "timed out" in text:
                return f"no answer within {HTTP_TIMEOUT:g} s"
            return text
        return None if ok_status(status) else f"HTTP {status}"

    return probe


def git_probe(url: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "LC_ALL": "C"}
        bundle = combined_ca_bundle()
        if bundle:
            env["GIT_SSL_CAINFO"] = bundle
        try:
            done = subprocess.run(
                ["git", "-c", "http.lowSpeedLimit=1", "-c", f"http.lowSpeedTime={int(GIT_TIMEOUT)}",
                 "ls-remote", "--quiet", url, "HEAD"],
                capture_output=True, text=True, timeout=GIT_TIMEOUT, env=env, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return f"no answer within {GIT_TIMEOUT:g} s"
        except FileNotFoundError:
            return "git is not installed (scripts/bootstrap.sh installs it)"
        if done.returncode == 0:
            return None
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1].removeprefix("fatal: ").strip() if lines else f"git ls-remote exited {done.returncode}"
        return re.sub(r"^unable to access '[^']*': ", "", last)

    return probe


_BUNDLE: list[str] = []


def combined_ca_bundle() -> str | None:
    """The system bundle plus the extra CA, for git (which takes one file)."""
    extra = [b for b in (os.environ.get("COMFYBAKE_EXTRA_CA_BUNDLE"), PACKER_CA) if b and Path(b).is_file()]
    if not extra:
        return None
    if not _BUNDLE:
        system = ssl.get_default_verify_paths().cafile
        parts = [Path(p).read_text() for p in [system, *extra] if p and Path(p).is_file()]
        handle = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)  # noqa: SIM115
        handle.write("\n".join(parts))
        handle.close()
        _BUNDLE.append(handle.name)
    return _BUNDLE[0]


def docker(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None


def image_present(image: str) -> bool:
    done = docker("image", "inspect", "--format", "{{.Id}}", image)
    return done is not None and done.returncode == 0


def registry_of(image: str) -> str:
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


def registry_mirrors() -> list[str]:
    done = docker("info", "--format", "{{json .RegistryConfig.Mirrors}}")
    if done is None or done.returncode != 0:
        return []
    try:
        return [m for m in json.loads(done.stdout or "null") or [] if isinstance(m, str)]
    except ValueError:
        return []


def image_contents(image: str, packages: list[str]) -> tuple[list[str], list[str]]:
    """The packages the local image lacks, and its apt sources' URLs (read with no network)."""
    script = (
        "dpkg-query --show --showformat='${Package} ${db:Status-Abbrev}\\n' \"$@\" 2>/dev/null; echo ---; "
        "cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null; true"
    )
    done = docker("run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "sh", image,
                  "-c", script, "sh", *packages)  # fmt: skip
    if done is None or done.returncode != 0:
        return packages, []
    installed_part, _, sources = done.stdout.partition("---")
    installed = {line.split()[0] for line in installed_part.splitlines() if line.strip().endswith(" ii")}
    urls = re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", sources, re.M)
    for line in re.findall(r"^URIs:\s*(.+)$", sources, re.M):
        urls += line.split()
    return [p for p in packages if p not in installed], list(dict.fromkeys(urls))


def image_checks(plan: Plan, image: str, pull: bool, packages: list[str], mode: str) -> None:
    present = image_present(image)
    short = image.split("/")[-1] if registry_of(image) == DOCKER_HUB else image
    if mode == "bake":
        setting = (
            f"Packer -var base_image=<your registry mirror>/{short}"
            f" (or `docker load` a saved copy and -var docker_pull=false); offline: <folder>/base-image.tar"
        )
    else:
        setting = "COMFYBAKE_BASE_IMAGE=<a local image>, or scripts/base-image.sh builds comfybake/test-base:bookworm"
    if present:
        plan.checks.append(Check("base image", f"{image} (present in Docker)", setting, lambda: None))
    elif not pull:
        reason = "not in Docker, and docker_pull is false" if mode == "bake" else "not in Docker"
        plan.checks.append(Check("base image", image, setting, lambda: reason))
    else:
        registry = registry_of(image)
        mirrors = registry_mirrors() if registry == DOCKER_HUB else []
        for url in [f"https://{registry}/v2/", *(m.rstrip("/") + "/v2/" for m in mirrors)]:
            # A registry answers /v2/ with 200 or 401 (a token is needed): either way it is there.
            plan.checks.append(Check("base image", f"{image} ({urllib.parse.urlsplit(url).netloc})", setting,
                                     http_probe(url, lambda s: s in (200, 401))))  # fmt: skip
    apt_checks(plan, image, present, packages, mode)


def apt_checks(plan: Plan, image: str, present: bool, packages: list[str], mode: str) -> None:
    """The apt archives of the base image, when it lacks packages the base role installs."""
    missing, sources = image_contents(image, packages) if present else (packages, [])
    if not missing:
        return
    if not sources:
        sources = next((urls for prefix, urls in KNOWN_APT.items() if image.startswith(prefix)), [])
        if image.startswith("nvidia/cuda"):
            sources = KNOWN_APT["ubuntu"] + sources
    apt_setting = (
        f"a base image whose apt sources point at a mirror you reach, or that already has {' '.join(missing)}"
        + (" (Packer -var base_image=...)" if mode == "bake" else " (COMFYBAKE_BASE_IMAGE=...)")
    )
    for url in sources:
        plan.checks.append(Check("apt archive", url, apt_setting, http_probe(url)))


def mirrored(url: str, mirrors: dict[str, str]) -> str:
    """The URL git fetches after `insteadOf` (the longest matching prefix wins)."""
    best = max((prefix for prefix in mirrors if url.startswith(prefix)), key=len, default=None)
    return url if best is None else mirrors[best] + url[len(best) :]


def owner_prefix(url: str) -> str:
    """https://github.com/comfyanonymous/ComfyUI.git -> https://github.com/comfyanonymous/"""
    parts = urllib.parse.urlsplit(url)
    owner = parts.path.strip("/").split("/")[0] if parts.path.strip("/").count("/") else ""
    return f"{parts.scheme}://{parts.netloc}/{owner + '/' if owner else ''}"


def environments(settings: Settings) -> dict[str, dict[str, Any]]:
    envs = settings.get("comfyui_environments") or {}
    if templated(envs) or not isinstance(envs, dict):
        return {}
    return {name: env for name, env in envs.items() if isinstance(env, dict)}


def repos_of(settings: Settings) -> list[tuple[str, str, str]]:
    """(environment, repo, version) of every ComfyUI and custom node."""
    found = []
    for name, env in environments(settings).items():
        found.append((name, str(env.get("comfyui_repo", "https://github.com/comfyanonymous/ComfyUI.git")),
                      str(env.get("comfyui_version", ""))))  # fmt: skip
        found += [(name, str(node.get("repo")), str(node.get("version", ""))) for node in env.get("custom_nodes") or []]
    return found


def torch_pins(settings: Settings) -> dict[str, tuple[str, list[str]]]:
    """Per environment: (torch index URL, torch packages), from its flavour or its own keys."""
    flavors = settings.get("comfyui_environments_torch_flavors") or {}
    default = settings.get("comfyui_environments_default_torch_flavor")
    pins = {}
    for name, env in environments(settings).items():
        flavor = flavors.get(env.get("torch_flavor", default)) or {}
        pins[name] = (
            str(env.get("torch_index_url", flavor.get("index_url", "")) or ""),
            list(env.get("torch_packages", flavor.get("packages", [])) or []),
        )
    return pins


def model_origins(settings: Settings) -> dict[str, str]:
    """Origin URL -> the setting that replaces it, for every model of the manifest."""
    models = settings.get("comfyui_models") or []
    if templated(models) or settings.get("comfyui_models_policy") == "none":
        return {}
    origins: dict[str, str] = {}
    mirrors = "comfyui_models_mirrors (a copy of the store, for entries with sha256)"
    for entry in models:
        url = str(entry.get("url", "")) if isinstance(entry, dict) else ""
        if url.startswith("hf://") or "huggingface.co/" in url:
            origins[str(settings.get("comfyui_models_hf_endpoint"))] = f"comfyui_models_hf_endpoint, or {mirrors}"
        elif url.startswith("civitai://"):
            origins[str(settings.get("comfyui_models_civitai_endpoint"))] = (
                f"comfyui_models_civitai_endpoint, or {mirrors}"
            )
        elif url.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(url)
            origins[f"{parts.scheme}://{parts.netloc}/"] = f"the entry's url, or {mirrors}"
    return {url: setting for url, setting in origins.items() if not templated(url)}


def on_this_machine(path: str, mounts: dict[str, str]) -> Path | None:
    """Where a path of the container (a file:// mirror, a wheelhouse) is on this machine, through the mounts."""
    path = path.removeprefix("file://")
    for dst, src in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if path == dst or path.startswith(dst.rstrip("/") + "/"):
            return Path(src + path[len(dst) :])
    return None


def source_checks(plan: Plan, settings: Settings, mounts: dict[str, str]) -> None:
    def offline(piece: str) -> str:  # a bake can also take a folder of mirrors
        return f"; offline: <folder>/{piece}" if plan.packer else ""

    mirrors = settings.get("comfyui_environments_git_mirrors") or {}
    mirrors = {} if templated(mirrors) else mirrors
    for _env, repo, _version in repos_of(settings):
        if templated(repo):
            continue
        url = mirrored(repo, mirrors)
        if templated(url):
            continue  # a mirror that only Ansible can resolve
        shown = repo if url == repo else f"{repo} -> {url}"
        local = on_this_machine(url, mounts) if url.startswith("file://") else None
        url = f"file://{local}" if local else url
        prefix = owner_prefix(repo)
        setting = f'comfyui_environments_git_mirrors: {{"{prefix}": "<your mirror>/"}}' + offline(
            f"git/{repo.split('://', 1)[-1]}"
        )
        plan.checks.append(Check("git remote", shown, setting, git_probe(url)))
    wheelhouse_src = settings.get("comfyui_environments_wheelhouse_src") or ""
    wheelhouse = settings.get("comfyui_environments_wheelhouse") or ""
    if wheelhouse_src and not templated(wheelhouse_src):
        path = Path(wheelhouse_src)
        plan.checks.append(Check("wheelhouse", wheelhouse_src, "comfyui_environments_wheelhouse_src",
                                 lambda: None if path.is_dir() else "no such folder on this machine"))  # fmt: skip
    local = on_this_machine(wheelhouse, mounts) if wheelhouse and not templated(wheelhouse) else None
    if local:
        plan.checks.append(Check("wheelhouse", f"{wheelhouse} ({local})", "comfyui_environments_wheelhouse and MOUNTS",
                                 lambda: None if local.is_dir() else "no such folder on this machine"))  # fmt: skip
    if wheelhouse_src or wheelhouse:
        return  # no index is used at all
    index = str(settings.get("comfyui_environments_index_url") or "")
    indexes: dict[str, str] = {}
    if index and not templated(index):
        indexes[index] = "comfyui_environments_index_url (a PyPI mirror)"
    for url in settings.get("comfyui_environments_extra_index_urls") or []:
        indexes.setdefault(str(url), "comfyui_environments_extra_index_urls")
    for env, (url, _packages) in torch_pins(settings).items():
        flavor = environments(settings)[env].get(
            "torch_flavor", settings.get("comfyui_environments_default_torch_flavor")
        )
        where = (
            f"environment {env}'s torch_index_url"
            if "torch_index_url" in environments(settings)[env]
            else f"comfyui_environments_torch_flavors.{flavor}.index_url (or environment {env}'s torch_index_url)"
        )
        if url and not templated(url):
            indexes.setdefault(url, where)
    for url, setting in indexes.items():
        # The project page of a package every build installs: an index answers it, even with 404.
        # Asked without the URL's credentials (an index that wants them answers 401: reachable),
        # and printed without them.
        page = REDACTION.without_credentials(url).rstrip("/") + ("/torch/" if "torch" in setting else "/uv/")
        setting += "; or a wheelhouse: comfyui_environments_wheelhouse_src" + offline("wheelhouse")
        plan.checks.append(Check("package index", REDACTION.redact(url), setting, http_probe(page)))
    for url, setting in model_origins(settings).items():
        plan.checks.append(Check("model origin", url, setting + offline("models"), http_probe(url)))


# -- offline: a folder of mirrors ----------------------------------------------------------------


def wheel_key(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheels_in(folder: Path, python: tuple[int, int] | None) -> dict[str, list[str]]:
    """Wheel versions by normalised name, only those the image's Python can install (when known)."""
    found: dict[str, list[str]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        parts = wheel.name.removesuffix(".whl").split("-")
        if len(parts) < 5:
            continue
        tags, abi = parts[-3].split("."), parts[-2]
        if python:
            major, minor = python
            fits = {f"py{major}", f"py{major}{minor}", f"cp{major}{minor}"}
            abi3 = abi == "abi3" and any(t.startswith(f"cp{major}") and int(t[3:] or 0) <= minor for t in tags)
            if not (fits & set(tags) or abi3):
                continue
        found.setdefault(wheel_key(parts[0]), []).append(parts[1])
    return found


def python_version(packer: dict[str, Any]) -> tuple[int, int] | None:
    """3.12 from /usr/bin/python3.12 (None for a bare python3)."""
    match = re.search(r"python(\d)\.(\d+)$", str(packer.get("python", "")))
    return (int(match.group(1)), int(match.group(2))) if match else None


def saved_image(tarball: Path) -> str | None:
    """The first tag of a `docker save` archive (its manifest.json)."""
    try:
        with tarfile.open(tarball) as archive:
            handle = archive.extractfile("manifest.json")
            manifest = json.loads(handle.read()) if handle else []
    except (OSError, KeyError, tarfile.TarError, ValueError):
        return None
    tags = [tag for item in manifest for tag in item.get("RepoTags") or []]
    return tags[0] if tags else None


@dataclass
class Offline:
    """What an offline bake hands Packer and Ansible, made by offline_checks."""

    base_image: str = ""
    load: str = ""
    ansible: dict[str, Any] = field(default_factory=dict)


OFFLINE = Offline()


def offline_checks(plan: Plan, folder: Path, settings: Settings, packages: list[str]) -> None:
    folder = folder.resolve()
    if not folder.is_dir():
        raise SetupError(f"the offline folder {folder} does not exist\nwhat to do next: build it as {DOCS} shows")
    image = str(plan.packer["base_image"])
    tarball = folder / "base-image.tar"
    if tarball.is_file():
        saved = saved_image(tarball)
        OFFLINE.base_image = saved or ""
        OFFLINE.load = "" if saved and image_present(saved) else str(tarball)
        plan.checks.append(Check("base image", f"{display(tarball)} ({saved or 'no tag'})",
                                 f"docker save {image} -o {tarball}",
                                 lambda: None if saved else "not a `docker save` archive with a tag"))  # fmt: skip
        if saved:
            apt_checks(plan, saved, image_present(saved), packages, "bake")
    else:
        OFFLINE.base_image = image
        present = image_present(image)
        source = f"{image} (in Docker)" if present else f"{display(tarball)} (missing)"
        fix = f"on a connected machine: docker pull {image} && docker save {image} -o {tarball}"
        why = None if present else "missing: no base-image.tar, and the image is not in Docker"
        plan.checks.append(Check("base image", source, fix, lambda: why))
        apt_checks(plan, image, present, packages, "bake")
    git_mirrors: dict[str, str] = {}
    requirements: list[tuple[Path, str]] = []
    for env, repo, version in repos_of(settings):
        if templated(repo):
            continue
        parts = urllib.parse.urlsplit(repo)
        relative = f"{parts.netloc}{parts.path}"
        mirror = folder / "git" / relative
        git_mirrors[f"{parts.scheme}://{parts.netloc}/"] = f"file://{OFFLINE_MOUNT}/git/{parts.netloc}/"
        plan.checks.append(Check("git mirror", f"git/{relative} ({env}: {version or 'HEAD'})",
                                 f"git clone --mirror {repo} {mirror}", git_mirror_probe(mirror, version)))  # fmt: skip
        requirements.append((mirror, version or "HEAD"))
    wheelhouse = folder / "wheelhouse"
    wants = [f"uv=={settings.get('comfyui_environments_uv_version')}"]
    for _index, pins in torch_pins(settings).values():
        wants += [pin for pin in pins if isinstance(pin, str) and not templated(pin)]
    indexes = {pin: index for index, pins in torch_pins(settings).values() for pin in pins if isinstance(pin, str)}
    python = python_version(plan.packer)
    for want in dict.fromkeys(wants):
        fix = wheelhouse_command(plan.packer, wheelhouse, want, indexes.get(want, ""))
        plan.checks.append(Check("wheelhouse", f"wheelhouse/ {want}", fix, wheel_probe(wheelhouse, want, python)))
    torch_index = next((index for index, _pins in torch_pins(settings).values() if index), "")
    for mirror, version in dict.fromkeys(requirements):
        listed = f"-r <(git --git-dir {mirror} show {version}:requirements.txt)"
        fix = wheelhouse_command(plan.packer, wheelhouse, listed, torch_index)
        plan.checks.append(Check("wheelhouse", f"wheelhouse/ requirements of {mirror.name} {version}", fix,
                                 requirements_probe(wheelhouse, mirror, version, python)))  # fmt: skip
    models = settings.get("comfyui_models") or []
    if models and not templated(models) and settings.get("comfyui_models_policy") != "none":
        for entry in models:
            dest = str(entry.get("dest", ""))
            path = folder / "models" / dest
            fetch = f"comfybake models fetch <manifest> --store {folder / 'models'}"
            plan.checks.append(Check("model", f"models/{dest}", fetch, model_probe(entry, path)))
        OFFLINE.ansible["comfyui_models_mirrors"] = [f"file://{OFFLINE_MOUNT}/models"]
    OFFLINE.ansible.update(
        comfyui_environments_git_mirrors=git_mirrors,
        comfyui_environments_wheelhouse=f"{OFFLINE_MOUNT}/wheelhouse",
        comfyui_environments_wheelhouse_src="",
    )


def git_mirror_probe(mirror: Path, version: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        if not mirror.is_dir():
            return "missing"
        rev = f"{version or 'HEAD'}^{{commit}}"
        done = subprocess.run(["git", "--git-dir", str(mirror), "rev-parse", "--verify", "--quiet", rev],
                              capture_output=True, text=True, check=False)  # fmt: skip
        return None if done.returncode == 0 else f"has no {version or 'HEAD'} (git -C {mirror} remote update)"

    return probe


def wheel_probe(folder: Path, want: str, python: tuple[int, int] | None) -> Callable[[], str | None]:
    name, _, version = want.partition("==")
    for_python = f" for Python {python[0]}.{python[1]}" if python else ""

    def probe() -> str | None:
        if not folder.is_dir():
            return "missing: no wheelhouse folder"
        versions = wheels_in(folder, python).get(wheel_key(name), [])
        if (version and version in versions) or (not version and versions):
            return None
        others = wheels_in(folder, None).get(wheel_key(name), [])
        return f"no {name} {version} wheel{for_python}" + (f" (only {', '.join(others)} for others)" if others else "")

    return probe


def requirements_probe(
    folder: Path, mirror: Path, version: str, python: tuple[int, int] | None
) -> Callable[[], str | None]:
    """Every package a repository's requirements.txt names has a wheel (versions are uv's to resolve)."""

    def probe() -> str | None:
        done = subprocess.run(["git", "--git-dir", str(mirror), "show", f"{version}:requirements.txt"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0 or not folder.is_dir():
            return None  # no mirror or no wheelhouse: their own rows say so; no requirements.txt: nothing needed
        names = []
        for line in done.stdout.splitlines():
            line = line.split("#", 1)[0].strip()
            match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line) if line and not line.startswith("-") else None
            if match and "://" not in line:
                names.append(match.group(0))
        have = wheels_in(folder, python)
        lacking = [name for name in names if wheel_key(name) not in have]
        return f"no wheel for {', '.join(lacking)}" if lacking else None

    return probe


def model_probe(entry: dict[str, Any], path: Path) -> Callable[[], str | None]:
    def probe() -> str | None:
        if not entry.get("sha256"):
            return "no sha256 in the manifest: a mirror serves only verified files (comfybake models lock)"
        if str(entry.get("dest", "")).endswith("/"):
            return "dest is a folder: give the file's exact dest path for an offline bake"
        return None if path.is_file() else "missing"

    return probe


def wheelhouse_command(packer: dict[str, Any], wheelhouse: Path, want: str, index: str) -> str:
    """pip download of one pin, run where the image's Python, OS and CPU architecture are (no --platform)."""
    python = Path(str(packer.get("python", "python3"))).name
    extra = f" --extra-index-url {REDACTION.redact(index)}" if index else ""
    download = f"{python} -m pip download --only-binary=:all: --dest {wheelhouse}"
    return f"on a connected Linux machine of the image's architecture: {download} {want}{extra}"


# -- running and printing ------------------------------------------------------------------------


def run_checks(checks: list[Check]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(checks)))) as pool:
        for check, problem in zip(checks, pool.map(lambda c: c.probe(), checks), strict=True):
            check.problem = problem


def table(rows: list[tuple[str, ...]], indent: str = "  ") -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(indent + "  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
                     for row in rows)  # fmt: skip


def report(plan: Plan, mode: str, offline: bool) -> int:
    print(f"preflight: {plan.title}")
    if not plan.checks:
        print("preflight: nothing external to check")
        return 0
    rows = [("KIND", "SOURCE", "STATUS")]
    rows += [(c.kind, c.source, "ok" if c.problem is None else c.problem) for c in plan.checks]
    print(table(rows))
    failed = [c for c in plan.checks if c.problem is not None]
    if not failed:
        print(f"preflight: all {len(plan.checks)} sources are {'in the folder' if offline else 'reachable'}")
        return 0
    verb = "missing from the folder" if offline else "unreachable"
    print(f"\npreflight: {len(failed)} of {len(plan.checks)} sources are {verb}; what replaces each:")
    print(table([("SOURCE", "SETTING OR MIRROR THAT REPLACES IT")] + [(c.source, c.setting) for c in failed]))
    print("\nwhat to do next:")
    if offline:
        print("  - add each missing piece to the folder with the command above, then make up OFFLINE=<folder> again")
        print(f"  - how to build the whole folder on a connected machine: {DOCS}")
    elif mode == "bake":
        print("  - Packer variables (base_image, docker_pull): make up COMFYBAKE_PACKER_ARGS='-var base_image=...'")
        print("  - Ansible variables (comfyui_environments_*, comfyui_models_*): put them in a vars file and add")
        print("    -var 'extra_vars_files=[\"/path/mirrors.yml\"]' to COMFYBAKE_PACKER_ARGS (or copy inventories/bake,")
        print("    set them in its group_vars/comfybake.yml and pass -var inventory_dir=<your copy>)")
        print(f"  - or bake without the network from a folder of mirrors: make up OFFLINE=<folder> ({DOCS})")
    else:
        print("  - Ansible variables (comfyui_environments_*, comfyui_models_*): set them in the inventory's")
        print("    group_vars/comfybake.yml (a copy of inventories/local: make provision INVENTORY=<your copy>);")
        print("    mirrors on this machine reach the container with MOUNTS='/path/on/host:/path/in/container'")
    if any(c.problem and "certificate verify failed" in c.problem for c in failed):
        print("  - behind a TLS-intercepting proxy: COMFYBAKE_EXTRA_CA_BUNDLE=/path/to/proxy-ca.pem (and for a bake")
        print("    -var extra_ca_bundle=/path/to/proxy-ca.pem), then run this again")
    again = [display(Path(arg)) if arg.startswith(str(ROOT)) else arg for arg in sys.argv[1:]]
    print("  - then check again in seconds: " + shlex.join([display(Path(sys.argv[0]).resolve()), *again]))
    return 1


def write_offline(out: Path, plan: Plan, folder: Path) -> None:
    """The Packer arguments (one a line), Ansible variables and image to load of an offline bake."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "vars.json").write_text(json.dumps(OFFLINE.ansible, indent=2) + "\n")
    models = "bake" if OFFLINE.ansible.get("comfyui_models_mirrors") else str(plan.packer.get("models_policy", "boot"))
    volumes = {**(plan.packer.get("docker_volumes") or {}), str(folder.resolve()): OFFLINE_MOUNT}
    extra = [*(plan.packer.get("extra_vars_files") or []), str((out / "vars.json").resolve())]
    args = [
        f"-var=base_image={OFFLINE.base_image}",
        "-var=docker_pull=false",
        f"-var=docker_volumes={json.dumps(volumes)}",
        f"-var=extra_vars_files={json.dumps(extra)}",
        f"-var=models_policy={models}",
    ]
    (out / "packer.args").write_text("\n".join(args) + "\n")
    (out / "load").write_text(OFFLINE.load + "\n" if OFFLINE.load else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--target", help="a bake target: packer/targets/<target>.pkrvars.hcl")
    what.add_argument("--inventory", type=Path, help="an inventory folder to converge (make provision)")
    parser.add_argument("--packer-args", default=os.environ.get("COMFYBAKE_PACKER_ARGS", ""),
                        help="more Packer arguments (default: COMFYBAKE_PACKER_ARGS)")  # fmt: skip
    parser.add_argument("--offline", type=Path, help="a folder of mirrors that replaces the network")
    parser.add_argument("--out", type=Path, help="with --offline: write packer.args, vars.json and load here")
    parser.add_argument("--base-image", default="", help="with --inventory: the image the container starts from")
    parser.add_argument("--mounts", default="", help="with --inventory: 'src:dst[:ro] ...' mounted into the container")
    args = parser.parse_args(argv)
    global PACKER_CA
    try:
        if args.target:
            plan = bake_plan(args.target, args.packer_args, args.offline)
            PACKER_CA = str(plan.packer.get("extra_ca_bundle") or "")
        else:
            if args.offline:
                raise SetupError(
                    "--offline is for bakes (make up OFFLINE=<folder>); a converge takes mirrors in its inventory"
                )
            mounts = {dst: src for src, dst, *_ in (m.split(":") for m in args.mounts.split() if m.count(":") >= 1)}
            plan = provision_plan(args.inventory.resolve(), args.base_image, mounts)
    except SetupError as error:
        print(f"preflight: {error}", file=sys.stderr)
        return 2
    run_checks(plan.checks)
    status = report(plan, "bake" if args.target else "provision", args.offline is not None)
    if status == 0 and args.offline and args.out:
        write_offline(args.out, plan, args.offline)
    return status


if __name__ == "__main__":
    sys.exit(main())
