"""The `comfybake` command. Subcommands register themselves in `SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from comfybake import __version__, logs
from comfybake.engine.redaction import redact

# name -> (help, function that adds the subcommand's arguments and sets `func`)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


# Modules that add subcommands; imported when the parser is built (they import this module).
COMMAND_MODULES = (
    "comfybake.environments",
    "comfybake.exporter",
    "comfybake.gateway",
    "comfybake.instances",
    "comfybake.jobs.cli",
    "comfybake.models",
)


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="comfybake",
        description="Bake and provision GPU machines that serve ComfyUI.",
        epilog="Playbooks, roles and Packer templates live in the repository; see its README.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-format",
        type=str.lower,  # JSON as COMFYBAKE_LOG_FORMAT accepts it
        choices=logs.FORMATS,
        help=f"messages on stderr as plain lines (text) or one JSON object a line (json); default "
        f"${logs.ENVIRONMENT}, else text",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure) in sorted(SUBCOMMANDS.items()):
        configure(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    plain = sys.stderr
    logs.install(logs.early_format(argv), logs.command_of(argv))  # the parser's own errors too
    try:
        return _run(argv)
    except Exception as error:  # noqa: BLE001 - any error a command did not expect, reported once
        # Redacted like every message (an exception's text may hold a URL with credentials): in
        # JSON mode one object, not a plain multi-line traceback printed after stderr is restored.
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        if logs.json_mode():
            logs.emit(f"{type(error).__name__}: {error}", "error", traceback=trace)
        else:
            print(redact(trace), end="", file=sys.stderr, flush=True)
        return 1
    finally:
        if isinstance(sys.stderr, logs.JsonLines):
            sys.stderr.close()  # a last line without its newline
        sys.stderr = plain


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        log_format = args.log_format or logs.format_from(os.environ.get(logs.ENVIRONMENT), logs.ENVIRONMENT)
    except logs.LogFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logs.install(log_format, args.command or "cli")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
