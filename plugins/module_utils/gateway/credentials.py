# Copyright: comfybake contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The gateway's users and API keys (principals), and their file `credentials.json`.

Private to comfybake: the `comfybake.core.gateway` module and the `comfybake gateway` CLI share it.
A principal is a user (a password, HTTP Basic for browsers) or an API key (a token, sent as
`Authorization: Bearer <token>`, as the `token` query value of a WebSocket upgrade, or as Basic
credentials). Both are stored only as bcrypt hashes: a key's token is `base64(name + ":" +
secret)`, and only the secret's hash is kept, so the token is shown once, when it is made.

The file is root's and no other account's (0600): it holds no plaintext, but a bcrypt hash is
still something to guess passwords against offline. It is written atomically (a temporary file
in the same folder, then a rename), and a file that another account could read or write, or a
symbolic link in its place, is refused rather than trusted.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import files
from .errors import GatewayError

try:
    import bcrypt

    HAS_BCRYPT = True
    BCRYPT_IMPORT_ERROR: ImportError | None = None
except ImportError as _error:  # pragma: no cover - reported when a hash is needed
    HAS_BCRYPT = False
    BCRYPT_IMPORT_ERROR = _error

FORMAT = 1
KINDS = ("user", "key")
SOURCES = ("inventory", "cli")
ALL = "*"
METRICS = "metrics"  # the exporter's route (routes.METRICS): Prometheus' principal, nothing else
JOBS = "jobs"  # the job API's route (routes.JOBS): submit, follow and cancel jobs, nothing else
CONTROL = "control"  # the control API's route (routes.CONTROL): start and stop instances, drain the job API
# Scopes that are the name of one service route, and reach that route only.
SERVICE_SCOPES = (METRICS, JOBS, CONTROL)
# Users and keys share one name space; a name is also the Basic user name, so no ':' in it.
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
NAME_RULE = "1 to 32 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or a digit"
# As the instance layout names them (plugins/filter/instances.py: NAME and ENVIRONMENT).
INSTANCE = re.compile(r"[a-z0-9][a-z0-9-]{0,22}")
ENVIRONMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SCOPE_RULE = (
    "'*' (every route), 'instance:<name>', 'environment:<name>', 'metrics' (the exporter's route), 'jobs'"
    " (the job API's) or 'control' (the control API's)"
)
# What bcrypt writes: $2b$<cost>$<22 characters of salt><31 of digest>.
HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
# bcrypt reads at most 72 bytes of a password; bcrypt 5 refuses more, older ones ignore the rest.
MAX_SECRET_BYTES = 72
SECRET_CHARACTERS = string.ascii_letters + string.digits
SECRET_LENGTH = 40  # about 238 bits
MIN_PASSWORD_LENGTH = 12
ROUNDS = 12  # bcrypt's cost; the gateway caches a verified hash (http_basic hash_cache)


@dataclass
class Principal:
    """One user or API key, as credentials.json stores it (never any plaintext)."""

    name: str
    kind: str  # "user" or "key"
    hash: str  # bcrypt, of the password (user) or of the key's secret (key)
    scope: list[str] = field(default_factory=list)
    source: str = "cli"  # "inventory" (comfyui_gateway_users/keys) or "cli" (comfybake gateway)
    created: str = ""  # ISO 8601, UTC

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "hash": self.hash,
            "scope": list(self.scope),
            "source": self.source,
            "created": self.created,
        }


def now() -> str:
    """The current time as credentials.json records `created`: ISO 8601, UTC, seconds."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- checks


def check_name(name: Any) -> str:
    """The name if it is a valid user or key name; GatewayError naming it otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise GatewayError(f"user or key name {name!r} is invalid: use {NAME_RULE}")
    return name


def check_scope(scope: Any) -> list[str]:
    """A scope (one entry or several) as a sorted list without duplicates; `*` alone covers all.

    GatewayError names the entry at fault, or says that a scope is needed.
    """
    entries = [scope] if isinstance(scope, str) else list(scope or [])
    checked = set()
    for entry in entries:
        kind, _colon, name = entry.partition(":") if isinstance(entry, str) else ("", "", "")
        pattern = {"instance": INSTANCE, "environment": ENVIRONMENT}.get(kind)
        if entry != ALL and entry not in SERVICE_SCOPES and (pattern is None or not pattern.fullmatch(name)):
            raise GatewayError(f"scope {entry!r} is invalid: use {SCOPE_RULE}")
        checked.add(entry)
    if not checked:
        raise GatewayError(f"no scope given: give one or more of {SCOPE_RULE}")
    return [ALL] if ALL in checked else sorted(checked)


def covers(principal: Principal, kind: str, name: str, environment: str | None = None) -> bool:
    """Whether the principal may use a route: kind "instance" (with the instance's environment),
    "environment", or a service route's ("metrics", "jobs", "control"). An environment scope covers
    that environment's route and each of its instances' routes; an instance scope only that
    instance's route; a service scope only its own route, which no other scope but `*` covers (a
    `jobs` key cannot stop instances, a `control` key cannot submit work)."""
    for entry in principal.scope:
        scope_kind, _colon, scope_name = entry.partition(":")
        if entry == ALL or (entry in SERVICE_SCOPES and kind == entry):
            return True
        if scope_kind == "instance" and kind == "instance" and scope_name == name:
            return True
        if scope_kind == "environment" and (
            (kind == "environment" and scope_name == name) or (kind == "instance" and scope_name == environment)
        ):
            return True
    return False


def check_principal(item: Any, where: str) -> Principal:
    """A principal from its JSON form; GatewayError naming `where` and the field at fault."""
    if not isinstance(item, dict):
        raise GatewayError(f"{where}: each principal must be an object with name, kind, hash and scope")
    unknown = set(item) - {"name", "kind", "hash", "scope", "source", "created"}
    if unknown:
        raise GatewayError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    try:
        name = check_name(item.get("name"))
        if item.get("kind") not in KINDS:
            raise GatewayError(f"kind {item.get('kind')!r} is neither 'user' nor 'key'")
        if not isinstance(item.get("hash"), str) or not HASH.fullmatch(item["hash"]):
            raise GatewayError("hash is not a bcrypt hash ($2b$...); never store a password or a key itself")
        source = item.get("source", "cli")
        if source not in SOURCES:
            raise GatewayError(f"source {source!r} is neither 'inventory' nor 'cli'")
        created = item.get("created", "")
        if not isinstance(created, str):
            raise GatewayError(f"created {created!r} is not an ISO 8601 time")
        return Principal(name, item["kind"], item["hash"], check_scope(item.get("scope")), source, created)
    except GatewayError as error:
        raise GatewayError(f"{where}: {error}") from None


def check_unique(principals: Sequence[Principal], where: str) -> None:
    seen: set[str] = set()
    for principal in principals:
        if principal.name in seen:
            raise GatewayError(f"{where}: the name {principal.name} is used twice (users and keys share names)")
        seen.add(principal.name)


# --------------------------------------------------------------------------- the file


def _refuse_unsafe(path: str, info: os.stat_result) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise GatewayError(
            f"{path} is a symbolic link: the credentials file must be a regular file; remove the link"
            " and converge the gateway again (or run `comfybake gateway users list` to see what is lost)"
        )
    if not stat.S_ISREG(info.st_mode):
        raise GatewayError(f"{path} is not a regular file: remove it and converge the gateway again")
    if info.st_uid != os.geteuid():
        raise GatewayError(
            f"{path} belongs to uid {info.st_uid}, not to this account (uid {os.geteuid()}): another account"
            f" could have written it; check it, then `chown root:root {path}` (run comfybake gateway as root)"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise GatewayError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: other accounts could read or change the"
            f" password and key hashes; `chmod 600 {path}`, and replace the passwords and keys if"
            " another account may have read them"
        )


def _read(path: str) -> bytes | None:
    """The file's bytes, None if it does not exist; GatewayError if it is unsafe to trust."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            _refuse_unsafe(path, os.lstat(path))
        raise GatewayError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as handle:
        _refuse_unsafe(path, os.fstat(handle.fileno()))
        return handle.read()


def load(path: str) -> list[Principal]:
    """The principals of credentials.json; [] if it does not exist. GatewayError if it is unsafe
    (a link, another account's, readable by others) or invalid."""
    raw = _read(path)
    if raw is None:
        return []
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise GatewayError(
            f"{path} is not valid JSON ({error}): restore it, or remove it and add the users again"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("principals"), list):
        raise GatewayError(
            f'{path} is not a credentials file of format {FORMAT} ({{"format": 1, "principals": [...]}})'
            ": restore it, or remove it and add the users again"
        )
    principals = [check_principal(item, f"{path}: principal {index}") for index, item in enumerate(data["principals"])]
    check_unique(principals, path)
    return principals


def dumps(principals: Sequence[Principal]) -> str:
    """credentials.json's text: principals sorted by name, so the same set gives the same bytes."""
    ordered = sorted(principals, key=lambda principal: principal.name)
    return json.dumps({"format": FORMAT, "principals": [item.as_dict() for item in ordered]}, indent=2) + "\n"


def save(path: str, principals: Sequence[Principal]) -> bool:
    """Write credentials.json atomically, mode 0600, owned by this account (root on a host); return
    whether it wrote. The folder must exist; a link or an unsafe file in the way is refused."""
    check_unique(principals, path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        _refuse_unsafe(path, info)
    return files.write(path, dumps(principals), 0o600)


@contextlib.contextmanager
def locked(folder: str) -> Iterator[None]:
    """One change of the gateway's credentials and configuration at a time (the module, the
    command line): an exclusive flock on the gateway's folder, released when the holder ends."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as error:
        raise GatewayError(f"cannot open the gateway's folder {folder}: {error.strerror}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- hashes and keys


def _bcrypt() -> Any:
    if not HAS_BCRYPT:
        raise GatewayError(
            f"the Python library bcrypt is missing ({BCRYPT_IMPORT_ERROR}): install it with"
            " `apt-get install python3-bcrypt` on Debian or Ubuntu, or `pip install bcrypt`"
        )
    return bcrypt


def _secret_bytes(plain: str, what: str) -> bytes:
    if not isinstance(plain, str) or not plain:
        raise GatewayError(f"the {what} is empty: give a non-empty one")
    data = plain.encode("utf-8")
    if len(data) > MAX_SECRET_BYTES:
        raise GatewayError(
            f"the {what} is {len(data)} bytes long: bcrypt reads at most {MAX_SECRET_BYTES}; choose a shorter one"
        )
    return data


def hash_secret(plain: str, rounds: int = ROUNDS) -> str:
    """The bcrypt hash ($2b$) of a password or a key's secret."""
    library = _bcrypt()
    hashed: bytes = library.hashpw(_secret_bytes(plain, "password"), library.gensalt(rounds))
    return hashed.decode("ascii")


def verify(plain: str, hashed: str) -> bool:
    """Whether the password or secret matches the hash; False for anything that cannot."""
    library = _bcrypt()
    try:
        data = _secret_bytes(plain, "password")
        return bool(library.checkpw(data, hashed.encode("ascii")))
    except (GatewayError, ValueError, UnicodeEncodeError, AttributeError):
        return False


def keep_or_hash(plain: str, previous: str | None) -> str:
    """The previous hash if the password still matches it, a new hash otherwise: a converge that
    hashes the same password again (a new salt each time) would change the file every run."""
    if previous and verify(plain, previous):
        return previous
    return hash_secret(plain)


def new_key(name: str) -> tuple[str, str]:
    """A new API key for `name`: (token, hash of its secret). The token is base64(name:secret) in
    the standard alphabet, drawn again until it has no '+', '/' or '=', so it passes unescaped
    in a URL's query; show it once and keep only the hash."""
    check_name(name)
    # name:secret a multiple of 3 bytes long: no '=' padding.
    length = SECRET_LENGTH + (-(len(name) + 1 + SECRET_LENGTH)) % 3
    while True:
        secret = "".join(secrets.choice(SECRET_CHARACTERS) for _position in range(length))
        token = base64.b64encode(f"{name}:{secret}".encode("ascii")).decode("ascii")
        if not any(character in token for character in "+/="):
            return token, hash_secret(secret)


def split_key(token: str) -> tuple[str, str]:
    """(name, secret) of a key's token; GatewayError if it is not one."""
    try:
        name, colon, secret = base64.b64decode(token.encode("ascii"), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeError, ValueError):
        raise GatewayError("the token is not an API key of this gateway (base64 of name:secret)") from None
    if not colon or not NAME.fullmatch(name) or not secret:
        raise GatewayError("the token is not an API key of this gateway (base64 of name:secret)")
    return name, secret


# --------------------------------------------------------------------------- inventory


def check_password(plain: str) -> str:
    """The password if it is long enough for a user; GatewayError saying how long it must be."""
    if not isinstance(plain, str) or len(plain) < MIN_PASSWORD_LENGTH:
        length = len(plain) if isinstance(plain, str) else 0
        raise GatewayError(f"the password is {length} characters long: use at least {MIN_PASSWORD_LENGTH}")
    _secret_bytes(plain, "password")
    return plain


def declared(users: Sequence[Any], keys: Sequence[Any], stored: Sequence[Principal]) -> list[Principal]:
    """The principals of the inventory (the module's `users` and `keys`: comfyui_gateway_users
    and comfyui_gateway_keys), hashed. A password or key that still matches its stored hash keeps
    that hash and its `created` (a new salt each run would change the file every converge); a key
    made on the host with `comfybake gateway keys create` and then declared is taken over as is."""
    previous = {principal.name: principal for principal in stored}
    found: list[Principal] = []
    entries = [("user", f"comfyui_gateway_users[{index}]", item) for index, item in enumerate(users)]
    entries += [("key", f"comfyui_gateway_keys[{index}]", item) for index, item in enumerate(keys)]
    for kind, where, item in entries:
        try:
            name = check_name(item.get("name"))
            scope = check_scope(item.get("scope"))
            before = previous.get(name)
            old_hash = before.hash if before is not None and before.kind == kind else None
            if kind == "key":
                key_name, secret = split_key(str(item.get("api_key") or ""))
                if key_name != name:
                    raise GatewayError(f"its key was made for {key_name!r}, not {name!r}: give the name the key names")
                hashed = keep_or_hash(secret, old_hash)
            elif item.get("password_hash"):
                hashed = str(item["password_hash"])
                if not HASH.fullmatch(hashed):
                    raise GatewayError("password_hash is not a bcrypt hash ($2b$...)")
            else:
                hashed = keep_or_hash(check_password(item.get("password")), old_hash)
        except GatewayError as error:
            raise GatewayError(f"{where} ({item.get('name')!r}): {error}") from None
        created = before.created if before is not None and hashed == old_hash else ""
        found.append(Principal(name, kind, hashed, scope, "inventory", created))
    return found


def merge_inventory(existing: Sequence[Principal], declared: Sequence[Principal]) -> list[Principal]:
    """The principals after a converge: the inventory's entries (comfyui_gateway_users and
    comfyui_gateway_keys) replaced by `declared`, the ones added with `comfybake gateway` kept.
    A declared name that the CLI added too is an error naming both; an inventory entry that keeps
    its name and kind keeps its `created`. A declared entry with the very hash of a host's one (the
    same key or password: `declared` kept its hash) takes it over."""
    check_unique(declared, "comfyui_gateway_users and comfyui_gateway_keys")
    by_name = {principal.name: principal for principal in existing}
    names = {principal.name for principal in declared}
    merged = [item for item in existing if item.source != "inventory" and item.name not in names]
    for principal in declared:
        previous = by_name.get(principal.name)
        taken_over = previous is not None and previous.kind == principal.kind and previous.hash == principal.hash
        if previous is not None and previous.source != "inventory" and not taken_over:
            remove = "users remove" if previous.kind == "user" else "keys revoke"
            raise GatewayError(
                f"the {principal.kind} {principal.name} of comfyui_gateway_{principal.kind}s is also a {previous.kind}"
                f" added with `comfybake gateway` on the host: rename one, or remove the host's one"
                f" (`comfybake gateway {remove} {principal.name}`)"
            )
        created = principal.created
        if not created:
            created = previous.created if previous is not None and previous.kind == principal.kind else now()
        merged.append(
            Principal(
                check_name(principal.name),
                principal.kind,
                principal.hash,
                check_scope(principal.scope),
                "inventory",
                created,
            )
        )
    return sorted(merged, key=lambda principal: principal.name)
