"""What comfybake's own commands tell their operator on stderr: plain lines, or JSON lines.

`text` (the default) leaves every message as it is. `json` (`--log-format json`, or
`COMFYBAKE_LOG_FORMAT=json` for units that run the command) turns each line written to stderr
into one JSON object: `time` (UTC, ISO 8601), `level` (`info`, `warning`, `error`), `component`
(the command: `models`, `exporter`, ...), `host` (this machine's name), `message`, and, where the
message concerns one of them, `instance`, `environment` or `entry`. A command names these with
`emit`; a line printed any other way (argparse's usage errors included) still becomes an object,
its level read from an `error:` or `warning:` prefix. Every message and field goes through the
redaction all of comfybake shares, so a URL's credentials or a token-shaped value never reaches a
journal; so does an error no command expected (one object with its `traceback`). What a command
asks for on standard output (tables, `--json` reports, a password shown once) stays there; the
reports of commands that units run (models fetch's summary, the keeper's, instances retry's and
clean's) move to stderr as objects in JSON mode (`say`), since the journal reads that stream.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from comfybake.engine.redaction import redact, redact_data, secret_name

ENVIRONMENT = "COMFYBAKE_LOG_FORMAT"
FORMATS = ("text", "json")
LEVELS = ("info", "warning", "error")
# `error: ...`, `warning: ...`, also after the command's own prefix (`comfybake instances: error: ...`).
_LEVEL_PREFIX = re.compile(r"^(?:comfybake[\w ]*: )?(error|warning):", re.IGNORECASE)


class LogFormatError(ValueError):
    """A log format that is neither `text` nor `json`."""


def format_from(value: str | None, source: str) -> str:
    """The log format `value` names (`text` when empty); `source` names where it came from."""
    chosen = (value or "text").strip().lower()
    if chosen not in FORMATS:
        raise LogFormatError(f"{source} {value!r} is not a log format: use one of {', '.join(FORMATS)}")
    return chosen


def record(message: str, component: str, level: str = "", **fields: Any) -> dict[str, Any]:
    """One log object: the common fields, `message`, then the non-empty `fields`; all redacted."""
    matched = _LEVEL_PREFIX.match(message)
    level = level or (matched.group(1).lower() if matched else "info")
    if message.lower().startswith(f"{level}: "):  # the level is a field now
        message = message[len(level) + 2 :]
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - hosts run the CLI on Python 3.10
    found: dict[str, Any] = {
        "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level,
        "component": component,
        "host": socket.gethostname(),
        "message": redact(message),
    }
    for key, value in fields.items():
        if value not in (None, ""):
            found[key] = redact_data(value, secret=secret_name(key))
    return found


class JsonLines(io.TextIOBase):
    """A text stream that writes each complete line given to it as one JSON object on `stream`.

    A carriage return starts the line over (a progress bar's redraw keeps only its last state);
    blank lines are dropped. Never a terminal, so progress bars print a line per file."""

    def __init__(self, stream: TextIO, component: str) -> None:
        super().__init__()
        self.stream = stream
        self.component = component
        self.pending = ""
        self.lock = threading.RLock()  # the fetch's worker threads warn at once

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self.line(line)
        return len(text)

    def line(self, text: str, level: str = "", **fields: Any) -> None:
        text = text.rpartition("\r")[2].replace("\033[K", "").strip()
        if text:
            encoded = json.dumps(record(text, self.component, level, **fields), ensure_ascii=False) + "\n"
            with self.lock:
                self.stream.write(encoded)
                self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:  # never close the process's stderr
        if self.pending:
            self.line(self.pending)
            self.pending = ""
        self.flush()


def emit(message: str, level: str = "", **fields: Any) -> None:
    """Write `message` on stderr: as it is in text mode, as one object with `fields` (`instance`,
    `environment`, `entry`, ...) in JSON mode."""
    stream = sys.stderr
    if isinstance(stream, JsonLines):
        with stream.lock:
            stream.write(stream.pending and "\n")  # a half-written line first, on its own
            stream.line(message, level, **fields)
    else:
        print(message, file=stream, flush=True)


def say(message: str, level: str = "", **fields: Any) -> None:
    """What a long-running command reports as it goes (the keeper): a line on stdout in text mode,
    as it always was, an object on stderr in JSON mode."""
    if json_mode():
        emit(message, level, **fields)
    else:
        print(message, flush=True)


def json_mode() -> bool:
    return isinstance(sys.stderr, JsonLines)


def early_format(argv: Sequence[str]) -> str:
    """The format `--log-format` (before the command's name) or COMFYBAKE_LOG_FORMAT gives, before
    the parser runs, so that its own usage errors come out in that format; `text` if unreadable."""
    value = os.environ.get(ENVIRONMENT)
    for index, arg in enumerate(argv):
        if not arg.startswith("-"):
            break
        if arg == "--log-format" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--log-format="):
            value = arg.partition("=")[2]
    try:
        return format_from(value, "--log-format")
    except LogFormatError:
        return "text"


def command_of(argv: Sequence[str]) -> str:
    """The command's name in `argv` (the first word that is neither an option nor its value)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--log-format":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return "cli"


def install(log_format: str, component: str) -> None:
    """Route stderr through JSON lines in JSON mode (the component named), back to plain in text mode."""
    plain = sys.stderr.stream if isinstance(sys.stderr, JsonLines) else sys.stderr
    sys.stderr = JsonLines(plain, component) if log_format == "json" else plain
