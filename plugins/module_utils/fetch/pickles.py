# PRIVATE to comfybake: not a public API; it may change without notice.
"""Pickle-based model files: which files are pickles, the policy, and the scan.

Loading a pickle (torch.load of a .ckpt, .pt, .pth, a pickle .bin or .pkl) can run any code the
file names, so such files are refused unless the entry or the run allows them, and an allowed
one is scanned with picklescan (the pinned PICKLESCAN) before it is moved into place. Nothing
here ever unpickles: the checks read opcodes (pickletools) and zip directories only.

Where the scanner comes from: the test venv and a controller that installs it import it; the
host's `comfybake` command carries it inside its zipapp (scripts/build-cli.py), so the module,
when it cannot import picklescan, runs `comfybake models scan --json`. Without either the
file fails, named, and is never installed unscanned.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import os
import pickletools
import stat
import subprocess
import warnings
import zipfile
from dataclasses import dataclass, field

from .errors import PickleError
from .options import how_to_set

PICKLESCAN_VERSION = "1.0.5"  # the one pin: scripts/build-cli.py reads it; tests check pyproject.toml agrees
PICKLESCAN = f"picklescan=={PICKLESCAN_VERSION}"
# Globals that picklescan 1.0.5 rates only "suspicious" but that common checkpoints need and that
# run no code of the file's choosing. Any other global not on picklescan's safe list fails the
# entry (fail closed): several code-running gadgets are only "suspicious" to picklescan.
# docs/models.md lists them; keep this short.
ALLOWED_GLOBALS = {
    "torch._utils": ("_rebuild_parameter",),  # an nn.Parameter around a tensor
    "torch": ("Size", "device"),  # a shape tuple; a device name
    "numpy.core.multiarray": ("scalar",),  # a numpy scalar from its bytes
    "numpy._core.multiarray": ("scalar",),
    "_codecs": ("encode",),  # the bytes of a numpy scalar, as pickle protocol 2 writes them
    "pytorch_lightning.callbacks.model_checkpoint": ("ModelCheckpoint",),  # Lightning's callback state
}
# Refused by name: formats that are pickles (or PyTorch zips of pickles) by definition. `.bin` is
# not here: it names pickles (pytorch_model.bin) and raw weights alike, so its bytes decide.
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".pkl", ".pickle")
HOST_COMMAND = "/usr/local/bin/comfybake"  # where the comfyui role installs the command (tests may set this)
SNIFF = 1 << 20  # the bytes read to tell a pickle stream from other data
# genops decodes the string arguments of whatever bytes it is given and warns about their escapes.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="pickletools")
SCAN_TIMEOUT = 3600.0  # seconds for the host command to scan one (large) file


@dataclass
class Findings:
    """What the scanner found: imports as `module name`, as picklescan prints them."""

    dangerous: list[str] = field(default_factory=list)
    suspicious: list[str] = field(default_factory=list)
    error: str | None = None  # the scanner could not parse all of it

    def as_dict(self) -> dict[str, object]:
        return {"dangerous": self.dangerous, "suspicious": self.suspicious, "error": self.error}


def kind_by_name(name: str) -> str | None:
    """Why a file named `name` is pickle-based by its name alone, or None."""
    if not name.lower().endswith(PICKLE_EXTENSIONS):
        return None
    return f"a pickle-based format ({os.path.splitext(name)[1]})"


def pickle_kind(path: str, name: str) -> str | None:
    """Why the file at `path` (installed as `name`) is pickle-based, or None when it is not.

    Fail closed: a zip that cannot be read and a tar (torch's legacy format) count as pickle-based.
    """
    by_name = kind_by_name(name)
    if by_name:
        return by_name
    with open(path, "rb") as handle:
        head = handle.read(SNIFF)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                members = [member for member in archive.namelist() if member.lower().endswith((".pkl", ".pickle"))]
        except (zipfile.BadZipFile, OSError, ValueError):
            return "a zip that cannot be read (it may hold pickles)"
        return f"a PyTorch zip of pickles ({members[0]})" if members else None
    if head[257:262] == b"ustar":
        return "a tar archive (PyTorch's legacy format holds pickles)"
    return "a pickle stream" if _is_pickle_stream(head) else None


def _is_pickle_stream(head: bytes) -> bool:
    """Opcodes that parse from the first byte and keep the unpickler's stack valid: a PROTO
    (torch.save's protocol 2 to 5) followed by valid opcodes, or protocol 0/1 opcodes that reach
    STOP or many valid ones. Running out of the sniffed head while they still parse (a huge first
    argument) counts as a pickle: fail closed."""
    proto = len(head) >= 2 and head[0] == 0x80 and head[1] in range(2, 6)
    stream = io.BytesIO(head)
    count = 0
    stack: list[bool] = []  # True for a MARK
    try:
        for opcode, _arg, _pos in pickletools.genops(stream):
            if not _stack_effect(opcode, stack):
                return False  # pops what is not there: not a pickle
            count += 1
            if opcode.name == "STOP":
                return proto or count >= 4
            if count >= 16:
                return True
    except ValueError:  # an unknown opcode or a bad argument, or the head ends inside an argument
        truncated = stream.tell() >= len(head)
        return truncated and (proto or count >= 4)
    return False  # pragma: no cover - genops ends with STOP or raises


def _stack_effect(opcode: pickletools.OpcodeInfo, stack: list[bool]) -> bool:
    """Apply `opcode` to a stack of markers (True) and objects (False); False when it cannot run."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        if True not in stack:
            return False
        del stack[len(stack) - 1 - stack[::-1].index(True) :]  # the slice above the MARK, and the MARK
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    if len(stack) < below or any(stack[len(stack) - below :]):
        return False
    del stack[len(stack) - below :]
    stack.extend(item is pickletools.markobject for item in opcode.stack_after)
    return True


def refusal(name: str, kind: str) -> str:
    return (
        f"{name} is {kind}: loading it can run code; use a .safetensors file, or set allow_pickle: true on this "
        f"entry (or {how_to_set('allow_pickle')} for the run) to have it scanned and accepted"
    )


def check_file(path: str, name: str, allowed: bool, entry: str, command: bool = True) -> Findings | None:
    """Apply the policy to the file at `path` that will be installed as `name` (relative to the store).

    Not pickle-based: None. Pickle-based and not allowed, or found dangerous, or not scannable:
    PickleError naming the entry. Otherwise the scanner's findings (allowed imports only).
    """
    kind = pickle_kind(path, name)
    if kind is None:
        return None
    if not allowed:
        raise PickleError(refusal(name, kind), entry)
    findings = scan(path, name, command)
    if findings.dangerous:
        raise PickleError(
            f"picklescan found dangerous import(s) in {name}: {', '.join(findings.dangerous)}; loading it would run "
            "that code, so it was not installed; use a .safetensors file or a source you trust",
            entry,
        )
    unknown = [found for found in findings.suspicious if not allowed_global(found)]
    if unknown:
        raise PickleError(
            f"{name} imports {', '.join(unknown)}, not on picklescan's safe list nor comfybake's allow list "
            "(docs/models.md); loading it may run that code, so it was not installed; use a .safetensors file",
            entry,
        )
    if findings.error:
        raise PickleError(
            f"picklescan could not read all of {name} ({findings.error}), so it was not installed; "
            "use a .safetensors file",
            entry,
        )
    return findings


def allowed_global(found: str) -> bool:
    """Whether `module name`, which picklescan does not rate safe, is on ALLOWED_GLOBALS."""
    module, _space, name = found.partition(" ")
    return name in ALLOWED_GLOBALS.get(module, ())


def scanner_version() -> str | None:
    """The version of the picklescan this Python imports, or None when there is none."""
    try:
        return importlib.metadata.version("picklescan")
    except importlib.metadata.PackageNotFoundError:
        return None


def scan(path: str, name: str, command: bool = True) -> Findings:
    """Scan the file at `path` as `name` (its extension picks picklescan's reader)."""
    try:
        from picklescan import scanner  # pylint: disable=import-outside-toplevel
    except (ImportError, SyntaxError):
        if not command:
            raise PickleError(
                f"picklescan is not installed for this Python; install {PICKLESCAN} to scan {name}"
            ) from None
        return _scan_with_command(path, name)
    version = scanner_version()
    if version != PICKLESCAN_VERSION:  # another picklescan comes first on this Python
        if command:
            return _scan_with_command(path, name)
        raise PickleError(
            f"this Python imports picklescan {version or '(unknown version)'}, not the pinned {PICKLESCAN_VERSION}; "
            f"install {PICKLESCAN} for it (or run the comfybake command, which carries it) to scan {name}"
        )
    logging.getLogger("picklescan").setLevel(logging.CRITICAL)  # findings are reported here, once
    try:
        with open(path, "rb") as handle:
            result = scanner.scan_bytes(handle, name, os.path.splitext(name)[1].lower())
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the scanner leaves the file unscanned
        return Findings(error=f"{type(error).__name__}: {error}")
    found = {(g.module, g.name, g.safety.value) for g in result.globals}
    return Findings(
        dangerous=sorted(f"{module} {global_}" for module, global_, level in found if level == "dangerous"),
        suspicious=sorted(f"{module} {global_}" for module, global_, level in found if level == "suspicious"),
        error="parse error after its imports" if result.scan_err else None,
    )


def host_command() -> str | None:
    """HOST_COMMAND when it is a regular file owned by root (or by this user when not root) that
    no group or other user can write; never a `comfybake` found on PATH."""
    try:
        info = os.stat(HOST_COMMAND)
    except OSError:
        return None
    owners = {0, os.geteuid()}
    safe = stat.S_ISREG(info.st_mode) and info.st_uid in owners and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return HOST_COMMAND if safe and os.access(HOST_COMMAND, os.X_OK) else None


def _scan_with_command(path: str, name: str) -> Findings:
    """The host's `comfybake models scan`, whose zipapp carries picklescan."""
    program = host_command()
    if program is None:
        raise PickleError(
            f"no pickle scanner to check {name}: install {PICKLESCAN} for this Python, or the comfybake command "
            f"(the comfyui role installs {HOST_COMMAND}, owned by root and not group/world-writable); "
            "it was not installed unscanned"
        )
    argv = [program, "models", "scan", "--json", f"--as={name}", "--", path]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SCAN_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise _command_failed(program, name, str(error)) from None
    try:
        (report,) = json.loads(done.stdout)["results"]
        about = (report["path"], report["name"])
        findings = Findings(
            dangerous=list(report["dangerous"]), suspicious=list(report["suspicious"]), error=report["error"]
        )
    except (ValueError, KeyError, IndexError, TypeError):
        lines = done.stderr.strip().splitlines()
        raise _command_failed(program, name, lines[-1] if lines else f"exit status {done.returncode}") from None
    if about != (path, name):
        raise _command_failed(program, name, "a result about another file")
    return findings


def _command_failed(program: str, name: str, reason: str) -> PickleError:
    return PickleError(
        f"{program} models scan could not scan {name} ({reason}); it was not installed unscanned. "
        f"Update the comfybake command (the comfyui role installs it) or install {PICKLESCAN} for this Python"
    )
