"""ComfyUI test double: a stdlib-only stand-in for ComfyUI's `main.py`, for tests only.

It follows the contract comfybake relies on (see README.md beside this file): ComfyUI's
command-line flags (unknown flags are an argparse error), its start-up order, its folders
and `extra_model_paths.yaml` handling, its custom-node import and failure logging, its
database location and failure line, the HTTP endpoints readiness and status use, and the job
routes (POST /prompt, /ws messages, /history, /queue, /interrupt, /upload/image, /view) in ComfyUI's
wire format. Its one flag of its own, `--test-double-strict`, adds the validation ComfyUI does that
older tests' small graphs would fail (execution.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sqlite3
import sys
import threading

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)

import comfyui_version  # noqa: E402
import files  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
import server  # noqa: E402
from utils import extra_config  # noqa: E402


def existing_directory(path: str) -> str:
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"The path '{path}' does not exist.")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{path}' is not a directory.")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"You do not have read permissions for '{path}'.")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    # Network and paths: the flags comfybake sets for every instance.
    p.add_argument("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?", const="0.0.0.0,::")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--tls-keyfile", type=str)
    p.add_argument("--tls-certfile", type=str)
    p.add_argument("--enable-cors-header", type=str, default=None, metavar="ORIGIN", nargs="?", const="*")
    p.add_argument("--max-upload-size", type=float, default=100)
    p.add_argument("--base-directory", type=str, default=None)
    p.add_argument("--extra-model-paths-config", type=str, default=None, metavar="PATH", nargs="+", action="append")
    p.add_argument("--output-directory", type=str, default=None)
    p.add_argument("--temp-directory", type=str, default=None)
    p.add_argument("--input-directory", type=str, default=None)
    p.add_argument("--user-directory", type=existing_directory, default=None)
    p.add_argument("--database-url", type=str, default=None)
    p.add_argument("--front-end-version", type=str, default="comfyanonymous/ComfyUI@latest")
    p.add_argument("--front-end-root", type=existing_directory, default=None)
    # Devices and memory: accepted and reported, never acted on (there is no GPU here).
    p.add_argument("--cuda-device", type=int, default=None, metavar="DEVICE_ID")
    p.add_argument("--reserve-vram", type=float, default=None)
    p.add_argument("--disable-smart-memory", action="store_true")
    p.add_argument("--disable-xformers", action="store_true")
    p.add_argument("--use-pytorch-cross-attention", action="store_true")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--preview-method", type=str, default="none", choices=["none", "auto", "latent2rgb", "taesd"])
    vram = p.add_mutually_exclusive_group()
    for flag in ("--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram", "--cpu"):
        vram.add_argument(flag, action="store_true")
    # Service hygiene and start-up behaviour.
    p.add_argument("--auto-launch", action="store_true")
    p.add_argument("--disable-auto-launch", action="store_true")
    p.add_argument("--dont-print-server", action="store_true")
    p.add_argument("--quick-test-for-ci", action="store_true")
    p.add_argument("--disable-metadata", action="store_true")
    p.add_argument("--disable-all-custom-nodes", action="store_true")
    p.add_argument("--disable-api-nodes", action="store_true")
    p.add_argument("--multi-user", action="store_true")
    p.add_argument("--enable-manager", action="store_true")
    p.add_argument("--enable-compress-response-body", action="store_true")
    p.add_argument(
        "--verbose", default="INFO", const="DEBUG", nargs="?", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    )
    p.add_argument("--log-stdout", action="store_true")
    # The double's own: ComfyUI's checks that older tests' small graphs would fail (execution.py).
    p.add_argument("--test-double-strict", action="store_true")
    return p


def apply_custom_paths(args: argparse.Namespace) -> None:
    if args.base_directory:
        folder_paths.set_base_directory(args.base_directory)
    default_config = os.path.join(HERE, "extra_model_paths.yaml")
    if os.path.isfile(default_config):
        extra_config.load_extra_path_config(default_config)
    for config_path in [path for group in args.extra_model_paths_config or [] for path in group]:
        extra_config.load_extra_path_config(config_path)
    if args.output_directory:
        folder_paths.set_output_directory(os.path.abspath(args.output_directory))
        logging.info("Setting output directory to: %s", folder_paths.get_output_directory())
    if args.input_directory:
        folder_paths.set_input_directory(os.path.abspath(args.input_directory))
        logging.info("Setting input directory to: %s", folder_paths.get_input_directory())
    if args.user_directory:
        folder_paths.set_user_directory(os.path.abspath(args.user_directory))
        logging.info("Setting user directory to: %s", folder_paths.get_user_directory())


def cleanup_temp() -> None:
    shutil.rmtree(folder_paths.get_temp_directory(), ignore_errors=True)


def setup_database(url: str | None) -> None:
    """Open the database where ComfyUI would; log ComfyUI's line when it cannot."""
    if url is None:
        url = "sqlite:///" + os.path.join(HERE, "user", "comfyui.db")
    try:
        if not url.startswith("sqlite:///"):
            raise ValueError(f"unsupported database URL {url!r} (the double speaks sqlite only)")
        path = url[len("sqlite:///") :]
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE IF NOT EXISTS comfybake_double (started REAL)")
            db.execute("INSERT INTO comfybake_double VALUES (julianday('now'))")
        logging.info("Database: %s", path)
    except Exception as exc:  # noqa: BLE001 - ComfyUI logs this and serves anyway
        if "database is locked" in str(exc):
            logging.error("Database is locked. Another ComfyUI process is already using this database.")
            sys.exit(1)
        logging.error(
            "Failed to initialize database. Please ensure you have installed the latest requirements. "
            "If the error persists, please report this as in future the database will be required: %s",
            exc,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.verbose),
        format="%(message)s",
        stream=sys.stdout if args.log_stdout else sys.stderr,
    )
    logging.info("ComfyUI version: %s (test double)", comfyui_version.__version__)
    if args.cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.cuda_device)
        logging.info("Set cuda device to: %s", args.cuda_device)

    apply_custom_paths(args)
    if not args.disable_all_custom_nodes:
        nodes.run_prestartup_scripts()
    for device in server.devices(args.cpu):
        logging.info("Device: %s", device["name"])

    if args.temp_directory:
        folder_paths.set_temp_directory(os.path.join(os.path.abspath(args.temp_directory), "temp"))
        logging.info("Setting temp directory to: %s", folder_paths.get_temp_directory())
    cleanup_temp()

    nodes.init_extra_nodes(init_custom_nodes=not args.disable_all_custom_nodes)
    try:
        os.makedirs(folder_paths.get_user_directory(), exist_ok=True)
    except OSError as exc:
        logging.warning("Cannot create user directory %s: %s", folder_paths.get_user_directory(), exc)
    setup_database(args.database_url)
    if args.quick_test_for_ci:
        return 0

    os.makedirs(folder_paths.get_temp_directory(), exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logging.info("Starting server\n")
    try:
        files.DISABLE_METADATA = args.disable_metadata
        addresses = [a for a in args.listen.split(",") if a]
        server.serve(addresses, args.port, args.cpu, stop, args.test_double_strict, args.max_upload_size)
    finally:
        logging.info("\nStopped server")
        cleanup_temp()
    return 0


if __name__ == "__main__":
    sys.exit(main())
